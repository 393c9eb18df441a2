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


def plain_loop(cfg, source, steps: int, bf16: bool) -> tuple[float, float]:
    """A hand-written loop: same model, data, optimizer, schedule and clipping. Returns (wall, CPU) seconds."""
    model = build_model(cfg, source)
    model.train()
    o = cfg.optim
    opt = torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    rows = slice(0, cfg.batch_size)
    t0, c0 = time.perf_counter(), time.process_time()
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
            float(loss.detach())
    return time.perf_counter() - t0, time.process_time() - c0


def trainer_run(cfg, steps: int, precision: str, folder: Path) -> tuple[float, float]:
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
    return report["seconds"] - report["checkpoint_seconds"] - report["eval_seconds"], report[
        "train_cpu_seconds"
    ]


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
        "note": (
            "medians over interleaved rounds; training loop only (data cached, evaluation and checkpoint "
            "writes excluded); CPU seconds of the process are the robust measure on a shared machine"
        ),
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
                bf16 = key.endswith("bf16")
                if key.startswith("plain"):
                    seconds, cpu_seconds = plain_loop(cfg, source, steps, bf16)
                else:
                    seconds, cpu_seconds = trainer_run(cfg, steps, "bf16" if bf16 else "fp32", tmp / "run")
                timings[key].append(seconds)
                cpu[key].append(cpu_seconds)
        med = {k: statistics.median(v) for k, v in timings.items()}
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        ckpt = checkpoint_cost(cfg, source, 5, tmp / "ckpt")
        n_ckpt = len(cfg.checkpoints.steps(cfg.steps))
        step_seconds = med["trainer_fp32"] / steps
        results["presets"][name] = {
            "steps_timed": steps,
            "tokens_per_step": cfg.batch_size * cfg.data.seq_len,
            "tokens_per_s": {k: tokens / v for k, v in med.items()},
            "seconds_median": med,
            "seconds_all": timings,
            "cpu_seconds_median": cmed,
            "cpu_seconds_all": cpu,
            "tokens_per_cpu_s": {k: tokens / v for k, v in cmed.items()},
            "trainer_overhead_fp32_wall": med["trainer_fp32"] / med["plain_fp32"] - 1,
            "trainer_overhead_bf16_wall": med["trainer_bf16"] / med["plain_bf16"] - 1,
            "trainer_overhead_fp32_cpu": cmed["trainer_fp32"] / cmed["plain_fp32"] - 1,
            "trainer_overhead_bf16_cpu": cmed["trainer_bf16"] / cmed["plain_bf16"] - 1,
            "bf16_speedup_plain_wall": med["plain_fp32"] / med["plain_bf16"],
            "bf16_speedup_plain_cpu": cmed["plain_fp32"] / cmed["plain_bf16"],
            "checkpoint_seconds": ckpt,
            "default_schedule_checkpoints": n_ckpt,
            "checkpoint_fraction_default_schedule": n_ckpt * ckpt / (cfg.steps * step_seconds),
        }
        print(
            name,
            json.dumps(results["presets"][name]["tokens_per_cpu_s"]),
            "overhead (cpu)",
            round(results["presets"][name]["trainer_overhead_fp32_cpu"], 4),
            "ckpt fraction",
            round(results["presets"][name]["checkpoint_fraction_default_schedule"], 4),
            flush=True,
        )
    shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.is_file():  # keep the other presets' results when only some were rerun
        previous = json.loads(out.read_text()).get("presets", {})
        results["presets"] = {**previous, **results["presets"]}
        results["rounds_note"] = "presets may come from separate invocations; see each preset's seconds_all"
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
