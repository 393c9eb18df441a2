"""Per-token loss effects of a feature over its stored contexts (a post-pass; the build never runs it).

For each stored context of a feature (top contexts, and samples with ``kinds=(0, 1)``), the window's tokens
are run through the model twice: as they are, and with the feature's decoder contribution
``act_f(x) * W_dec[f] / act_scale`` subtracted from the SAE's site at every position (the feature removed
from the SAE's reconstruction, the rest of the activation, error term included, untouched). At window
position ``k`` the stored value is ``loss_removed[k] - loss[k]`` where ``loss[k] = -log p(token_k |
tokens_<k)`` on the window: positive where the feature helped predict that token. The window is the model's
whole input (the build keeps no more of the corpus), so activations near its left edge see less context
than in the corpus; the first token of a window has no prediction and its value is NaN, as are positions
outside the corpus.

>>> n = compute_loss_effects("features.db", model, sae)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from sqlalchemy import select
from torch import Tensor

from interplab.features import schema as S
from interplab.features.collect import check_sae_fits, decoder_directions
from interplab.features.writer import FeatureWriter
from interplab.hooks import Site
from interplab.model import Transformer
from interplab.sae import SAE


@torch.no_grad()
def window_loss_effect(
    model: Transformer, sae: SAE, tokens: Int[Tensor, " pos"], feature: int
) -> Float[Tensor, " pos"]:
    """``loss_removed - loss`` per position of ``tokens`` (one window, no padding; NaN at position 0)."""
    hook = check_sae_fits(model, sae)
    direction = decoder_directions(sae, torch.tensor([feature]))[0]

    def remove(x: Tensor, _site: Site) -> Tensor:
        act = sae.encode(x.to(sae.W_enc.dtype))[..., feature].to(x.dtype)
        return x - act[..., None] * direction.to(x.dtype)

    toks = tokens[None].long()
    clean = model(toks).float()
    removed = model.run_with_hooks(toks, fwd_hooks=[(hook, remove)]).float()
    target = toks[0, 1:, None]

    def nll(logits: Tensor) -> Tensor:
        return -torch.log_softmax(logits[0, :-1], -1).gather(-1, target)[:, 0]

    return torch.cat([torch.full((1,), float("nan")), nll(removed) - nll(clean)])


def compute_loss_effects(
    db: str | Path,
    model: Transformer,
    sae: SAE,
    *,
    features: Iterable[int] | None = None,
    kinds: tuple[int, ...] = (0,),
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Compute and store (`schema.context_loss`) the per-token loss effects of ``features``' contexts of
    ``kinds`` (0: top, 1: samples); resumable: contexts that have them are skipped unless ``overwrite``.
    Returns how many contexts were computed."""
    check_sae_fits(model, sae)
    with FeatureWriter(db) as store:
        d_sae = store.meta().get("d_sae")
        if d_sae is not None and int(d_sae) != sae.cfg.d_sae:
            raise ValueError(
                f"{db} holds {d_sae} features but the SAE has d_sae={sae.cfg.d_sae}: another SAE"
            )
        with store.reader() as r:
            rows = [(x["id"], x["feature"], x["tokens"]) for x in r.contexts(features, kinds)]
        with store.engine.connect() as c:
            if not overwrite and S.has_table(store.engine, S.context_loss):
                done = set(c.execute(select(S.context_loss.c.context_id)).scalars())
                rows = [r for r in rows if r[0] not in done]
        pending: dict[int, np.ndarray] = {}
        for n, (cid, feature, blob) in enumerate(rows, 1):
            window = np.frombuffer(blob, "<i4")
            valid = np.flatnonzero(window >= 0)
            out = np.full(window.shape[0], np.nan, dtype=np.float32)
            if valid.size > 1:  # the corpus part of a window is contiguous
                lo, hi = int(valid[0]), int(valid[-1]) + 1
                toks = torch.from_numpy(window[lo:hi].astype(np.int64))
                out[lo:hi] = window_loss_effect(model, sae, toks, int(feature)).numpy()
            pending[int(cid)] = out
            if len(pending) >= 256 or n == len(rows):
                store.write_context_loss(pending)
                pending = {}
            if progress is not None:
                progress(n, len(rows))
        return len(rows)
