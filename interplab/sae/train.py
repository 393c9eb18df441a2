"""Training SAEs: Adam with warmup/decay, sparsity-coefficient warmup, dead/dense latent tracking with AuxK
or resampling, checkpoints, a JSONL log, a progress callback, several SAEs from one pass over the activations,
and data-parallel training under torchrun (gradients all-reduced; each rank reads its own batches).

Fast path: with ``autocast=True`` matmuls run in bfloat16 against float32 master weights, and TopK SAEs use
the sparse kernels in `interplab.sae.kernels`.

>>> from interplab.sae.activations import TensorActivations
>>> result = train_saes({"l0": sae}, TensorActivations(acts, batch_size=256), SAETrainConfig(total_steps=20))
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab.runs import LOG, SAES, TRAIN_SUMMARY, Kind, write_json
from interplab.sae import resume as resume_lib
from interplab.sae.activations import ActivationBatch, SkippableBatches
from interplab.sae.base import SAE
from interplab.sae.config import Architecture
from interplab.sae.disk_store import ActivationDataError
from interplab.sae.plots import training_curves
from interplab.sae.train_config import (
    DEFAULT_COEFFICIENTS,
    BDecInit,
    DeadHandling,
    SAETrainConfig,
    default_coefficient,
)
from interplab.train.checkpoint import load_optimizer_state, optimizer_state
from interplab.train.distributed import (
    all_reduce_grads,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    broadcast_,
    is_main,
    same_on_every_rank,
    world_size,
)

#: the training configuration lives in `interplab.sae.train_config`; it is re-exported here
__all__ = [
    "DEFAULT_COEFFICIENTS",
    "BDecInit",
    "DeadHandling",
    "SAETrainConfig",
    "SAETrainProgress",
    "SAETrainResult",
    "default_coefficient",
    "evaluate_returned",
    "resample_dead",
    "train_saes",
]


@dataclass(frozen=True)
class SAETrainProgress:
    """Handed to the ``progress`` callback every ``log_every`` steps: step and the latest metrics per SAE."""

    step: int
    total_steps: int
    tokens: int
    metrics: dict[str, dict[str, float]]


@dataclass(frozen=True)
class SAETrainResult:
    """The trained SAEs and their log (one row per logged step and SAE)."""

    saes: dict[str, SAE]
    history: list[dict[str, Any]] = field(repr=False)
    tokens: int = 0
    steps: int = 0
    resumed_from: int | None = None
    """the checkpoint step a resumed run continued from (None: started from scratch)"""
    stopped: bool = False
    """stopped by ``stop_after`` before ``total_steps`` (the SAEs are not final: run again to resume)"""

    def final(self, name: str) -> dict[str, Any]:
        rows = [r for r in self.history if r["sae"] == name]
        return rows[-1] if rows else {}

    def plot(self, metric: str = "fvu") -> Any:
        """One curve per SAE of ``metric`` (a log column: fvu, l0, mse, dead_fraction ...) against step."""
        return training_curves(self.history, metric)

    def save(self, path: str | Path) -> Path:
        """Write the SAEs (``saes/NAME/``) and ``train_summary.json`` into the run folder ``path``."""
        path = Path(path)
        for name, sae in self.saes.items():
            sae.save(path / SAES / name)
        write_json(
            path / TRAIN_SUMMARY,
            Kind.SAE_TRAIN_SUMMARY,
            {"tokens": self.tokens, "steps": self.steps, "final": {n: self.final(n) for n in self.saes}},
        )
        return path


class _Trainer:
    """State for one SAE: optimizer, firing statistics."""

    def __init__(self, name: str, sae: SAE, cfg: SAETrainConfig) -> None:
        self.name, self.sae, self.cfg = name, sae, cfg
        self.opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.betas, foreach=True)
        d = sae.cfg.d_sae
        self.since_fired = torch.zeros(d, dtype=torch.long)
        self.window_counts = torch.zeros(d, dtype=torch.long)
        self.window_tokens = 0
        self.unsampled_tokens = 0
        self.sums = {"loss": 0.0, "mse": 0.0, "fvu": 0.0, "l0": 0.0, "aux": 0.0, "sparsity": 0.0}
        self.n = 0
        dh = cfg.dead_handling
        if dh is DeadHandling.AUTO:
            topk = sae.cfg.architecture in (
                Architecture.TOPK,
                Architecture.BATCHTOPK,
                Architecture.MATRYOSHKA,
            )
            dh = DeadHandling.AUXK if topk else DeadHandling.RESAMPLE
        self.dead_handling = dh
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # resolved on the first step from the data (see `_resolve_defaults`)
        self.dead_after_tokens: int | None = cfg.dead_after_tokens
        self.base_coefficient: float | None = cfg.coefficient
        self.steps_done = 0
        self.last_batch: tuple[Tensor, Tensor | None] | None = None
        self.final_metrics: dict[str, float] | None = None

    def dead_mask(self) -> Tensor:
        if self.dead_after_tokens is None:
            return torch.zeros_like(self.since_fired, dtype=torch.bool)
        return self.since_fired >= self.dead_after_tokens

    def coefficient_at(self, step: int) -> float:
        return self.cfg.coefficient_at(step, self.base_coefficient)

    # Everything a bit-exact resume needs (`interplab.sae.resume`); state added to this class goes here too.
    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON scalars): the SAE's raw state, Adam's, firing counters, log sums, generator."""
        opt_tensors, groups = optimizer_state(self.opt)
        tensors = {f"sae.{k}": v for k, v in self.sae.state_dict().items()}
        tensors.update({f"opt.{k}": v for k, v in opt_tensors.items()})
        tensors.update(
            since_fired=self.since_fired,
            window_counts=self.window_counts,
            generator=self.generator.get_state(),
        )
        scalars = {
            "param_groups": groups,
            "window_tokens": self.window_tokens,
            "unsampled_tokens": self.unsampled_tokens,
            "sums": self.sums,
            "n": self.n,
            # resolved from the first batch (`_resolve_defaults`): a resume must not recompute them
            "base_coefficient": self.base_coefficient,
            "dead_after_tokens": self.dead_after_tokens,
            "steps_done": self.steps_done,
            "final_metrics": self.final_metrics,
        }
        return tensors, scalars

    def load_state_dict(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.sae.load_state_dict(part("sae."), strict=True)
        load_optimizer_state(self.opt, part("opt."), scalars["param_groups"])
        self.since_fired = tensors["since_fired"].clone()
        self.window_counts = tensors["window_counts"].clone()
        self.generator.set_state(tensors["generator"])
        self.window_tokens, self.unsampled_tokens = scalars["window_tokens"], scalars["unsampled_tokens"]
        self.sums, self.n = dict(scalars["sums"]), scalars["n"]
        self.base_coefficient = scalars.get("base_coefficient", self.base_coefficient)
        self.dead_after_tokens = scalars.get("dead_after_tokens", self.dead_after_tokens)
        self.steps_done = scalars.get("steps_done", self.steps_done)
        self.final_metrics = scalars.get("final_metrics", self.final_metrics)


def train_saes(
    saes: dict[str, SAE] | SAE,
    batches: Iterable[ActivationBatch],
    cfg: SAETrainConfig | dict[str, SAETrainConfig],
    *,
    run_dir: str | Path | None = None,
    progress: Callable[[SAETrainProgress], None] | None = None,
    data: dict[str, Any] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    stop_after: int | None = None,
    keep_checkpoints: int | None = None,
) -> SAETrainResult:
    """Train every SAE in ``saes`` on the same stream of batches (each reads ``batch[sae.cfg.hook_name]``,
    and a transcoder's target ``batch[sae.cfg.hook_name_out]``). Under torch.distributed, gradients are
    averaged across ranks.

    With ``run_dir``: writes ``config.json`` (the SAE and training configs and ``data``, a JSON description of
    the activations), ``log.jsonl``, checkpoints every ``checkpoint_every`` steps and the final SAEs. A folder
    holding this same run is resumed bit-exactly from its newest intact checkpoint (``batches`` must yield the
    same batches in the same order; the ones already trained on are skipped), its log cut back to that step;
    one holding a different run is refused unless ``overwrite``. ``stop_after=k`` stops after step k with a
    checkpoint (resume later); ``keep_checkpoints`` keeps only the newest ones. Under torchrun pass the same
    ``run_dir`` on every rank (rank 0 writes)."""
    if isinstance(saes, SAE):
        saes = {"sae": saes}
    cfgs = cfg if isinstance(cfg, dict) else {name: cfg for name in saes}
    missing = sorted(set(saes) - set(cfgs))
    if missing:
        raise ValueError(f"no SAETrainConfig for SAEs {missing}")
    trainers = [_Trainer(name, sae, cfgs[name]) for name, sae in saes.items()]
    total_steps = max(t.cfg.total_steps for t in trainers)
    stop = total_steps if stop_after is None else min(stop_after, total_steps)
    run = Path(run_dir) if run_dir is not None else None
    history: list[dict[str, Any]] = []
    identity = resume_lib.run_identity(saes, cfgs, data)
    start, tokens, events = resume_lib.start_run(run, identity, trainers, resume=resume, overwrite=overwrite)
    if run is not None and is_main():
        history = resume_lib.restart_log(run, start)
    log = open(run / LOG, "a") if run is not None and is_main() else None  # noqa: SIM115
    if log is not None:
        log.writelines(json.dumps(e) + "\n" for e in events)
    step = start
    every = [t.cfg.checkpoint_every for t in trainers if t.cfg.checkpoint_every]
    try:
        # a resume starts at batch ``start`` (reading nothing before it where the source can: SkippableBatches)
        # and never draws a batch past ``stop``
        rest = (
            batches.from_batch(start)
            if isinstance(batches, SkippableBatches)
            else itertools.islice(batches, start, None)
        )
        for batch in itertools.islice(rest, max(stop - start, 0)):
            _check_input(batch, step, batches)
            n_tok = next(iter(batch.values())).shape[0]
            if step == start:  # tokens count n_tok * world: exact only when every rank's batch has n_tok rows
                same_on_every_rank(n_tok, "the rows per batch")
            for t in trainers:
                if step < t.cfg.total_steps:
                    _step(t, batch, step)
            step += 1
            tokens += n_tok * world_size()
            rows = [_log_row(t, step, tokens) for t in trainers if _row_due(t, step)]
            if rows:
                history += rows
                if log is not None:
                    log.writelines(json.dumps(r) + "\n" for r in rows)
                    log.flush()
                if progress is not None:
                    progress(SAETrainProgress(step, total_steps, tokens, {r["sae"]: r for r in rows}))
            due = (every and step % min(every) == 0) or (step == stop and (every or stop < total_steps))
            if run is not None and due:
                if is_main():
                    resume_lib.save_training_checkpoint(run, step, tokens, trainers)
                    if keep_checkpoints is not None:
                        resume_lib.prune_checkpoints(run, keep_checkpoints)
                barrier()  # no rank runs ahead of a checkpoint rank 0 is still writing
        stopped_early = stop_after is not None and step == stop < total_steps
        if not stopped_early:  # a stopped run's final rows come when it is resumed and finishes
            rows = _final_rows(trainers, tokens)
            history += rows
            if log is not None:
                log.writelines(json.dumps(r) + "\n" for r in rows)
    finally:
        if log is not None:
            log.close()
    result = SAETrainResult(
        saes=dict(saes),
        history=history,
        tokens=tokens,
        steps=step,
        resumed_from=start or None,
        stopped=stopped_early,
    )
    if run is not None and is_main() and not stopped_early:
        result.save(run)
    # every rank returns once rank 0 has written the run folder: a rank that read it (or tore down the
    # process group) while rank 0 was still writing saw a half-written run (and gloo aborted at teardown)
    barrier()
    return result


def _check_input(batch: ActivationBatch, step: int, source: object) -> None:
    """NaN/inf in the activations is refused at the input, naming the hook and row, before any weight sees it
    (otherwise it surfaces steps later as a 'divergence' of weights it has already poisoned)."""
    for hook, x in batch.items():
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).reshape(x.shape[0], -1).any(-1).nonzero()[0, 0].item())
            raise ActivationDataError(
                f"non-finite activation ({x.reshape(x.shape[0], -1)[bad][~torch.isfinite(x.reshape(x.shape[0], -1)[bad])][0].item()}) "
                f"in input batch {step} (0-based), row {bad}, at {hook!r} from {_source_name(source)}"
            )


def _source_name(source: object) -> str:
    path = getattr(source, "path", None)
    return f"{type(source).__name__}({str(path)!r})" if path is not None else type(source).__name__


def _step(t: _Trainer, batch: ActivationBatch, step: int) -> None:
    sae, cfg = t.sae, t.cfg
    x = _select(batch, sae.cfg.hook_name)
    target = _select(batch, sae.cfg.hook_name_out) if sae.cfg.hook_name_out else None
    if step == 0:
        _initialise(sae, x, target, cfg)
    if t.base_coefficient is None or t.dead_after_tokens is None:
        _resolve_defaults(t, x if target is None else target)
    for group in t.opt.param_groups:
        group["lr"] = cfg.lr_at(step)
    ctx = torch.autocast(x.device.type, dtype=torch.bfloat16) if cfg.autocast else contextlib.nullcontext()
    dead = t.dead_mask() if t.dead_handling is DeadHandling.AUXK else None
    # every log row needs at least one sampled step (a row of a window without samples used to report zeros)
    sample = step % cfg.stats_every == 0 or step == cfg.total_steps - 1 or (step + 1) % cfg.log_every == 0
    with ctx:
        out = sae.loss(x, target, coefficient=t.coefficient_at(step), dead_mask=dead, with_counts=sample)
    # SAE.loss fills every loss field
    assert out.loss is not None and out.mse is not None and out.aux is not None and out.sparsity is not None
    t.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    all_reduce_grads(sae.parameters())
    if sae.unit_norm_decoder:
        sae.remove_parallel_grad()
    t.opt.step()
    sae.apply_constraints()
    n = x.shape[0] * world_size()
    t.unsampled_tokens += n
    t.steps_done = step + 1
    t.last_batch = (x, target)
    if t.dead_handling is DeadHandling.RESAMPLE and cfg.resamples_at(step + 1):
        any_dead = bool(t.dead_mask().any())  # the same on every rank (firing counts are all-reduced)
        resample_dead(t, x, target)
        if any_dead and world_size() > 1:
            # each rank drew from its own rows: every rank takes rank 0's new latents (and their Adam moments)
            moments = [v for p in sae.parameters() for v in t.opt.state.get(p, {}).values() if v.ndim]
            broadcast_([*sae.parameters(), *moments])
    if step + 1 == cfg.total_steps:
        t.final_metrics = evaluate_returned(sae, x, target)
    if not sample:
        return
    assert out.latent_counts is not None  # with_counts=sample
    counts = out.latent_counts.detach().to(torch.long).cpu()
    counts = all_reduce_sum(counts)
    t.since_fired = torch.where(counts > 0, 0, t.since_fired + t.unsampled_tokens)
    t.unsampled_tokens = 0
    t.window_counts += counts
    t.window_tokens += n
    with torch.no_grad():
        tgt = x if target is None else target
        var = (tgt.float() - tgt.float().mean(0)).pow(2).sum(-1).mean() * sae.act_scale.pow(2)
        for key, value in (
            ("loss", out.loss),
            ("mse", out.mse),
            ("aux", out.aux),
            ("sparsity", out.sparsity),
        ):
            t.sums[key] += float(value)
        t.sums["fvu"] += float(out.mse / var.clamp_min(1e-12))
        t.sums["l0"] += float(counts.sum()) / n
    t.n += 1


@torch.no_grad()
def _initialise(sae: SAE, x: Tensor, target: Tensor | None, cfg: SAETrainConfig) -> None:
    sae.set_scale_from(x)
    if cfg.b_dec_init is not BDecInit.ZEROS:
        ref = x if target is None else target
        sae.init_b_dec(ref[:4096].float(), cfg.b_dec_init.value)
    broadcast_([*sae.parameters(), *sae.buffers()])  # every rank starts from rank 0's weights


@torch.no_grad()
def _resolve_defaults(t: _Trainer, x: Tensor) -> None:
    """Fill in the data-dependent defaults of ``t.cfg`` from the first batch this process trains on (also
    after a resume): the sparsity coefficient (`default_coefficient`, from the scale of what the SAE
    reconstructs: ``x`` is a transcoder's target) and the dead-latent window."""
    sae = t.sae
    if t.base_coefficient is None:
        mean_square = (x.float() * sae.act_scale - sae.b_dec.float()).pow(2).mean().reshape(1)
        mean_square = all_reduce_sum(mean_square) / world_size()  # every rank must use the same coefficient
        t.base_coefficient = default_coefficient(sae.cfg.architecture, float(mean_square))
    if t.dead_after_tokens is None:
        t.dead_after_tokens = t.cfg.dead_after(x.shape[0] * world_size())


@torch.no_grad()
def resample_dead(t: _Trainer, x: Tensor, target: Tensor | None) -> int:
    """Re-initialise dead latents towards inputs the SAE reconstructs worst (sampled with probability
    proportional to squared error, from the trainer's own generator). Every per-latent parameter
    (``sae.latent_axes``: W_enc columns, W_dec rows, b_enc, and e.g. Gated's r_mag and b_mag, JumpReLU's
    threshold) is reset, and so are its Adam moments. Returns how many were resampled."""
    sae = t.sae
    dead_mask = t.dead_mask()
    dead = dead_mask.nonzero().squeeze(-1)
    if dead.numel() == 0:
        return 0
    tgt = x if target is None else target
    err = (sae(x).reconstruction.float() - tgt.float()).pow(2).sum(-1)
    if float(err.sum()) <= 0:
        return 0
    rows = torch.multinomial(err / err.sum(), dead.numel(), replacement=True, generator=t.generator)
    enc_dirs = _unit(x[rows].float() * sae.act_scale - (sae.b_dec if sae.cfg.apply_b_dec_to_input else 0))
    # a transcoder's decoder writes the output site: point it at the badly reconstructed target
    dec_dirs = enc_dirs if target is None else _unit(target[rows].float() * sae.act_scale - sae.b_dec)
    alive = ~dead_mask
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    dec_norm = 1.0 if sae.unit_norm_decoder or not alive.any() else sae.W_dec[alive].norm(dim=-1).mean()
    sae.W_dec[dead] = (dec_dirs * dec_norm).to(sae.W_dec.dtype)
    sae.W_enc[:, dead] = (enc_dirs.T * enc_norm * 0.2).to(sae.W_enc.dtype)
    params = dict(sae.named_parameters())
    for name, value in sae.latent_reset_values().items():
        params[name].index_fill_(sae.latent_axes[name], dead, value)
    for name, axis in sae.latent_axes.items():
        state = t.opt.state.get(params[name], {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].index_fill_(axis, dead, 0.0)
    t.since_fired[dead] = 0
    return int(dead.numel())


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-8)


@torch.no_grad()
def evaluate_returned(sae: SAE, x: Tensor, target: Tensor | None = None) -> dict[str, float]:
    """MSE (normalised units, as logged), FVU and L0 of ``sae`` as it is returned (its inference forward, in
    float32) on one batch: what the final log row reports, so that it describes the SAE a run hands back
    rather than the average over the steps before it."""
    out = sae(x.float())
    tgt = (x if target is None else target).float()
    scale = float(sae.act_scale)
    if world_size() > 1:
        return _evaluate_over_ranks(out.reconstruction, tgt, out.feature_acts, scale)
    mse = float((out.reconstruction - tgt).pow(2).sum(-1).mean()) * scale**2
    var = float((tgt - tgt.mean(0)).pow(2).sum(-1).mean()) * scale**2
    acts = out.feature_acts
    assert acts is not None
    return {"mse": mse, "fvu": mse / max(var, 1e-12), "l0": float((acts != 0).sum(-1).float().mean())}


def _evaluate_over_ranks(recon: Tensor, tgt: Tensor, acts: Tensor | None, scale: float) -> dict[str, float]:
    """`evaluate_returned` over the union of every rank's batch (what one process reports on the whole batch)."""
    assert acts is not None
    n = all_reduce_sum(torch.tensor([float(tgt.shape[0])], dtype=torch.float64))
    sq = all_reduce_sum((recon.double() - tgt.double()).pow(2).sum().reshape(1))
    mean = all_reduce_sum(tgt.double().sum(0)) / n
    dev = all_reduce_sum((tgt.double() - mean).pow(2).sum().reshape(1))
    l0 = all_reduce_sum((acts != 0).sum().double().reshape(1))
    mse, var = float(sq / n) * scale**2, float(dev / n) * scale**2
    return {"mse": mse, "fvu": mse / max(var, 1e-12), "l0": float(l0 / n)}


def _row_due(t: _Trainer, step: int) -> bool:
    """A trainer logs every ``log_every`` of its own steps and after its last one (never after it stopped)."""
    return t.steps_done == step and (step % t.cfg.log_every == 0 or step == t.cfg.total_steps)


def _final_rows(trainers: list[_Trainer], tokens: int) -> list[dict[str, Any]]:
    """When the batches ran out before a trainer's ``total_steps``: a last row describing the SAE it returns
    (on its last batch), so that the final row always reports the returned SAE."""
    rows = []
    for t in trainers:
        if t.final_metrics is None and t.last_batch is not None:
            t.final_metrics = evaluate_returned(t.sae, *t.last_batch)
            rows.append(_log_row(t, t.steps_done, tokens))
    return rows


def _log_row(t: _Trainer, step: int, tokens: int) -> dict[str, Any]:
    """Means over the sampled steps since the last row; the final row's mse, fvu and l0 are those of the
    returned SAE (`evaluate_returned` on the last batch, ``"final": true``)."""
    density = t.window_counts.float() / max(t.window_tokens, 1)
    row: dict[str, Any] = {
        "sae": t.name,
        "step": step,
        "tokens": tokens,
        "lr": t.cfg.lr_at(step - 1),
        "coefficient": t.coefficient_at(step - 1),
    }
    if t.n and world_size() > 1:  # each rank summed its own rows: the row reports the mean over ranks
        keys = list(t.sums)
        means = all_reduce_mean(torch.tensor([t.sums[k] for k in keys], dtype=torch.float64))
        t.sums = dict(zip(keys, means.tolist(), strict=True))
    if t.n:
        row.update({k: v / t.n for k, v in t.sums.items()})
    if t.final_metrics is not None:
        row.update(t.final_metrics, final=True)
    row["dead_fraction"] = float(t.dead_mask().float().mean())
    row["dense_fraction"] = float((density > t.cfg.dense_threshold).float().mean())
    t.sums = dict.fromkeys(t.sums, 0.0)
    t.n = 0
    t.window_counts.zero_()
    t.window_tokens = 0
    if not all(math.isfinite(row.get(k, 0.0)) for k in ("loss", "mse")):
        raise FloatingPointError(
            f"SAE {t.name!r} diverged at step {step}: loss={row.get('loss')}, mse={row['mse']}; "
            "lower lr or coefficient"
        )
    return row


def _select(batch: ActivationBatch, hook: str | None) -> Tensor:
    if hook and hook in batch:
        return batch[hook]
    if not hook and len(batch) == 1:
        return next(iter(batch.values()))
    raise KeyError(f"the activation batches have no {hook!r}; they hold {list(batch)}")
