"""`build_feature_db`: collect every feature's statistics and write them into a feature database.

The build is resumable at two grains: finished passes (feature ranges) are recorded in the database, and
the streaming state of the running pass is checkpointed every ``cfg.checkpoint_every`` batches next to the
database (``<db>.build/``). Features are written in transactions of ``WRITE_CHUNK``, so the web app can
browse a database while it is being built. Building twice, or resuming, gives the same rows.

>>> build_feature_db("features.db", model, sae, tokens, FeatureBuildConfig(top_k=20))   # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from interplab.features.store import FeatureStore
from interplab.features.stream import FeatureStats, StreamingFeatureStats

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

    def save(self, path) -> None:
        from interplab.io import atomic_write_json

        atomic_write_json(path, self.__dict__)

    def plot(self):
        import plotly.graph_objects as go

        return go.Figure(go.Bar(x=["run", "skipped"], y=[self.passes_run, self.passes_skipped]))


def token_strings(model, d_vocab: int) -> list[str]:
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


def _fingerprint(model, sae, cfg: FeatureBuildConfig, n_tokens: int) -> dict:
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
    model,
    sae,
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
    if overwrite and "://" not in str(path):
        Path(path).unlink(missing_ok=True)
        shutil.rmtree(_state_dir(path), ignore_errors=True)
    store = FeatureStore(path, create=True)
    fingerprint = _fingerprint(model, sae, cfg, n_tokens)
    meta = store.meta()
    if "fingerprint" in meta and meta["fingerprint"] != fingerprint:
        raise ValueError(
            f"{path} was built with other settings, SAE or corpus; pass overwrite=True (--overwrite) "
            f"to rebuild it from scratch"
        )
    if "fingerprint" not in meta:
        store.set_meta(
            fingerprint=fingerprint,
            status="building",
            seq_len=seq_len,
            hist_edges=np.round(
                np.logspace(np.log10(cfg.hist_min), np.log10(cfg.hist_max), cfg.hist_bins + 1), 8
            ).tolist(),
            window_left=cfg.window_left,
            window_right=cfg.window_right,
            hook_name=sae.cfg.hook_name,
            d_sae=int(sae.cfg.d_sae),
            n_tokens=n_tokens,
            model_path=str(Path(model_path).resolve()) if model_path else None,
            sae_path=str(Path(sae_path).resolve()) if sae_path else None,
        )
        store.write_vocab(token_strings(model, model.cfg.d_vocab), counts.tolist())
    vocab = store.vocab()
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
        state_file = _state_dir(path) / f"pass_{first}_{last}.safetensors"
        state = StreamingFeatureStats(d_sae, cfg, features=feats)
        if state_file.is_file():
            from safetensors.torch import load_file

            state.load_state_dict(load_file(str(state_file)))

        def checkpoint(s: StreamingFeatureStats, state_file=state_file) -> None:
            from interplab.io import save_tensors

            save_tensors(state_file, s.state_dict())

        def report(i: int, total: int | None, first=first, last=last) -> None:
            if progress is not None:
                progress(f"features {first}-{last - 1}", i, total)

        stats = collect_features(
            model, sae, tokens, cfg, features=feats, state=state, checkpoint=checkpoint, progress=report
        )
        effects = decoder_logit_effects(model, sae, feats) if sae.cfg.d_in == model.cfg.d_model else None
        for lo in range(0, last - first, WRITE_CHUNK):
            rows, ctx = feature_rows(
                stats, effects, cfg, vocab, range(lo, min(lo + WRITE_CHUNK, last - first))
            )
            store.write_features(rows, ctx)
        store.mark_pass_done(first, last)
        state_file.unlink(missing_ok=True)
        ran += 1
    store.set_meta(status="complete")
    shutil.rmtree(_state_dir(path), ignore_errors=True)
    n = store.n_features()
    store.close()
    return BuildReport(
        path=str(path), n_features=n, n_tokens=n_tokens, passes_run=ran, passes_skipped=skipped
    )


def _state_dir(path: str | Path) -> Path:
    s = str(path)
    if "://" in s:
        return Path(".interplab-feature-build")
    return Path(s + ".build")


def _r(x: np.ndarray) -> list:
    return np.round(x.astype(np.float64), 4).tolist()


def feature_rows(
    stats: FeatureStats,
    logit_effects: torch.Tensor | None,
    cfg: FeatureBuildConfig,
    vocab: dict[int, str],
    rows: range,
) -> tuple[list[dict], list[dict]]:
    """Database rows for rows ``rows`` of ``stats`` (features and their contexts)."""
    center = cfg.window_left
    if logit_effects is not None:
        pv, pi, nv, ni = (t.numpy() for t in top_logits(logit_effects[rows.start : rows.stop], cfg.logit_k))
    n_fires = stats.n_fires.numpy()
    density, mean_act = stats.density.numpy(), stats.mean_act.numpy()
    loss = stats.loss_effect.numpy() if stats.loss_effect is not None else None
    out, ctx = [], []
    for j, i in enumerate(rows):
        f = int(stats.features[i])
        logits = {"pos": [], "neg": []}
        if logit_effects is not None:
            logits = {
                "pos": [[int(t), round(float(v), 4)] for t, v in zip(pi[j], pv[j], strict=True)],
                "neg": [[int(t), round(float(v), 4)] for t, v in zip(ni[j], nv[j], strict=True)],
            }
        fires = int(n_fires[i]) > 0
        out.append(
            {
                "feature": f,
                "n_fires": int(n_fires[i]),
                "density": float(density[i]),
                "max_act": round(float(stats.top_val[i, 0]), 6) if fires else 0.0,
                "mean_act": round(float(mean_act[i]), 6),
                "loss_effect": None if loss is None or not fires else round(float(loss[i]), 6),
                "hist": json.dumps(stats.hist[i].tolist()),
                "logits": json.dumps(logits),
                "cooc": json.dumps(_cooc(stats, i, cfg.cooc_k)),
                "top_token": int(stats.top_tokens[i, 0, center]) if fires else None,
            }
        )
        groups = (
            (0, stats.top_index[i], stats.top_val[i], stats.top_tokens[i], stats.top_acts[i]),
            (1, stats.sample_index[i], stats.sample_val[i], stats.sample_tokens[i], stats.sample_acts[i]),
        )
        for kind, index, val, toks, acts in groups:
            keep = (index >= 0).nonzero().flatten()
            if kind == 1:  # samples shown from the strongest down, grouped into activation quantiles
                keep = keep[torch.argsort(-val[keep], stable=True)]
            for rank, k in enumerate(keep.tolist()):
                ids = toks[k].tolist()
                ctx.append(
                    {
                        "feature": f,
                        "kind": kind,
                        "rank": rank,
                        "token_index": int(index[k]),
                        "act": round(float(val[k]), 6),
                        "center_token": ids[center],
                        "tokens": json.dumps(ids),
                        "acts": json.dumps(_r(acts[k].numpy())),
                        "text": "".join(vocab.get(t, f"#{t}") for t in ids if t >= 0),
                    }
                )
    return out, ctx


def _cooc(stats: FeatureStats, i: int, k: int) -> list[list]:
    if stats.cooc is None or k == 0:
        return []
    row = stats.cooc[i].double()
    fires = stats.cooc.diagonal().double()  # firing counts over the tokens co-occurrence was counted on
    union = fires[i] + fires - row
    jac = torch.where(union > 0, row / union.clamp(min=1), 0.0)
    jac[i] = 0.0
    vals, idx = jac.topk(min(k, len(jac)))
    return [
        [int(stats.features[g]), round(float(v), 4), int(stats.cooc[i, g])]
        for v, g in zip(vals, idx, strict=True)
        if v > 0
    ]
