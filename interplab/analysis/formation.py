"""Formation: an analysis over a training run. Every intact checkpoint is scored on repeated random tokens
and held-out data, and the step where the induction heads form is found.

Per checkpoint: the induction and previous-token score of every head (the scores of
`interplab.analysis.heads`, on its probe with ``period`` = the repeated length), the loss on the first and
the repeated half of the probe, the held-out loss and the in-context-learning score (loss late in the
context minus early in it). The run is read through the run contract (`interplab.runs.TrainRun`); the
result is written as ``formation.json`` (``kind: formation``) with a table and pictures.

>>> result = formation("runs/demo")
>>> step = result.formation_step                  # None when the heads have not formed (as in this tiny run)
>>> result.table()[-1]["step"], sorted(result.table()[-1])[:3]
(24, ['icl_score', 'max_induction', 'max_prev_token'])
>>> paths = result.save("runs/demo/formation")
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from interplab import runs
from interplab.analysis.heads import (
    pattern_masks,
    pattern_scores,
    patterns_and_logits,
    repeated_random_tokens,
)
from interplab.data import build_token_store, load_tokenizer, open_corpus
from interplab.io import atomic_write_text
from interplab.model.io import load_native
from interplab.model.transformer import Transformer
from interplab.plots import write_figure_files
from interplab.train.config import TrainConfig

FORMED_THRESHOLD = 0.3
"""a run "forms" induction heads when some head's induction score reaches this"""
RISE_FRACTIONS = (0.0, 0.5, 0.9)
"""`FormationResult.rise_steps`' default: before the rise, its midpoint (the formation step), near its top"""


@dataclass(frozen=True)
class FormationResult:
    """Scores of every checkpoint of a run, in step order."""

    run_dir: str
    steps: tuple[int, ...]
    tokens: tuple[int, ...]
    induction: Float[Tensor, "ckpt layer head"]
    prev_token: Float[Tensor, "ckpt layer head"]
    repeated_loss_first: tuple[float, ...]
    """loss on the first (unpredictable) half of repeated random tokens"""
    repeated_loss_second: tuple[float, ...]
    """loss on the repeated half: falls when induction works"""
    val_loss: tuple[float | None, ...]
    icl_score: tuple[float | None, ...]
    """held-out loss late minus early in the context (more negative: more in-context learning)"""
    formation_step: int | None
    """first checkpoint where the best induction score passed halfway from its start to its peak
    (None if no head ever reached `FORMED_THRESHOLD`)"""
    skipped: tuple[str, ...] = ()
    """checkpoints left out because they are incomplete or corrupt, each ``"step_N: reason"``"""

    @property
    def max_induction(self) -> list[float]:
        return self.induction.flatten(1).max(dim=1).values.tolist()

    @property
    def max_prev_token(self) -> list[float]:
        return self.prev_token.flatten(1).max(dim=1).values.tolist()

    def best_head(self) -> tuple[int, int]:
        """(layer, head) with the highest induction score at the last checkpoint."""
        last = self.induction[-1]
        flat = int(last.argmax())
        return flat // last.shape[1], flat % last.shape[1]

    def rise_steps(self, fractions: Sequence[float] = RISE_FRACTIONS) -> list[int]:
        """Checkpoints along the rise of the best induction score (for analyses across training, e.g. CLTs
        and attribution graphs at a few checkpoints): for each fraction f, the first step whose score reached
        ``start + f (peak - start)`` (for f = 0, the last step before the score first rose 5% of the way),
        and the last step; distinct and in step order (f = 0.5 is `formation_step`). Refused (ValueError)
        when no head formed."""
        if self.formation_step is None:
            raise ValueError(
                f"no induction head formed in {self.run_dir} (best score {max(self.max_induction):.3f}): "
                "there is no rise to pick checkpoints along; name the checkpoints (e.g. 100,400,800)"
            )
        for f in fractions:
            if not 0.0 <= f <= 1.0:
                raise ValueError(f"rise fractions must be in [0, 1], got {f}")
        scores = self.max_induction
        start, peak = scores[0], max(scores)
        chosen = set()
        for f in fractions:
            if f == 0.0:
                risen = next(i for i, v in enumerate(scores) if v >= start + 0.05 * (peak - start))
                chosen.add(self.steps[max(risen - 1, 0)])
            else:
                level = start + f * (peak - start)
                chosen.add(next(s for s, v in zip(self.steps, scores, strict=True) if v >= level))
        chosen.add(self.steps[-1])
        return sorted(chosen)

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for i, step in enumerate(self.steps):
            rows.append(
                {
                    "step": step,
                    "tokens": self.tokens[i],
                    "val_loss": self.val_loss[i],
                    "max_induction": self.max_induction[i],
                    "max_prev_token": self.max_prev_token[i],
                    "repeated_loss_first": self.repeated_loss_first[i],
                    "repeated_loss_second": self.repeated_loss_second[i],
                    "icl_score": self.icl_score[i],
                }
            )
        return rows

    def summary(self) -> str:
        """One paragraph saying whether and where the induction heads formed."""
        layer, head = self.best_head()
        mi = self.max_induction
        if self.formation_step is None:
            return (
                f"no induction head formed: the best induction score reached {max(mi):.3f} "
                f"(threshold {FORMED_THRESHOLD}) over {len(self.steps)} checkpoints"
            )
        i = self.steps.index(self.formation_step)
        before = max(0, i - 1)
        gap0 = self.repeated_loss_first[0] - self.repeated_loss_second[0]
        gap1 = self.repeated_loss_first[-1] - self.repeated_loss_second[-1]
        return (
            f"induction heads formed at step {self.formation_step}: best induction score {mi[before]:.3f} "
            f"at step {self.steps[before]} -> {mi[i]:.3f} at step {self.formation_step} -> {mi[-1]:.3f} at the "
            f"end (head L{layer}H{head}); on repeated random tokens the repeated half's loss went from "
            f"{gap0:.2f} to {gap1:.2f} nats below the first half's"
        )

    def shown_rows(self, every: int = 1) -> list[dict[str, Any]]:
        """The `table` rows a summary shows: every ``every``-th checkpoint, the last one and the two around
        the formation step."""
        rows = self.table()
        keep = set(range(0, len(rows), every)) | {len(rows) - 1}
        if self.formation_step is not None:
            i = self.steps.index(self.formation_step)
            keep.update({max(i - 1, 0), i})
        return [rows[i] for i in sorted(keep)]

    def markdown(self, every: int = 1) -> str:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
        lines += ["| " + " | ".join(row_cells(r)) + " |" for r in self.shown_rows(every)]
        return "\n".join(lines)

    def plot(self) -> Any:
        """Induction and previous-token score per head, losses and ICL score against step (Plotly)."""
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=2,
            cols=2,
            subplot_titles=(
                "induction score per head",
                "previous-token score per head",
                "loss on repeated random tokens",
                "held-out loss and in-context score",
            ),
        )
        steps = list(self.steps)
        n_layers, n_heads = self.induction.shape[1:]
        for layer in range(n_layers):
            for head in range(n_heads):
                name = f"L{layer}H{head}"
                for col, scores in ((1, self.induction), (2, self.prev_token)):
                    fig.add_scatter(
                        x=steps,
                        y=scores[:, layer, head].tolist(),
                        name=name,
                        legendgroup=name,
                        mode="lines",
                        showlegend=col == 1,
                        row=1,
                        col=col,
                    )
        fig.add_scatter(
            x=steps, y=list(self.repeated_loss_first), name="first half", mode="lines", row=2, col=1
        )
        fig.add_scatter(
            x=steps, y=list(self.repeated_loss_second), name="repeated half", mode="lines", row=2, col=1
        )
        if any(v is not None for v in self.val_loss):
            fig.add_scatter(x=steps, y=list(self.val_loss), name="held-out loss", mode="lines", row=2, col=2)
            fig.add_scatter(x=steps, y=list(self.icl_score), name="ICL score", mode="lines", row=2, col=2)
        if self.formation_step is not None:
            for row, col in ((1, 1), (1, 2), (2, 1), (2, 2)):
                fig.add_vline(x=self.formation_step, line_dash="dot", line_color="gray", row=row, col=col)
        fig.update_xaxes(title_text="step")
        fig.update_yaxes(range=[0, 1], row=1, col=1)
        fig.update_yaxes(range=[0, 1], row=1, col=2)
        title = (
            f"induction heads form at step {self.formation_step}"
            if self.formation_step is not None
            else "no induction head formed"
        )
        fig.update_layout(title=f"{Path(self.run_dir).name}: {title}", height=700, width=1100)
        return fig

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "formation_step": self.formation_step,
            "summary": self.summary(),
            "steps": list(self.steps),
            "tokens": list(self.tokens),
            "induction": self.induction.tolist(),
            "prev_token": self.prev_token.tolist(),
            "repeated_loss_first": list(self.repeated_loss_first),
            "repeated_loss_second": list(self.repeated_loss_second),
            "val_loss": list(self.val_loss),
            "icl_score": list(self.icl_score),
            "skipped_checkpoints": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FormationResult:
        return cls(
            run_dir=data["run_dir"],
            steps=tuple(data["steps"]),
            tokens=tuple(data["tokens"]),
            induction=torch.tensor(data["induction"]),
            prev_token=torch.tensor(data["prev_token"]),
            repeated_loss_first=tuple(data["repeated_loss_first"]),
            repeated_loss_second=tuple(data["repeated_loss_second"]),
            val_loss=tuple(data["val_loss"]),
            icl_score=tuple(data["icl_score"]),
            formation_step=data["formation_step"],
            skipped=tuple(data.get("skipped_checkpoints", ())),
        )

    def save(self, folder: str | Path) -> dict[str, str | None]:
        """Write ``formation.json``, ``formation.md`` (the table), ``formation.html`` and ``formation.png``.

        Returns the written paths; ``png`` is None (with ``png_error``) when no static image backend works.
        ``formation.json`` carries ``kind: formation`` and its schema version (`interplab.runs.write_json`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = runs.write_json(folder / runs.FORMATION_JSON, runs.Kind.FORMATION, self.to_dict())
        atomic_write_text(folder / "formation.md", self.summary() + "\n\n" + self.markdown() + "\n")
        # inside its training run, the page shares the run folder's plotly.min.js with the run's other reports
        pictures = write_figure_files(
            self.plot(), folder, "formation", assets=self.run_dir, fallback=self._plot_matplotlib
        )
        return {"json": str(data), "table": str(folder / "formation.md"), **pictures}

    def _plot_matplotlib(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(12, 7.5))
        steps = list(self.steps)
        n_layers, n_heads = self.induction.shape[1:]
        for layer in range(n_layers):
            for head in range(n_heads):
                axes[0, 0].plot(steps, self.induction[:, layer, head], label=f"L{layer}H{head}")
                axes[0, 1].plot(steps, self.prev_token[:, layer, head], label=f"L{layer}H{head}")
        axes[0, 0].set_title("induction score per head")
        axes[0, 1].set_title("previous-token score per head")
        axes[0, 0].legend(fontsize=7, ncol=2)
        axes[1, 0].plot(steps, self.repeated_loss_first, label="first half")
        axes[1, 0].plot(steps, self.repeated_loss_second, label="repeated half")
        axes[1, 0].set_title("loss on repeated random tokens")
        axes[1, 0].legend()
        if any(v is not None for v in self.val_loss):
            axes[1, 1].plot(
                steps, [math.nan if v is None else v for v in self.val_loss], label="held-out loss"
            )
            axes[1, 1].plot(steps, [math.nan if v is None else v for v in self.icl_score], label="ICL score")
            axes[1, 1].legend()
        axes[1, 1].set_title("held-out loss and in-context score")
        for ax in axes.flat:
            ax.set_xlabel("step")
            if self.formation_step is not None:
                ax.axvline(self.formation_step, color="gray", linestyle=":")
        axes[0, 0].set_ylim(0, 1)
        axes[0, 1].set_ylim(0, 1)
        fig.suptitle(
            f"induction heads form at step {self.formation_step}"
            if self.formation_step is not None
            else "no induction head formed"
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


COLUMNS = (
    "step",
    "tokens",
    "val loss",
    "max induction",
    "max prev-token",
    "loss 1st half",
    "loss repeated half",
    "ICL score",
)
"""the columns of the formation table (`row_cells` formats a `FormationResult.table` row for them)"""


def row_cells(row: dict[str, Any]) -> list[str]:
    """One `FormationResult.table` row as the text of the `COLUMNS`."""
    return [
        str(row["step"]),
        f"{row['tokens']:,}",
        _fmt(row["val_loss"]),
        f"{row['max_induction']:.3f}",
        f"{row['max_prev_token']:.3f}",
        f"{row['repeated_loss_first']:.2f}",
        f"{row['repeated_loss_second']:.2f}",
        _fmt(row["icl_score"]),
    ]


def find_formation_step(
    steps: list[int], max_scores: list[float], threshold: float = FORMED_THRESHOLD
) -> int | None:
    """The first step where the best induction score passes halfway from its first value to its peak,
    or None if the peak stays below ``threshold``."""
    if not max_scores or max(max_scores) < threshold:
        return None
    half = (max_scores[0] + max(max_scores)) / 2
    return next(s for s, v in zip(steps, max_scores, strict=True) if v >= half)


@torch.no_grad()
def token_losses(
    model: Transformer, tokens: Int[Tensor, "batch pos"], *, logits: Tensor | None = None
) -> Float[Tensor, "batch pos_minus_1"]:
    """Next-token cross-entropy at every position (position ``i`` predicts token ``i + 1``)."""
    logits = (model(tokens) if logits is None else logits).float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def in_context_score(losses: Float[Tensor, "batch pos"]) -> float:
    """Loss late in the context minus loss early in it (negative: the model uses its context).

    Early = positions ``[L/16, L/8)``, late = the last ``L/8`` positions, of ``L`` predicted positions."""
    L = losses.shape[1]
    if L < 16:
        raise ValueError(f"the in-context score needs at least 16 positions, got {L}")
    early = losses[:, L // 16 : L // 8].mean()
    late = losses[:, L - L // 8 :].mean()
    return float(late - early)


def formation(
    run_dir: str | Path,
    *,
    n_seqs: int = 8,
    half: int = 50,
    seed: int = 0,
    val_seqs: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> FormationResult:
    """Score every intact checkpoint of a training run (``progress(done, total)`` after each); damaged
    checkpoints are skipped with a warning and listed in the result.

    The induction and previous-token scores use ``n_seqs`` sequences of ``half`` random tokens repeated once
    (50, as in the usual TransformerLens/ARENA evaluation, capped at n_ctx / 2), drawn with replacement from
    the ids above the special tokens (`repeated_random_tokens` with ``distinct=False``), scored with the
    probe's targets (``period=half``); the held-out loss and the in-context score use ``val_seqs`` windows of
    the run's validation split."""
    run = runs.TrainRun.open(run_dir)
    cfg = TrainConfig.from_dict(run.config)
    checkpoints = run.checkpoints(intact=True)
    skipped = []
    for c in run.checkpoints(intact=False):
        if c not in checkpoints:
            reason = runs.verify_checkpoint(c.path, need_optimizer=False)
            skipped.append(f"{c.path.name}: {reason}")
            warnings.warn(f"formation: skipping checkpoint {c.path}: {reason}", stacklevel=2)
    if not checkpoints:
        raise ValueError(
            f"{run.path} has no intact checkpoints to analyse"
            + (f" (skipped: {'; '.join(skipped)})" if skipped else "")
        )
    val_tokens = _heldout_tokens(cfg, run.path, val_seqs)
    probes: dict[tuple[int, int, int], tuple[Tensor, dict[str, Tensor]]] = {}
    rows: list[dict[str, Any]] = []
    for i, ckpt in enumerate(checkpoints):
        model = load_native(ckpt.path)
        h = min(half, model.cfg.n_ctx // 2)
        low = 2 if model.tokenizer is not None and model.tokenizer.bos_id is not None else 0
        key = (model.cfg.d_vocab, h, low)
        if key not in probes:  # the same probe for every checkpoint
            tokens = repeated_random_tokens(model.cfg.d_vocab, h, n_seqs, seed=seed, low=low, distinct=False)
            probes[key] = tokens, pattern_masks(tokens, period=h)
        tokens, masks = probes[key]
        patterns, logits = patterns_and_logits(model, tokens)
        scores = pattern_scores(patterns, masks)
        losses = token_losses(model, tokens, logits=logits)
        row: dict[str, Any] = {
            "step": ckpt.step,
            "tokens": int(runs.read_json(ckpt.path / runs.STATE).get("tokens", 0)),
            "induction": scores["induction"],
            "prev_token": scores["previous_token"],
            "first": float(losses[:, : h - 1].mean()),
            "second": float(losses[:, h:].mean()),
            "val": None,
            "icl": None,
        }
        if val_tokens is not None:
            val_losses = token_losses(model, val_tokens)
            row["val"], row["icl"] = float(val_losses.mean()), in_context_score(val_losses)
        rows.append(row)
        if progress is not None:
            progress(i + 1, len(checkpoints))
    steps = [r["step"] for r in rows]
    induction = torch.stack([r["induction"] for r in rows])
    return FormationResult(
        run_dir=str(run.path),
        steps=tuple(steps),
        tokens=tuple(r["tokens"] for r in rows),
        induction=induction,
        prev_token=torch.stack([r["prev_token"] for r in rows]),
        repeated_loss_first=tuple(r["first"] for r in rows),
        repeated_loss_second=tuple(r["second"] for r in rows),
        val_loss=tuple(r["val"] for r in rows),
        icl_score=tuple(r["icl"] for r in rows),
        formation_step=find_formation_step(steps, induction.flatten(1).max(dim=1).values.tolist()),
        skipped=tuple(skipped),
    )


def _heldout_tokens(cfg: TrainConfig, run_dir: Path, n: int) -> Tensor | None:
    """Evenly spread held-out windows of the run's corpus (None for task runs or without a validation split)."""
    if cfg.data.task is not None or cfg.data.val_fraction == 0 or not (run_dir / runs.TOKENIZER).is_file():
        return None
    corpus = open_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction)
    store = build_token_store(corpus, load_tokenizer(run_dir), "validation")
    n_val = store.n_sequences(cfg.data.seq_len)
    if n_val == 0:
        return None
    index = torch.linspace(0, n_val - 1, min(n, n_val)).round().long()
    return store.sequences(index, cfg.data.seq_len)
