"""Judging SAEs against each other (SAEBench's questions, answered offline): core metrics (`evaluate_sae`'s L0,
FVU, CE loss recovered, KL, dead/dense fractions), k-sparse probing of labelled token properties, feature
absorption on a token class, and any extra per-SAE metric plugged in (the autointerp score lives at the features
layer, above this one). Every metric comes with its reseed noise: SAEs trained with several seeds are one
*group*, reported as mean, SD and coefficient of variation (CV = SD / |mean|), never a single draw.

k-sparse probing (SAEBench's method, re-derived): on a train split, rank latents by the absolute difference of
their mean activation on positive and negative tokens, keep the top k, fit a logistic regression on those k
latents, and report its accuracy on a held-out split.

Absorption (SAEBench's first-letter full absorption, re-derived for any token class): the class's *main
latents* are the ``absorption_k`` latents with the largest mean activation on the class minus that off it; its
*direction* u is the difference of the class means of the SAE's input (SAEBench: a trained probe's weights).
A positive token is a false negative when no main latent fires on it; it is *absorbed* when, besides, its input
projects positively on u and the other latent with the largest projection on u (``a_j * W_dec[j] . u``) both
points along it (cosine of ``W_dec[j]`` with u >= ``cos_threshold``) and carries at least ``fraction`` of the
token's projection (``a_j * W_dec[j] . u >= fraction * x . u``). The absorption rate is absorbed / positives;
the false-negative rate is reported beside it.
"""

from __future__ import annotations

import io
import math
import statistics
import tokenize
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from interplab.hooks import Site
from interplab.plots import save_figure
from interplab.runs import REPORT, Kind, write_json
from interplab.sae.activations import TokenFilter, _as_batch
from interplab.sae.base import SAE
from interplab.sae.evaluate import evaluate_sae

if TYPE_CHECKING:
    from interplab.data import Tokenizer
    from interplab.model import Transformer
    from interplab.tasks import Task

#: the core metrics taken from `evaluate_sae`'s report
CORE_METRICS = ("l0", "fvu", "ce_loss_recovered", "kl_div", "dead_fraction", "dense_fraction")
#: the probe sizes of `k_sparse_probe` unless told otherwise
PROBE_KS = (1, 2, 5, 10)
#: the Python token classes `python_token_labels` assigns (index = label)
PY_CLASSES = ("other", "keyword", "name", "number", "string", "operator", "comment", "whitespace")

#: a labelled property: [batch, pos] token ids -> [batch, pos] integer class labels
Labeller = Callable[[Tensor], Tensor]
#: an extra per-SAE metric: (SAE name, SAE) -> {metric: value}
ExtraMetric = Callable[[str, SAE], Mapping[str, float]]


# --------------------------------------------------------------------------- labels


def python_token_labels(tokenizer: Tokenizer, tokens: Tensor) -> Tensor:
    """[batch, pos] token ids -> [batch, pos] labels (index into `PY_CLASSES`): the Python `tokenize` type of
    the first non-space character of each model token, in its sequence's decoded text (``whitespace`` when the
    token is only spaces/newlines). A sequence that `tokenize` cannot finish keeps the labels it reached."""
    import keyword

    tokens = _as_batch(tokens)
    out = torch.zeros(tokens.shape, dtype=torch.long)
    for b, row in enumerate(tokens.tolist()):
        pieces = [tokenizer.decode([t]) for t in row]
        text = "".join(pieces)
        char_class = [PY_CLASSES.index("whitespace") if c.isspace() else 0 for c in text]
        line_starts = [0]
        for line in text.splitlines(keepends=True):
            line_starts.append(line_starts[-1] + len(line))
        try:
            for tok in tokenize.generate_tokens(io.StringIO(text).readline):
                cls = _py_class(tok, keyword.iskeyword)
                if cls is None:
                    continue
                start = line_starts[tok.start[0] - 1] + tok.start[1]
                end = (
                    line_starts[tok.end[0] - 1] + tok.end[1]
                    if tok.end[0] - 1 < len(line_starts)
                    else len(text)
                )
                for i in range(start, min(end, len(text))):
                    if not text[i].isspace() or cls == PY_CLASSES.index("string"):
                        char_class[i] = cls
        except (tokenize.TokenError, IndentationError, SyntaxError):
            pass
        pos = 0
        for p, piece in enumerate(pieces):
            first = next((pos + i for i, c in enumerate(piece) if not c.isspace()), None)
            out[b, p] = char_class[first] if first is not None else PY_CLASSES.index("whitespace")
            pos += len(piece)
    return out


def _py_class(tok: tokenize.TokenInfo, is_keyword: Callable[[str], bool]) -> int | None:
    if tok.type == tokenize.NAME:
        return PY_CLASSES.index("keyword" if is_keyword(tok.string) else "name")
    names = {tokenize.NUMBER: "number", tokenize.STRING: "string", tokenize.OP: "operator",
             tokenize.COMMENT: "comment"}  # fmt: skip
    return PY_CLASSES.index(names[tok.type]) if tok.type in names else None


def first_letter_labels(tokenizer: Tokenizer, tokens: Tensor) -> Tensor:
    """[batch, pos] token ids -> [batch, pos] labels: 1 + the index in a..z of the first letter of each token's
    text (leading spaces stripped, case folded), 0 when it does not start with a letter a-z."""
    tokens = _as_batch(tokens).long()
    ids = torch.unique(tokens)
    table = torch.zeros(int(ids.max()) + 1, dtype=torch.long)
    for t in ids.tolist():
        s = tokenizer.decode([t]).lstrip().lower()
        table[t] = ord(s[0]) - ord("a") + 1 if s and "a" <= s[0] <= "z" else 0
    return table[tokens]


# --------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class ProbeResult:
    """A k-sparse probe: the latents it reads, the held-out accuracy of the plain logistic probe (SAEBench's
    ``train_sklearn_probe``: on a rare property it answers the majority class and reads the majority rate)
    and the held-out balanced accuracy (mean of the true-positive and true-negative rates) of the same probe
    fit with class-balanced weights (each class half the loss, as SAEBench's balanced datasets give): 0.5
    without signal however rare the property, above it with any."""

    k: int
    latents: tuple[int, ...]
    accuracy: float
    balanced_accuracy: float


def balanced_accuracy(pred: Tensor, labels: Tensor) -> float:
    """Mean of the true-positive and true-negative rates of bool predictions (a class absent from ``labels``
    is left out of the mean)."""
    pred, labels = pred.bool(), labels.bool()
    rates = [float((pred[m] == labels[m]).float().mean()) for m in (labels, ~labels) if bool(m.any())]
    return statistics.fmean(rates)


def rank_latents(acts: Tensor, labels: Tensor, *, absolute: bool = False) -> Tensor:
    """[n, d_sae] activations, [n] bool labels -> latent indices ordered by mean on positives - mean on
    negatives (largest first; ties by index): the latents that fire *for* the property come first (SAE latents
    are non-negative, so one firing against it is a latent of the complement). ``absolute=True`` ranks by the
    absolute difference, as SAEBench's sparse probing does."""
    labels = labels.bool()
    if labels.all() or not labels.any():
        raise ValueError("the labels need both classes (some positives and some negatives)")
    diff = acts[labels].float().mean(0) - acts[~labels].float().mean(0)
    # stable: argsort of -diff keeps the lower index first on ties
    return torch.argsort(-(diff.abs() if absolute else diff), stable=True)


def fit_logistic(
    x: Tensor, y: Tensor, *, l2: float = 1e-3, steps: int = 200, balanced: bool = False
) -> tuple[Tensor, Tensor]:
    """Logistic regression on standardised ``x`` [n, k] (y [n] in {0,1}) by L-BFGS: (w [k], b) in the
    original units. ``balanced``: each class weighs half of the loss (sample weights n / (2 n_class))."""
    x = x.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-8)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    target = y.double()
    weight = None
    if balanced:
        n_pos = target.sum().clamp_min(1.0)
        n_neg = (1 - target).sum().clamp_min(1.0)
        weight = torch.where(target > 0.5, len(target) / (2 * n_pos), len(target) / (2 * n_neg))

    def closure() -> Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target, weight=weight)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_out = (w / sd).detach()
    return w_out, (b - (w * mu / sd).sum()).detach()


def k_sparse_probe(
    acts: Tensor,
    labels: Tensor,
    *,
    ks: Sequence[int] = PROBE_KS,
    test_fraction: float = 0.3,
    seed: int = 0,
    absolute: bool = True,
) -> list[ProbeResult]:
    """k-sparse probes of a binary property ([n] labels) from SAE activations [n, d_sae]: latents ranked on a
    seeded train split (`rank_latents`, by absolute mean difference as SAEBench does unless ``absolute`` is
    False), a logistic regression on the top k, accuracy on the rest; balanced accuracy of the same regression
    fit with class-balanced weights (see `ProbeResult`)."""
    train, test = _split(acts.shape[0], test_fraction, seed)
    order = rank_latents(acts[train], labels[train], absolute=absolute)
    out = []
    for k in ks:
        if not 0 < k <= acts.shape[1]:
            raise ValueError(f"k={k} must be in 1..d_sae={acts.shape[1]}")
        latents = order[:k]
        x_train, x_test = acts[train][:, latents], acts[test][:, latents].double()
        w, b = fit_logistic(x_train, labels[train].float())
        acc = float((((x_test @ w + b) > 0) == labels[test].bool()).float().mean())
        w, b = fit_logistic(x_train, labels[train].float(), balanced=True)
        bal = balanced_accuracy((x_test @ w + b) > 0, labels[test])
        out.append(
            ProbeResult(k=k, latents=tuple(int(i) for i in latents), accuracy=acc, balanced_accuracy=bal)
        )
    return out


def input_probe(x: Tensor, labels: Tensor, *, test_fraction: float = 0.3, seed: int = 0) -> float:
    """The reference beside the k-sparse probes (SAEBench's probe on the model's own activations): held-out
    balanced accuracy of a class-balanced logistic regression on every dimension of the SAE's input ``x``
    [n, d_in], on `k_sparse_probe`'s split: how much of the property there is for the latents to find."""
    train, test = _split(x.shape[0], test_fraction, seed)
    w, b = fit_logistic(x[train], labels[train].float(), balanced=True)
    return balanced_accuracy((x[test].double() @ w + b) > 0, labels[test])


def _split(n: int, test_fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """(train, test) indices of a seeded shuffle of ``n`` rows, ``test_fraction`` of them held out."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(n * test_fraction))
    return perm[n_test:], perm[:n_test]


# --------------------------------------------------------------------------- absorption


@dataclass(frozen=True)
class AbsorptionResult:
    """Absorption of one token class (see the module docstring)."""

    main_latents: tuple[int, ...]
    positives: int
    false_negatives: int
    absorbed: int

    @property
    def absorption_rate(self) -> float:
        return self.absorbed / self.positives if self.positives else float("nan")

    @property
    def false_negative_rate(self) -> float:
        return self.false_negatives / self.positives if self.positives else float("nan")


def absorption(
    x: Tensor,
    acts: Tensor,
    w_dec: Tensor,
    labels: Tensor,
    main_latents: Sequence[int],
    *,
    cos_threshold: float = 0.025,
    fraction: float = 0.4,
    direction: Tensor | None = None,
) -> AbsorptionResult:
    """Absorption of the class ``labels`` (bool [n]) given the SAE input ``x`` [n, d_in], its activations
    ``acts`` [n, d_sae], decoder ``w_dec`` [d_sae, d_in] and the class's ``main_latents``; the class
    ``direction`` [d_in] is the difference of the class means of ``x`` unless given (SAEBench gives a trained
    probe's weights; then ``labels`` may be all positive)."""
    labels = labels.bool()
    if direction is None:
        if labels.all() or not labels.any():
            raise ValueError("the labels need both classes (some positives and some negatives)")
        direction = x[labels].double().mean(0) - x[~labels].double().mean(0)
    fn, absorbed = absorption_flags(
        x[labels],
        acts[labels],
        w_dec,
        direction,
        main_latents,
        cos_threshold=cos_threshold,
        fraction=fraction,
    )
    return AbsorptionResult(
        main_latents=tuple(int(i) for i in main_latents),
        positives=int(labels.sum()),
        false_negatives=int(fn.sum()),
        absorbed=int(absorbed.sum()),
    )


def absorption_flags(
    x: Tensor,
    acts: Tensor,
    w_dec: Tensor,
    direction: Tensor,
    main_latents: Sequence[int],
    *,
    cos_threshold: float = 0.025,
    fraction: float = 0.4,
) -> tuple[Tensor, Tensor]:
    """Per positive token (rows of ``x`` [n, d_in] and ``acts`` [n, d_sae]): (false negative, absorbed), bool
    [n] each. A false negative: no main latent fires. Absorbed (SAEBench's full absorption): a false negative
    whose input projects positively on the unit ``direction`` u, and whose top non-main latent by projection
    (``a_j * W_dec[j] . u``, the largest) has cosine >= ``cos_threshold`` with u and carries >= ``fraction``
    of ``x . u``. (SAEBench writes the projection ``a_j * cos_j``: the same for unit-norm decoder rows.)"""
    x, acts, w_dec = x.double(), acts.double(), w_dec.double()
    u = direction.double() / direction.double().norm().clamp_min(1e-12)
    proj = w_dec @ u  # [d_sae] each latent's unit contribution along u
    cos = proj / w_dec.norm(dim=1).clamp_min(1e-12)
    main = torch.zeros(acts.shape[1], dtype=torch.bool)
    main[list(main_latents)] = True
    fn = ~(acts[:, main] > 0).any(1)
    contrib = torch.where(main, 0.0, acts * proj)  # [n, d_sae]; silent latents contribute 0
    top_value, top = contrib.max(1)
    xu = x @ u
    absorbed = fn & (xu > 0) & (cos[top] >= cos_threshold) & (top_value >= fraction * xu)
    return fn, absorbed


# --------------------------------------------------------------------------- the suite


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """What `bench_sae` measures beyond the core metrics."""

    ks: tuple[int, ...] = PROBE_KS
    """probe sizes of sparse probing"""
    min_positives: int = 20
    """a class with fewer positive (or negative) tokens than this is not probed"""
    absorption_k: int = 1
    """main latents per class for absorption (SAEBench uses the k=1 probe's latent, then splits)"""
    cos_threshold: float = 0.025
    """absorbing latents' cosine with the class direction (SAEBench's default)"""
    fraction: float = 0.4
    """share of the token's projection an absorbing latent must carry"""
    max_tokens: int = 20_000
    """probing/absorption use at most this many kept tokens (the first ones)"""
    input_probe: bool = True
    """also the class-balanced probe on the SAE's whole input (`input_probe`), the reference for the latents"""

    def __post_init__(self) -> None:
        if not self.ks or any(k <= 0 for k in self.ks):
            raise ValueError(f"ks must be positive ints, got {self.ks}")
        if self.min_positives <= 0 or self.max_tokens <= 0 or self.absorption_k <= 0:
            raise ValueError("min_positives, max_tokens and absorption_k must be > 0")


@torch.no_grad()
def site_activations(
    model: Transformer,
    sae: SAE,
    token_batches: Iterable[Tensor],
    token_filter: TokenFilter,
    labellers: Mapping[str, Labeller],
    max_tokens: int,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """(SAE input [n, d_in], SAE activations [n, d_sae], {property: labels [n]}) of the kept positions."""
    hook = Site.parse(sae.cfg.hook_name).name
    xs, acts, n = [], [], 0
    labels: dict[str, list[Tensor]] = {p: [] for p in labellers}
    for batch in token_batches:
        tokens = _as_batch(batch).to(sae.device)
        keep = token_filter.mask(tokens)
        _, cache = model.run_with_cache(tokens, names=[hook])
        x = cache[hook].flatten(2)[keep].to(sae.W_enc.dtype)
        for p, fn in labellers.items():
            labels[p].append(fn(tokens.cpu())[keep.cpu()])
        xs.append(x)
        acts.append(sae.encode(x))
        n += x.shape[0]
        if n >= max_tokens:
            break
    props = {p: torch.cat(v)[:max_tokens] for p, v in labels.items()}
    return torch.cat(xs)[:max_tokens], torch.cat(acts)[:max_tokens], props


def labelled_metrics(
    acts: Tensor, x: Tensor, w_dec: Tensor, properties: Mapping[str, Tensor], cfg: BenchConfig
) -> dict[str, float]:
    """Sparse probing and absorption over labelled properties ({property: [n] int class labels, negative
    where the property is not defined: those tokens are left out of it}): per k, the mean probe accuracy and
    balanced accuracy over every class (one-vs-rest) with enough tokens, and the reference probe on the whole
    SAE input (``probe_balanced_{property}_input``, `input_probe`); per property, the mean absorption and
    false-negative rates of its classes."""
    out: dict[str, float] = {}
    for prop, all_labels in properties.items():
        defined = all_labels >= 0  # a negative label: the property is not defined at that token
        labels = all_labels[defined]
        acts_p, x_p = (acts, x) if bool(defined.all()) else (acts[defined], x[defined])
        accs: dict[int, list[float]] = {k: [] for k in cfg.ks}
        bals: dict[int, list[float]] = {k: [] for k in cfg.ks}
        absorb, fneg, dense = [], [], []
        for cls in sorted(set(labels.tolist())):
            y = labels == cls
            if min(int(y.sum()), int((~y).sum())) < cfg.min_positives:
                continue
            if cfg.input_probe:
                dense.append(input_probe(x_p, y))
            ks = tuple(k for k in cfg.ks if k <= acts_p.shape[1])
            for r in k_sparse_probe(acts_p, y, ks=ks):
                accs[r.k].append(r.accuracy)
                bals[r.k].append(r.balanced_accuracy)
            main = rank_latents(acts_p, y)[: cfg.absorption_k].tolist()
            a = absorption(
                x_p, acts_p, w_dec, y, main, cos_threshold=cfg.cos_threshold, fraction=cfg.fraction
            )
            absorb.append(a.absorption_rate)
            fneg.append(a.false_negative_rate)
        for k, v in accs.items():
            if v:
                out[f"probe_{prop}_k{k}"] = statistics.fmean(v)
                out[f"probe_balanced_{prop}_k{k}"] = statistics.fmean(bals[k])
        if dense:
            out[f"probe_balanced_{prop}_input"] = statistics.fmean(dense)
        if absorb:
            out[f"absorption_{prop}"] = statistics.fmean(absorb)
            out[f"false_negative_{prop}"] = statistics.fmean(fneg)
    return out


def bench_sae(
    model: Transformer,
    sae: SAE,
    token_batches: Sequence[Tensor],
    *,
    token_filter: TokenFilter = TokenFilter(),
    labellers: Mapping[str, Labeller] | None = None,
    cfg: BenchConfig = BenchConfig(),
    targets: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> dict[str, float]:
    """Every metric of one SAE: the core metrics of `evaluate_sae` (its losses at a task's ``targets`` where
    given, `CorpusBatches.targets`) and, for each labeller ({property: [n] token ids -> class labels, see
    `Labeller`}), sparse probing and absorption (`labelled_metrics`)."""
    core = evaluate_sae(model, sae, token_batches, token_filter=token_filter, targets=targets)
    out = {m: float(getattr(core, m)) for m in CORE_METRICS}
    if labellers:
        x, acts, props = site_activations(model, sae, token_batches, token_filter, labellers, cfg.max_tokens)
        out.update(labelled_metrics(acts.float(), x.float(), sae.W_dec.detach().float(), props, cfg))
    return out


def tokenizer_labellers(tokenizer: Tokenizer) -> dict[str, Labeller]:
    """The built-in labelled properties of a corpus on ``tokenizer``: each token's first letter (absorption's
    classic) and its Python token type in its sequence (`python_token_labels`)."""
    return {
        "first_letter": lambda t: first_letter_labels(tokenizer, t),
        "python_token": lambda t: python_token_labels(tokenizer, t),
    }


def task_labellers(task: Task) -> dict[str, Labeller]:
    """The ground-truth variables of an algorithmic task (`Task.variables`: e.g. induction's ``repeat`` and
    ``seen_before``, sorting's ``segment`` and ``duplicate``, modular addition's ``answer``, ``a``, ``b`` at
    the ``=`` position) as labellers of its examples; -1 where a variable is not defined."""
    names = task.variable_names()
    if not names:
        raise ValueError(f"task {task.name!r} defines no variables to probe")

    def labeller(name: str) -> Labeller:
        return lambda tokens: task.variables(_as_batch(tokens))[name]

    return {name: labeller(name) for name in names}


# --------------------------------------------------------------------------- reseed noise and the table


def reseed_noise(values: Sequence[float]) -> dict[str, float]:
    """mean, sample SD (0 for one seed), CV = SD / |mean| (NaN when the mean is 0) and n of one metric over
    seeds."""
    vals = [float(v) for v in values if not math.isnan(float(v))]
    if not vals:
        return {"mean": float("nan"), "sd": float("nan"), "cv": float("nan"), "n": 0}
    mean = statistics.fmean(vals)
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": mean, "sd": sd, "cv": sd / abs(mean) if mean != 0 else float("nan"), "n": len(vals)}


@dataclass(frozen=True)
class BenchResult:
    """Per-SAE metrics (``rows``: name, group, seed source, metrics) and, per group of reseeded SAEs, each
    metric's mean/SD/CV (``groups``)."""

    rows: list[dict[str, Any]]
    groups: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: Sequence[dict[str, Any]]) -> BenchResult:
        """Group ``rows`` (each: ``group``, ``name``, ``metrics``) and compute every group's reseed noise."""
        groups: dict[str, dict[str, list[float]]] = {}
        for r in rows:
            g = groups.setdefault(r["group"], {})
            for m, v in r["metrics"].items():
                g.setdefault(m, []).append(v)
        noise = {g: {m: reseed_noise(v) for m, v in ms.items()} for g, ms in groups.items()}
        return cls(rows=list(rows), groups=noise)

    def metrics(self) -> list[str]:
        names: list[str] = []
        for g in self.groups.values():
            names += [m for m in g if m not in names]
        return names

    def to_dict(self) -> dict[str, Any]:
        return {"saes": self.rows, "groups": self.groups}

    def markdown(self) -> str:
        """The comparison table: one row per group, one column per metric, ``mean ± SD (CV x%)``."""
        metrics = self.metrics()
        lines = ["| SAE | seeds | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
        for g, ms in self.groups.items():
            n = max((int(s["n"]) for s in ms.values()), default=0)
            cells = [_cell(ms[m]) if m in ms else "" for m in metrics]
            lines.append(f"| {g} | {n} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plot(self, metric: str = "fvu") -> Any:
        """``metric`` against L0, one marker per group at its seed mean with SD error bars (Plotly)."""
        import plotly.graph_objects as go

        pts = sorted(
            (g for g in self.groups.items() if metric in g[1] and "l0" in g[1]),
            key=lambda g: g[1]["l0"]["mean"],
        )
        fig = go.Figure(
            go.Scatter(
                x=[ms["l0"]["mean"] for _, ms in pts],
                y=[ms[metric]["mean"] for _, ms in pts],
                error_x={"type": "data", "array": [ms["l0"]["sd"] for _, ms in pts]},
                error_y={"type": "data", "array": [ms[metric]["sd"] for _, ms in pts]},
                mode="lines+markers+text",
                text=[g for g, _ in pts],
                textposition="top center",
            )
        )
        fig.update_layout(
            title=f"L0 vs {metric} (mean ± SD over seeds)",
            xaxis_title="L0 (active latents per token)",
            yaxis_title=metric,
            xaxis_type="log",
            template="plotly_white",
        )
        return fig

    def save(self, path: str | Path, *, plots: Sequence[str] = ("fvu", "ce_loss_recovered")) -> Path:
        """Write ``report.json``, ``bench.md`` and ``frontier_{metric}.html`` into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / REPORT, Kind.SAE_EVAL, {**self.to_dict(), "bench": True})
        tmp = path / "bench.md.tmp"
        tmp.write_text(self.markdown())
        tmp.replace(path / "bench.md")
        for m in plots:
            if m in self.metrics():
                save_figure(self.plot(m), path / f"frontier_{m}.html")
        return path


def _cell(s: Mapping[str, float]) -> str:
    if s["n"] == 0:
        return "n/a"
    cv = "" if s["n"] < 2 else f" (CV {s['cv']:.1%})" if not math.isnan(s["cv"]) else " (CV n/a)"
    return f"{s['mean']:.4g} ± {s['sd']:.2g}{cv}"


def bench_saes(
    model: Transformer,
    saes: Mapping[str, tuple[str, SAE]],
    token_batches: Sequence[Tensor],
    *,
    token_filter: TokenFilter = TokenFilter(),
    labellers: Mapping[str, Labeller] | None = None,
    extra: Mapping[str, ExtraMetric] | None = None,
    cfg: BenchConfig = BenchConfig(),
    targets: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> BenchResult:
    """Bench every SAE of ``saes`` ({name: (group, SAE)}; SAEs of one group are reseeds of one
    configuration) and compute each group's reseed noise. ``extra`` plugs in more per-SAE metrics (e.g. the
    autointerp score of `interplab.features`)."""
    rows = []
    for name, (group, sae) in saes.items():
        metrics = bench_sae(
            model,
            sae,
            token_batches,
            token_filter=token_filter,
            labellers=labellers,
            cfg=cfg,
            targets=targets,
        )
        for fn in (extra or {}).values():
            metrics.update({k: float(v) for k, v in fn(name, sae).items()})
        rows.append({"name": name, "group": group, "metrics": metrics})
    return BenchResult.from_rows(rows)
