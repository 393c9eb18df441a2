"""The training loop: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, evaluation, JSONL log,
scheduled atomic checkpoints, bit-exact resume, and data parallelism over ``torch.distributed``.

Run under ``torchrun --nproc_per_node N`` and `train` joins the process group (gloo on CPU, nccl on GPU);
each process trains on its share of the same global batch.

>>> from interplab.train import load_preset, train
>>> load_preset("induction-2l").steps     # the demo's run: minutes on a CPU
1500
>>> result = train(cfg, "runs/tiny")           # here a tiny config: 24 steps of a 2-layer model
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.parallel import DistributedDataParallel

from interplab import runs
from interplab.model import Transformer
from interplab.runs import Kind, list_checkpoints
from interplab.train.checkpoint import (
    clean_stale_temps,
    latest_good_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from interplab.train.config import Precision, TrainConfig
from interplab.train.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    init_distributed,
    local_device,
    shutdown,
)
from interplab.train.log import RunLog, read_log, truncate_log
from interplab.train.sources import CorpusSource, Source, TaskSource, cosine_lr, make_source, rows_for

if TYPE_CHECKING:
    from interplab.tasks.base import Task

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    step: int
    """the last step trained"""
    loss: float
    """training loss at the last step"""
    val_loss: float | None
    tokens: int
    """tokens trained on"""
    seconds: float
    """wall time of the training loop (this invocation)"""
    tokens_per_s: float
    checkpoints: tuple[int, ...]
    resumed_from: int | None = None
    skipped_checkpoints: tuple[str, ...] = field(default=())
    """checkpoints found unusable while resuming, with the reason"""

    def log(self) -> list[dict[str, Any]]:
        return read_log(self.run_dir)

    def plot(self) -> Any:
        """Training and validation loss against step (Plotly)."""
        import plotly.graph_objects as go

        rows = self.log()
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        fig = go.Figure()
        fig.add_scatter(x=[r["step"] for r in train], y=[r["loss"] for r in train], name="train loss")
        fig.add_scatter(x=[r["step"] for r in val], y=[r["val_loss"] for r in val], name="validation loss")
        fig.update_layout(xaxis_title="step", yaxis_title="loss", title=str(self.run_dir))
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}

    def save(self, path: str | Path) -> None:
        """Write the result as a ``train_report`` JSON document (``report.json`` in the run folder)."""
        runs.write_json(Path(path), Kind.TRAIN_REPORT, self.to_dict())


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast pays off on ``device``: a GPU with bf16, or a CPU with AMX bf16 tile units.

    Measured on a Xeon with AMX (benchmarks/results/train.json): bf16 autocast trains the 256-wide code-4l
    about 1.5x faster per CPU second and the 128-wide induction-2l about 1.06x, with the same loss curve
    and the same induction-head formation. Without AMX, bf16 matmuls are emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            return any(line.startswith("flags") and " amx_bf16" in line for line in fh)
    except OSError:
        return False


def build_model(cfg: TrainConfig, source: CorpusSource | TaskSource) -> Transformer:
    """The model of a run: the config's architecture (or a task's own) with the data source's vocabulary."""
    if isinstance(
        source, TaskSource
    ):  # a task: its vocabulary and length, the config's architecture or its own
        t = source.model_cfg
        model_cfg = (
            t
            if cfg.model is None
            else cfg.model.replace(
                d_vocab=t.d_vocab, d_vocab_out=t.d_vocab_out, n_ctx=max(cfg.model.n_ctx, t.n_ctx)
            )
        )
    elif cfg.model is None:  # TrainConfig refuses this already; said again for a hand-built source
        raise ValueError("a corpus run needs a 'model' section in its config")
    else:
        changes: dict[str, Any] = {"d_vocab": source.d_vocab}
        if cfg.model.d_vocab_out == cfg.model.d_vocab:
            changes["d_vocab_out"] = source.d_vocab
        model_cfg = cfg.model.replace(**changes)
    torch.manual_seed(cfg.seed)
    model = Transformer(model_cfg)
    model.tokenizer = source.tokenizer
    return model


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if name.rsplit(".", 1)[-1].startswith("W_") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _check_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool) -> bool:
    """True if the run directory holds an earlier run of this config to continue."""
    if runs.detect(run_dir) is not Kind.TRAIN:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(
                f"{run_dir} is not empty and is not a training run (it is {runs.describe(run_dir)}); "
                "choose another output folder"
            )
        return False
    if not resume:
        raise ValueError(f"{run_dir} already holds a run; resume it or choose another output folder")
    old = runs.TrainRun.open(run_dir).config
    new = cfg.to_dict()
    diff = sorted(k for k in set(old) | set(new) if k != "steps" and old.get(k) != new.get(k))
    if diff:
        raise ValueError(
            f"{run_dir} was started with a different config (differs in {', '.join(diff)}); "
            "resume with the same config or choose another output folder"
        )
    return True


def train(
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = True,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    task: Task | None = None,
    callbacks: Sequence[Callable[..., None]] = (),
) -> TrainResult:
    """Train ``cfg`` into ``run_dir``, continuing from its newest good checkpoint if it holds this run.

    ``stop_after=k`` stops after step k (writing a checkpoint) so the run can be resumed later.
    ``task`` trains on a Task object (``generate/loss/metrics/model_config``) instead of ``cfg.data.source``.
    ``progress(event)`` receives dicts with ``event`` in {"setup", "step", "eval", "checkpoint", "done"}.
    ``callbacks`` are called after each step's backward pass and before the optimiser update, as
    ``cb(step=, model=, tokens=, example_ids=, lr=, optimizer=)`` (corpus runs; ``example_ids`` index the training
    token store), e.g. `interplab.data_attribution.record.RecordingCallback`."""
    run_dir = Path(run_dir)
    device = torch.device(device) if device is not None else _default_device()
    device = local_device(device)  # cuda:LOCAL_RANK under torchrun (one GPU per process)
    dist_info = init_distributed(device)
    notify = progress if (progress is not None and dist_info.main) else (lambda event: None)
    try:
        return _train(cfg, run_dir, resume, stop_after, device, dist_info, notify, task, tuple(callbacks))
    finally:
        shutdown(dist_info)


def _train(
    cfg: TrainConfig,
    run_dir: Path,
    resume: bool,
    stop_after: int | None,
    device: torch.device,
    dist_info: DistInfo,
    notify: ProgressFn,
    task: Task | None,
    callbacks: tuple[Callable[..., None], ...] = (),
) -> TrainResult:
    continuing = _check_run_dir(run_dir, cfg, resume)
    cleaned = clean_stale_temps(run_dir) if continuing and dist_info.main else []
    barrier()  # every process has looked at the run folder before the first process writes to it
    per_step = cfg.grad_accum * dist_info.world
    if cfg.batch_size % per_step:
        raise ValueError(
            f"batch_size={cfg.batch_size} must be divisible by grad_accum x processes = {per_step}"
        )
    notify({"event": "setup", "message": "preparing data (tokenised once, then cached)"})
    source = make_source(cfg, task=task, progress=lambda n: notify({"event": "setup", "tokens": n}))
    corpus = source if isinstance(source, CorpusSource) else None
    if callbacks and corpus is None:
        raise ValueError(
            "training callbacks need a corpus run (they receive the training sequences' indices)"
        )
    model = build_model(cfg, source).to(device)
    if cfg.data.task is None and task is None and cfg.data.seq_len > model.cfg.n_ctx:
        raise ValueError(
            f"data.seq_len={cfg.data.seq_len} is longer than the model's n_ctx={model.cfg.n_ctx}"
        )
    model.train()
    o = cfg.optim
    optimizer = torch.optim.AdamW(_param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas)
    start, resumed_from, skipped = 0, None, []
    tokens_seen = 0
    if continuing:
        ckpt, bad = latest_good_checkpoint(run_dir)
        skipped = [f"{c.path.name}: {reason}" for c, reason in bad]
        if ckpt is not None:
            state = load_checkpoint(ckpt.path, model, optimizer)
            start, resumed_from, tokens_seen = ckpt.step, ckpt.step, int(state.get("tokens", 0))
    if dist_info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.to_json(run_dir / runs.CONFIG)
        if model.tokenizer is not None:
            model.tokenizer.save(run_dir / runs.TOKENIZER)
    ddp = _wrap(model, device, dist_info)
    bf16 = cfg.precision is Precision.BF16 or (cfg.precision is Precision.AUTO and fast_bf16(device))
    schedule = set(cfg.checkpoints.steps(cfg.steps))
    if resumed_from is not None and dist_info.main:
        truncate_log(run_dir, resumed_from)  # the steps after the checkpoint are trained again
    log = RunLog(run_dir, cfg, dist_info.main)
    for item in cleaned:
        log.write({"event": "cleaned", "what": item})
    for item in skipped:
        log.write({"event": "skipped_checkpoint", "reason": item})
    if resumed_from is not None:
        log.write({"event": "resume", "step": resumed_from})
    elif dist_info.main and 0 in schedule and not list_checkpoints(run_dir):
        save_checkpoint(run_dir, 0, model, optimizer, {"tokens": 0})
        log.write({"step": 0, **_evaluate(source, model)})
    stop = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    tokens_per_step = cfg.batch_size * source.seq_len
    t0, loss_value, val_loss, step, written = time.perf_counter(), float("nan"), None, start, []
    for row in read_log(run_dir) if resumed_from is not None else []:
        loss_value = row.get("loss", loss_value)
        val_loss = row.get("val_loss", val_loss)
    ckpt_seconds = eval_seconds = 0.0
    # CPU time of this process in the loop, without evaluation and checkpoints (robust on a busy machine)
    cpu0, cpu_aside = time.process_time(), 0.0
    for step in range(start + 1, stop + 1):
        lr = cosine_lr(step - 1, lr=o.lr, warmup=o.warmup_steps, total=cfg.steps, min_ratio=o.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        total = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = source.batch(
                step - 1, rows_for(cfg.batch_size, micro, cfg.grad_accum, dist_info.rank, dist_info.world)
            )
            batch = _to(batch, device)
            last = micro == cfg.grad_accum - 1
            sync = (
                ddp.no_sync()
                if isinstance(ddp, DistributedDataParallel) and not last
                else contextlib.nullcontext()
            )
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    loss = source.loss(ddp, batch) / cfg.grad_accum
                loss.backward()  # outside autocast, as PyTorch recommends
            total += loss.detach()
        if corpus is not None:  # (callbacks need one: checked above)
            for cb in callbacks:
                rows = rows_for(cfg.batch_size, 0, 1, dist_info.rank, dist_info.world)
                cb(
                    step=step,
                    model=model,
                    tokens=_to(corpus.batch(step - 1, rows), device),
                    example_ids=corpus.indices(step - 1, rows),
                    lr=lr,
                    optimizer=optimizer,
                )
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        if step % cfg.log_every == 0 or step == stop or step in schedule:
            loss_value = float(all_reduce_mean(total))
            elapsed = time.perf_counter() - t0
            rate = tokens_per_step * (step - start) / max(elapsed, 1e-9)
            row = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "tokens": tokens_seen,
                "tokens_per_s": rate,
                "elapsed_s": elapsed,
            }
            if step % cfg.eval_every == 0 or step == stop:
                e0, ec0 = time.perf_counter(), time.process_time()
                metrics = _evaluate(source, model) if dist_info.main else {}
                eval_seconds += time.perf_counter() - e0
                cpu_aside += time.process_time() - ec0
                val_loss = metrics.get("val_loss", val_loss)
                row.update(metrics)
            log.write(row)
            notify({"event": "step", **row, "total": cfg.steps})
        if step in schedule or step == stop:
            c0, cc0 = time.perf_counter(), time.process_time()
            if dist_info.main:
                save_checkpoint(run_dir, step, model, optimizer, {"tokens": tokens_seen})
                written.append(step)
            barrier()
            ckpt_seconds += time.perf_counter() - c0
            cpu_aside += time.process_time() - cc0
    seconds = time.perf_counter() - t0
    train_cpu_seconds = time.process_time() - cpu0 - cpu_aside
    model.eval()
    if dist_info.main and step == cfg.steps:
        model.save(run_dir / runs.FINAL)
    result = TrainResult(
        run_dir=run_dir,
        step=step,
        loss=loss_value,
        val_loss=val_loss,
        tokens=tokens_seen,
        seconds=seconds,
        tokens_per_s=tokens_per_step * (step - start) / max(seconds, 1e-9),
        checkpoints=tuple(c.step for c in list_checkpoints(run_dir)),
        resumed_from=resumed_from,
        skipped_checkpoints=tuple(skipped),
    )
    if dist_info.main:
        report = {
            **result.to_dict(),
            "checkpoint_seconds": ckpt_seconds,
            "eval_seconds": eval_seconds,
            "train_cpu_seconds": train_cpu_seconds,
            "finished": step == cfg.steps,
        }
        runs.write_json(run_dir / runs.REPORT, Kind.TRAIN_REPORT, report)
    log.close()
    notify({"event": "done", "step": step, "total": cfg.steps})
    return result


def _wrap(model: Transformer, device: torch.device, dist_info: DistInfo) -> torch.nn.Module:
    if dist_info.world <= 1:
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor) or hasattr(batch, "to"):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(
            batch,
            **{
                f.name: getattr(batch, f.name).to(device)
                for f in dataclasses.fields(batch)
                if isinstance(getattr(batch, f.name), torch.Tensor)
            },
        )
    return batch


@torch.no_grad()
def _evaluate(source: Source, model: torch.nn.Module) -> dict[str, float]:
    was = model.training
    model.eval()
    try:
        return source.evaluate(model)
    finally:
        model.train(was)
