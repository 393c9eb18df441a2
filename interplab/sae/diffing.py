"""Model diffing with a crosscoder (Lindsey et al. 2024): train one `Crosscoder` on the same site of two
models (here: two checkpoints of one training run) and sort its latents by where their decoder writes.

For latent i with decoder norms a_i (into "before") and b_i (into "after")::

    relative_norm_i = b_i / (a_i + b_i)        0: only in before (lost), 1: only in after (new), 0.5: shared

Latents with ``relative_norm <= LOST_BELOW`` are *lost*, ``>= NEW_ABOVE`` *new*, between ``SHARED`` bounds
*shared*, the rest *partial*; latents that never fired on the evaluation tokens are *dead* and left out of
the counts. `diff_checkpoints` links the result to the run's formation report (``formation.json`` of
`interplab formation`): whether the two steps bracket the induction head's formation, so the new features
are candidates for what appeared with it.

>>> result = diff_checkpoints("runs/demo", before=100, after=1000)  # trains a crosscoder # doctest: +SKIP
>>> result.counts()  # after the call above # doctest: +SKIP
>>> formation_window("runs/demo")  # the checkpoints either side of the formation step # doctest: +SKIP
{'new': ..., 'lost': ..., 'shared': ..., 'partial': ..., 'dead': ...}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab import runs
from interplab.io import atomic_write_text, read_json
from interplab.model.load import load_model
from interplab.plots import figure_html, write_image
from interplab.sae.activations import corpus_token_batches
from interplab.sae.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    CrosscoderTrainConfig,
    fvu,
    load_crosscoder,
    multi_model_activations,
    shuffled_batches,
    train_crosscoder,
)

LOST_BELOW = 0.1
NEW_ABOVE = 0.9
SHARED = (0.3, 0.7)
LABELS = ("new", "lost", "shared", "partial", "dead")
DIFF_JSON = runs.DIFF_JSON
N_EXAMPLES = 5
"""held-out contexts kept per listed latent (its strongest activations)"""
N_LISTED = 20
"""latents whose examples are kept: the new ones, else the ones leaning most towards the later checkpoint"""
CONTEXT_LEFT = 6
"""tokens shown before the activating one in an example"""


def relative_norms(cc: Crosscoder) -> Tensor:
    """[d_sae] b / (a + b) of each latent's decoder norms into source 0 (a) and source 1 (b); NaN where
    both are 0."""
    if cc.cfg.n_sources != 2:
        raise ValueError(f"model diffing needs a crosscoder of two sources, got {list(cc.cfg.sources)}")
    with torch.no_grad():
        norms = cc.decoder_norms()
        return norms[:, 1] / (norms[:, 0] + norms[:, 1])


def classify(relative: Tensor, alive: Tensor | None = None) -> list[str]:
    """The label (`LABELS`) of each latent from its relative norm; ``alive`` [d_sae] bool (False: dead)."""
    out = []
    for i, r in enumerate(relative.tolist()):
        if (alive is not None and not bool(alive[i])) or r != r:
            out.append("dead")
        elif r <= LOST_BELOW:
            out.append("lost")
        elif r >= NEW_ABOVE:
            out.append("new")
        elif SHARED[0] <= r <= SHARED[1]:
            out.append("shared")
        else:
            out.append("partial")
    return out


@dataclass(frozen=True)
class DiffResult:
    """A crosscoder's latents sorted into new / lost / shared / partial / dead between two sources."""

    relative_norm: Tensor
    """[d_sae] b / (a + b)"""
    cosine: Tensor
    """[d_sae] cosine between each latent's before and after decoder rows"""
    labels: tuple[str, ...]
    before: str
    after: str
    fvu: float | None = None
    formation: dict[str, Any] | None = None
    """the run's formation step and whether before < formation_step <= after (None: no report)"""
    meta: dict[str, Any] = field(default_factory=dict)
    examples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    """latent -> its strongest held-out activations: ``{"context": text, "token": text, "act": value}``"""

    @classmethod
    def from_crosscoder(cls, cc: Crosscoder, *, alive: Tensor | None = None, **kw: Any) -> DiffResult:
        rel = relative_norms(cc)
        with torch.no_grad():
            cos = torch.nn.functional.cosine_similarity(cc.W_dec[:, 0], cc.W_dec[:, 1], dim=-1)
        return cls(
            rel, cos, tuple(classify(rel, alive)), before=cc.cfg.sources[0], after=cc.cfg.sources[1], **kw
        )

    def counts(self) -> dict[str, int]:
        return {label: self.labels.count(label) for label in LABELS}

    def features(self, label: str) -> list[int]:
        """The latents of one label, most extreme first (new: highest relative norm; lost: lowest; shared:
        closest to 0.5)."""
        if label not in LABELS:
            raise ValueError(f"unknown label {label!r}; valid: {LABELS}")
        idx = [i for i, lab in enumerate(self.labels) if lab == label]
        r = self.relative_norm
        key = {"new": lambda i: -float(r[i]), "lost": lambda i: float(r[i])}.get(
            label, lambda i: abs(float(r[i]) - 0.5)
        )
        return sorted(idx, key=key)

    def leaning_new(self, n: int = N_LISTED) -> list[int]:
        """The ``n`` live latents with the largest relative norm (the new ones first): what the later
        checkpoint has most of its own, even when no latent passes `NEW_ABOVE`."""
        live = [i for i, lab in enumerate(self.labels) if lab != "dead"]
        return sorted(live, key=lambda i: -float(self.relative_norm[i]))[:n]

    def summary(self) -> str:
        c = self.counts()
        alive = len(self.labels) - c["dead"]
        text = (
            f"{alive} live latents between {self.before} and {self.after}: {c['new']} new, {c['lost']} lost, "
            f"{c['shared']} shared, {c['partial']} partial ({c['dead']} dead)"
        )
        f = self.formation
        if f is not None:
            if f.get("formation_step") is None:
                text += "; the run's formation report found no induction head forming"
            else:
                where = "between them" if f["brackets"] else "outside them"
                text += f"; the induction head formed at step {f['formation_step']}, {where}"
        return text

    def plot(self) -> Any:
        """Histogram of the live latents' relative decoder norm (Plotly), the class bounds marked."""
        import plotly.graph_objects as go

        live = [float(r) for r, lab in zip(self.relative_norm, self.labels, strict=True) if lab != "dead"]
        fig = go.Figure(go.Histogram(x=live, xbins={"start": 0.0, "end": 1.0, "size": 0.025}))
        for x in (LOST_BELOW, NEW_ABOVE, *SHARED):
            fig.add_vline(x=x, line_dash="dot", line_color="grey")
        c = self.counts()
        fig.update_layout(
            title={
                "text": f"relative decoder norm: {c['lost']} lost, {c['shared']} shared, {c['partial']} partial, "
                f"{c['new']} new<br><sup>{self.before} → {self.after}</sup>",
                "font": {"size": 15},
            },
            xaxis={
                "title": "||d_after|| / (||d_before|| + ||d_after||)   (0: only before, 1: only after)",
                "range": [0, 1],
            },  # fmt: skip
            yaxis_title="live latents",
            template="plotly_white",
            width=820,
            margin={"l": 60, "r": 20, "t": 70, "b": 60},
        )
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {
            "before": self.before,
            "after": self.after,
            "counts": self.counts(),
            "fvu": self.fvu,
            "formation": self.formation,
            "thresholds": {"lost_below": LOST_BELOW, "new_above": NEW_ABOVE, "shared": list(SHARED)},
            "features": {label: self.features(label) for label in ("new", "lost", "shared")},
            "relative_norm": [None if r != r else r for r in self.relative_norm.tolist()],
            "cosine": [None if c != c else c for c in self.cosine.tolist()],
            "labels": list(self.labels),
            "leaning_new": self.leaning_new(),
            "examples": {str(k): v for k, v in self.examples.items()},
            "meta": self.meta,
        }

    def save(self, folder: str | Path) -> dict[str, str | None]:
        """Write ``diff.json``, ``diff.md``, ``relative_norm.html`` and
        ``relative_norm.png``; returns the paths written (the PNG: None with a reason when no renderer)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        runs.write_json(folder / DIFF_JSON, runs.Kind.MODEL_DIFF, self.to_dict())
        c = self.counts()
        lines = [f"# crosscoder diff: {self.before} -> {self.after}", "", self.summary(), ""]
        lines += ["| label | latents | first ten |", "| --- | --- | --- |"]
        lines += [f"| {lab} | {c[lab]} | {self.features(lab)[:10]} |" for lab in LABELS if lab != "dead"]
        if self.examples:
            lines += [
                "",
                f"Latents leaning most towards {self.after} (relative norm, strongest held-out example):",
                "",
            ]
            lines += [
                "| latent | label | relative norm | cosine | example (activating token in [brackets]) |"
            ]
            lines += ["| --- | --- | --- | --- | --- |"]
            for i in self.leaning_new():
                ex = self.examples.get(i) or [{}]
                ctx = str(ex[0].get("context", "")).replace("|", "\\|").replace("\n", "\\n")
                lines.append(
                    f"| {i} | {self.labels[i]} | {float(self.relative_norm[i]):.3f} | "
                    f"{float(self.cosine[i]):.3f} | `{ctx}` |"
                )
        atomic_write_text(folder / runs.DIFF_TABLE, "\n".join(lines) + "\n")
        fig = self.plot()
        atomic_write_text(folder / "relative_norm.html", figure_html(fig, folder))
        why = write_image(fig, folder / "relative_norm.png")
        return {
            "json": str(folder / DIFF_JSON),
            "md": str(folder / runs.DIFF_TABLE),
            "html": str(folder / "relative_norm.html"),
            "png": None if why else str(folder / "relative_norm.png"),
            "png_missing": why,
        }


def formation_link(run_dir: str | Path, before: int, after: int) -> dict[str, Any] | None:
    """The run's formation step (from its ``formation/formation.json``, where `interplab formation` writes it,
    or a ``formation.json`` in the run folder itself) and whether ``before < step <= after``; None when the run
    has no formation report."""
    candidates = [Path(run_dir) / runs.FORMATION / runs.FORMATION_JSON, Path(run_dir) / runs.FORMATION_JSON]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    data = runs.read_json(path, runs.Kind.FORMATION)
    step = data.get("formation_step")
    return {
        "report": str(path),
        "formation_step": step,
        "brackets": step is not None and before < step <= after,
    }


def formation_window(run_dir: str | Path, formation_step: int | None = None) -> tuple[int, int] | None:
    """The two checkpoints of training run ``run_dir`` nearest its formation step on either side: the last
    before it and the first at or after it (``before < formation_step <= after``, what `formation_link` calls
    bracketing), so a diff of them isolates what appeared as the induction head formed. ``formation_step``
    defaults to the run's formation report; None when there is none, no head formed or no checkpoint lies on
    one side."""
    if formation_step is None:
        link = formation_link(run_dir, 0, 0)
        formation_step = link["formation_step"] if link is not None else None
    if formation_step is None:
        return None
    steps = [c.step for c in runs.TrainRun.open(run_dir).checkpoints()]
    before = [s for s in steps if s < formation_step]
    after = [s for s in steps if s >= formation_step]
    return (before[-1], after[0]) if before and after else None


def diff_checkpoints(
    run_dir: str | Path,
    before: int,
    after: int,
    *,
    hook: str | None = None,
    expansion: int = 8,
    k: int = 16,
    n_tokens: int = 32_768,
    batch_size: int = 1024,
    train: CrosscoderTrainConfig = CrosscoderTrainConfig(steps=1500, checkpoint_every=250),
    seq_len: int | None = None,
    out: str | Path | None = None,
) -> DiffResult:
    """Train a crosscoder on ``hook`` (default: the last layer's ``hook_resid_post``) of checkpoints
    ``before`` and ``after`` of training run ``run_dir`` over the same ``n_tokens`` of the run's own corpus,
    and classify its latents; the latents leaning most towards ``after`` keep their strongest held-out
    contexts (``examples``). With ``out`` (`default_diff_folder` is the run's own ``diffs/`` folder, where the
    run page lists it beside the formation report) the crosscoder (``out/crosscoder``) and the diff are saved
    there, and training checkpoints into ``out/train`` every ``train.checkpoint_every`` steps: an interrupted
    diff resumes when called again."""
    run = runs.TrainRun.open(run_dir)
    if before >= after:
        raise ValueError(f"--before ({before}) must be an earlier step than --after ({after})")
    models = [load_model(run.checkpoint(step).path) for step in (before, after)]
    for m in models:
        m.eval()
    cfg = models[0].cfg
    hook = hook or f"blocks.{cfg.n_layers - 1}.hook_resid_post"
    source = run.config.get("data", {}).get("source") or "python-stdlib"
    seq = seq_len or min(128, cfg.n_ctx)
    n_batches = max(1, -(-n_tokens // (16 * seq)))
    corpus = corpus_token_batches(models[0], source, seq_len=seq, batch_size=16, n_batches=n_batches)
    rows = torch.cat(
        list(multi_model_activations(models, corpus.batches, hook, token_filter=corpus.token_filter))
    )[:n_tokens]
    # (batch, sequence, position) of every row, in the order the token filter keeps them
    where = torch.cat(
        [
            torch.cat([torch.full((int(m.sum()), 1), i), m.nonzero()], dim=1)
            for i, m in enumerate(corpus.token_filter.mask(b) for b in corpus.batches)
        ]
    )[:n_tokens]
    n_eval = max(batch_size, rows.shape[0] // 10)
    held, rows = rows[:n_eval], rows[n_eval:]
    cc = Crosscoder(
        CrosscoderConfig(
            d_in=rows.shape[-1],
            d_sae=expansion * rows.shape[-1],
            k=k,
            sources=(f"step_{before}:{hook}", f"step_{after}:{hook}"),
            model_name=str(run.path),
            meta={"run": str(run.path), "before": before, "after": after, "hook": hook},
        ),
        seed=train.seed,
    )
    identity = {"run": str(run.path), "before": before, "after": after, "hook": hook, "tokens": n_tokens,
                "seq_len": seq, "batch_size": batch_size, "corpus": str(source)}  # fmt: skip
    history = train_crosscoder(
        cc,
        shuffled_batches(rows, batch_size, seed=train.seed),
        train,
        checkpoints=Path(out) / "train" if out is not None else None,
        data_identity=identity,
    )
    with torch.no_grad():
        held_acts = cc.encode(held)
        alive = (held_acts > 0).any(0)
    draft = DiffResult.from_crosscoder(cc, alive=alive)
    tokenizer = models[0].tokenizer
    examples = {}
    for i in draft.leaning_new():
        examples[i] = [
            _example(corpus.batches, where[int(r)], float(held_acts[r, i]), tokenizer)
            for r in torch.argsort(-held_acts[:, i], stable=True)[:N_EXAMPLES].tolist()
            if float(held_acts[r, i]) > 0
        ]
    result = DiffResult.from_crosscoder(
        cc,
        alive=alive,
        examples=examples,
        fvu=fvu(cc, held),
        formation=formation_link(run.path, before, after),
        meta={
            "run": str(run.path),
            "hook": hook,
            "tokens": int(rows.shape[0]),
            "eval_tokens": int(held.shape[0]),
            "train": history[-1] if history else {},
        },
    )
    if out is not None:
        cc.save(Path(out) / runs.CROSSCODER_DIR)
        result.save(out)
    return result


def _example(batches: list[Tensor], at: Tensor, act: float, tokenizer: Any) -> dict[str, Any]:
    b, seq, pos = (int(v) for v in at)
    ids = batches[b][seq, max(0, pos - CONTEXT_LEFT) : pos + 1].tolist()
    text = (lambda t: tokenizer.decode([t])) if tokenizer is not None else (lambda t: f"#{t}")
    pieces = [text(t) for t in ids]
    return {
        "context": "".join(pieces[:-1]) + f"[{pieces[-1]}]",
        "token": pieces[-1],
        "act": round(act, 4),
    }


def default_diff_folder(run_dir: str | Path, before: int, after: int) -> Path:
    """Where a diff of two checkpoints of a run goes by default: ``RUN/diffs/step_A-step_B``."""
    return Path(run_dir) / runs.DIFFS / f"{runs.checkpoint_name(before)}-{runs.checkpoint_name(after)}"


def diff_from_folder(folder: str | Path) -> DiffResult:
    """Re-classify a saved diff's crosscoder (``folder/crosscoder``) with the current thresholds (latents
    marked dead in ``diff.json`` stay dead)."""
    folder = Path(folder)
    cc = load_crosscoder(folder / runs.CROSSCODER_DIR)
    data = read_json(folder / DIFF_JSON) if (folder / DIFF_JSON).is_file() else {}
    alive = torch.tensor([lab != "dead" for lab in data["labels"]]) if "labels" in data else None
    examples = {int(k): v for k, v in data.get("examples", {}).items()}
    return DiffResult.from_crosscoder(
        cc, alive=alive, fvu=data.get("fvu"), formation=data.get("formation"), examples=examples
    )
