"""Analysis of decision transformers with the lab's tools: caches over trajectories, environment labels,
linear probes, activation patching between instruction-swapped trajectories, direct logit attribution onto
the action logits, attention over the token sequence (state tokens drawn as grids) and steering.

Everything runs on `Windows`: left-padded windows of ``context`` steps cut from `Trajectories`, each ending at
one step of an episode (the step being analysed sits last, so it sees as much history as the model allows).
Sequence positions are tokens ``[R_1, s_1, a_1, ..., R_K, s_K, a_K]`` (`token_index`); the action logits of a
step are read at its state token.

>>> win = windows(trajs, dt.cfg.context)                      # one window per step, ending at that step
>>> cache = cache_trajectories(dt, trajs, ["blocks.0.hook_resid_post"])
>>> sweep = probe(cache, instruction_labels(trajs))             # accuracy per site, episodes held out
>>> pair = instruction_pair(trajs, decision_steps(trajs), dt.cfg.context)
>>> fig = patch_instruction(dt, pair.clean, pair.corrupt, answer=pair.answer, wrong=pair.wrong).plot()
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from interplab import plots
from interplab.analysis.probes import ProbeConfig, ProbeKind, ProbeResult, train_probe
from interplab.analysis.steering import steering_hook
from interplab.analysis.targets import Direction, PatchResult, PatchTarget, plan_patches, selection, site_of
from interplab.hooks.site import Site, SiteKind
from interplab.rl.attention import attention_figure, attention_pattern, palette_obs
from interplab.rl.envs import ACTION_NAMES
from interplab.rl.labels import (
    INSTRUCTION_NAMES,
    EnvLabels,
    InstructionPair,
    decision_steps,
    env_labels,
    instruction_labels,
    instruction_pair,
    swapped_instruction_obs,
)
from interplab.rl.model import TOKEN_KINDS, DecisionTransformer
from interplab.rl.windows import (
    BALL,
    KEY,
    TrajectoryCache,
    Windows,
    cache_trajectories,
    token_labels,
    token_position,
    windows,
)


# ---- probes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSweep:
    """A logistic (or linear) probe per site on one token kind, scored on held-out episodes."""

    sites: tuple[str, ...]
    probes: tuple[ProbeResult, ...]
    """the fitted probe of each site (`interplab.analysis.probes`)"""
    test_scores: Tensor
    """accuracy (R^2 for linear probes) on the held-out episodes' rows, per site"""
    chance: float
    """the majority class's share of the held-out rows (nan for linear probes)"""
    kind: str
    """the token kind probed"""
    label: str
    n_train: int
    n_test: int

    def __repr__(self) -> str:
        best = int(self.test_scores.argmax())
        return (
            f"ProbeSweep({self.label} at {self.kind} tokens: best {self.sites[best]} "
            f"{float(self.test_scores[best]):.3f}, chance {self.chance:.3f}; {self.n_train}/{self.n_test} rows)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            "sites": list(self.sites),
            "test_scores": self.test_scores.tolist(),
            "train_scores": [p.train_score for p in self.probes],
            "chance": self.chance,
            "n_train": self.n_train,
            "n_test": self.n_test,
        }

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        fig = plots.line(
            {"held-out episodes": self.test_scores, "train": [p.train_score for p in self.probes]},
            x_labels=list(self.sites),
            x_title="site",
            y_title=self.probes[0].score_name,
            title=title or f"probe for {self.label} at {self.kind} tokens",
        )
        if self.chance == self.chance:  # not nan
            fig.add_hline(y=self.chance, line_dash="dot", annotation_text="chance")
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def probe(
    cache: TrajectoryCache,
    labels: Tensor,
    *,
    sites: Sequence[str | Site | tuple] | None = None,
    kind: str = "state",
    label: str = "label",
    test_fraction: float = 0.25,
    config: ProbeConfig = ProbeConfig(),
    seed: int = 0,
) -> ProbeSweep:
    """Fit `train_probe` on each cached site's ``kind`` rows against per-step ``labels`` (indexed by the flat
    step, e.g. `instruction_labels`) and score it on the rows of held-out *episodes* (steps of one episode
    are near copies, so a row split would leak)."""
    names = cache.sites if sites is None else [Site.parse(s).name for s in sites]
    rows = cache.rows(kind)
    y_all = torch.as_tensor(labels)
    if y_all.shape[0] <= int(cache.flat_step.max()):
        raise ValueError(
            f"labels has {y_all.shape[0]} entries; the cache reads steps up to {int(cache.flat_step.max())}"
        )
    y = y_all[cache.flat_step[rows]]
    episodes = cache.episode[rows].unique()
    if episodes.numel() < 2:
        raise ValueError(f"a held-out split needs rows of >= 2 episodes, got {episodes.numel()}")
    logistic = ProbeKind(config.kind) is ProbeKind.LOGISTIC
    test = torch.isin(cache.episode[rows], _held_out(cache.episode[rows], y, logistic, test_fraction, seed))
    if logistic:
        if torch.unique(y[~test]).numel() < 2:
            raise ValueError(
                f"the {kind} rows' {label!r} labels have one class only ({torch.unique(y).tolist()}) in the "
                "training episodes: nothing to probe"
            )
        counts = torch.bincount(y[test].long())
        chance = float(counts.max()) / max(1, int(test.sum()))
    else:
        chance = float("nan")
    results, scores = [], []
    for name in names:
        x = cache[name][rows]
        result = train_probe(x[~test], y[~test], config)
        pred = result.predict(x[test])
        if logistic:
            score = float((pred == y[test].long()).float().mean())
        else:
            yt = y[test].float()
            ss_tot = float(((yt - yt.mean()) ** 2).sum())
            score = 1 - float(((pred - yt) ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan")
        results.append(result)
        scores.append(score)
    return ProbeSweep(
        sites=tuple(names),
        probes=tuple(results),
        test_scores=torch.tensor(scores),
        chance=chance,
        kind=kind,
        label=label,
        n_train=int((~test).sum()),
        n_test=int(test.sum()),
    )


def _held_out(episode: Tensor, y: Tensor, stratify: bool, fraction: float, seed: int) -> Tensor:
    """The held-out episodes: ``fraction`` of them, drawn per class of their first row's label when
    ``stratify`` (so both splits see every class an episode-constant label has, e.g. the instruction; a class
    needs >= 2 / fraction episodes to be held out at all, else its episodes all train the probe)."""
    g = torch.Generator().manual_seed(seed)
    eps, first = torch.unique(episode, return_inverse=True)
    order = torch.argsort(first, stable=True)
    first_row = order[torch.searchsorted(first[order], torch.arange(eps.numel()))]
    groups = [eps] if not stratify else [eps[y[first_row] == c] for c in torch.unique(y[first_row])]
    picked = []
    for group in groups:
        n = round(group.numel() * fraction) if group.numel() > 1 else 0
        picked.append(group[torch.randperm(group.numel(), generator=g)][:n])
    out = torch.cat(picked)
    if out.numel() == 0:  # too few episodes per class: hold out one episode at random
        out = eps[torch.randperm(eps.numel(), generator=g)][:1]
    if out.numel() == eps.numel():
        out = out[:-1]
    return out


# ---- activation patching -------------------------------------------------------------------------
COMPONENTS: dict[str, tuple[PatchTarget, bool]] = {
    "resid": (PatchTarget.RESID_PRE, True),
    "attn": (PatchTarget.ATTN_OUT, True),
    "mlp": (PatchTarget.MLP_OUT, True),
    "heads": (PatchTarget.Z, False),
}
"""what `patch_instruction` can patch: name -> (target, by position); heads are patched at every position"""


def _logit_diff(logits: Tensor, step: int, answer: Tensor, wrong: Tensor) -> Tensor:
    at = logits[:, step].float()
    rows = torch.arange(at.shape[0], device=at.device)
    return at[rows, answer.to(at.device)] - at[rows, wrong.to(at.device)]


def _as_actions(x: Tensor | int, batch: int, name: str, n_actions: int) -> Tensor:
    t = torch.as_tensor(x, dtype=torch.long).reshape(-1)
    t = t.expand(batch) if t.numel() == 1 else t
    if t.numel() != batch:
        raise ValueError(f"{name} has {t.numel()} actions for a batch of {batch}")
    if bool((t < 0).any()) or bool((t >= n_actions).any()):
        raise ValueError(f"{name} actions {t.tolist()[:8]} out of range 0..{n_actions - 1}")
    return t


@dataclass(frozen=True)
class InstructionPatching:
    """Activation patching between clean and corrupted windows: the logit difference at the decision step
    after each patch, per component (`PatchResult` each, dims (layer, pos) or (layer, head))."""

    results: dict[str, PatchResult]
    clean_metric: float
    corrupt_metric: float
    step: int
    """the window step whose logits the metric reads"""

    @property
    def gap(self) -> float:
        """clean minus corrupt metric: what a patch can restore"""
        return self.clean_metric - self.corrupt_metric

    @property
    def separates(self) -> bool:
        """Whether the clean and corrupt runs differ enough for `normalized` to mean anything (a model that
        ignores the instruction gives a gap near 0, and normalised values of noise)."""
        scale = max(1.0, abs(self.clean_metric), abs(self.corrupt_metric))
        return abs(self.gap) > 1e-3 * scale

    def normalized(self, component: str) -> Tensor:
        """(patched - corrupt) / (clean - corrupt) when denoising: 1 = the patch restores the clean answer."""
        v = self.results[component].values
        return (v - self.corrupt_metric) / (self.clean_metric - self.corrupt_metric)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k} {tuple(v.values.shape)}" for k, v in self.results.items())
        return (
            f"InstructionPatching({parts}; clean {self.clean_metric:.4g}, corrupt {self.corrupt_metric:.4g})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "separates": self.separates,
            "clean_metric": self.clean_metric,
            "corrupt_metric": self.corrupt_metric,
            "results": {k: v.to_dict() for k, v in self.results.items()},
        }

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        """One heatmap per component of the normalised metric (1: the clean answer restored)."""
        from plotly.subplots import make_subplots

        names = list(self.results)
        fig = make_subplots(rows=len(names), cols=1, subplot_titles=names, vertical_spacing=0.12)
        for i, name in enumerate(names, start=1):
            r = self.results[name]
            x, y = r.dims[1], r.dims[0]
            values = self.normalized(name) if self.separates else r.values - self.corrupt_metric
            hm = plots.heatmap(values, x_labels=r.labels[x], y_labels=r.labels[y])
            trace = hm.data[0]
            trace.update(zmid=0, showscale=i == 1)
            if self.separates:
                trace.update(zmin=-1, zmax=1)
            fig.add_trace(trace, row=i, col=1)
            fig.update_yaxes(autorange="reversed", type="category", title_text=y, row=i, col=1)
            fig.update_xaxes(type="category", row=i, col=1)
        fig.update_layout(
            template="plotly_white",
            height=260 * len(names),
            title=title
            or (
                f"instruction patching (normalised logit difference at step {self.step})"
                if self.separates
                else f"instruction patching: clean and corrupt agree (gap {self.gap:.2g}); patched - corrupt shown"
            ),
        )
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def patch_instruction(
    model: DecisionTransformer,
    clean: Windows,
    corrupt: Windows,
    *,
    answer: Tensor | int,
    wrong: Tensor | int,
    step: int = -1,
    components: Sequence[str] = ("resid", "attn", "mlp", "heads"),
    direction: Direction | str = Direction.DENOISE,
    max_batch: int = 1024,
) -> InstructionPatching:
    """Patch each component (residual stream per layer and token, attention and MLP outputs per layer and
    token, each head at every token) from the source run into the base run (denoising: clean into corrupt)
    and record ``logit[answer] - logit[wrong]`` at window step ``step`` (mean over the batch). The patched
    copies run stacked along the batch, at most ``max_batch`` rows per forward pass."""
    direction = Direction(direction)
    if clean.rtg.shape != corrupt.rtg.shape or not torch.equal(clean.mask, corrupt.mask):
        raise ValueError(
            f"clean and corrupt windows must be aligned (same shape and padding), got {tuple(clean.rtg.shape)} "
            f"and {tuple(corrupt.rtg.shape)}"
        )
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(f"unknown components {unknown}; valid: {', '.join(COMPONENTS)}")
    tf = model.transformer
    b, n_steps = clean.rtg.shape
    step = clean.step_index(step)
    n_actions = model.cfg.n_actions
    ans, wr = _as_actions(answer, b, "answer", n_actions), _as_actions(wrong, b, "wrong", n_actions)
    base, source = (corrupt, clean) if direction is Direction.DENOISE else (clean, corrupt)
    dev = tf.W_E.device
    n_pos = 3 * n_steps
    targets = {c: COMPONENTS[c] for c in components}
    if not tf.cfg.has_mlp:
        targets.pop("mlp", None)
    with torch.no_grad():
        names = [site_of(t, layer).name for t, _ in targets.values() for layer in range(tf.cfg.n_layers)]
        store: dict[str, Tensor] = {}

        def save(act: Tensor, site: Site) -> None:
            store[site.name] = act

        with tf.hooks(read_hooks=[(n, save) for n in names]):
            src_logits = model(*source.inputs(dev))
        metric = {
            "source": _logit_diff(src_logits, step, ans, wr),
            "base": _logit_diff(model(*base.inputs(dev)), step, ans, wr),
        }
        results = {}
        inputs = base.inputs(dev)
        for comp, (target, by_pos) in targets.items():
            patches, dims, shape = plan_patches(tf, target, n_pos, by_position=by_pos)
            per_chunk = max(1, max_batch // b)
            values = []
            for i in range(0, len(patches), per_chunk):
                chunk = patches[i : i + per_chunk]
                values.append(_run_patches(model, inputs, chunk, target, store, step, ans, wr))
            per = torch.cat(values).view(*shape, b).cpu()
            labels: dict[str, tuple[str, ...]] = {"layer": tuple(str(x) for x in range(tf.cfg.n_layers))}
            if "pos" in dims:
                labels["pos"] = tuple(plots.unique_labels(token_labels(base)))
            if "head" in dims:
                labels["head"] = tuple(f"H{h}" for h in range(tf.cfg.n_heads))
            clean_m, corr_m = (
                (metric["source"], metric["base"])
                if direction is Direction.DENOISE
                else (metric["base"], metric["source"])
            )
            results[comp] = PatchResult(
                values=per.mean(-1),
                per_example=per,
                dims=dims,
                labels=labels,
                target=target,
                direction=direction,
                method="activation",
                clean_metric=float(clean_m.mean()),
                corrupted_metric=float(corr_m.mean()),
            )
    first = next(iter(results.values()))
    return InstructionPatching(
        results=results, clean_metric=first.clean_metric, corrupt_metric=first.corrupted_metric, step=step
    )


def _run_patches(
    model: DecisionTransformer,
    inputs: tuple[Tensor, ...],
    chunk: list,
    target: PatchTarget,
    source: dict[str, Tensor],
    step: int,
    answer: Tensor,
    wrong: Tensor,
) -> Tensor:
    """The metric [len(chunk) * batch] with each patch applied to its own copy of the base batch (all patches
    of a chunk share one layer: `plan_patches` orders them layer by layer, a chunk may span two)."""
    n = len(chunk)
    b = inputs[0].shape[0]
    stacked = tuple(x.repeat(n, *([1] * (x.dim() - 1))) for x in inputs)
    hooks = []
    for layer in sorted({p.layer for p in chunk}):
        name = site_of(target, layer).name
        src = source[name]
        mine = [(i, p) for i, p in enumerate(chunk) if p.layer == layer]

        def patch(act: Tensor, site: Site, mine: list = mine, src: Tensor = src) -> Tensor:
            act = act.clone()
            for i, p in mine:
                sel = selection(target, p.pos, p.index)
                act[i * b : (i + 1) * b][sel] = src[sel]
            return act

        hooks.append((name, patch))
    with model.transformer.hooks(fwd_hooks=hooks):
        logits = model(*stacked)
    return _logit_diff(logits, step, answer.repeat(n), wrong.repeat(n))


# ---- direct logit attribution onto the action logits --------------------------------------------------
@dataclass(frozen=True)
class ActionDLA:
    """Each component's direct contribution to every action logit at one step, through the final norm
    linearised at its cached scale (as `interplab.analysis.lens`): the components plus ``bias`` (the final
    norm's bias and the head's bias, the same for every input) sum exactly to the logits."""

    contributions: Float[Tensor, "component n_actions"]
    """mean over the batch"""
    per_example: Float[Tensor, "component batch n_actions"]
    labels: tuple[str, ...]
    """'embed' (token embeddings), 'time' (timestep embeddings), 'L0H1' (a head's z W_O), 'L0 b_O', 'L0 mlp'"""
    bias: Float[Tensor, " n_actions"]
    logits: Float[Tensor, "batch n_actions"]
    """the model's logits at the step"""
    step: int

    def sum_of_components(self) -> Float[Tensor, "batch n_actions"]:
        return self.per_example.sum(0) + self.bias

    def difference(self, answer: int, wrong: int) -> Float[Tensor, " component"]:
        """Each component's contribution to ``logit[answer] - logit[wrong]`` (the bias terms cancel but for
        the head's own bias difference, which is not a component)."""
        return self.contributions[:, answer] - self.contributions[:, wrong]

    def __repr__(self) -> str:
        top = int(self.contributions.abs().amax(1).argmax())
        return f"ActionDLA({len(self.labels)} components at step {self.step}; largest {self.labels[top]})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "labels": list(self.labels),
            "contributions": self.contributions.tolist(),
            "bias": self.bias.tolist(),
            "mean_logits": self.logits.mean(0).tolist(),
        }

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        n_actions = self.contributions.shape[1]
        names = [ACTION_NAMES[a] if a < len(ACTION_NAMES) else str(a) for a in range(n_actions)]
        return plots.heatmap(
            self.contributions,
            x_labels=names,
            y_labels=list(self.labels),
            x_title="action",
            y_title="component",
            colorbar_title="logit",
            title=title or f"direct logit attribution onto the action logits (step {self.step})",
        )

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def action_dla(model: DecisionTransformer, win: Windows, *, step: int = -1) -> ActionDLA:
    """Direct logit attribution of the embeddings, every head, every attention bias and every MLP onto the
    action logits read at window step ``step``'s state token."""
    tf = model.transformer
    cfg = tf.cfg
    step = win.step_index(step)
    pos = token_position(step, "state")
    embed, time, scale = (
        Site(SiteKind.EMBED).name,
        Site(SiteKind.POS_EMBED).name,
        Site(SiteKind.LN_FINAL_SCALE).name,
    )
    names = [embed, time, Site(SiteKind.RESID_PRE, 0).name]
    names += [Site(SiteKind.Z, layer).name for layer in range(cfg.n_layers)]
    if cfg.has_mlp:
        names += [Site(SiteKind.MLP_OUT, layer).name for layer in range(cfg.n_layers)]
    if tf.ln_final.hook_scale is not None:
        names.append(scale)
    store: dict[str, Tensor] = {}

    def save(act: Tensor, site: Site) -> None:
        store[site.name] = act[:, pos] if site.name != scale else act[:, pos]

    names = [n for n in names if n in tf.hook_names]
    with torch.no_grad():
        with tf.hooks(read_hooks=[(n, save) for n in names]):
            logits = model(*win.inputs(tf.W_E.device))[:, step].float()
        norm = tf.ln_final
        w = getattr(norm, "w", None)

        def project(c: Tensor) -> Tensor:  # [batch ... d_model] -> [batch ... n_actions]
            if scale in store:
                s = store[scale].reshape(c.shape[0], *([1] * (c.dim() - 1)))
                c = norm.divide_by_scale(c, s)
            if w is not None:
                c = c * w
            return (c @ tf.W_U).float()

        parts: list[Tensor] = []
        labels: list[str] = []
        if embed in store and time in store:
            parts += [project(store[embed]), project(store[time])]
            labels += ["embed", "time"]
        else:  # a model without the embedding hook points: the whole stream entering block 0
            parts.append(project(store[Site(SiteKind.RESID_PRE, 0).name]))
            labels.append("embed")
        for layer, block in enumerate(tf.blocks):
            z = store[Site(SiteKind.Z, layer).name]  # batch head d_head
            heads = project(torch.einsum("bhe,hed->bhd", z, block.attn.W_O))  # batch head n_actions
            parts += list(heads.unbind(1))
            labels += [f"L{layer}H{h}" for h in range(heads.shape[1])]
            parts.append(project(block.attn.b_O.expand(z.shape[0], -1)))
            labels.append(f"L{layer} b_O")
            if cfg.has_mlp:
                parts.append(project(store[Site(SiteKind.MLP_OUT, layer).name]))
                labels.append(f"L{layer} mlp")
        bias = tf.b_U.float().clone()
        b_norm = getattr(norm, "b", None)
        if b_norm is not None:
            bias = bias + (b_norm @ tf.W_U).float()
    per = torch.stack(parts).cpu()
    return ActionDLA(
        contributions=per.mean(1),
        per_example=per,
        labels=tuple(labels),
        bias=bias.cpu(),
        logits=logits.cpu(),
        step=step,
    )


# ---- steering ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SteerResult:
    """The action distribution at one step before and after adding ``alpha * direction`` at a site."""

    probs_before: Float[Tensor, "batch n_actions"]
    probs_after: Float[Tensor, "batch n_actions"]
    logits_before: Float[Tensor, "batch n_actions"]
    logits_after: Float[Tensor, "batch n_actions"]
    site: str
    alpha: float

    @property
    def shift(self) -> Tensor:
        """Mean change of each action's probability [n_actions]."""
        return (self.probs_after - self.probs_before).mean(0)

    @property
    def flipped(self) -> float:
        """Share of windows whose most likely action changed."""
        return float((self.probs_after.argmax(-1) != self.probs_before.argmax(-1)).float().mean())

    @property
    def kl(self) -> float:
        """Mean KL(before || after)."""
        lp, lq = self.logits_before.log_softmax(-1), self.logits_after.log_softmax(-1)
        return float((lp.exp() * (lp - lq)).sum(-1).mean())

    def __repr__(self) -> str:
        return f"SteerResult({self.site} alpha {self.alpha:g}: flipped {self.flipped:.3f}, KL {self.kl:.4f})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "alpha": self.alpha,
            "flipped": self.flipped,
            "kl": self.kl,
            "mean_probs_before": self.probs_before.mean(0).tolist(),
            "mean_probs_after": self.probs_after.mean(0).tolist(),
        }

    def plot(self, title: str | None = None):  # noqa: ANN201 - plotly Figure
        from plotly import graph_objects as go

        n_actions = self.probs_before.shape[1]
        names = [ACTION_NAMES[a] if a < len(ACTION_NAMES) else str(a) for a in range(n_actions)]
        fig = go.Figure(
            [
                go.Bar(x=names, y=self.probs_before.mean(0).tolist(), name="before"),
                go.Bar(x=names, y=self.probs_after.mean(0).tolist(), name=f"after (alpha {self.alpha:g})"),
            ]
        )
        fig.update_layout(
            barmode="group",
            template="plotly_white",
            yaxis_title="mean probability",
            title=title or f"steering at {self.site}: {self.flipped:.0%} of actions flipped",
        )
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def steer(
    model: DecisionTransformer,
    win: Windows,
    direction: Tensor,
    site: str | Site | tuple,
    alpha: float,
    *,
    kinds: Sequence[str] | None = ("state",),
    positions: Sequence[int] | None = None,
    step: int = -1,
) -> SteerResult:
    """Add ``alpha * direction`` at ``site`` on every token of ``kinds`` (all tokens if None) and compare the
    action distribution at window step ``step`` with the unsteered one. ``positions`` (token indices) replaces
    ``kinds`` where given."""
    tf = model.transformer
    name = Site.parse(site).name
    if name not in tf.hook_names:
        raise ValueError(f"{name!r} is not a hook point of this model")
    n_steps = win.steps
    step = win.step_index(step)
    if positions is not None:
        positions = [p + 3 * n_steps if p < 0 else p for p in positions]
        if any(not 0 <= p < 3 * n_steps for p in positions):
            raise ValueError(f"token positions {list(positions)} out of range for {3 * n_steps} tokens")
    elif kinds is not None:
        bad = [k for k in kinds if k not in TOKEN_KINDS]
        if bad:
            raise ValueError(f"kinds must be a subset of {TOKEN_KINDS}, got {list(kinds)}")
        positions = [token_position(t, k) for t in range(n_steps) for k in kinds]
    hook = steering_hook(name, torch.as_tensor(direction), coefficient=alpha, positions=positions)
    inputs = win.inputs(tf.W_E.device)
    with torch.no_grad():
        before = model(*inputs)[:, step].float().cpu()
        with tf.hooks(fwd_hooks=[hook]):
            after = model(*inputs)[:, step].float().cpu()
    return SteerResult(
        probs_before=before.softmax(-1),
        probs_after=after.softmax(-1),
        logits_before=before,
        logits_after=after,
        site=name,
        alpha=float(alpha),
    )


__all__ = [
    "ACTION_NAMES",
    "BALL",
    "COMPONENTS",
    "INSTRUCTION_NAMES",
    "KEY",
    "TOKEN_KINDS",
    "ActionDLA",
    "EnvLabels",
    "InstructionPair",
    "InstructionPatching",
    "ProbeSweep",
    "SteerResult",
    "TrajectoryCache",
    "Windows",
    "action_dla",
    "attention_figure",
    "attention_pattern",
    "cache_trajectories",
    "decision_steps",
    "env_labels",
    "instruction_labels",
    "instruction_pair",
    "palette_obs",
    "patch_instruction",
    "probe",
    "steer",
    "swapped_instruction_obs",
    "token_labels",
    "token_position",
    "windows",
]
