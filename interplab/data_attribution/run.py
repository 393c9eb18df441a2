"""Attribute a mechanism's formation in a training run to the training examples that built it.

The trainer makes every batch a pure function of (seed, step), so the examples each step trained on are known
after the fact: candidates are the sequences seen inside the formation window, scored against the target
at every checkpoint of the window (TracIn over checkpoints: the sum of -lr <grad target, grad loss_i>).

>>> result = attribute_run("runs/demo", "induction:best", dim=64, max_candidates=20)
>>> paths = result.save("runs/demo/attribution")
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from interplab import runs
from interplab.data_attribution.factored import (
    GainSite,
    LinearSite,
    factored_dots,
    gain_sites,
    linear_sites,
    lm_losses,
)
from interplab.data_attribution.methods import CheckpointGrads, formation_window, tracin_per_checkpoint
from interplab.data_attribution.params import ParamGroup, param_group
from interplab.data_attribution.per_example import lm_loss, objective_grad, objective_grads, per_example_grads
from interplab.data_attribution.projection import Projector
from interplab.data_attribution.targets import Target, feature_target, loss_target, parse_target
from interplab.io import atomic_write_text, save_tensors
from interplab.model.io import load_native
from interplab.model.transformer import Transformer
from interplab.plots import figure_html, write_image
from interplab.runs import REPORT, Kind, write_json
from interplab.sae.io import load_sae
from interplab.train.config import TrainConfig
from interplab.train.sources import CorpusSource, cosine_lr


@dataclass(frozen=True)
class RunAttribution:
    """Scores of training sequences for one target over a window of a run's checkpoints."""

    run_dir: str
    target: str
    window: tuple[int, int]
    example_ids: Tensor  # [n] sequence indices in the run's training token store
    scores: Tensor  # [n] predicted change of the target caused by training on each sequence
    steps: tuple[int, ...]  # checkpoints used (inside the window)
    per_step: Tensor  # [n_steps, n] each checkpoint's term
    curve_steps: tuple[int, ...]  # every checkpoint of the run
    curve: tuple[float, ...]  # the target's value at each of them
    texts: tuple[str, ...]  # decoded candidates (empty strings without a tokenizer)
    enriched: tuple[tuple[str, float], ...]  # tokens over-represented in the top examples vs all candidates
    rises: bool = True  # the target's `Target.rises`: False for a loss, whose helpful examples score negative
    grads: str = "factored"  # how the per-example gradients were taken (`GRADS`)

    @property
    def sign(self) -> float:
        """+1 when the target rises as it forms (a mechanism score), -1 when it falls (a loss)."""
        return 1.0 if self.rises else -1.0

    @property
    def ranking(self) -> str:
        """How `top` orders the sequences, in words (the sign convention of docs/attribution.md)."""
        if self.rises:
            return "highest score first: the sequences that raised the target most"
        return "lowest (most negative) score first: the sequences that lowered the loss most, i.e. helped"

    def top(self, k: int = 10) -> list[tuple[int, float]]:
        """The ``k`` sequences that did most to form the target: highest score first for a target that rises,
        most negative first for a loss (``rises=False``). Scores keep their sign."""
        order = (self.sign * self.scores).argsort(descending=True)[:k]
        return [(int(self.example_ids[i]), float(self.scores[i])) for i in order]

    @property
    def mass(self) -> Tensor:
        """Attribution mass per checkpoint: the summed contribution towards the target's formation of all
        candidates that pushed it that way (positive terms; for a loss, the negative ones, as a positive mass)."""
        return (self.sign * self.per_step).clamp_min(0).sum(1)

    def plot(self) -> Any:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1,
            cols=3,
            subplot_titles=(
                f"{self.target} over training (window shaded)",
                "attribution mass per checkpoint",
                "scores of candidate sequences",
            ),
        )
        fig.add_trace(
            go.Scatter(x=list(self.curve_steps), y=list(self.curve), mode="lines+markers", name=self.target),
            row=1,
            col=1,
        )
        fig.add_vrect(
            x0=self.window[0], x1=self.window[1], fillcolor="orange", opacity=0.2, line_width=0, row=1, col=1
        )
        fig.add_trace(go.Bar(x=list(self.steps), y=self.mass.tolist(), name="mass"), row=1, col=2)
        fig.add_trace(go.Histogram(x=self.scores.tolist(), nbinsx=40, name="scores"), row=1, col=3)
        fig.update_xaxes(title_text="step", row=1, col=1)
        fig.update_xaxes(title_text="checkpoint step", row=1, col=2)
        fig.update_xaxes(title_text="score", row=1, col=3)
        fig.update_layout(
            height=380, width=1200, showlegend=False, title=f"What built {self.target}? ({self.run_dir})"
        )
        return fig

    def to_dict(self, k: int = 20) -> dict[str, Any]:
        """The ``report.json`` of an attribution (`Kind.ATTRIBUTION`): ``run_dir``, ``target``, ``window``
        [start, stop], ``steps`` (the checkpoints used), ``n_candidates``, ``mass`` (per checkpoint), ``curve``
        {steps, values} (the target along the run), ``top`` [{sequence, score, text}] (the ``k`` best),
        ``enriched_tokens`` [{token, ratio}], ``method`` (in words), ``rises`` (whether the target rises as
        it forms; false for a loss) and ``ranking`` (how ``top`` is ordered: by ``score`` for a target that
        rises, by ``-score`` for one that falls)."""
        top = self.top(k)
        pos = {int(e): i for i, e in enumerate(self.example_ids)}
        return {
            "run_dir": self.run_dir,
            "target": self.target,
            "window": list(self.window),
            "steps": list(self.steps),
            "n_candidates": int(self.example_ids.numel()),
            "mass": self.mass.tolist(),
            "curve": {"steps": list(self.curve_steps), "values": list(self.curve)},
            "top": [
                {"sequence": i, "score": s, "text": self.texts[pos[i]][:400] if self.texts else ""}
                for i, s in top
            ],
            "enriched_tokens": [{"token": t, "ratio": r} for t, r in self.enriched],
            "rises": self.rises,
            "ranking": self.ranking,
            "grads": self.grads,
            "method": "TracIn over the checkpoints of the formation window (sum of -lr <grad target, grad loss>)"
            + (
                "; per-example gradients randomly projected (sparse JL): noise-dominated where the cosines "
                "are small"
                if self.grads == "exact"
                else "; exact, unprojected gradient dot products (factored_dots)"
            ),
        }

    def save(self, folder: str | Path) -> dict[str, str]:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(
            folder / "scores.safetensors",
            {"example_ids": self.example_ids, "scores": self.scores, "per_step": self.per_step},
        )
        atomic_write_text(folder / "top_examples.html", self.top_html())
        fig = self.plot()
        # inside its training run, the page shares the run folder's plotly.min.js with the run's other reports
        atomic_write_text(folder / "attribution.html", figure_html(fig, folder, assets=self.run_dir))
        out = {
            "report": str(folder / REPORT),
            "html": str(folder / "attribution.html"),
            "examples": str(folder / "top_examples.html"),
        }
        error = write_image(fig, folder / "attribution.png")
        if error is None:
            out["png"] = str(folder / "attribution.png")
        else:
            out["png_error"] = error
        write_json(
            folder / REPORT, Kind.ATTRIBUTION, self.to_dict()
        )  # last: a folder with a report is complete
        return out

    def top_html(self, k: int = 10) -> str:
        """The top sequences as text; highlighted: tokens an induction head can predict (the token pair occurred
        earlier in the same sequence)."""
        import html

        pos = {int(e): i for i, e in enumerate(self.example_ids)}
        parts = [
            f"<h1>Training sequences that built {html.escape(self.target)}</h1>",
            f"<p>Ranked {html.escape(self.ranking)}.</p>",
            "<p>Highlighted: tokens whose (previous, current) pair occurred earlier in the same sequence, "
            "i.e. what an induction head can predict.</p>",
        ]
        for rank, (seq, score) in enumerate(self.top(k), 1):
            pieces = self._pieces[pos[seq]] if self._pieces else []
            body = "".join(f"<mark>{html.escape(t)}</mark>" if rep else html.escape(t) for t, rep in pieces)
            parts.append(f"<h3>#{rank}: sequence {seq}, score {score:.3g}</h3><pre>{body}</pre>")
        return "<!doctype html><meta charset='utf-8'><title>top examples</title>" + "\n".join(parts)

    @property
    def _pieces(self) -> list[list[tuple[str, bool]]]:
        return self.__dict__.get("pieces", [])


def _repeated_pairs(tokens: list[int]) -> list[bool]:
    seen: set[tuple[int, int]] = set()
    out = [False]
    for a, b in zip(tokens[:-1], tokens[1:], strict=True):
        out.append((a, b) in seen)
        seen.add((a, b))
    return out


def attribute_run(
    run_dir: str | Path,
    target: str | Target = "induction:best",
    *,
    window: str | tuple[int, int] = "auto",
    group: str = "all",
    dim: int = 1024,
    max_candidates: int = 256,
    probe: Tensor | None = None,
    seed: int = 0,
    grads: str = "factored",
    progress: Callable[[int, int], None] | None = None,
) -> RunAttribution:
    """Score the training sequences seen inside ``window`` (``"auto"``: where the target rises from 10% to 90%
    of its total rise over the run's checkpoints; for a loss, where it falls) for their effect on ``target``:
    any `Target` (evaluated at every checkpoint), or a spec (`run_target`: ``induction:best``, ``prev:L.H``,
    ``composition:...``, ``neuron:L.N``, ``loss``, ``loss:FILE``, ``feature:SAE_PATH:IDX``). ``probe``
    [batch pos]: the tokens neuron, feature and loss specs read (default: the run's held-out sequences).
    Each checkpoint's term is weighted by lr x span / n_train (see docs/attribution.md, sign convention).

    ``grads``: ``"factored"`` (the default: `factored_dots`, the exact dot product of each example's
    gradient with the target's over the whole group, from the inputs and output gradients of its linear maps
    (embedding included), norms and key-smearing gates (`group_sites`); no projection, so ``dim`` is unused,
    and no per-example gradient formed; a parameter no site covers, such as a learned position embedding, by
    exact per-example gradients) or ``"exact"`` (per-example gradients of the group through ``torch.func``,
    then a sparse JL projection to ``dim``: a random projection, whose dot products carry noise of about
    ``|g| |g_target| / sqrt(dim)``; where the cosine between the sequences' and the target's gradients is tiny
    (3.6e-4 at the demo run's first checkpoint, against 1/32 at dim 1024) that noise swamps the ranking, see
    docs/attribution.md). ``factored`` takes 1.8-2.8x less CPU than ``exact`` at the demo's size."""
    if grads not in GRADS:
        raise ValueError(f"grads must be one of {', '.join(GRADS)}, got {grads!r}")
    run_dir = Path(run_dir)
    cfg, ckpts = _open_run(run_dir)
    if len(ckpts) < 2:
        raise ValueError(f"{run_dir} has {len(ckpts)} intact checkpoints; attribution needs at least 2")
    models = {c.step: load_native(c.path) for c in ckpts}
    final = models[ckpts[-1].step]
    source = CorpusSource(cfg)
    if isinstance(target, str):
        target = run_target(final, _resolve_best(final, target), source, probe)
    with torch.no_grad():
        curve = [float(target(models[c.step])) for c in ckpts]
    steps_all = [c.step for c in ckpts]
    if window == "auto":
        lo, hi = formation_window(steps_all, curve if target.rises else [-v for v in curve])
    else:
        lo, hi = cast(tuple[int, int], window)  # not "auto": a (lo, hi) pair
        if not (steps_all[0] <= lo < hi <= steps_all[-1]):
            raise ValueError(
                f"window [{lo}, {hi}] is outside the run's checkpoints ({steps_all[0]}..{steps_all[-1]})"
            )
    used = [s for s in steps_all if lo <= s <= hi]
    if len(used) < 2:
        raise ValueError(f"window [{lo}, {hi}] holds {len(used)} checkpoint(s); need at least 2")
    ids = _window_sequences(source, lo, hi, max_candidates, seed)
    tokens = source.train.sequences(ids, source.seq_len)
    features = _features(final, param_group(final, group), target, tokens, grads, dim, seed)
    cps = []
    for i, step in enumerate(used[:-1]):  # checkpoint s stands for the steps from s up to the next one
        model = models[step]
        lr = _lr_at(cfg, step)
        span = used[i + 1] - step
        g, tg = features(model)
        # an example sits in a step's batch with probability batch/n_train and then moves the weights by
        # lr/batch times its gradient (SGD form; AdamW's preconditioning is not modelled here)
        cps.append(CheckpointGrads(step, lr * span / source.n_train, g, tg))
        if progress is not None:
            progress(i + 1, len(used) - 1)
    per_step = tracin_per_checkpoint(cps)
    scores = per_step.sum(0)
    texts, pieces = _decode(final, tokens)
    result = RunAttribution(
        run_dir=str(run_dir),
        target=target.name,
        window=(lo, hi),
        example_ids=ids,
        scores=scores,
        steps=tuple(used[:-1]),
        per_step=per_step,
        curve_steps=tuple(steps_all),
        curve=tuple(curve),
        texts=texts,
        enriched=_enriched(final, tokens, scores if target.rises else -scores),
        rises=target.rises,
        grads=grads,
    )
    object.__setattr__(result, "pieces", pieces)
    return result


GRADS = ("factored", "exact")
"""how `attribute_run` takes per-example gradients"""


def _features(
    final: Transformer, grp: ParamGroup, target: Target, tokens: Tensor, grads: str, dim: int, seed: int
) -> Callable[[Transformer], tuple[Tensor, Tensor]]:
    """``model -> (per-example features [n, k], target features [k])`` whose products are the TracIn dot
    products: projected gradients (one projection for every checkpoint) for ``exact``; for ``factored`` the
    exact dot products themselves as one column, against a target of 1."""
    if grads == "exact":
        proj = Projector(d_in=grp.numel, dim=min(dim, grp.numel), seed=seed)

        def exact(model: Transformer) -> tuple[Tensor, Tensor]:
            tg = proj.project(objective_grad(model, target, grp)[None])[0]
            return per_example_grads(model, lm_loss, tokens, grp, chunk_size=8, transform=proj.project), tg

        return exact
    sites, rest = group_sites(final, grp)
    masks = _slice_masks(final, grp)
    outside = {p for s in sites for p in s.params} - set(grp.param_names)

    def factored(model: Transformer) -> tuple[Tensor, Tensor]:
        # the exact dot products as one-column features against a target of 1: g @ tg is <grad_i, grad target>
        tgrads = objective_grads(model, target, grp.param_names)
        vector = {k: v * masks[k] if k in masks else v for k, v in tgrads.items()}
        named = dict(model.named_parameters())
        for p in outside:  # a site's parameter the group leaves out (a head's W_O without b_O): weight 0
            vector[p] = torch.zeros_like(named[p])
        dots = factored_dots(model, lm_losses, tokens, sites, [vector])
        if rest is not None:
            # parameters no site covers (e.g. learned positions): exact per-example gradients, dotted with
            # the target's chunk by chunk
            tvec = rest.flatten(tgrads)
            dots = (
                dots
                + per_example_grads(model, lm_loss, tokens, rest, chunk_size=8, transform=lambda g: g @ tvec)[
                    :, None
                ]
            )
        return dots, torch.ones(1)

    return factored


def _row_norms(g: Tensor) -> Tensor:
    return g.norm(dim=1)


def _slice_masks(model: Transformer, group: ParamGroup) -> dict[str, Tensor]:
    """For the parameters ``group`` selects slices of (a head, a neuron): 1 on the slices, 0 elsewhere. The
    dot product with a target gradient masked so is the dot product over the slices alone."""
    params = dict(model.named_parameters())
    masks: dict[str, Tensor] = {}
    whole = {s.name for s in group.slices if s.dim is None}
    for s in group.slices:
        if s.dim is None or s.index is None or s.name in whole:
            continue
        mask = masks.setdefault(s.name, torch.zeros_like(params[s.name], dtype=torch.float32))
        mask.select(s.dim, s.index).fill_(1.0)
    return masks


def group_sites(
    model: Transformer, group: ParamGroup
) -> tuple[list[LinearSite | GainSite], ParamGroup | None]:
    """What ``grads="factored"`` attributes ``group`` through: the linear maps (embedding included, unless
    tied) and the norm gains / smear gates (`gain_sites`) holding its parameters, and the group of the
    parameters none of them covers (None when they cover all; those are taken by exact per-example
    gradients)."""
    names = set(group.param_names)
    candidates: list[LinearSite | GainSite] = [
        *linear_sites(model, embedding=not model.cfg.tie_embeddings),
        *gain_sites(model),
    ]
    sites = [s for s in candidates if names.intersection(s.params)]
    covered = {p for s in sites for p in s.params}
    left = [s for s in group.slices if s.name not in covered]
    rest = None
    if left:
        params = dict(model.named_parameters())
        numel = sum(
            params[s.name].numel() // (params[s.name].shape[s.dim] if s.dim is not None else 1) for s in left
        )
        rest = ParamGroup(f"{group.spec} (not factorised)", tuple(left), numel)
    return sites, rest


PROBE_SEQUENCES = 16
"""held-out sequences a ``loss`` / ``neuron`` / ``feature`` spec reads when no probe is given"""


RUN_TARGETS = (
    "induction:L.H, prev:L.H (or :best: the head with the highest final score), composition:q|k|v:L1.H1->L2.H2, "
    "neuron:L.N, feature:SAE_PATH:IDX, loss (the run's held-out sequences), loss:QUERY_FILE"
)
"""every target spec `run_target` reads, as its error message lists them"""


def run_target(model: Transformer, spec: str, source: CorpusSource, probe: Tensor | None = None) -> Target:
    """A target spec on a training run: every `parse_target` kind, plus ``loss:FILE`` (mean next-token loss on
    a UTF-8 text file, tokenized with the run's tokenizer into ``seq_len`` windows) and
    ``feature:SAE_PATH:IDX`` (latent IDX of the SAE `load_sae` reads at SAE_PATH). ``neuron:L.N``,
    ``feature:...`` and ``loss`` read ``probe``, by default the run's first `PROBE_SEQUENCES` held-out
    sequences."""
    kind, _, arg = spec.partition(":")
    if kind == "loss" and arg:
        return loss_target(_file_sequences(Path(arg), source), name=f"loss:{Path(arg).name}")
    if kind not in ("loss", "neuron", "feature"):
        if kind not in ("induction", "prev", "composition"):
            # parse_target's own list lacks the run-level kinds (feature, loss:FILE, :best)
            raise ValueError(f"unknown target {spec!r}; valid: {RUN_TARGETS}")
        return parse_target(model, spec, probe)
    probe = probe if probe is not None else _heldout(source, spec)
    if kind != "feature":
        return parse_target(model, spec, probe)
    path, _, idx = arg.rpartition(":")
    if not path or not idx.isdigit():
        raise ValueError(f"cannot parse target {spec!r}: a feature target is feature:SAE_PATH:IDX")
    sae = load_sae(path)
    if sae.cfg.hook_name not in model.hook_names:
        raise ValueError(
            f"the SAE at {path} reads {sae.cfg.hook_name!r}, which the run's model does not have"
        )
    if int(idx) >= sae.cfg.d_sae:
        raise ValueError(f"feature {idx} does not exist: the SAE at {path} has {sae.cfg.d_sae} latents")
    return feature_target(model, sae, probe, int(idx))


def _heldout(source: CorpusSource, spec: str) -> Tensor:
    """The run's first `PROBE_SEQUENCES` validation sequences (what a loss / neuron / feature spec reads)."""
    n = source.val.n_sequences(source.seq_len) if source.val is not None else 0
    if n == 0:
        raise ValueError(
            f"target {spec!r} reads probe tokens and the run has no held-out sequences: pass probe= "
            "(or use loss:FILE)"
        )
    return source.val.sequences(torch.arange(min(n, PROBE_SEQUENCES)), source.seq_len)  # type: ignore[union-attr]


def _file_sequences(path: Path, source: CorpusSource) -> Tensor:
    """A text file's tokens as non-overlapping ``seq_len`` windows (a shorter file: one shorter sequence)."""
    if not path.is_file():
        raise FileNotFoundError(f"query file {path} does not exist (loss:FILE needs a UTF-8 text file)")
    ids = source.tokenizer.encode(path.read_text(encoding="utf-8"))
    if len(ids) < 2:
        raise ValueError(f"query file {path} has {len(ids)} token(s); a loss needs at least 2")
    n = source.seq_len
    if len(ids) < n:
        return torch.tensor([ids], dtype=torch.long)
    return torch.tensor(ids[: len(ids) // n * n], dtype=torch.long).view(-1, n)


def _open_run(run_dir: Path) -> tuple[TrainConfig, list[runs.Checkpoint]]:
    """A corpus training run's config and its intact checkpoints, read through the run contract (clear
    errors otherwise)."""
    run = runs.TrainRun.open(run_dir)
    cfg = TrainConfig.from_dict(run.config)
    if cfg.data.task is not None:
        raise ValueError(
            f"{run_dir} trained on task {cfg.data.task!r}; attribution to training data needs a corpus run"
        )
    return cfg, run.checkpoints(intact=True)


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """The learning rate the trainer used for the update after checkpoint ``step``."""
    o = cfg.optim
    return cosine_lr(step, lr=o.lr, warmup=o.warmup_steps, total=cfg.steps, min_ratio=o.min_lr_ratio)


def _resolve_best(model: Transformer, target: str) -> str:
    kind, _, arg = target.partition(":")
    if arg != "best" or kind not in ("induction", "prev"):
        return target
    best, best_value = (0, 0), -1.0
    with torch.no_grad():
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                value = float(parse_target(model, f"{kind}:{layer}.{head}")(model))
                if value > best_value:
                    best, best_value = (layer, head), value
    return f"{kind}:{best[0]}.{best[1]}"


def _window_sequences(source: CorpusSource, lo: int, hi: int, limit: int, seed: int) -> Tensor:
    """Training sequence indices the optimiser saw between checkpoints ``lo`` and ``hi`` (step t used batch t-1)."""
    seen: list[int] = []
    for step in range(lo, hi):
        seen.extend(source.indices(step).tolist())
    unique = torch.tensor(sorted(set(seen)), dtype=torch.long)
    if unique.numel() > limit:
        pick = torch.randperm(unique.numel(), generator=torch.Generator().manual_seed(seed))[:limit]
        unique = unique[pick.sort().values]
    return unique


def _decode(model: Transformer, tokens: Tensor) -> tuple[tuple[str, ...], list[list[tuple[str, bool]]]]:
    tok = model.tokenizer
    texts, pieces = [], []
    for row in tokens.tolist():
        flags = _repeated_pairs(row)
        strings = [tok.decode([t]) if tok is not None else f"[{t}]" for t in row]
        pieces.append(list(zip(strings, flags, strict=True)))
        texts.append("".join(strings))
    return tuple(texts), pieces


def _enriched(
    model: Transformer, tokens: Tensor, scores: Tensor, k: int = 20, top_frac: float = 0.1
) -> tuple[tuple[str, float], ...]:
    """Tokens over-represented in the top ``top_frac`` sequences (highest ``scores``: pass minus a loss
    target's) relative to all candidates (ratio of frequencies)."""
    n_top = max(1, int(len(scores) * top_frac))
    top = tokens[scores.argsort(descending=True)[:n_top]]
    all_counts, top_counts = Counter(tokens.flatten().tolist()), Counter(top.flatten().tolist())
    n_all, n_topt = tokens.numel(), top.numel()
    ratios = {t: (c / n_topt) / (all_counts[t] / n_all) for t, c in top_counts.items() if c >= 5}
    best = sorted(ratios.items(), key=lambda kv: -kv[1])[:k]
    tok = model.tokenizer
    return tuple((tok.decode([t]) if tok is not None else str(t), round(r, 3)) for t, r in best)


@dataclass(frozen=True)
class Movers:
    """For one parameter group: which sequences moved it most in each checkpoint interval (update norms)."""

    group: str
    intervals: tuple[tuple[int, int], ...]
    example_ids: Tensor  # [n] candidate sequences
    norms: Tensor  # [n_intervals, n] expected update norm of each sequence on the group, per interval
    enriched: tuple[
        tuple[tuple[str, float], ...], ...
    ]  # per interval: tokens over-represented in the top 10%

    def top(self, interval: int, k: int = 10) -> list[tuple[int, float]]:
        order = self.norms[interval].argsort(descending=True)[:k]
        return [(int(self.example_ids[i]), float(self.norms[interval, i])) for i in order]

    def plot(self) -> Any:
        import plotly.graph_objects as go

        labels = [f"{a}..{b}" for a, b in self.intervals]
        fig = go.Figure(
            go.Heatmap(
                z=self.norms.T.tolist(),
                x=labels,
                y=[str(int(i)) for i in self.example_ids],
                colorscale="Viridis",
                colorbar={"title": "update norm"},
            )
        )
        fig.update_layout(
            title=f"Which sequences moved {self.group}",
            xaxis_title="checkpoint interval",
            yaxis_title="training sequence",
            height=600,
        )
        return fig


def movers(
    run_dir: str | Path,
    group: str,
    *,
    max_candidates: int = 128,
    seed: int = 0,
    steps: tuple[int, int] | None = None,
) -> Movers:
    """Per-parameter view: the expected update norm (lr / n_train * |grad|) each training sequence seen in an
    interval contributed to ``group`` (e.g. ``head:0.1`` or ``neuron:1.17``), for every checkpoint interval."""
    run_dir = Path(run_dir)
    cfg, ckpts = _open_run(run_dir)
    if steps is not None:
        ckpts = [c for c in ckpts if steps[0] <= c.step <= steps[1]]
    if len(ckpts) < 2:
        raise ValueError(f"{run_dir} has {len(ckpts)} intact checkpoints in range; need at least 2")
    source = CorpusSource(cfg)
    ids = _window_sequences(source, ckpts[0].step, ckpts[-1].step, max_candidates, seed)
    tokens = source.train.sequences(ids, source.seq_len)
    rows, intervals, enriched = [], [], []
    for a, b in zip(ckpts[:-1], ckpts[1:], strict=True):
        model = load_native(a.path)
        grp = param_group(model, group)
        lr = _lr_at(cfg, a.step)
        norms = (
            per_example_grads(model, lm_loss, tokens, grp, chunk_size=8, transform=_row_norms)
            * lr
            * (b.step - a.step)
            / source.n_train
        )
        rows.append(norms)
        intervals.append((a.step, b.step))
        enriched.append(_enriched(model, tokens, norms))
    return Movers(group, tuple(intervals), ids, torch.stack(rows), tuple(enriched))
