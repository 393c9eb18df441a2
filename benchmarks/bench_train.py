"""Training throughput on CPU: interplab's trainer against a plain hand-written PyTorch loop on the same
model and batches (interleaved rounds, medians), float32 against bf16 autocast, and the time spent writing
checkpoints under the default schedule.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_train.py --out benchmarks/results/train.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from interplab.train import load_preset, train  # noqa: E402
from interplab.train.checkpoint import save_checkpoint  # noqa: E402
from interplab.train.sources import cosine_lr, lm_loss, make_source  # noqa: E402
from interplab.train.trainer import _param_groups, build_model  # noqa: E402


def plain_loop(cfg, source, steps: int, bf16: bool) -> float:
    """A hand-written loop: same model, data, optimizer, schedule and clipping. Returns seconds."""
    model = build_model(cfg, source)
    model.train()
    o = cfg.optim
    opt = torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    rows = slice(0, cfg.batch_size)
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(
                step, lr=o.lr, warmup=o.warmup_steps, total=cfg.steps, min_ratio=o.min_lr_ratio
            )
        tokens = source.batch(step, rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = lm_loss(model(tokens), tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0:
            float(loss)
    return time.perf_counter() - t0


def trainer_run(cfg, steps: int, precision: str, folder: Path) -> float:
    """interplab's trainer (JSONL log, progress events, only the first and last checkpoint). Returns the
    seconds of the training loop minus the final checkpoint's write and evaluation."""
    cfg = cfg.override(
        [
            f"steps={cfg.steps}",
            f"precision={precision}",
            "checkpoints.log_spaced=0",
            "checkpoints.every=null",
            "eval_every=100000",
        ]
    )
    shutil.rmtree(folder, ignore_errors=True)
    train(cfg, folder, stop_after=steps, device="cpu", progress=lambda e: None)
    report = json.loads((folder / "report.json").read_text())
    return report["seconds"] - report["checkpoint_seconds"] - report["eval_seconds"]


def checkpoint_cost(cfg, source, repeats: int, folder: Path) -> float:
    model = build_model(cfg, source)
    opt = torch.optim.AdamW(model.parameters())
    model(source.batch(0, slice(0, 1))).sum().backward()
    opt.step()
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        save_checkpoint(folder, i, model, opt, {"tokens": 0})
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/train.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--presets", default="induction-2l,code-4l")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    results = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "presets": {},
        "note": "medians over interleaved rounds; tokens/s of the training loop only (data already cached)",
    }
    steps_for = {"induction-2l": 30, "code-4l": 8}
    for name in args.presets.split(","):
        cfg = load_preset(name)
        source = make_source(cfg)
        steps = steps_for.get(name, 10)
        tokens = steps * cfg.batch_size * cfg.data.seq_len
        timings: dict[str, list[float]] = {
            "plain_fp32": [],
            "trainer_fp32": [],
            "plain_bf16": [],
            "trainer_bf16": [],
        }
        cpu: dict[str, list[float]] = {k: [] for k in timings}
        for _ in range(args.rounds):
            for key in timings:
                c0 = time.process_time()
                bf16 = key.endswith("bf16")
                if key.startswith("plain"):
                    seconds = plain_loop(cfg, source, steps, bf16)
                else:
                    seconds = trainer_run(cfg, steps, "bf16" if bf16 else "fp32", tmp / "run")
                timings[key].append(seconds)
                cpu[key].append(time.process_time() - c0)
        med = {k: statistics.median(v) for k, v in timings.items()}
        ckpt = checkpoint_cost(cfg, source, 5, tmp / "ckpt")
        n_ckpt = len(cfg.checkpoints.steps(cfg.steps))
        step_seconds = med["trainer_fp32"] / steps
        results["presets"][name] = {
            "steps_timed": steps,
            "tokens_per_step": cfg.batch_size * cfg.data.seq_len,
            "tokens_per_s": {k: tokens / v for k, v in med.items()},
            "seconds_median": med,
            "seconds_all": timings,
            "cpu_seconds_median": {k: statistics.median(v) for k, v in cpu.items()},
            "trainer_overhead_fp32": med["trainer_fp32"] / med["plain_fp32"] - 1,
            "trainer_overhead_bf16": med["trainer_bf16"] / med["plain_bf16"] - 1,
            "bf16_speedup_plain": med["plain_fp32"] / med["plain_bf16"],
            "checkpoint_seconds": ckpt,
            "default_schedule_checkpoints": n_ckpt,
            "checkpoint_fraction_default_schedule": n_ckpt * ckpt / (cfg.steps * step_seconds),
        }
        print(
            name,
            json.dumps(results["presets"][name]["tokens_per_s"]),
            "overhead",
            round(results["presets"][name]["trainer_overhead_fp32"], 4),
            "ckpt fraction",
            round(results["presets"][name]["checkpoint_fraction_default_schedule"], 4),
            flush=True,
        )
    shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
