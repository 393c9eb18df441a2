"""CLT benchmark: training tokens/s of a cross-layer transcoder (one model forward per batch reads every layer:
the shared activation pass) vs per-layer transcoders trained separately (one interplab transcoder SAE per
layer, each streaming its own activations through `train_saes`: one pass over the model per layer), and the
per-layer transcoders trained jointly by `train_clt` (``cross_layer=False``: the shared pass alone).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_clt.py [--out benchmarks/results/clt.json] [--rounds 3]

One thread, random models (throughput does not depend on the weights), JumpReLU everywhere, float32, the same
activation rows per step; contenders interleaved in rounds (order rotating), medians of CPU time (the machine is
shared: CPU time is the fair measure). Tokens/s counts activation rows (each row holds every layer).
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
        results[f"{n_layers}_layers"] = {
            "cpu_seconds": {n: [round(t, 3) for t in ts] for n, ts in times.items()},
            "tokens_per_s": {n: round(rows / t) for n, t in med.items()},
            "speedup_vs_separate": {n: round(med["per_layer_separate"] / t, 2) for n, t in med.items()},
        }
        print(n_layers, "layers:", json.dumps(results[f"{n_layers}_layers"]["tokens_per_s"]), flush=True)
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
