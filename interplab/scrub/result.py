"""The result of causal scrubbing: losses with standard errors, recovered fraction, breakdowns, report files."""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from interplab.io import atomic_write_text
from interplab.plots import figure_html
from interplab.runs import REPORT, Kind, write_json


@dataclass(frozen=True)
class Estimate:
    """A mean with its standard error over examples and a 95% interval over resampling seeds."""

    mean: float
    se: float
    """standard error over reference examples (per-example values averaged over seeds first)"""
    ci_low: float
    ci_high: float
    """95% normal interval over seeds (equal to the mean with one seed)"""

    @classmethod
    def of(cls, values: Tensor) -> Estimate:
        """``values`` [seeds examples]."""
        per_example = values.mean(0)
        n = per_example.numel()
        se = float(per_example.std() / math.sqrt(n)) if n > 1 else float("nan")
        return cls._with_seeds(float(values.mean()), se, values.mean(1))

    @classmethod
    def from_values(cls, per_seed: Tensor) -> Estimate:
        s = per_seed.numel()
        se = float(per_seed.std() / math.sqrt(s)) if s > 1 else float("nan")
        return cls._with_seeds(float(per_seed.mean()), se, per_seed)

    @classmethod
    def _with_seeds(cls, mean: float, se: float, per_seed: Tensor) -> Estimate:
        s = per_seed.numel()
        half = 1.96 * float(per_seed.std()) / math.sqrt(s) if s > 1 else 0.0
        return cls(mean, se, mean - half, mean + half)

    def __format__(self, spec: str) -> str:
        return f"{self.mean:{spec or '.3f'}} ({self.se:{spec or '.3f'}})"


@dataclass(frozen=True)
class ClaimRow:
    claim: str
    """the claim's path from the root (``hypothesis``, ``structure`` or ``logits/a1.0``)"""
    loss: Estimate
    recovered: Estimate


@dataclass(frozen=True)
class ScrubResult:
    """Causal scrubbing of one hypothesis on one task (see `interplab.scrub.scrub`)."""

    hypothesis: str
    description: str
    task: str
    n_examples: int
    n_seeds: int
    loss_original: Estimate
    loss_random: Estimate
    loss_scrubbed: Estimate
    recovered: Estimate
    """(L_random - L_scrubbed) / (L_random - L_original), mean and interval over seeds"""
    per_claim: list[ClaimRow] = field(default_factory=list)
    """each claim's feature resampled alone (every other claim on its parent's input), and the structure alone"""
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    samples: list[dict[str, int]] = field(default_factory=list)
    """for the first ``ScrubConfig.n_show`` references (seed 0): the data-set row each claim ran on, by claim
    path (``logits/a1.0/a1.0.in@1``), and each internal claim's other-inputs row (``<path> (others)``)"""

    def table(self) -> str:
        """A plain-text table of the numbers (for notebooks and scripts)."""
        lines = [
            f"{self.hypothesis} on {self.task}: {self.n_examples} examples x {self.n_seeds} seeds",
            f"  original loss   {self.loss_original}",
            f"  random baseline {self.loss_random}",
            f"  scrubbed loss   {self.loss_scrubbed}",
            f"  loss recovered  {self.recovered.mean:.1%} [{self.recovered.ci_low:.1%}, {self.recovered.ci_high:.1%}]",
        ]
        if self.per_claim:
            lines.append("  one claim at a time (loss, recovered):")
            lines += [f"    {r.claim:<30} {r.loss}  {r.recovered.mean:.1%}" for r in self.per_claim]
        if self.per_class:
            lines.append("  per class (n: original / random / scrubbed):")
            for name, c in self.per_class.items():
                lines.append(f"    {name:<20} {c['n']:>5}: {c['original']} / {c['random']} / {c['scrubbed']}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ScrubResult({self.hypothesis!r}: scrubbed {self.loss_scrubbed.mean:.3f}, original "
            f"{self.loss_original.mean:.3f}, random {self.loss_random.mean:.3f}, recovered {self.recovered.mean:.1%})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` of a scrub (`Kind.SCRUB`): every field above; each `Estimate` as
        ``{mean, se, ci_low, ci_high}``, ``per_claim`` as ``[{claim, loss, recovered}]``."""
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write ``report.html`` and then ``report.json`` (`Kind.SCRUB`, `to_dict`) into folder ``path``
        (atomic)."""
        path = Path(path)
        atomic_write_text(path / "report.html", self.to_html(path))
        write_json(path / REPORT, Kind.SCRUB, self.to_dict())
        return path

    def plot(self):
        """Bar chart of the losses: original, random, hypothesis, and each claim alone (Plotly)."""
        import plotly.graph_objects as go

        names = ["original", "random", self.hypothesis] + [r.claim for r in self.per_claim]
        ests = [self.loss_original, self.loss_random, self.loss_scrubbed] + [r.loss for r in self.per_claim]
        fig = go.Figure(
            go.Bar(
                x=names, y=[e.mean for e in ests], error_y=dict(type="data", array=[2 * e.se for e in ests])
            )
        )
        fig.update_layout(
            title=f"causal scrubbing: {self.hypothesis} ({self.recovered.mean:.1%} of loss recovered)",
            yaxis_title="loss",
            template="plotly_white",
        )
        return fig

    def to_html(self, folder: str | Path) -> str:
        """The report page to be written into ``folder`` (its chart loads the folder's shared plotly.js)."""
        rows = "".join(
            f"<tr><td>{html.escape(r.claim)}</td><td>{r.loss}</td><td>{r.recovered.mean:.1%}</td></tr>"
            for r in self.per_claim
        )
        classes = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{c['n']}</td><td>{c['original']}</td><td>{c['random']}</td>"
            f"<td>{c['scrubbed']}</td></tr>"
            for k, c in self.per_class.items()
        )
        chart = figure_html(self.plot(), folder, full_html=False)
        return _PAGE.format(
            title=html.escape(f"scrub: {self.hypothesis} on {self.task}"),
            tree=html.escape(self.description),
            orig=self.loss_original,
            rand=self.loss_random,
            scr=self.loss_scrubbed,
            rec=f"{self.recovered.mean:.1%}",
            lo=f"{self.recovered.ci_low:.1%}",
            hi=f"{self.recovered.ci_high:.1%}",
            claims=rows,
            classes=classes,
            n=self.n_examples,
            seeds=self.n_seeds,
            chart=chart,
            forwards=html.escape(json.dumps(self.forwards)),
            warnings="".join(f"<li>{html.escape(w)}</li>" for w in self.warnings),
        )

    def _repr_html_(self) -> str:
        return (
            f"<b>{html.escape(self.hypothesis)}</b>: scrubbed {self.loss_scrubbed}, original {self.loss_original}, "
            f"random {self.loss_random}; <b>{self.recovered.mean:.1%}</b> of loss recovered"
        )


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em}}pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>{title}</h1><p>{n} reference examples, {seeds} resampling seeds. Loss: mean (standard error over examples).</p>
<h2>Hypothesis</h2><pre>{tree}</pre>
<table><tr><th>original</th><th>random baseline</th><th>scrubbed</th><th>loss recovered</th></tr>
<tr><td>{orig}</td><td>{rand}</td><td>{scr}</td><td>{rec} [{lo}, {hi}]</td></tr></table>
<h2>One claim at a time</h2><table><tr><th>claim</th><th>loss</th><th>recovered</th></tr>{claims}</table>
<h2>Per class</h2><table><tr><th>class</th><th>n</th><th>original</th><th>random</th><th>scrubbed</th></tr>{classes}</table>
<h2>Chart</h2>{chart}
<h2>Work</h2><pre>{forwards}</pre><ul>{warnings}</ul></body></html>
"""
