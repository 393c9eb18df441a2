"""One cross-layer transcoder shared by several checkpoints of a training run (issue 17, item 6): trained on
activations pooled from all of them, so that latent ``i`` of layer ``l`` is one dictionary direction at every
checkpoint and the graphs built with it (`interplab.graphs.graphs_across(..., clt="shared")`) name the same
feature by the same index everywhere; each checkpoint's misfit goes into its error nodes.

**Balanced pooling.** Every training batch holds ``batch_size // n`` rows of each of the ``n`` checkpoints
(the first ``batch_size % n`` checkpoints one more), each checkpoint's rows streamed by its own model over the
same token batches (`ActivationStream`, shuffled with seed ``seed + i``, so the checkpoints' rows come from
different positions), then concatenated. A checkpoint whose activations are larger does not dominate by
count; the loss still weighs its rows by their squared error in the shared normalised units (one power-of-two
scale per layer, taken from the first pooled batch). All checkpoints' models are in memory at once.

>>> from interplab.sae.clt import CLTConfig
>>> cfg = CLTTrainConfig(clt=CLTConfig(n_layers=2, d_model=64, d_sae=128), total_steps=4, batch_size=64)
>>> result = train_clt_shared({"step_000010": model, "step_000020": model}, tokens, cfg)  # tokens [4, 16]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab.model import Transformer
from interplab.sae.activations import ActivationBatch, ActivationStream, TokenFilter
from interplab.sae.clt import check_fits
from interplab.sae.clt_train import (
    CLTTrainConfig,
    CLTTrainProgress,
    CLTTrainResult,
    clt_hooks,
    token_batches,
    train_clt,
)


def rows_per_checkpoint(batch_size: int, n: int) -> list[int]:
    """Rows of each of ``n`` checkpoints in a pooled batch of ``batch_size`` rows (they differ by at most 1).

    >>> rows_per_checkpoint(10, 3)
    [4, 3, 3]
    """
    if n <= 0 or batch_size < n:
        raise ValueError(f"a pooled batch of {batch_size} rows cannot hold a row of each of {n} checkpoints")
    return [batch_size // n + (i < batch_size % n) for i in range(n)]


def check_same_shape(models: Mapping[str, Transformer], cfg: CLTTrainConfig) -> None:
    """Raise naming the checkpoints whose shape (layers, d_model) differs from the first's, or that the CLT does
    not fit (its hooks)."""
    names = list(models)
    if not names:
        raise ValueError("no checkpoints to pool: give at least one")
    shape = {n: (m.cfg.n_layers, m.cfg.d_model) for n, m in models.items()}
    first = shape[names[0]]
    odd = [n for n in names if shape[n] != first]
    if odd:
        got = ", ".join(f"{n} ({shape[n][0]} layers, d_model {shape[n][1]})" for n in odd)
        raise ValueError(
            f"one CLT cannot be shared by checkpoints of different shapes: {names[0]} has {first[0]} layers, "
            f"d_model {first[1]}, but {got}; pool only checkpoints of one training run"
        )
    for n, m in models.items():
        check_fits(cfg.clt, m, f"the shared CLT (checkpoint {n})")


def pooled_activations(
    models: Mapping[str, Transformer],
    batches: Sequence[Tensor],
    cfg: CLTTrainConfig,
    *,
    token_filter: TokenFilter = TokenFilter(),
) -> Iterator[ActivationBatch]:
    """Batches of ``cfg.batch_size`` rows of every layer's ``hook_in`` and ``hook_out`` (`clt_hooks`), each
    holding `rows_per_checkpoint` rows of every model (in ``models``' order, first rows first), all models
    reading the same token ``batches``; ends when any stream does."""
    shares = rows_per_checkpoint(cfg.batch_size, len(models))
    hooks = clt_hooks(cfg.clt)
    buffer = cfg.buffer_tokens or 8 * cfg.batch_size
    streams = []
    for i, (model, share) in enumerate(zip(models.values(), shares, strict=True)):
        streams.append(
            iter(
                ActivationStream(
                    model,
                    batches,
                    hooks,
                    batch_size=share,
                    buffer_tokens=max(2 * share, buffer // len(models)),
                    token_filter=token_filter,
                    seed=cfg.seed + i,
                )
            )
        )
    while True:
        parts = []
        for stream in streams:
            part = next(stream, None)
            if part is None:
                return
            parts.append(part)
        yield {h: torch.cat([p[h] for p in parts]) for h in hooks}


def train_clt_shared(
    models: Mapping[str, Transformer | Callable[[], Transformer]],
    data: str | Tensor | Sequence[Tensor],
    cfg: CLTTrainConfig,
    out: str | Path | None = None,
    *,
    source: dict[str, Any] | None = None,
    progress: Callable[[CLTTrainProgress], None] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    stop_after: int | None = None,
    keep_checkpoints: int | None = 2,
) -> CLTTrainResult:
    """Train one CLT on activations pooled from every model in ``models`` (checkpoint name -> model, or a
    function loading it), balanced per checkpoint (see the module docstring). ``data`` as `train_clt`'s (a
    corpus name or path, a token tensor, token batches), read by every checkpoint. With ``out``: an ordinary
    CLT training run (resumable, ``clt/`` when finished) whose config records ``data.shared``: ``{**source,
    checkpoints, rows_per_checkpoint}`` (`CLTTrainRun.shared`)."""
    loaded = {n: m if isinstance(m, Transformer) else m() for n, m in models.items()}
    check_same_shape(loaded, cfg)
    first = next(iter(loaded.values()))
    clt_cfg = cfg.clt.replace(model_name=cfg.clt.model_name or (source or {}).get("run"))
    cfg = CLTTrainConfig(**{**vars(cfg), "clt": clt_cfg})
    toks, token_filter, data_source = token_batches(first, data, cfg)
    shared = {
        **(source or {}),
        "checkpoints": list(loaded),
        "rows_per_checkpoint": rows_per_checkpoint(cfg.batch_size, len(loaded)),
    }
    return train_clt(
        None,
        pooled_activations(loaded, toks, cfg, token_filter=token_filter),
        cfg,
        out,
        progress=progress,
        resume=resume,
        overwrite=overwrite,
        stop_after=stop_after,
        keep_checkpoints=keep_checkpoints,
        source={"shared": shared, **data_source},
    )


__all__ = ["check_same_shape", "pooled_activations", "rows_per_checkpoint", "train_clt_shared"]
