"""`build_feature_db`: collect every feature's statistics and write them into a feature database.

The build is resumable at two grains: finished passes (feature ranges) are recorded in the database, and
the streaming state of the running pass is checkpointed every ``cfg.checkpoint_every`` batches next to the
database (``<db>.build/``). Features are written in transactions of ``WRITE_CHUNK``, so the web app can
browse a database while it is being built. Building twice, or resuming, gives the same rows.

>>> report = build_feature_db("my-features.db", model, sae, tokens, FeatureBuildConfig(top_k=20))
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from interplab.features.collect import (
    TokenSource,
    check_sae_fits,
    collect_features,
    decoder_logit_effects,
    token_batches,
    top_logits,
)
from interplab.features.config import FeatureBuildConfig
from interplab.features.packed import ContextArrays
from interplab.features.stream import FeatureStats, StreamingFeatureStats
from interplab.features.writer import FeatureWriter
from interplab.io import load_tensors, save_tensors
from interplab.model import Transformer
from interplab.runs import Kind, write_json
from interplab.sae import SAE

WRITE_CHUNK = 256
Progress = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class BuildReport:
    """What a build did."""

    path: str
    n_features: int
    n_tokens: int
    passes_run: int
    passes_skipped: int

    def save(self, path: str | Path) -> None:
        write_json(path, Kind.FEATURE_BUILD, self.__dict__)

    def plot(self):
        import plotly.graph_objects as go

        return go.Figure(go.Bar(x=["run", "skipped"], y=[self.passes_run, self.passes_skipped]))


def token_strings(model: Transformer, d_vocab: int) -> list[str]:
    """Each token id as text (``#id`` when the model has no tokenizer)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"#{i}" for i in range(d_vocab)]
    out = []
    for i in range(d_vocab):
        try:
            s = tok.decode([i])
        except Exception:  # ids beyond the tokenizer's vocabulary (padded embeddings)
            s = f"#{i}"
        out.append(s if isinstance(s, str) else str(s))
    return out


def _fingerprint(model: Transformer, sae: SAE, cfg: FeatureBuildConfig, n_tokens: int) -> dict:
    sae_cfg = (
        {k: v for k, v in vars(sae.cfg).items() if isinstance(v, (int, float, str, bool, type(None)))}
        if hasattr(sae.cfg, "__dict__")
        else {}
    )
    return {
        "build_config": cfg.to_dict(),
        "hook_name": sae.cfg.hook_name,
        "d_sae": int(sae.cfg.d_sae),
        "d_in": int(sae.cfg.d_in),
        "n_tokens": n_tokens,
        "sae": sae_cfg,
        "model": {
            "name": model.cfg.name,
            "d_vocab": model.cfg.d_vocab,
            "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model,
        },
        "sae_norm": round(float(sae.W_dec.detach().double().norm()), 6),
    }


def build_feature_db(
    path: str | Path,
    model: Transformer,
    sae: SAE,
    tokens: TokenSource,
    cfg: FeatureBuildConfig | None = None,
    *,
    model_path: str | Path | None = None,
    sae_path: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BuildReport:
    """Build (or resume building) the feature database at ``path`` (a file or a SQLAlchemy URL)."""
    cfg = cfg or FeatureBuildConfig()
    check_sae_fits(model, sae)
    counts = torch.zeros(model.cfg.d_vocab, dtype=torch.long)
    seq_len = None
    for batch in token_batches(tokens, 256):
        counts += torch.bincount(batch.flatten(), minlength=model.cfg.d_vocab)[: model.cfg.d_vocab]
        seq_len = batch.shape[1]
    n_tokens = int(counts.sum())
    if n_tokens == 0:
        raise ValueError("the token source is empty")

    def collect(
        feats: torch.Tensor, state: StreamingFeatureStats, checkpoint: Any, report: Any
    ) -> FeatureStats:
        return collect_features(
            model, sae, tokens, cfg, features=feats, state=state, checkpoint=checkpoint, progress=report
        )

    def effects(feats: torch.Tensor) -> torch.Tensor | None:
        return decoder_logit_effects(model, sae, feats) if sae.cfg.d_in == model.cfg.d_model else None

    return write_feature_db(
        path,
        sae,
        cfg,
        fingerprint=_fingerprint(model, sae, cfg, n_tokens),
        meta={
            "seq_len": seq_len,
            "model_path": str(Path(model_path).resolve()) if model_path else None,
            "sae_path": str(Path(sae_path).resolve()) if sae_path else None,
        },
        vocab=token_strings(model, model.cfg.d_vocab),
        counts=counts.tolist(),
        collect=collect,
        logit_effects=effects,
        overwrite=overwrite,
        progress=progress,
    )


class Dictionary(Protocol):
    """What `write_feature_db` reads of a dictionary: ``cfg.hook_name`` and ``cfg.d_sae`` (an `SAE`, or a
    crosscoder's `interplab.features.crosscoder_db.CrosscoderShape`)."""

    @property
    def cfg(self) -> Any: ...


Collect = Callable[[torch.Tensor, StreamingFeatureStats, Callable, Callable], FeatureStats]
"""``collect(features, state, checkpoint, report) -> FeatureStats``: one streaming pass over the data for a range
of features, continuing ``state`` (its ``batches`` already seen), calling ``checkpoint(state)`` to save it and
``report(i, total)`` for progress (`collect_features` over a corpus; `interplab.rl.features` over cached
decision-transformer activations)"""


def write_feature_db(
    path: str | Path,
    sae: Dictionary,
    cfg: FeatureBuildConfig,
    *,
    fingerprint: dict,
    meta: dict[str, Any],
    vocab: list[str],
    counts: list[int],
    collect: Collect,
    logit_effects: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    on_create: Callable[[FeatureWriter], None] | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BuildReport:
    """The build of `build_feature_db` for any source of activations: the database at ``path`` created (its
    ``meta``: ``fingerprint``, the histogram edges, the window, the SAE's site and size, ``n_tokens`` =
    ``sum(counts)`` and the entries of ``meta``; the vocabulary ``vocab`` with ``counts``; ``on_create`` for
    anything else written once) or resumed (a different ``fingerprint`` is refused), then one ``collect``
    pass per range of features, each written in chunks and recorded as done."""
    n_tokens = int(sum(counts))
    with (
        _no_cyclic_gc(),
        FeatureWriter.for_build(path, overwrite=overwrite) as store,
    ):  # closed on an error too
        found = store.meta()
        if "fingerprint" in found and found["fingerprint"] != fingerprint:
            raise ValueError(
                f"{path} was built with other settings, SAE or corpus; pass overwrite=True (--overwrite) "
                f"to rebuild it from scratch"
            )
        if "fingerprint" not in found:
            store.set_meta(
                fingerprint=fingerprint,
                status="building",
                hist_edges=np.round(
                    np.logspace(np.log10(cfg.hist_min), np.log10(cfg.hist_max), cfg.hist_bins + 1), 8
                ).tolist(),
                window_left=cfg.window_left,
                window_right=cfg.window_right,
                hook_name=sae.cfg.hook_name,
                d_sae=int(sae.cfg.d_sae),
                n_tokens=n_tokens,
                **meta,
            )
            store.write_vocab(vocab, counts)
            if on_create is not None:
                on_create(store)
        stored_vocab = store.vocab()
        d_sae = int(sae.cfg.d_sae)
        step = cfg.features_per_pass or d_sae
        done = store.passes_done()
        ran = skipped = 0
        for first in range(0, d_sae, step):
            last = min(first + step, d_sae)
            if (first, last) in done:
                skipped += 1
                continue
            feats = torch.arange(first, last)
            state_file = store.state_dir / f"pass_{first}_{last}.safetensors"
            state = StreamingFeatureStats(d_sae, cfg, features=feats)
            if state_file.is_file():
                state.load_state_dict(load_tensors(state_file))

            def checkpoint(s: StreamingFeatureStats, state_file: Path = state_file) -> None:
                save_tensors(state_file, s.state_dict())

            def report(i: int, total: int | None, first: int = first, last: int = last) -> None:
                if progress is not None:
                    progress(f"features {first}-{last - 1}", i, total)

            stats = collect(feats, state, checkpoint, report)
            effects = logit_effects(feats) if logit_effects is not None else None
            for lo in range(0, last - first, WRITE_CHUNK):
                rows, ctx = feature_rows(
                    stats, effects, cfg, stored_vocab, range(lo, min(lo + WRITE_CHUNK, last - first))
                )
                store.write_features(rows, ctx)
            store.mark_pass_done(first, last)
            state_file.unlink(missing_ok=True)
            ran += 1
        store.finish_build()
        n = store.n_features()
    return BuildReport(
        path=str(path), n_features=n, n_tokens=n_tokens, passes_run=ran, passes_skipped=skipped
    )


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """Python's cycle collector paused for the build (reference counting still frees everything at once): the
    rows a build makes are millions of small lists and dicts, which trigger full collections that walk every
    object of the process (torch's included), ~5% of a build's CPU time; restored on exit."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _rounded(x: torch.Tensor, digits: int = 4) -> list:
    return torch.round(x.double(), decimals=digits).tolist()


def feature_dicts(
    stats: FeatureStats, logit_effects: torch.Tensor | None, cfg: FeatureBuildConfig, rows: range
) -> list[dict]:
    """The ``features`` table's rows for rows ``rows`` of ``stats`` (`feature_rows`' first half)."""
    center = cfg.window_left
    sl = slice(rows.start, rows.stop)
    n = rows.stop - rows.start
    logits: list[dict[str, list]] = [{"pos": [], "neg": []} for _ in range(n)]
    if logit_effects is not None:
        top = top_logits(logit_effects[sl], cfg.logit_k)
        pv, pi, nv, ni = _rounded(top[0]), top[1].tolist(), _rounded(top[2]), top[3].tolist()
        logits = [
            {
                "pos": [list(e) for e in zip(pi[j], pv[j], strict=True)],
                "neg": [list(e) for e in zip(ni[j], nv[j], strict=True)],
            }
            for j in range(n)
        ]
    cooc = _cooc_rows(stats, sl, cfg.cooc_k)
    feats, n_fires = stats.features[sl].tolist(), stats.n_fires[sl].tolist()
    density, mean_act = stats.density[sl].tolist(), _rounded(stats.mean_act[sl], 6)
    max_act = _rounded(stats.top_val[sl, 0], 6)
    loss = _rounded(stats.loss_effect[sl], 6) if stats.loss_effect is not None else [None] * n
    hist = stats.hist[sl].tolist()
    top_tok = stats.top_tokens[sl, 0, center].tolist()
    out = []
    for j in range(n):
        fires = n_fires[j] > 0
        out.append(
            {
                "feature": feats[j],
                "n_fires": n_fires[j],
                "density": density[j],
                "max_act": max_act[j] if fires else 0.0,
                "mean_act": mean_act[j],
                "loss_effect": loss[j] if fires else None,
                "hist": json.dumps(hist[j]),
                "logits": json.dumps(logits[j]),
                "cooc": json.dumps(cooc[j]),
                "top_token": top_tok[j] if fires else None,
            }
        )
    return out


def feature_rows(
    stats: FeatureStats,
    logit_effects: torch.Tensor | None,
    cfg: FeatureBuildConfig,
    vocab: dict[int, str],
    rows: range,
) -> tuple[list[dict], ContextArrays]:
    """Database rows for rows ``rows`` of ``stats``: the features, and their contexts as arrays (made in bulk,
    because this runs for every feature)."""
    center = cfg.window_left
    sl = slice(rows.start, rows.stop)
    out = feature_dicts(stats, logit_effects, cfg, rows)
    names = np.array([vocab.get(t, f"#{t}") for t in range(max(vocab, default=-1) + 1)] + [""], dtype=object)
    parts = []
    feat_ids = stats.features[sl].numpy()
    for kind, index, val, toks, acts in (
        (0, stats.top_index, stats.top_val, stats.top_tokens, stats.top_acts),
        (1, stats.sample_index, stats.sample_val, stats.sample_tokens, stats.sample_acts),
    ):
        index, val = index[sl], val[sl]
        if kind == 1:  # samples shown from the strongest down, grouped into activation quantiles
            order = torch.argsort(torch.where(index >= 0, -val, float("inf")), dim=1, stable=True)
            index, val = index.gather(1, order), val.gather(1, order)
            toks = toks[sl].gather(1, order[..., None].expand(-1, -1, toks.shape[-1]))
            acts = acts[sl].gather(1, order[..., None].expand(-1, -1, acts.shape[-1]))
        else:
            toks, acts = toks[sl], acts[sl]
        rr, kk = np.nonzero(index.numpy() >= 0)  # (feature row, rank), row-major
        if len(rr) == 0:
            continue
        tok_rows = toks.numpy()[rr, kk]  # context window
        parts.append(
            ContextArrays(
                feature=feat_ids[rr].astype(np.int64),
                kind=np.full(len(rr), kind, np.int64),
                rank=kk.astype(np.int64),
                token_index=index.numpy()[rr, kk].astype(np.int64),
                act=torch.round(val[torch.from_numpy(rr), torch.from_numpy(kk)].double(), decimals=6).numpy(),
                center_token=tok_rows[:, center].astype(np.int64),
                tokens=tok_rows.astype("<i4"),
                acts=acts.numpy()[rr, kk].astype("<f4"),
                text=_texts(tok_rows, names) if kind == 0 else [""] * len(rr),
            )
        )
    return out, ContextArrays.concat(parts)


def _texts(tok_rows: np.ndarray, names: np.ndarray) -> list[str]:
    """Each window as text (``names[-1]`` is "" for positions outside the sequence)."""
    ids = tok_rows
    ids = np.where((ids >= 0) & (ids < len(names) - 1), ids, len(names) - 1)
    return ["".join(row) for row in names[ids].tolist()]


def _cooc_rows(stats: FeatureStats, sl: slice, k: int) -> list[list[list]]:
    """Per feature: the ``k`` features with the highest Jaccard similarity of firing (and the co-firing count)."""
    n = sl.stop - sl.start
    if stats.cooc is None or k == 0:
        return [[] for _ in range(n)]
    rows = stats.cooc[sl].double()
    fires = stats.cooc.diagonal().double()  # firing counts over the tokens co-occurrence was counted on
    union = fires[sl, None] + fires[None, :] - rows
    jac = torch.where(union > 0, rows / union.clamp(min=1), 0.0)
    jac[torch.arange(n), torch.arange(sl.start, sl.stop)] = 0.0
    best, best_idx = jac.topk(min(k, jac.shape[1]), dim=1)
    counts = rows.gather(1, best_idx).long().tolist()
    feats, vals, idx = stats.features.tolist(), _rounded(best), best_idx.tolist()
    return [
        [[feats[g], v, c] for g, v, c in zip(idx[j], vals[j], counts[j], strict=True) if v > 0]
        for j in range(n)
    ]
