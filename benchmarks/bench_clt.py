"""CLT benchmark: training tokens/s of a cross-layer transcoder (one model forward per batch reads every layer:
the shared activation pass) vs per-layer transcoders trained separately (one interplab transcoder SAE per
layer, each streaming its own activations through `train_saes`: one pass over the model per layer), and the
per-layer transcoders trained jointly by `train_clt` (``cross_layer=False``: the shared pass alone).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_clt.py [--out benchmarks/results/clt.json] [--rounds 3]

One thread, random models (throughput does not depend on the weights), JumpReLU everywhere, float32, the same
activation rows per step; contenders interleaved in rounds (order rotating), medians of CPU time (the machine is
shared: CPU time is the fair measure). Tokens/s counts activation rows (each row holds every layer).

Not like-for-like, so two more measures: (1) FLOPs-normalised throughput: a cross-layer CLT has L(L+1)/2
decoders where per-layer transcoders have L, so it does more work per row; ``gflop_per_s`` divides the
transcoders' matmul FLOPs (3 x 2 x rows x d_model x d_sae per encoder and per decoder: forward and both
backward products; the model's forward not counted) by the CPU time. (2) Where the time goes: ``forward_s``
is the CPU time of streaming the activations alone (one `ActivationStream` over every layer's hooks, what the
CLT's shared pass costs, vs one stream per layer), ``step_ms`` the CPU time of one training step on cached
activations (no model), so ``cpu_seconds`` ~ forward + steps x step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interplab.model import ModelConfig, Transformer  # noqa: E402
from interplab.sae import SAEConfig, SAETrainConfig, create_sae, train_saes  # noqa: E402
from interplab.sae.activations import ActivationStream  # noqa: E402
from interplab.sae.clt import CLTConfig  # noqa: E402
from interplab.sae.clt_train import CLTTrainConfig, train_clt  # noqa: E402

D_MODEL, D_MLP, D_SAE, BATCH, SEQ = 128, 512, 1024, 1024, 128


def _model(n_layers: int) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=D_MODEL, n_layers=n_layers, n_heads=4, d_vocab=1024, n_ctx=SEQ, d_mlp=D_MLP)
    return Transformer(cfg).eval()


def _tokens(steps: int) -> torch.Tensor:
    n_seq = steps * BATCH // (SEQ - 1) + 40  # enough rows for the steps (BOS dropped) plus the buffer's tail
    return torch.randint(0, 1024, (n_seq, SEQ), generator=torch.Generator().manual_seed(1))


def run_clt(model: Transformer, toks: torch.Tensor, steps: int, cross_layer: bool) -> float:
    cfg = CLTTrainConfig(
        clt=CLTConfig(n_layers=model.cfg.n_layers, d_model=D_MODEL, d_sae=D_SAE, cross_layer=cross_layer),
        total_steps=steps,
        batch_size=BATCH,
        log_every=steps,
    )
    start = time.process_time()
    result = train_clt(model, toks, cfg)
    assert result.steps == steps, result.steps
    return time.process_time() - start


def flops_per_row(n_layers: int, cross_layer: bool) -> int:
    """Matmul FLOPs of one training row: encoders and decoders, forward and both backward products."""
    decoders = n_layers * (n_layers + 1) // 2 if cross_layer else n_layers
    return 3 * 2 * D_MODEL * D_SAE * (n_layers + decoders)


def run_forward(model: Transformer, toks: torch.Tensor, steps: int, shared: bool) -> float:
    """CPU seconds of streaming the rows of ``steps`` batches: all layers' hooks in one stream, or a stream
    per layer (what per-layer transcoders trained separately read)."""
    layers = range(model.cfg.n_layers)
    hooks = [[h for lay in layers for h in (f"blocks.{lay}.hook_resid_mid", f"blocks.{lay}.hook_mlp_out")]]
    if not shared:
        hooks = [[f"blocks.{lay}.hook_resid_mid", f"blocks.{lay}.hook_mlp_out"] for lay in layers]
    start = time.process_time()
    for hs in hooks:
        stream = ActivationStream(model, toks.split(16), hs, batch_size=BATCH, buffer_tokens=8 * BATCH)
        for i, _ in enumerate(stream):
            if i + 1 == steps:
                break
    return time.process_time() - start


def step_ms(n_layers: int, which: str, n: int = 5) -> float:
    """CPU milliseconds of one training step on cached random activations (no model forward)."""
    from interplab.sae.clt import CrossLayerTranscoder
    from interplab.sae.clt_train import _CLTTrainer
    from interplab.sae.train import _step, _Trainer

    g = torch.Generator().manual_seed(0)
    batch = {}
    for lay in range(n_layers):
        batch[f"blocks.{lay}.hook_resid_mid"] = torch.randn(BATCH, D_MODEL, generator=g)
        batch[f"blocks.{lay}.hook_mlp_out"] = torch.randn(BATCH, D_MODEL, generator=g)
    if which == "per_layer_separate":
        trainers = []
        for lay in range(n_layers):
            cfg = SAEConfig(
                d_in=D_MODEL, d_sae=D_SAE, architecture="jumprelu", hook_name=f"blocks.{lay}.hook_resid_mid",
                hook_name_out=f"blocks.{lay}.hook_mlp_out",
            )  # fmt: skip
            sae_cfg = SAETrainConfig(total_steps=100, autocast=False, log_every=100)
            trainers.append(_Trainer(f"l{lay}", create_sae(cfg), sae_cfg))

        def one(i: int) -> None:
            for t in trainers:
                _step(t, batch, i)
    else:
        clt_cfg = CLTConfig(
            n_layers=n_layers, d_model=D_MODEL, d_sae=D_SAE, cross_layer=which == "clt_cross_layer"
        )
        cfg = CLTTrainConfig(clt=clt_cfg, total_steps=100, batch_size=BATCH)
        trainer = _CLTTrainer(CrossLayerTranscoder(clt_cfg), cfg)

        def one(i: int) -> None:
            trainer.step(batch, i)

    one(0)
    start = time.process_time()
    for i in range(1, n + 1):
        one(i)
    return (time.process_time() - start) / n * 1000


def run_separate(model: Transformer, toks: torch.Tensor, steps: int) -> float:
    start = time.process_time()
    for layer in range(model.cfg.n_layers):
        hooks = [f"blocks.{layer}.hook_resid_mid", f"blocks.{layer}.hook_mlp_out"]
        sae = create_sae(
            SAEConfig(
                d_in=D_MODEL, d_sae=D_SAE, architecture="jumprelu", hook_name=hooks[0], hook_name_out=hooks[1]
            )
        )
        stream = ActivationStream(model, toks.split(16), hooks, batch_size=BATCH, buffer_tokens=8 * BATCH)
        result = train_saes(sae, stream, SAETrainConfig(total_steps=steps, autocast=False, log_every=steps))
        assert result.steps == steps, result.steps
    return time.process_time() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "clt.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, dict[str, object]] = {}
    for n_layers in args.layers:
        model, toks = _model(n_layers), _tokens(args.steps)
        contenders = {
            "clt_cross_layer": lambda m=model, t=toks: run_clt(m, t, args.steps, True),
            "per_layer_joint": lambda m=model, t=toks: run_clt(m, t, args.steps, False),
            "per_layer_separate": lambda m=model, t=toks: run_separate(m, t, args.steps),
        }
        contenders["clt_cross_layer"]()  # warm-up (imports, first-call costs)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        names = list(contenders)
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(contenders[name]())
        rows = args.steps * BATCH
        med = {name: statistics.median(ts) for name, ts in times.items()}
        flops = {n: flops_per_row(n_layers, n == "clt_cross_layer") for n in names}
        forward = {
            "shared_pass": [run_forward(model, toks, args.steps, True) for _ in range(args.rounds)],
            "per_layer_passes": [run_forward(model, toks, args.steps, False) for _ in range(args.rounds)],
        }
        steps_ms: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                steps_ms[name].append(step_ms(n_layers, name))
        results[f"{n_layers}_layers"] = {
            "cpu_seconds": {n: [round(t, 3) for t in ts] for n, ts in times.items()},
            "tokens_per_s": {n: round(rows / t) for n, t in med.items()},
            "speedup_vs_separate": {n: round(med["per_layer_separate"] / t, 2) for n, t in med.items()},
            "flops_per_row": flops,
            "gflop_per_s": {n: round(rows * flops[n] / t / 1e9, 2) for n, t in med.items()},
            "forward_s": {k: round(statistics.median(v), 3) for k, v in forward.items()},
            "step_ms": {n: round(statistics.median(v), 1) for n, v in steps_ms.items()},
        }
        print(n_layers, "layers:", json.dumps(results[f"{n_layers}_layers"]), flush=True)
    doc = {
        "benchmark": "clt training tokens/s: the shared activation pass vs per-layer transcoders trained separately",
        "settings": {
            "d_model": D_MODEL,
            "d_mlp": D_MLP,
            "d_sae_per_layer": D_SAE,
            "batch_rows": BATCH,
            "seq_len": SEQ,
            "steps": args.steps,
            "rounds": args.rounds,
            "threads": 1,
            "activation": "jumprelu",
            "dtype": "float32",
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "load": os.getloadavg()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
