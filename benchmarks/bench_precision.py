"""bfloat16 vs float32 forward on CPU: a random GPT-2-small-shaped interplab model (12 layers, d_model 768, 12
heads, vocab 50257), its logits at a few batch x sequence sizes, in both dtypes.

The two dtypes are timed in interleaved rounds (the order alternates each round, so a load spike on the shared
machine hits both alike); reported are medians of wall and CPU time (``time.process_time``) per forward and the
median over rounds of the per-round bf16/fp32 CPU-time ratio, with whether the CPU has native bf16 units (AMX or
AVX512-BF16; without them bf16 matmuls are emulated and slower) and the logits' largest difference between the
two dtypes.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_precision.py --out benchmarks/results/precision.json
    python benchmarks/bench_precision.py --quick   # a 2-layer model, small sizes, 2 rounds: a smoke run
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
from interplab.train.trainer import fast_bf16  # noqa: E402

GPT2_SMALL = dict(d_model=768, n_layers=12, n_heads=12, d_vocab=50257, n_ctx=1024, act_fn="gelu_new")
SIZES = [(1, 128), (4, 128), (1, 512)]
QUICK = dict(d_model=64, n_layers=2, n_heads=4, d_vocab=500, n_ctx=64, act_fn="gelu_new")


def cpu_bf16_units() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if f in ("amx_bf16", "avx512_bf16", "amx_tile"))


def time_forward(model: Transformer, tokens: torch.Tensor) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        model(tokens)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/precision.json"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes, 2 rounds (a smoke run)")
    args = ap.parse_args()
    shape, sizes, rounds = (QUICK, [(1, 16), (2, 32)], 2) if args.quick else (GPT2_SMALL, SIZES, args.rounds)
    torch.manual_seed(0)
    fp32 = Transformer(ModelConfig(**shape))
    models = {"float32": fp32, "bfloat16": Transformer(ModelConfig(**shape)).to(torch.bfloat16)}
    models["bfloat16"].load_state_dict({k: v.bfloat16() for k, v in fp32.state_dict().items()})
    results = []
    for batch, seq in sizes:
        tokens = torch.randint(0, shape["d_vocab"], (batch, seq), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref, low = models["float32"](tokens), models["bfloat16"](tokens).float()
        for m in models.values():  # warm-up
            time_forward(m, tokens)
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
        ratios = []
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                times[name].append(time_forward(models[name], tokens))
            ratios.append(times["bfloat16"][-1][1] / times["float32"][-1][1])
        row = {"batch": batch, "seq": seq}
        for name, ts in times.items():
            row[name] = {
                "wall_s": statistics.median(t[0] for t in ts),
                "cpu_s": statistics.median(t[1] for t in ts),
            }
        row["bf16_over_fp32_cpu"] = statistics.median(ratios)
        row["logits_max_abs_diff"] = (low - ref).abs().max().item()
        row["logits_max_abs"] = ref.abs().max().item()
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    doc = {
        "benchmark": "precision",
        "model": shape,
        "rounds": rounds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_bf16_units": cpu_bf16_units(),
        "bf16_autocast_default_here": fast_bf16(torch.device("cpu")),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
