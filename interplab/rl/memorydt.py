"""The MemoryDT findings (Bloom et al., "Features and Adversaries in MemoryDT") measured on a decision
transformer of MiniGrid-MemoryS7, as one table:

(a) the instruction feature: the instruction object is linearly decodable from the residual stream (held-out
    probe accuracy per site at the state tokens whose view shows it (as the only key or ball where such
    steps cover both objects), and at the decision token), with the feature
    direction (the probe's direction at the embedding) and a PCA picture of the embeddings;
(b) adversarial distractors: an object of the other kind placed in the decision step's view (in an empty
    visible cell) and how often that flips the chosen turn, against how often the feature predicts a flip
    (the distractor moves the decision token's projection on the feature direction past the class boundary);
(c) the equivalent latent intervention: adding the distractor's mean shift along the feature direction at the
    decision token's embedding, and the flip rate it gives; and the instruction swapped in latent space (every
    state token moved along the feature by the distance between the two objects' mean projections);
(d) RTG dependence: the probability of the correct turn at the decision as the target return varies.

>>> table = memorydt(dt, trajs)
>>> 0 <= table.rows["b_distractor_flip_rate"] <= 1, 0 <= table.rows["c_latent_flip_rate"] <= 1
(True, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab import plots
from interplab.analysis.probes import ProbeConfig
from interplab.hooks.site import Site, SiteKind
from interplab.rl.analysis import probe, steer
from interplab.rl.labels import INSTRUCTION_NAMES, decision_steps, env_labels
from interplab.rl.model import DecisionTransformer
from interplab.rl.trajectories import Trajectories
from interplab.rl.windows import BALL, KEY, Windows, cache_trajectories, token_position, windows

EMPTY = 1
"""MiniGrid's object index of an empty cell"""
DISTRACTOR_COLOUR = 1
"""green, the colour MemoryS7 gives its objects"""


@dataclass(frozen=True)
class MemoryDTTable:
    """The reproduction's numbers (``rows``: name -> value) and what the pictures draw."""

    rows: dict[str, float]
    """a_*: probe accuracies and chance; b_*: distractor flip rates; c_*: latent intervention; d_*: RTG"""
    probe_sites: tuple[str, ...]
    probe_visible: Tensor
    """held-out accuracy per site at state tokens whose view shows the instruction object"""
    probe_decision: Tensor
    """held-out accuracy per site at the decision token"""
    embedding_pca: Tensor = field(repr=False)
    """[rows, 2] the first two principal components of the embeddings of instruction-showing state tokens"""
    pca_labels: Tensor = field(repr=False)
    """the instruction of each PCA row (0 key 1 ball)"""
    rtg_targets: Tensor = field(default_factory=lambda: torch.zeros(0))
    rtg_correct: Tensor = field(default_factory=lambda: torch.zeros(0))
    """mean probability of the correct turn at the decision per target return"""

    def __repr__(self) -> str:
        body = ", ".join(f"{k} {v:.3f}" for k, v in self.rows.items())
        return f"MemoryDTTable({body})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "probe_sites": list(self.probe_sites),
            "probe_visible": self.probe_visible.tolist(),
            "probe_decision": self.probe_decision.tolist(),
            "rtg_targets": self.rtg_targets.tolist(),
            "rtg_correct": self.rtg_correct.tolist(),
        }

    def plot(self, title: str = "MemoryDT reproduction"):  # noqa: ANN201 - plotly Figure
        from plotly import graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(
            rows=1,
            cols=3,
            subplot_titles=[
                "(a) probe accuracy",
                "(a) embeddings (PCA)",
                "(d) P(correct turn) vs target RTG",
            ],
        )
        sites = list(self.probe_sites)
        for name, ys in (
            ("instruction in view", self.probe_visible),
            ("decision token", self.probe_decision),
        ):
            fig.add_trace(go.Scatter(x=sites, y=ys.tolist(), mode="lines+markers", name=name), row=1, col=1)
        for c, name in enumerate(INSTRUCTION_NAMES):
            pts = self.embedding_pca[self.pca_labels == c]
            fig.add_trace(
                go.Scatter(x=pts[:, 0].tolist(), y=pts[:, 1].tolist(), mode="markers", name=name),
                row=1,
                col=2,
            )
        fig.add_trace(
            go.Scatter(
                x=self.rtg_targets.tolist(), y=self.rtg_correct.tolist(), mode="lines+markers", name="P"
            ),
            row=1,
            col=3,
        )
        fig.update_layout(template="plotly_white", title=title, width=1300, height=420)
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def add_distractor(obs: Tensor, instruction: Tensor) -> tuple[Tensor, Tensor]:
    """Each view [batch 7 7 3] with an object of the kind *other* than ``instruction`` [batch] (0 key 1 ball)
    placed in its first empty cell nearest the agent; and whether a cell was found [batch]."""
    out = obs.clone()
    placed = torch.zeros(obs.shape[0], dtype=torch.bool)
    # cells ordered by distance from the agent (bottom centre, [3, 6]), nearest first, the agent's own excluded
    cells = sorted(
        ((x, y) for x in range(obs.shape[1]) for y in range(obs.shape[2]) if (x, y) != (3, 6)),
        key=lambda c: (abs(c[0] - 3) + abs(c[1] - 6), c),
    )
    for i in range(obs.shape[0]):
        other = KEY if int(instruction[i]) == 1 else BALL
        for x, y in cells:
            if int(obs[i, x, y, 0]) == EMPTY:
                out[i, x, y] = torch.tensor([other, DISTRACTOR_COLOUR, 0], dtype=obs.dtype)
                placed[i] = True
                break
    return out, placed


def _turn_logits(model: DecisionTransformer, win: Windows) -> Tensor:
    with torch.no_grad():
        return model(*win.inputs(model.transformer.W_E.device))[:, -1].float().cpu()


def _episodes_per_class(label: Tensor, steps: Tensor, episode_starts: Tensor, least: int = 4) -> bool:
    """Whether ``steps`` cover at least two classes of ``label``, each in at least ``least`` episodes (so the
    probe's stratified split holds out a quarter of each: with fewer, the held-out rows hold one class)."""
    episode = torch.searchsorted(episode_starts, steps, right=True) - 1
    classes = torch.unique(label[steps])
    return classes.numel() >= 2 and all(
        torch.unique(episode[label[steps] == c]).numel() >= least for c in classes.tolist()
    )


def memorydt(
    model: DecisionTransformer,
    trajs: Trajectories,
    *,
    rtg_targets: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    alpha: float | None = None,
    seed: int = 0,
) -> MemoryDTTable:
    """Measure (a)-(d) (see the module docstring) on ``trajs`` (MemoryS7 episodes that reach the split; the
    others are left out). ``alpha``: the latent intervention's size along the unit feature direction
    (default: the distractors' mean shift of the decision token's embedding along it)."""
    if not trajs.env.startswith("MiniGrid-Memory"):
        raise ValueError(f"the MemoryDT reproduction needs MiniGrid-Memory trajectories, got {trajs.env!r}")
    cfg = model.transformer.cfg
    sites = [Site(SiteKind.RESID_PRE, layer).name for layer in range(cfg.n_layers)]
    sites.append(Site(SiteKind.RESID_POST, cfg.n_layers - 1).name)
    embed_site = sites[0]
    labels = env_labels(trajs)
    assert labels.instruction is not None  # a Memory env
    inst = labels.instruction
    ends = decision_steps(trajs)
    ends = ends[ends >= 0]
    if ends.numel() < 4:
        raise ValueError(f"only {ends.numel()} episodes reach the split; the reproduction needs >= 4")
    # (a) where the instruction object is in view, and at the decision
    assert labels.instruction_in_view is not None
    # every step whose view shows the instruction's cell (the scripted expert mostly looks at it facing north,
    # with an object of the split in view too); and, as a second row, the steps where it is the only key or
    # ball in view, when those cover each object in >= 4 episodes (a quarter of them held out)
    shown = labels.instruction_in_view.nonzero()[:, 0]
    if torch.unique(inst[shown]).numel() < 2:
        raise ValueError(
            f"the instruction object is in view at {shown.numel()} steps, of one kind only: (a) needs episodes "
            "that look at both objects"
        )
    objects = torch.as_tensor(trajs.obs)[..., 0].flatten(1)
    alone = ((objects == KEY) | (objects == BALL)).sum(1) == 1
    alone_steps = (labels.instruction_in_view & alone).nonzero()[:, 0]
    config = ProbeConfig(seed=seed)
    rows: dict[str, float] = {}
    vis_cache = cache_trajectories(model, trajs, sites, kinds=["state"], ends=shown)
    vis = probe(vis_cache, inst, label="instruction", seed=seed, config=config)
    dec_cache = cache_trajectories(model, trajs, sites, kinds=["state"], ends=ends)
    dec = probe(dec_cache, inst, label="instruction", seed=seed, config=config)
    rows["a_probe_embedding_in_view"] = float(vis.test_scores[0])
    rows["a_probe_chance_in_view"] = vis.chance
    rows["a_in_view_test_rows"] = float(vis.n_test)  # held-out state tokens showing the instruction
    if _episodes_per_class(inst, alone_steps, trajs.episode_starts):
        alone_cache = cache_trajectories(model, trajs, [embed_site], kinds=["state"], ends=alone_steps)
        only = probe(alone_cache, inst, label="instruction", seed=seed, config=config)
        rows["a_probe_embedding_alone"] = float(only.test_scores[0])  # the only key or ball in view
        rows["a_alone_chance"] = only.chance
        rows["a_alone_test_rows"] = float(only.n_test)
    rows["a_probe_decision_best"] = float(dec.test_scores.max())
    rows["a_probe_decision_chance"] = dec.chance
    emb = vis_cache[embed_site]
    centred = emb - emb.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    pca = centred @ v[:2].T
    direction = vis.probes[0].direction()  # ball minus key, unit, at the embedding
    # (b) distractors at the decision step
    clean = windows(trajs, model.cfg.context, ends=ends)
    assert labels.target_side is not None  # a Memory env
    answer = labels.target_side[ends]  # facing east at the split: left (0) goes north, right (1) south
    base = _turn_logits(model, clean)
    last = clean.obs[:, -1]
    distracted_obs, placed = add_distractor(last, inst[ends])
    obs = clean.obs.clone()
    obs[:, -1] = distracted_obs
    distracted = clean.replace(obs=obs)
    after = _turn_logits(model, distracted)
    chose = base[:, :2].argmax(-1)
    flipped = (after[:, :2].argmax(-1) != chose) & placed
    n_placed = max(1, int(placed.sum()))
    rows["b_distractor_flip_rate"] = float(flipped.sum()) / n_placed
    pos = token_position(clean.steps - 1, "state")
    with torch.no_grad():
        e_clean = _embedding_at(model, clean, embed_site, pos)
        e_dist = _embedding_at(model, distracted, embed_site, pos)
    shift = (e_dist - e_clean) @ direction
    rows["b_feature_shift"] = float(shift[placed].mean()) if bool(placed.any()) else 0.0
    # the feature predicts a flip where the distractor moves the projection to the other class's side
    probe_emb = vis.probes[0]
    predicted = (probe_emb.predict(e_dist) != probe_emb.predict(e_clean)) & placed
    rows["b_predicted_flip_rate"] = float(predicted.sum()) / n_placed
    rows["b_prediction_agreement"] = float(((predicted == flipped) & placed).sum()) / n_placed
    # (c) the same shift as a latent intervention along the feature, at the decision token's embedding
    # (per example its sign: towards the other object than the instruction)
    size = abs(rows["b_feature_shift"]) if alpha is None else abs(alpha)
    toward = torch.where(inst[ends] == 1, -1.0, 1.0)  # ball -> subtract the ball direction
    rows["c_latent_alpha"] = size
    rows["c_latent_flip_rate"] = _steered_flips(model, clean, direction, embed_site, toward * size, [pos])
    # the instruction itself swapped in latent space: every state token moved by the distance between the two
    # objects' mean projections (where the instruction is in view), towards the other object
    proj = emb @ direction
    shown_inst = inst[vis_cache.flat_step]
    separation = float(proj[shown_inst == 1].mean() - proj[shown_inst == 0].mean())
    states = [token_position(t, "state") for t in range(clean.steps)]
    rows["c_swap_alpha"] = separation
    rows["c_swap_flip_rate"] = _steered_flips(
        model, clean, direction, embed_site, toward * separation, states
    )
    # (d) the correct turn's probability against the target return (MemoryS7 pays only at the end, so the
    # return to go is the target at every step)
    targets = torch.tensor(list(rtg_targets), dtype=torch.float32)
    correct = []
    for t in targets.tolist():
        win = clean.replace(rtg=torch.where(clean.mask, torch.full_like(clean.rtg, t), 0.0))
        p = _turn_logits(model, win).softmax(-1)
        correct.append(float(p[torch.arange(len(win)), answer].mean()))
    rtg_correct = torch.tensor(correct)
    if targets.numel() >= 2:
        tc = targets - targets.mean()
        rows["d_rtg_slope"] = float((tc * (rtg_correct - rtg_correct.mean())).sum() / (tc**2).sum())
    rows["d_correct_at_max_rtg"] = float(rtg_correct[targets.argmax()])
    rows["episodes"] = float(ends.numel())
    return MemoryDTTable(
        rows=rows,
        probe_sites=tuple(sites),
        probe_visible=vis.test_scores,
        probe_decision=dec.test_scores,
        embedding_pca=pca,
        pca_labels=inst[vis_cache.flat_step],
        rtg_targets=targets,
        rtg_correct=rtg_correct,
    )


def _steered_flips(
    model: DecisionTransformer,
    win: Windows,
    direction: Tensor,
    site: str,
    alphas: Tensor,
    positions: list[int],
) -> float:
    """Share of windows whose chosen turn (left or right, the higher logit) changes when ``alphas[i] *
    direction`` is added at ``site`` on the token ``positions`` of window i."""
    flips = torch.zeros(len(win), dtype=torch.bool)
    for a in alphas.unique().tolist():
        idx = (alphas == a).nonzero()[:, 0]
        res = steer(model, win.select(idx), direction, site, a, positions=positions)
        flips[idx] = res.probs_after[:, :2].argmax(-1) != res.probs_before[:, :2].argmax(-1)
    return float(flips.float().mean())


def _embedding_at(model: DecisionTransformer, win: Windows, site: str, pos: int) -> Tensor:
    store: dict[str, Tensor] = {}

    def save(act: Tensor, s: Site) -> None:
        store["a"] = act[:, pos].float().cpu()

    with model.transformer.hooks(read_hooks=[(site, save)]):
        model(*win.inputs(model.transformer.W_E.device))
    return store["a"]
