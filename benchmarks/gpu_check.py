"""The GPU check of issue 20: one script, under 10 minutes on one GPU, writing one JSON with the device's name.

1. parity: every family of tests/model/test_load_hf.py's tiny random configs, interplab against `transformers`
   on the device, in float32 and bfloat16 (logits, every ``hook_resid_pre``, ``unembed.hook_in``, every
   ``hook_pattern``): the largest differences and whether they are within the tolerances the CPU tests use;
2. the device's bfloat16 matmul peak (measured here: a large square matmul) and SAE training steps/s for TopK at
   d_sae 65536 on d_in 768 (GPT-2 small's residual), with bf16 autocast, as a fraction of that peak (issue goal:
   >= 40%); the FLOPs counted per token are those docs/sae.md counts for TopK, 2 d_in d_sae (the dense encoder)
   + 8 k d_in (the sparse decoder and the sparse gradients);
3. forward and cache-all timings of interplab vs Hugging Face on GPT-2-small-sized random weights, float32 and
   bfloat16 (and TransformerLens' HookedTransformer when ``INTERPLAB_TL_PYTHON`` names a Python with
   transformer_lens and the same torch; otherwise skipped, with that reason in the JSON);
4. an activation-patching sweep (resid_pre at every layer and position) timed on the same model.

Timings are medians over interleaved rounds, synchronised on CUDA. The JSON is rewritten after each section
(a run cut short keeps what it finished); on a GPU a section that fails is recorded with its error and the
others still run (``--quick`` fails loudly instead). No test depends on a GPU: ``--device cpu
--quick`` runs every section at tiny sizes in seconds (tests/test_gpu_check.py runs it).

    python benchmarks/gpu_check.py                       # CUDA: writes benchmarks/results/gpu_check_<device>.json
    python benchmarks/gpu_check.py --device cpu --quick  # a smoke run at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from interplab import load_model  # noqa: E402
from interplab.analysis import LogitDiff, activation_patch  # noqa: E402
from interplab.sae import SAEConfig, create_sae  # noqa: E402
from interplab.sae.train import SAETrainConfig, train_saes  # noqa: E402
from tests.model.precision import TOLERANCES, VARIANTS, compare, family, max_differences  # noqa: E402

FULL = {
    "matmul_n": 8192,
    "sae": {"d_in": 768, "d_sae": 65536, "k": 32, "batch": 4096, "steps": 200},
    "gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024},
    "forward": {"batch": 8, "seq": 1024, "rounds": 5},
    "patch": {"batch": 8, "seq": 64},
}
QUICK = {
    "matmul_n": 256,
    "sae": {"d_in": 32, "d_sae": 256, "k": 8, "batch": 128, "steps": 4},
    "gpt2": {"n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 101, "n_positions": 64},
    "forward": {"batch": 2, "seq": 16, "rounds": 2},
    "patch": {"batch": 2, "seq": 6},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def interleaved(contenders: dict[str, Callable[[], object]], device: torch.device, rounds: int) -> dict:
    """Median seconds per call of each contender, timed in rounds whose order rotates (one warm-up call each)."""
    for fn in contenders.values():
        timed(fn, device)
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(contenders[name], device))
    return {k: statistics.median(v) for k, v in times.items()}


# ---- 1. parity --------------------------------------------------------------------------------------
def check_parity(device: str, quick: bool) -> list[dict]:
    variants = list(VARIANTS)
    if quick:  # one variant per family
        variants = list({family(v): v for v in reversed(variants)}.values())[::-1]
    rows = []
    for variant in variants:
        for name, dtype in DTYPES.items():
            with tempfile.TemporaryDirectory() as tmp:
                pairs = compare(variant, dtype, tmp, device=device)
            within = True
            for got, expected in pairs.values():
                try:
                    torch.testing.assert_close(got, expected, **TOLERANCES[dtype])
                except AssertionError:
                    within = False
            fast, hf_default = pairs["logits_fast"]
            rows.append(
                {
                    "variant": variant,
                    "dtype": name,
                    "within_tolerance": within,
                    "fast_logits_bit_exact": bool(torch.equal(fast, hf_default)),
                    "every_site_bit_exact": all(bool(torch.equal(a, b)) for a, b in pairs.values()),
                    "max": max_differences(pairs),
                }
            )
            print(f"parity {variant} {name}: within={within}", file=sys.stderr)
    return rows


# ---- 2. matmul peak and SAE training ------------------------------------------------------------------
def matmul_peak(device: torch.device, n: int) -> dict:
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    reps = 10
    seconds = statistics.median(
        timed(lambda: [torch.mm(a, b) for _ in range(reps)], device) / reps for _ in range(3)
    )
    return {"n": n, "seconds": seconds, "tflops": 2 * n**3 / seconds / 1e12}


def sae_training(device: torch.device, size: dict, peak_tflops: float) -> dict:
    hook = "blocks.6.hook_resid_pre"
    d_in, d_sae, k, batch, steps = (size[x] for x in ("d_in", "d_sae", "k", "batch", "steps"))
    gen = torch.Generator(device=device).manual_seed(0)
    data = [torch.randn(batch, d_in, device=device, generator=gen) for _ in range(4)]
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, hook_name=hook)).to(device)
    cfg = SAETrainConfig(total_steps=steps, log_every=10**9, autocast=True, lr=1e-4)
    train_saes(
        sae, [{hook: data[0]}], SAETrainConfig(total_steps=1, log_every=10**9, autocast=True)
    )  # warm-up
    batches = [{hook: data[i % len(data)]} for i in range(steps)]
    seconds = timed(lambda: train_saes(sae, batches, cfg), device)
    flops = steps * batch * (2 * d_in * d_sae + 8 * k * d_in)
    tflops = flops / seconds / 1e12
    return {
        **size,
        "architecture": "topk",
        "autocast": "bfloat16",
        "steps_per_s": steps / seconds,
        "tokens_per_s": steps * batch / seconds,
        "tflops": tflops,
        "fraction_of_bf16_peak": tflops / peak_tflops,
        "goal_fraction": 0.4,
    }


# ---- 3. forward and cache-all vs Hugging Face (and TransformerLens) -----------------------------------
def forward_and_cache(device: torch.device, shape: dict, size: dict, folder: Path) -> dict:
    cfg = transformers.GPT2Config(**shape, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    tokens = torch.randint(0, shape["vocab_size"], (size["batch"], size["seq"]), device=device)
    out: dict = {"batch": size["batch"], "seq": size["seq"]}
    for name, dtype in DTYPES.items():
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).eval().to(device)
        # the patterns exist only in eager attention: HF's cache-all runs it, as interplab's does its explicit path
        hf_eager = (
            transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype, attn_implementation="eager")
            .eval()
            .to(device)
        )
        ours = load_model(folder, dtype=dtype, device=device)
        with torch.no_grad():
            diff = (ours(tokens).double() - hf(tokens).logits.double()).abs().max().item()

        def hf_forward(hf=hf) -> object:
            with torch.no_grad():
                return hf(tokens).logits

        def hf_cache(hf=hf_eager) -> object:  # every hidden state and attention pattern Hugging Face can give
            with torch.no_grad():
                return hf(tokens, output_hidden_states=True, output_attentions=True)

        def our_forward(ours=ours) -> object:
            with torch.no_grad():
                return ours(tokens)

        def our_cache(ours=ours) -> object:
            return ours.run_with_cache(tokens)

        medians = interleaved(
            {
                "interplab_forward": our_forward,
                "hf_forward": hf_forward,
                "interplab_cache_all": our_cache,
                "hf_hidden_states_and_attentions": hf_cache,
            },
            device,
            size["rounds"],
        )
        out[name] = {"seconds": medians, "logits_max_abs_diff": diff, "hook_points": len(ours.hook_names)}
        del hf, hf_eager, ours
    out["transformer_lens"] = transformer_lens(device, shape, size)
    return out


TL_SCRIPT = r"""
import json, statistics, sys, time, torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
shape, size, device = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
out = {}
for name in ("float32", "bfloat16"):
    cfg = HookedTransformerConfig(n_layers=shape["n_layer"], d_model=shape["n_embd"], n_heads=shape["n_head"],
        d_head=shape["n_embd"] // shape["n_head"], d_mlp=4 * shape["n_embd"], d_vocab=shape["vocab_size"],
        n_ctx=shape["n_positions"], act_fn="gelu_new", normalization_type="LN", device=device,
        dtype=getattr(torch, name))
    model = HookedTransformer(cfg).eval()
    tokens = torch.randint(0, shape["vocab_size"], (size["batch"], size["seq"]), device=device)
    def t(fn):
        torch.cuda.synchronize() if device.startswith("cuda") else None
        s = time.perf_counter(); fn()
        torch.cuda.synchronize() if device.startswith("cuda") else None
        return time.perf_counter() - s
    calls = {"tl_forward": lambda: model(tokens), "tl_cache_all": lambda: model.run_with_cache(tokens)}
    with torch.no_grad():
        for f in calls.values(): t(f)
        out[name] = {k: statistics.median(t(f) for _ in range(size["rounds"])) for k, f in calls.items()}
print(json.dumps(out))
"""


def transformer_lens(device: torch.device, shape: dict, size: dict) -> dict:
    python = os.environ.get("INTERPLAB_TL_PYTHON")
    if not python:
        return {"skipped": "INTERPLAB_TL_PYTHON is not set (a Python with transformer_lens installed)"}
    proc = subprocess.run(
        [python, "-c", TL_SCRIPT, json.dumps(shape), json.dumps(size), str(device)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode != 0:
        return {"skipped": f"TransformerLens run failed: {proc.stderr.strip().splitlines()[-1:]}"}
    return {"seconds": json.loads(proc.stdout.strip().splitlines()[-1]), "python": python}


# ---- 4. a patching sweep ---------------------------------------------------------------------------
def patching_sweep(device: torch.device, folder: Path, size: dict) -> dict:
    out = {}
    for name, dtype in DTYPES.items():
        model = load_model(folder, dtype=dtype, device=device)
        gen = torch.Generator().manual_seed(2)
        clean = torch.randint(0, model.cfg.d_vocab, (size["batch"], size["seq"]), generator=gen).to(device)
        corrupted = clean.clone()
        corrupted[:, 1] = torch.randint(0, model.cfg.d_vocab, (size["batch"],), generator=gen).to(device)
        metric = LogitDiff(answer=clean[:, -1], wrong=corrupted[:, 1])
        sweep = lambda model=model, clean=clean, corrupted=corrupted, metric=metric: activation_patch(  # noqa: E731
            model, clean, corrupted, metric, "resid_pre"
        )
        sweep()  # warm-up
        seconds = statistics.median(timed(sweep, device) for _ in range(3))
        patches = model.cfg.n_layers * size["seq"]
        out[name] = {"seconds": seconds, "patches": patches, "patches_per_s": patches / seconds}
    return {**size, "target": "resid_pre", "by": "layer x position", **out}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run of every section, seconds)")
    ap.add_argument(
        "--out", default=None, help="JSON path (default: benchmarks/results/gpu_check_<device>.json)"
    )
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    name = device_name(device)
    start = time.perf_counter()
    doc: dict = {
        "benchmark": "gpu_check",
        "device": name,
        "device_type": device.type,
        "quick": args.quick,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tolerances": {str(k).removeprefix("torch."): v for k, v in TOLERANCES.items()},
    }
    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or device.type
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"gpu_check_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    strict = args.quick  # a smoke run fails loudly; a GPU run keeps going and records what failed

    def section(key: str, run: Callable[[], object]) -> None:
        """Run one section, record its result (or its error) and rewrite the JSON: a GPU run that is cut
        short keeps every section it finished."""
        t0 = time.perf_counter()
        try:
            doc[key] = run()
        except Exception as err:
            if strict:
                raise
            doc[key] = {"error": f"{type(err).__name__}: {err}"}
        doc.setdefault("section_seconds", {})[key] = time.perf_counter() - t0
        doc["total_seconds"] = time.perf_counter() - start
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_text(json.dumps(doc, indent=1) + "\n")
        tmp_out.replace(out)
        print(f"{key}: done in {doc['section_seconds'][key]:.1f} s", file=sys.stderr)

    section("parity", lambda: check_parity(str(device), args.quick))
    section("matmul_bf16_peak", lambda: matmul_peak(device, sizes["matmul_n"]))
    peak = doc["matmul_bf16_peak"].get("tflops", float("nan"))
    section("sae_training", lambda: sae_training(device, sizes["sae"], peak))
    with tempfile.TemporaryDirectory() as tmp:
        section(
            "forward_and_cache", lambda: forward_and_cache(device, sizes["gpt2"], sizes["forward"], Path(tmp))
        )
        section("patching_sweep", lambda: patching_sweep(device, Path(tmp), sizes["patch"]))
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
