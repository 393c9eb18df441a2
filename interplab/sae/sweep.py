"""A family of SAEs from one pass over the activations: one SAE per hook and sweep point, with its name, width
and schedules derived here, once (what ``interplab sae train`` runs).

An `SAESweepConfig` says what to train; an `ActivationSource` where the activations come from (a cache on
disk, `cache_source`, or a model streamed over a corpus, `model_source`); `plan_sweep` builds the SAEs and
their `SAETrainConfig`s and `train_sweep` trains them into a run folder (resumable, see `train_saes`).

>>> plan = plan_sweep({"blocks.0.hook_resid_post": 16}, SAESweepConfig(steps=100, sweep=parse_sweep(["k=4,8"])))
>>> sorted(plan.saes)
['blocks_0_hook_resid_post__k_4', 'blocks_0_hook_resid_post__k_8']
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from interplab.hooks import Site
from interplab.integrity import module_fingerprint
from interplab.plots import save_figure
from interplab.runs import LOG, SAES, TRAIN_SUMMARY, read_json
from interplab.sae import resume as resume_lib
from interplab.sae.activations import (
    ActivationBatch,
    ActivationStream,
    SkippableBatches,
    corpus_token_batches,
)
from interplab.sae.base import SAE
from interplab.sae.config import Architecture, SAEConfig
from interplab.sae.disk_store import DiskActivationStore
from interplab.sae.io import load_sae
from interplab.sae.registry import create_sae
from interplab.sae.train import SAETrainConfig, SAETrainProgress, SAETrainResult, train_saes
from interplab.train.distributed import (
    agree,
    all_reduce_sum,
    barrier,
    is_main,
    shard_of,
    single_process,
    world_size,
)
from interplab.train.distributed import rank as _rank
from interplab.train.log import read_log

if TYPE_CHECKING:
    from interplab.model import Transformer

#: the knobs a sweep may vary, and what each value must be
SWEEP_KEYS = {"coefficient": "a finite number >= 0", "k": "a positive integer", "lr": "a finite positive number",
              "d_sae": "a positive integer"}  # fmt: skip
#: the curves `train_sweep` draws into the run folder (``training_{metric}.html``)
TRAINING_PLOTS = ("fvu", "l0", "dead_fraction")


def _default(name: str) -> Any:
    """The default of `SAETrainConfig` field ``name`` (one source of truth for the sweep's and the CLI's)."""
    return {f.name: f.default for f in dataclasses.fields(SAETrainConfig)}[name]


def sae_name(hook: str, point: Mapping[str, float] | None = None) -> str:
    """The name of the SAE trained at ``hook`` (and sweep ``point``) in a run folder's ``saes/``:
    ``blocks_0_hook_resid_post`` or ``blocks_0_hook_resid_post__k_16``. Every reader derives it here."""
    return Site.parse(hook).name.replace(".", "_") + "".join(
        f"__{key}_{v:g}" for key, v in (point or {}).items()
    )


def parse_sweep(items: Sequence[str]) -> tuple[dict[str, float], ...]:
    """``["coefficient=1,3,10", "k=16,32"]`` -> one dict per SAE (the product of the lists); no items: one
    point, ``({},)``. A bad item raises ValueError naming it and what is valid."""
    points: list[dict[str, float]] = [{}]
    for item in items:
        key, _, values = item.partition("=")
        if key not in SWEEP_KEYS or not values:
            raise ValueError(
                f"{item!r}: use KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)} (e.g. coefficient=1,3,10)"
            )
        parsed = [_sweep_value(item, key, v) for v in values.split(",")]
        points = [{**p, key: v} for p in points for v in parsed]
    return tuple(points)


def _sweep_value(item: str, key: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    ok = math.isfinite(value) and (
        value >= 0 if key == "coefficient" else value > 0 and (key == "lr" or value == int(value))
    )
    if not ok:
        raise ValueError(f"{item!r}: {raw.strip()!r} is not {SWEEP_KEYS[key]} (for {key})")
    return value


@dataclass(frozen=True, kw_only=True)
class SAESweepConfig:
    """What a sweep trains: one ``architecture`` SAE per hook and sweep point, all for ``steps`` steps of
    ``batch_size`` rows. The schedules (warm-ups, log and checkpoint intervals) scale with ``steps``."""

    architecture: Architecture = Architecture.TOPK
    """the SAE family (see `Architecture`)"""
    expansion: int = 8
    """d_sae = expansion * d_in (unless ``d_sae`` is swept)"""
    k: int = 32
    """active latents per token for topk/batchtopk (unless swept)"""
    coefficient: float | None = _default("coefficient")
    """sparsity coefficient (unless swept); None: the architecture's default, scaled to the data"""
    lr: float = _default("lr")
    """Adam learning rate after warm-up (unless swept)"""
    steps: int = 2000
    """optimizer steps of every SAE"""
    batch_size: int = 4096
    """activation rows per step"""
    autocast: bool = _default("autocast")
    """bfloat16 matmuls with float32 master weights"""
    seed: int = _default("seed")
    """seed of the SAEs' initial weights (the plan's i-th SAE draws with ``seed + i``), the data order and the
    resampling draws"""
    checkpoint_every: int | None = None
    """steps between checkpoints; None: a tenth of ``steps``"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints a run keeps"""
    sweep: tuple[dict[str, float], ...] = field(default=({},), hash=False)
    """the sweep points (`parse_sweep`): each overrides some of coefficient, k, lr, d_sae"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "architecture", Architecture.parse(self.architecture))
        for name in ("expansion", "k", "steps", "batch_size", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be > 0 (or None), got {self.checkpoint_every}")
        for point in self.sweep:
            unknown = sorted(set(point) - set(SWEEP_KEYS))
            if unknown:
                raise ValueError(f"unknown sweep keys {unknown}; valid: {', '.join(SWEEP_KEYS)}")
        object.__setattr__(self, "sweep", tuple(dict(p) for p in self.sweep) or ({},))

    def sae_config(
        self, hook: str, d_in: int, point: Mapping[str, float], model_name: str | None
    ) -> SAEConfig:
        """The SAE of ``hook`` (width ``d_in``) at sweep ``point``."""
        topk = self.architecture in (Architecture.TOPK, Architecture.BATCHTOPK, Architecture.MATRYOSHKA)
        return SAEConfig(
            d_in=d_in,
            d_sae=int(point.get("d_sae", self.expansion * d_in)),
            architecture=self.architecture,
            hook_name=hook,
            k=int(point.get("k", self.k)) if topk else None,
            model_name=model_name,
        )

    def train_config(self, point: Mapping[str, float]) -> SAETrainConfig:
        """How the SAE at sweep ``point`` trains: warm-ups, log and checkpoint intervals scaled to ``steps``."""
        steps = self.steps
        return SAETrainConfig(
            total_steps=steps,
            lr=point.get("lr", self.lr),
            coefficient=point.get("coefficient", self.coefficient),
            coefficient_warmup_steps=steps // 20,
            warmup_steps=min(100, steps // 10 + 1),
            autocast=self.autocast,
            log_every=max(1, min(50, steps // 20)),
            checkpoint_every=self.checkpoint_every or max(1, steps // 10),
            seed=self.seed,
        )


@dataclass(frozen=True)
class ActivationSource:
    """Where a sweep's activations come from: the batches, the width of each hook, and a JSON description
    (recorded in the run's config: a resume must read the same activations)."""

    batches: Iterable[ActivationBatch]
    widths: dict[str, int]
    """{canonical hook name: d_in}, in the order the SAEs are built"""
    model_name: str | None
    """the model the activations come from (written into each SAE's config)"""
    data: dict[str, Any]
    """what the activations are (cache identity, or model fingerprint + corpus), JSON-able"""


def canonical_hooks(hooks: Sequence[str]) -> list[str]:
    """The canonical names of ``hooks`` (ValueError naming a bad one)."""
    return [Site.parse(h).name for h in hooks]


def cache_source(
    cache_dir: str | Path,
    hooks: Sequence[str],
    *,
    batch_size: int,
    steps: int,
    seed: int = 0,
    spread: bool = False,
) -> ActivationSource:
    """Batches of a cache written by `cache_activations`, enough epochs for ``steps`` steps, shuffled by ``seed``.

    Under torchrun ``batch_size`` is the global batch and each rank reads its ``batch_size // world`` rows of
    every batch (`DiskActivationStore.batches`): every row once, as one process reads it. ``spread=True``
    (a sweep spread over ranks, `train_sweep`): every rank reads every row of every batch."""
    cache_dir = Path(cache_dir)
    world = 1 if spread else world_size()
    if batch_size % world:
        lower, upper = batch_size // world * world, -(-batch_size // world) * world
        raise ValueError(
            f"--batch {batch_size} does not divide over {world} processes (each takes an equal part of every "
            f"batch): use a multiple of {world}, e.g. --batch {lower or upper} or --batch {upper}"
        )
    store = DiskActivationStore(cache_dir)
    names = canonical_hooks(hooks)
    missing = [h for h in names if h not in store.hooks]
    if missing:
        raise ValueError(f"{cache_dir} has no activations for {missing}; it holds {list(store.hooks)}")
    if store.rows < batch_size:
        raise ValueError(
            f"--batch {batch_size} is more than the {store.rows:,} rows in {cache_dir}; use --batch <= {store.rows}"
        )
    widths = {h: store.hooks[h] for h in names}
    ranks: dict[str, Any] = {"rank": 0, "world": 1} if spread else {}
    epochs = -(-steps * batch_size // max(store.rows, 1))
    return ActivationSource(
        batches=SkippableBatches(
            lambda start: store.batches(
                batch_size, hooks=list(widths), epochs=epochs, seed=seed, start=start, **ranks
            )
        ),
        widths=widths,
        model_name=(store.manifest.get("model") or {}).get("name"),
        data={
            "cache": str(cache_dir.resolve()),
            "cache_identity": store.manifest.get("identity"),
            "cache_shards": [[sh["file"], sh["rows"], sh.get("sha256")] for sh in store.shards],
            "batch": batch_size,
            "epochs": epochs,
        },
    )


def model_source(
    model: Transformer,
    model_path: str | Path,
    hooks: Sequence[str],
    *,
    corpus: str,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    spread: bool = False,
) -> ActivationSource:
    """Activations streamed from ``model`` (loaded from ``model_path``) over ``corpus``, cycled for as long as
    the run needs, through a shuffling buffer of at least 8 batches; ``seed`` draws the order of the corpus's
    sequences and the buffer's shuffles.

    Under torchrun each rank streams every world-th token batch (disjoint shares of the corpus) and serves
    ``batch_size // world`` rows per step (the global batch is ``batch_size``): not the same rows per step as
    one process (each rank shuffles its own buffer), each token once per pass. ``spread=True``: every rank
    streams everything (a sweep spread over ranks)."""
    world, rank = (1, 0) if spread else (world_size(), _rank())
    if batch_size % world:
        raise ValueError(
            f"--batch {batch_size} does not divide over {world} processes: use a multiple of {world}"
        )
    shapes = model.hook_shapes(batch=1, pos=2)
    widths = {}
    for h in canonical_hooks(hooks):
        if h not in shapes:
            model.hook_registry.resolve(h)  # raises the model's own error (layer count, suggestions)
        widths[h] = int(shapes[h][-1]) if len(shapes[h]) == 3 else int(shapes[h][-2] * shapes[h][-1])
    data = corpus_token_batches(model, corpus, seq_len=seq_len, batch_size=max(1, 4096 // seq_len), seed=seed)
    if len(data.batches) < world:
        raise ValueError(
            f"{corpus!r} gives {len(data.batches)} token batches, fewer than the {world} processes: use fewer "
            "processes, a longer corpus or a shorter --seq-len"
        )
    batches = ActivationStream(
        model,
        _cycle(data.batches[rank::world]),
        list(widths),
        batch_size=batch_size // world,
        buffer_tokens=max(8 * batch_size, 65536),
        token_filter=data.token_filter,
        seed=seed + rank,  # each rank's buffer shuffles its own rows
    )
    return ActivationSource(
        batches=batches,
        widths=widths,
        model_name=str(model_path),
        data={
            "model": str(Path(model_path).resolve()),
            "model_fingerprint": module_fingerprint(model),
            **data.source,
            "batch": batch_size,
        },
    )


def _cycle(items: list[Any]) -> Iterator[Any]:
    while True:
        yield from items


@dataclass(frozen=True)
class SweepPlan:
    """The SAEs of a sweep, by name (`sae_name`), and how each trains."""

    saes: dict[str, SAE]
    train: dict[str, SAETrainConfig]


def plan_sweep(widths: Mapping[str, int], cfg: SAESweepConfig, *, model_name: str | None = None) -> SweepPlan:
    """One freshly initialised SAE per hook in ``widths`` ({hook: d_in}) and sweep point, with its config. The
    i-th SAE (hooks in order, then sweep points) draws its initial weights with seed ``cfg.seed + i``: SAEs of
    one run never start from the same weights, and a single SAE draws with ``cfg.seed`` itself."""
    saes: dict[str, SAE] = {}
    train: dict[str, SAETrainConfig] = {}
    for hook, d_in in widths.items():
        for point in cfg.sweep:
            name = sae_name(hook, point)
            saes[name] = create_sae(cfg.sae_config(hook, d_in, point, model_name), seed=cfg.seed + len(saes))
            train[name] = cfg.train_config(point)
    return SweepPlan(saes=saes, train=train)


def train_sweep(
    plan: SweepPlan,
    source: ActivationSource,
    cfg: SAESweepConfig,
    run_dir: str | Path,
    *,
    progress: Callable[[SAETrainProgress], None] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    stop_after: int | None = None,
    spread: bool = False,
) -> SAETrainResult:
    """Train ``plan``'s SAEs on ``source`` into ``run_dir`` (see `train_saes` for resuming, overwriting and
    ``stop_after``); a finished run also gets its training curves, ``training_{metric}.html``.

    Under torchrun every SAE trains data-parallel, unless ``spread=True``: then the sweep is spread over the
    ranks (`spread_names`: rank r trains SAEs r, r + world, ... of the plan, each alone on all the data, from
    a ``source`` made with ``spread=True``), each rank into its own resumable ``ranks/rank_R_of_W/`` run, and
    rank 0 collects the SAEs, log rows and summary into ``run_dir`` as one process writes them (the same
    numbers: the SAEs of a sweep never interact)."""
    run_dir = Path(run_dir)
    if spread and world_size() > 1:
        result = _train_spread(plan, source, cfg, run_dir, progress, resume, overwrite, stop_after)
    else:
        result = train_saes(
            plan.saes,
            source.batches,
            plan.train,
            run_dir=run_dir,
            progress=progress,
            data=source.data,
            resume=resume,
            overwrite=overwrite,
            stop_after=stop_after,
            keep_checkpoints=cfg.keep_checkpoints,
        )
    if not result.stopped and is_main():
        for metric in TRAINING_PLOTS:
            save_figure(result.plot(metric), run_dir / f"training_{metric}.html")
    return result


#: the folder of a spread sweep's per-rank runs (checkpoints, logs), inside the sweep's run folder
RANKS = "ranks"


def spread_names(names: Sequence[str], rank: int, world: int) -> list[str]:
    """The SAEs rank ``rank`` of ``world`` trains in a sweep spread over ranks: every ``world``-th, from
    ``rank`` (disjoint, every SAE once). Refuses more ranks than SAEs (a rank would have nothing to do)."""
    if world > len(names):
        raise ValueError(
            f"a sweep of {len(names)} SAE(s) cannot be spread over {world} processes (one would idle): use at "
            f"most {len(names)} processes, or train data-parallel (without --spread)"
        )
    return [names[i] for i in shard_of(len(names), rank, world)]


def _train_spread(
    plan: SweepPlan,
    source: ActivationSource,
    cfg: SAESweepConfig,
    run: Path,
    progress: Callable[[SAETrainProgress], None] | None,
    resume: bool,
    overwrite: bool,
    stop_after: int | None,
) -> SAETrainResult:
    rank, world = _rank(), world_size()
    names = list(plan.saes)
    error: BaseException | None = None
    try:
        mine = spread_names(names, rank, world)
        if rank == 0:
            identity = resume_lib.run_identity(plan.saes, plan.train, source.data)
            files = (*resume_lib._RUN_FILES, RANKS, TRAIN_SUMMARY)
            resume_lib.claim_run(run, identity, resume=resume, overwrite=overwrite, files=files)
    except (ValueError, OSError) as err:
        error = err
    agree(error, f"the check of the run folder {run}")
    sub = run / RANKS / f"rank_{rank:05d}_of_{world:05d}"
    try:
        with single_process():  # this rank's SAEs alone: no collective inside
            own = train_saes(
                {n: plan.saes[n] for n in mine},
                source.batches,
                {n: plan.train[n] for n in mine},
                run_dir=sub,
                progress=progress if rank == 0 else None,
                data=source.data,
                resume=resume,
                stop_after=stop_after,
                keep_checkpoints=cfg.keep_checkpoints,
            )
    except (ValueError, OSError, FloatingPointError) as err:
        error = err
    agree(error, "training its SAEs of the sweep")
    stopped = bool(all_reduce_sum(torch.tensor([int(own.stopped)])).item())
    if rank == 0 and not stopped:
        result = _collect_spread(run, names, world)
    barrier(f"the collection of the sweep into {run}")
    if rank != 0 or stopped:
        return own
    return result


def _collect_spread(run: Path, names: list[str], world: int) -> SAETrainResult:
    """Rank 0: the ranks' SAEs, log rows (in the order one process logs them: by step, then plan order) and
    summary, written into ``run`` as a one-process sweep writes them."""
    order = {n: i for i, n in enumerate(names)}
    saes: dict[str, SAE] = {}
    rows: list[dict[str, Any]] = []
    tokens = steps = 0
    for r in range(world):
        sub = run / RANKS / f"rank_{r:05d}_of_{world:05d}"
        summary = read_json(sub / TRAIN_SUMMARY)
        tokens, steps = max(tokens, summary["tokens"]), max(steps, summary["steps"])
        rows += [row for row in read_log(sub) if "sae" in row]
        for n in names[r::world]:
            saes[n] = load_sae(sub / SAES / n)
    rows.sort(key=lambda row: (row["step"], order[row["sae"]]))
    with open(run / LOG, "w") as log:  # the merged log replaces any earlier collection's
        log.writelines(json.dumps(row) + "\n" for row in rows)
    result = SAETrainResult(saes={n: saes[n] for n in names}, history=rows, tokens=tokens, steps=steps)
    result.save(run)
    return result
