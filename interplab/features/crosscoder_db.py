"""Feature pages for a crosscoder's latents: a feature database built from the crosscoder's activations on the
models (or checkpoints) it reads, with each latent's decoder-norm share per side (the model-diff signature).

A crosscoder latent has one activation per token (its encoder sums every source), so its statistics, top
contexts and samples are those of any feature database (`write_feature_db`, one streaming pass). What is its
own is recorded in ``meta["crosscoder"]``: the sources and, per latent, the norm of its decoder row into each
source, the share ``norm_s / sum_s norm_s`` and a side label: for two sources the labels of
`interplab.sae.diffing.classify` read as sides (``lost`` -> ``A-only``, ``new`` -> ``B-only``, ``shared``,
``partial``); for more sources ``S-only`` where one share is at least `interplab.sae.diffing.NEW_ABOVE`, else
``shared``. The feature page shows them (`interplab.web.views.crosscoder_view`).

>>> from interplab.sae.crosscoder import CrosscoderConfig
>>> sources = ("a:blocks.0.hook_resid_post", "b:blocks.0.hook_resid_post")
>>> cc = Crosscoder(CrosscoderConfig(d_in=64, d_sae=8, k=2, sources=sources))
>>> report = build_crosscoder_db("cc-features.db", [model, model], cc, tokens)
>>> report.n_features
8
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.features.build import BuildReport, token_strings, write_feature_db
from interplab.features.collect import TokenSource, token_batches
from interplab.features.config import FeatureBuildConfig
from interplab.features.stream import FeatureStats, StreamingFeatureStats
from interplab.model import Transformer
from interplab.model.load import load_model
from interplab.runs import CROSSCODER_DIR, DIFF_JSON, FEATURE_DB, TrainRun
from interplab.sae.activations import TokenFilter, corpus_token_batches, model_activations
from interplab.sae.crosscoder import Crosscoder, load_crosscoder
from interplab.sae.diffing import NEW_ABOVE, classify

CROSSCODER_META = "crosscoder"
"""the ``meta`` key of a crosscoder's feature database (absent from an SAE's)"""
SIDE_LABELS = {"lost": "A-only", "new": "B-only", "shared": "shared", "partial": "partial", "dead": "dead"}
"""`interplab.sae.diffing` labels of a two-source crosscoder, read as the side a latent writes into"""

ALL_POSITIONS = TokenFilter(exclude_bos=False)


@dataclass(frozen=True)
class _Cfg:
    hook_name: str
    d_sae: int


@dataclass(frozen=True)
class CrosscoderShape:
    """What `write_feature_db` reads of a dictionary, for a crosscoder (its sources joined as the site)."""

    cfg: _Cfg


def source_hook(source: str) -> str:
    """The hook of a source name: ``"step_000100:blocks.1.hook_resid_post"`` -> ``"blocks.1.hook_resid_post"``
    (a multi-layer crosscoder's sources are hooks already)."""
    return source.rsplit(":", 1)[-1]


def side_shares(cc: Crosscoder, norms: Tensor | None = None) -> Float[Tensor, "d_sae n_sources"]:
    """Each latent's decoder norm into each source over the sum of them (NaN where all are 0); ``norms``:
    ``cc.decoder_norms()`` if already computed."""
    with torch.no_grad():
        norms = (cc.decoder_norms() if norms is None else norms).double()
        return norms / norms.sum(-1, keepdim=True)


def side_labels(cc: Crosscoder, alive: Tensor | None = None, *, shares: Tensor | None = None) -> list[str]:
    """Per latent: ``A-only`` / ``B-only`` / ``shared`` / ``partial`` (two sources, `SIDE_LABELS`) or
    ``<source>-only`` / ``shared`` (more), ``dead`` where ``alive`` [d_sae] is False; ``shares``:
    `side_shares` if already computed."""
    shares = side_shares(cc) if shares is None else shares
    if cc.cfg.n_sources == 2:
        return [SIDE_LABELS[lab] for lab in classify(shares[:, 1].float(), alive)]
    out = []
    for i, row in enumerate(shares.tolist()):
        if (alive is not None and not bool(alive[i])) or row[0] != row[0]:
            out.append("dead")
            continue
        top = max(range(len(row)), key=row.__getitem__)
        out.append(f"{cc.cfg.sources[top]}-only" if row[top] >= NEW_ABOVE else "shared")
    return out


@torch.no_grad()
def crosscoder_acts(
    models: Sequence[Transformer], cc: Crosscoder, tokens: Tensor
) -> Float[Tensor, "batch pos d_sae"]:
    """The crosscoder's latent activations on a token batch [batch pos]: source s read at its hook of
    ``models[s]`` (every position kept)."""
    b, p = tokens.shape
    x = torch.stack(
        [
            model_activations(m, tokens, [source_hook(s)], token_filter=ALL_POSITIONS)[source_hook(s)]
            for m, s in zip(models, cc.cfg.sources, strict=True)
        ],
        dim=1,
    )
    return cc.encode(x.float()).reshape(b, p, -1)


def build_crosscoder_db(
    path: str | Path,
    models: Sequence[Transformer],
    cc: Crosscoder,
    tokens: TokenSource,
    cfg: FeatureBuildConfig | None = None,
    *,
    side_names: Sequence[str] | None = None,
    crosscoder_path: str | Path | None = None,
    diff_path: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> BuildReport:
    """The feature database of crosscoder ``cc``'s latents over ``tokens`` (read by ``models[s]`` for source
    s: the checkpoints of a model diff, or one model several times for a multi-layer crosscoder), with the
    decoder-norm shares and side labels in ``meta["crosscoder"]``. ``side_names``: how the pages call the
    sides (default the sources). ``diff_path``: the ``diff.json`` folder the pages link back to. The
    loss effect and logit effects are left out (a latent writes into several models)."""
    cfg = cfg or FeatureBuildConfig()
    if len(models) != cc.cfg.n_sources:
        raise ValueError(
            f"the crosscoder reads {cc.cfg.n_sources} sources {list(cc.cfg.sources)}, got {len(models)} models"
        )
    if cfg.loss_effect:
        cfg = dataclasses.replace(cfg, loss_effect=False)
    vocab_sizes = {m.cfg.d_vocab for m in models}
    if len(vocab_sizes) != 1:
        raise ValueError(f"the models must share one vocabulary, got d_vocab {sorted(vocab_sizes)}")
    d_vocab = vocab_sizes.pop()
    names = list(side_names) if side_names is not None else list(cc.cfg.sources)
    if len(names) != cc.cfg.n_sources:
        raise ValueError(f"side_names needs {cc.cfg.n_sources} names, got {names}")
    counts = torch.zeros(d_vocab, dtype=torch.long)
    seq_len = None
    for batch in token_batches(tokens, 256):
        counts += torch.bincount(batch.flatten(), minlength=d_vocab)[:d_vocab]
        seq_len = batch.shape[1]
    if int(counts.sum()) == 0:
        raise ValueError("the token source is empty")

    def collect(
        feats: Tensor, state: StreamingFeatureStats, checkpoint: Callable, report: Callable
    ) -> FeatureStats:
        for batch in token_batches(tokens, cfg.batch_size, skip=state.batches):
            state.update(batch, crosscoder_acts(models, cc, batch)[..., feats])
            if cfg.checkpoint_every and state.batches % cfg.checkpoint_every == 0:
                checkpoint(state)
            report(state.batches, None)
        return state.result()

    norms = cc.decoder_norms().detach().double()
    shares = side_shares(cc, norms)
    record: dict[str, Any] = {
        "sources": list(cc.cfg.sources),
        "sides": names,
        "decoder_norms": [[round(v, 6) for v in row] for row in norms.tolist()],
        "shares": [[None if v != v else round(v, 6) for v in row] for row in shares.tolist()],
        "labels": side_labels(cc, shares=shares),
        "crosscoder": str(Path(crosscoder_path).resolve()) if crosscoder_path is not None else None,
        "diff": str(Path(diff_path).resolve()) if diff_path is not None else None,
    }
    shape = CrosscoderShape(_Cfg(hook_name=" + ".join(cc.cfg.sources), d_sae=cc.cfg.d_sae))
    fingerprint = {
        "build_config": cfg.to_dict(),
        "crosscoder": cc.cfg.to_dict(),
        "n_tokens": int(counts.sum()),
        "decoder_norm": round(float(norms.norm()), 6),
    }
    return write_feature_db(
        path,
        shape,
        cfg,
        fingerprint=fingerprint,
        meta={"seq_len": seq_len, "model_path": None, "sae_path": None, CROSSCODER_META: record},
        vocab=token_strings(models[-1], d_vocab),
        counts=counts.tolist(),
        collect=collect,
        overwrite=overwrite,
        progress=progress,
    )


def build_diff_db(
    diff_folder: str | Path,
    *,
    n_seqs: int = 256,
    seq_len: int | None = None,
    cfg: FeatureBuildConfig | None = None,
    overwrite: bool = False,
    progress: Callable[[str, int, int | None], None] | None = None,
) -> BuildReport:
    """The feature database (``diff_folder/features.db``) of the crosscoder a model diff saved
    (`interplab.sae.diffing.diff_checkpoints` with ``out``): its two checkpoints (named in the crosscoder's
    ``meta``) read ``n_seqs`` sequences of the run's own corpus; the pages link back to ``diff.json``."""
    folder = Path(diff_folder)
    cc = load_crosscoder(folder / CROSSCODER_DIR)
    meta = cc.cfg.meta or {}
    missing = [k for k in ("run", "before", "after") if k not in meta]
    if missing:
        raise ValueError(
            f"{folder / CROSSCODER_DIR} is not a model diff's crosscoder: its meta lacks {missing}"
        )
    run = TrainRun.open(meta["run"])
    models = [load_model(run.checkpoint(int(meta[k])).path) for k in ("before", "after")]
    for m in models:
        m.eval()
    source = run.config.get("data", {}).get("source") or "python-stdlib"
    seq = seq_len or min(128, models[0].cfg.n_ctx)
    corpus = corpus_token_batches(models[0], source, seq_len=seq, batch_size=16, n_batches=-(-n_seqs // 16))
    tokens = torch.cat(list(corpus.batches))[:n_seqs]
    names = [f"step {int(meta['before'])}", f"step {int(meta['after'])}"]
    return build_crosscoder_db(
        folder / FEATURE_DB,
        models,
        cc,
        tokens,
        cfg,
        side_names=names,
        crosscoder_path=folder / CROSSCODER_DIR,
        diff_path=folder if (folder / DIFF_JSON).is_file() else None,
        overwrite=overwrite,
        progress=progress,
    )


__all__ = [
    "CROSSCODER_META",
    "SIDE_LABELS",
    "CrosscoderShape",
    "build_crosscoder_db",
    "build_diff_db",
    "crosscoder_acts",
    "side_labels",
    "side_shares",
    "source_hook",
]
