"""The result of causal scrubbing: losses with standard errors and intervals, the recovered fraction, per-claim
and per-class breakdowns, the inputs each claim ran on for a few references, and the report files.

The numbers and their intervals are defined in `interplab.scrub.estimate`. The sampled inputs follow REMIX's
``Experiment.print()``: for each of the first few references (seed 0), the tree of claims with the data-set row
each claim ran on and each internal claim's other-inputs row, one letter (one colour in HTML) per distinct row.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from interplab.io import atomic_write_text
from interplab.plots import figure_html, unique_labels
from interplab.runs import REPORT, Kind, write_json
from interplab.scrub.estimate import Estimate

OTHERS = " (others)"
"""suffix of a `ScrubResult.samples` key naming an internal claim's other-inputs datum: ``"<path> (others)"``"""
MAX_INPUT_CHARS = 200
"""an input longer than this is cut (with an ellipsis) in reports"""
PALETTE = (
    "#fde2b8", "#cfe8fc", "#d5f5d0", "#f9d0e0", "#e6dcfa", "#fff3b0",
    "#c9f0ee", "#f6d5c8", "#dfe6c2", "#e0e0e0", "#f4c8f0", "#c8d8f4",
)  # fmt: skip
"""background colours of the sampled inputs in HTML: one per distinct data-set row of an example (cycled: past
12 rows, the letters tell rows apart)"""


@dataclass(frozen=True)
class ClaimRow:
    claim: str
    """the claim's path from the root (``hypothesis``, ``structure`` or ``logits/a1.0``)"""
    loss: Estimate
    recovered: Estimate


@dataclass(frozen=True)
class SampleLine:
    """One line of the sampled-inputs tree of one reference (see `sample_lines`)."""

    key: str
    """the `ScrubResult.samples` key: a claim path, or ``"<path> (others)"``"""
    depth: int
    """0 for the root claim"""
    label: str
    """the claim's target (its last path element), or ``(others)``"""
    row: int
    """the data-set row it ran on"""
    tag: int
    """which distinct row of this reference it is, in order of first appearance (0: the root's, the reference)"""

    @property
    def letter(self) -> str:
        return _letter(self.tag)


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"Z{i - 25}"


def sample_lines(sample: Mapping[str, int]) -> list[SampleLine]:
    """One reference's sampled inputs as a tree, depth first: each claim, then its other-inputs datum, then
    its children (claims in the order given). A claim path's parent is its longest proper prefix that is
    also a key (a path whose parent is missing hangs under the nearest ancestor that is there)."""
    claims = [k for k in sample if not k.endswith(OTHERS)]
    present = set(claims)
    children: dict[str | None, list[str]] = {}
    for key in claims:
        parts = key.split("/")
        parent = next(
            ("/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1) if "/".join(parts[:i]) in present),
            None,
        )
        children.setdefault(parent, []).append(key)
    listed = {k + OTHERS for k in claims}
    orphans = [k for k in sample if k.endswith(OTHERS) and k not in listed]  # others of an unnamed claim
    out: list[SampleLine] = []
    tags: dict[int, int] = {}

    def add(key: str, depth: int, label: str) -> None:
        row = int(sample[key])
        out.append(SampleLine(key, depth, label, row, tags.setdefault(row, len(tags))))

    def visit(key: str, depth: int) -> None:
        add(key, depth, key.rsplit("/", 1)[-1])
        if key + OTHERS in sample:
            add(key + OTHERS, depth + 1, OTHERS.strip())
        for child in children.get(key, []):
            visit(child, depth + 1)

    for root in children.get(None, []):
        visit(root, 0)
    for key in orphans:
        add(key, 0, key)
    return out


def sample_inputs(
    samples: Sequence[Mapping[str, int]],
    tokens: Tensor,
    decode: Callable[[Tensor], str] | None = None,
    attention_mask: Tensor | None = None,
) -> dict[int, str]:
    """The data-set rows named in ``samples`` as text: ``decode(row tokens)`` when the task can decode, else
    the token ids; positions the attention mask marks as padding are left out first."""
    out: dict[int, str] = {}
    for row in sorted({int(r) for s in samples for r in s.values()}):
        toks = tokens[row]
        if attention_mask is not None:
            toks = toks[attention_mask[row] > 0]
        out[row] = decode(toks) if decode is not None else " ".join(str(t) for t in toks.tolist())
    return out


def _cut(text: str) -> str:
    return text if len(text) <= MAX_INPUT_CHARS else text[: MAX_INPUT_CHARS - 1] + "\u2026"


def _interval(e: Estimate) -> str:
    return f"[{e.ci_low:.1%}, {e.ci_high:.1%}]"


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
    """(L_random - L_scrubbed) / (L_random - L_original): mean over seeds, a 95% interval covering resampling
    and the choice of references (bootstrap over references), and the seeds-only interval
    (`interplab.scrub.estimate.recovered_fraction`)"""
    per_claim: list[ClaimRow] = field(default_factory=list)
    """each claim's feature resampled alone (every other claim on its parent's input), and the structure alone"""
    per_class: dict[str, dict[str, Any]] = field(default_factory=dict)
    forwards: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    samples: list[dict[str, int]] = field(default_factory=list)
    """for the first references of seed 0 (``ScrubConfig.n_show``): claim path (as in error messages,
    ``logits/a1.0/a1.0.in@1``) -> the data-set row the claim ran on; an internal claim's other-inputs row under
    ``"<path> (others)"``. The root's row is the reference."""
    inputs: dict[int, str] = field(default_factory=dict)
    """the rows named in `samples`, as text (`sample_inputs`: the task's ``decode``, else token ids)"""

    def table(self, n_samples: int | None = 1) -> str:
        """A plain-text table of the numbers and the sampled inputs of the first ``n_samples`` references
        (None: all recorded; `samples_text` shows them alone) for notebooks and scripts; ``str(result)``."""
        rec = self.recovered
        lines = [
            f"{self.hypothesis} on {self.task}: {self.n_examples} examples x {self.n_seeds} seeds",
            f"  original loss   {self.loss_original}",
            f"  random baseline {self.loss_random}",
            f"  scrubbed loss   {self.loss_scrubbed}",
            f"  loss recovered  {rec.mean:.1%} {_interval(rec)} "
            f"(95%, resampling and references; seeds alone [{rec.seeds_low:.1%}, {rec.seeds_high:.1%}])",
        ]
        if self.per_claim:
            lines.append("  one claim at a time (loss, recovered [95%]):")
            lines += [
                f"    {r.claim:<30} {r.loss}  {r.recovered.mean:.1%} {_interval(r.recovered)}"
                for r in self.per_claim
            ]
        if self.per_class:
            lines.append("  per class (n: original / random / scrubbed):")
            for name, c in self.per_class.items():
                lines.append(f"    {name:<20} {c['n']:>5}: {c['original']} / {c['random']} / {c['scrubbed']}")
        if self.samples and n_samples != 0:
            lines.append(self.samples_text(indent="  ", n=n_samples))
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def samples_text(self, indent: str = "", n: int | None = None) -> str:
        """The sampled inputs of `samples` (the first ``n`` references; default all) as indented trees
        (REMIX's ``Experiment.print()``): per reference, each claim's data-set row and input; one letter per
        distinct row (A: the reference)."""
        if not self.samples:
            return f"{indent}no sampled inputs recorded (ScrubConfig.n_show=0)"
        shown = self.samples[:n] if n is not None else self.samples
        out = [
            f"{indent}sampled inputs, first {len(shown)} of {len(self.samples)} recorded references of seed 0 "
            "(same letter = same input; A = the reference):"
        ]
        for i, sample in enumerate(shown):
            lines = sample_lines(sample)
            width = max((2 * ln.depth + len(ln.label) for ln in lines), default=0)
            out.append(f"{indent}  reference {i + 1}")
            for ln in lines:
                claim = ("  " * ln.depth + ln.label).ljust(width)
                text = _cut(self.inputs.get(ln.row, ""))
                out.append(f"{indent}    {ln.letter:>2}  {claim}  row {ln.row:<7} {text}".rstrip())
        return "\n".join(out)

    def __repr__(self) -> str:
        return (
            f"ScrubResult({self.hypothesis!r}: scrubbed {self.loss_scrubbed.mean:.3f}, original "
            f"{self.loss_original.mean:.3f}, random {self.loss_random.mean:.3f}, recovered {self.recovered.mean:.1%})"
        )

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` of a scrub (`Kind.SCRUB`): every field above; each `Estimate` as
        ``{mean, se, ci_low, ci_high, seeds_low, seeds_high}``, ``per_claim`` as ``[{claim, loss, recovered}]``,
        ``inputs`` with its rows as strings (JSON object keys)."""
        data = asdict(self)
        data["inputs"] = {str(k): v for k, v in self.inputs.items()}
        return data

    def save(self, path: str | Path, *, assets: str | Path | None = None) -> Path:
        """Write ``report.html`` and then ``report.json`` (`Kind.SCRUB`, `to_dict`) into folder ``path``
        (atomic). The page's chart loads plotly.js from ``assets`` (a folder containing ``path``, e.g. the run
        folder of several reports; default ``path``: see `interplab.plots.figure_html`)."""
        path = Path(path)
        atomic_write_text(path / "report.html", self.to_html(path, assets=assets))
        write_json(path / REPORT, Kind.SCRUB, self.to_dict())
        return path

    def plot(self):
        """Bar chart of the losses: original, random, hypothesis, and each claim alone (Plotly)."""
        import plotly.graph_objects as go

        names = ["original", "random", self.hypothesis] + [r.claim for r in self.per_claim]
        ests = [self.loss_original, self.loss_random, self.loss_scrubbed] + [r.loss for r in self.per_claim]
        fig = go.Figure(
            go.Bar(
                x=unique_labels(names),
                y=[e.mean for e in ests],
                error_y=dict(
                    type="data",
                    symmetric=False,
                    array=[e.ci_high - e.mean for e in ests],
                    arrayminus=[e.mean - e.ci_low for e in ests],
                ),
            )
        )
        fig.update_layout(
            title=f"causal scrubbing: {self.hypothesis} ({self.recovered.mean:.1%} of loss recovered)",
            yaxis_title="loss (95% interval)",
            template="plotly_white",
        )
        fig.update_xaxes(type="category")
        return fig

    def samples_html(self) -> str:
        """The sampled inputs as HTML tables, one per reference; rows of the same input share a colour."""
        if not self.samples:
            return '<p class="muted">no sampled inputs recorded (<code>ScrubConfig.n_show=0</code>)</p>'
        parts = []
        for i, sample in enumerate(self.samples):
            rows = []
            for ln in sample_lines(sample):
                colour = PALETTE[ln.tag % len(PALETTE)]
                rows.append(
                    f'<tr style="background:{colour}" data-row="{ln.row}"><td>{ln.letter}</td>'
                    f'<td style="padding-left:{0.6 + 1.2 * ln.depth:.1f}em">{html.escape(ln.label)}</td>'
                    f"<td>{ln.row}</td><td><code>{html.escape(_cut(self.inputs.get(ln.row, '')))}</code></td></tr>"
                )
            parts.append(
                f'<table class="samples"><caption>reference {i + 1}</caption>'
                "<tr><th></th><th>claim</th><th>row</th><th>input</th></tr>" + "".join(rows) + "</table>"
            )
        return "".join(parts)

    def to_html(self, folder: str | Path, *, assets: str | Path | None = None) -> str:
        """The report page to be written into ``folder`` (its chart loads the shared plotly.js of ``assets``)."""
        rows = "".join(
            f"<tr><td>{html.escape(r.claim)}</td><td>{r.loss}</td><td>{r.recovered.mean:.1%}</td>"
            f"<td>{_interval(r.recovered)}</td></tr>"
            for r in self.per_claim
        )
        classes = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{c['n']}</td><td>{c['original']}</td><td>{c['random']}</td>"
            f"<td>{c['scrubbed']}</td></tr>"
            for k, c in self.per_class.items()
        )
        chart = figure_html(self.plot(), folder, full_html=False, assets=assets)
        rec = self.recovered
        return _PAGE.format(
            title=html.escape(f"scrub: {self.hypothesis} on {self.task}"),
            tree=html.escape(self.description),
            orig=self.loss_original,
            rand=self.loss_random,
            scr=self.loss_scrubbed,
            rec=f"{rec.mean:.1%}",
            interval=_interval(rec),
            seeds=f"[{rec.seeds_low:.1%}, {rec.seeds_high:.1%}]",
            claims=rows,
            classes=classes,
            samples=self.samples_html(),
            n=self.n_examples,
            n_seeds=self.n_seeds,
            chart=chart,
            forwards=html.escape(json.dumps(self.forwards)),
            warnings="".join(f"<li>{html.escape(w)}</li>" for w in self.warnings),
        )

    def _repr_html_(self) -> str:
        return (
            f"<b>{html.escape(self.hypothesis)}</b>: scrubbed {self.loss_scrubbed}, original {self.loss_original}, "
            f"random {self.loss_random}; <b>{self.recovered.mean:.1%}</b> {_interval(self.recovered)} of loss "
            "recovered"
        )


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em}}pre{{background:#f6f6f6;padding:1em}}
table.samples{{margin:.5em 0 1em}}table.samples caption{{text-align:left;font-weight:bold}}
.muted{{color:#777}}</style></head><body>
<h1>{title}</h1><p>{n} reference examples, {n_seeds} resampling seeds. Loss: mean (standard error over examples).
Intervals: 95%, covering resampling and the choice of references.</p>
<h2>Hypothesis</h2><pre>{tree}</pre>
<table><tr><th>original</th><th>random baseline</th><th>scrubbed</th><th>loss recovered</th><th>95% interval</th>
<th>seeds alone</th></tr>
<tr><td>{orig}</td><td>{rand}</td><td>{scr}</td><td>{rec}</td><td>{interval}</td><td>{seeds}</td></tr></table>
<h2>One claim at a time</h2><table><tr><th>claim</th><th>loss</th><th>recovered</th><th>95% interval</th></tr>
{claims}</table>
<h2>Per class</h2><table><tr><th>class</th><th>n</th><th>original</th><th>random</th><th>scrubbed</th></tr>{classes}</table>
<h2>Sampled inputs</h2><p>The first references of seed 0: the data-set row each claim ran on (REMIX's
<code>Experiment.print()</code>); rows of the same input share a letter and a colour, A is the reference.</p>
{samples}
<h2>Chart</h2>{chart}
<h2>Work</h2><pre>{forwards}</pre><ul>{warnings}</ul></body></html>
"""
