"""Analysis of decision transformers with the lab's tools: caches over trajectories, environment labels,
linear probes, activation patching between instruction-swapped trajectories, direct logit attribution onto
the action logits, attention over the token sequence (state tokens drawn as grids) and steering.

Everything runs on `Windows`: left-padded windows of ``context`` steps cut from `Trajectories`, each ending at
one step of an episode (the step being analysed sits last, so it sees as much history as the model allows).
Sequence positions are tokens ``[R_1, s_1, a_1, ..., R_K, s_K, a_K]`` (`token_index`); the action logits of a
step are read at its state token.

>>> win = windows(trajs, model.cfg.context)                   # one window per step, ending at that step
>>> cache = cache_trajectories(model, trajs, ["blocks.0.hook_resid_post"])
>>> sweep = probe(cache, instruction_labels(trajs))             # accuracy per site, episodes held out
>>> pair = instruction_pair(trajs, decision_steps(trajs), model.cfg.context)
>>> patch_instruction(model, pair.clean, pair.corrupt, answer=pair.answer, wrong=pair.wrong).plot()
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab import plots
from interplab.analysis.probes import ProbeConfig, ProbeKind, ProbeResult, train_probe
from interplab.analysis.steering import steering_hook
from interplab.analysis.targets import Direction, PatchResult, PatchTarget, plan_patches, selection, site_of
from interplab.hooks.site import Site, SiteKind
from interplab.model.transformer import Transformer

TOKEN_KINDS = ("rtg", "state", "action")
"""the three tokens of a step, in sequence order (as `interplab.rl.model`)"""
ACTION_NAMES = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
"""MiniGrid's discrete actions"""
KEY, BALL = 5, 6
"""MiniGrid's object indices of the two instruction objects (``OBJECT_TO_IDX``)"""
INSTRUCTION_NAMES = ("key", "ball")
"""label 0 and 1 of `instruction_labels`"""
_MEMORY_PREFIX = "MiniGrid-Memory"


class DTLike(Protocol):
    """What the analyses need of a `DecisionTransformer`: its config, the inner `Transformer` (hook points,
    weights) and the forward ``(rtg, obs, actions, timesteps, attention_mask) -> logits [batch T n_actions]``."""

    cfg: Any
    transformer: Transformer

    def __call__(
        self,
        rtg: Tensor,
        obs: Tensor,
        actions: Tensor,
        timesteps: Tensor,
        attention_mask: Tensor | None = None,
    ) -> Tensor: ...


class TrajectoriesLike(Protocol):
    """The fields of `Trajectories` the analyses read (one flat step axis over all episodes)."""

    @property
    def env(self) -> str: ...
    @property
    def obs(self) -> Any: ...  # uint8 [N 7 7 3]
    @property
    def actions(self) -> Any: ...  # int64 [N]
    @property
    def episode_starts(self) -> Any: ...  # int64 [E+1]
    @property
    def seeds(self) -> Any: ...  # int64 [E]
    @property
    def rtg(self) -> Any: ...  # float32 [N]
    @property
    def timesteps(self) -> Any: ...  # int64 [N]


def token_position(step: int, kind: str) -> int:
    """The sequence position of window step ``step``'s ``kind`` token."""
    if kind not in TOKEN_KINDS:
        raise ValueError(f"token kind {kind!r} is not one of {TOKEN_KINDS}")
    return 3 * step + TOKEN_KINDS.index(kind)


def _t(x: Any, dtype: torch.dtype | None = None) -> Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x
    return t if dtype is None else t.to(dtype)


# ---- windows -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Windows:
    """Left-padded model inputs of ``T`` steps, one window per row, each ending at the step it analyses."""

    rtg: Float[Tensor, "batch T"]
    obs: Int[Tensor, "batch T 7 7 3"]
    actions: Int[Tensor, "batch T"]
    timesteps: Int[Tensor, "batch T"]
    mask: Bool[Tensor, "batch T"]
    """True for real steps, False for left padding"""
    episode: Int[Tensor, " batch"]
    """the episode each window comes from"""
    end: Int[Tensor, " batch"]
    """the flat step index (into the trajectories) of each window's last step"""

    def __len__(self) -> int:
        return self.rtg.shape[0]

    @property
    def steps(self) -> int:
        return self.rtg.shape[1]

    def select(self, index: Tensor | slice | Sequence[int]) -> Windows:
        idx = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        return Windows(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    def replace(self, **changes: Tensor) -> Windows:
        return dataclasses.replace(self, **changes)

    def inputs(self, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(rtg, obs, actions, timesteps, attention_mask)`` for the model's forward."""
        xs = (self.rtg, self.obs, self.actions, self.timesteps, self.mask)
        return tuple(x.to(device) if device is not None else x for x in xs)  # type: ignore[return-value]

    def batches(self, size: int) -> Iterator[Windows]:
        for i in range(0, len(self), size):
            yield self.select(slice(i, i + size))


def windows(trajs: TrajectoriesLike, context: int, *, ends: Sequence[int] | Tensor | None = None) -> Windows:
    """Windows of ``context`` steps ending at the flat steps ``ends`` (default: every step), left-padded
    where the episode began less than ``context`` steps before (padding: zeros, mask False)."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    starts = _t(trajs.episode_starts, torch.long)
    n = int(starts[-1])
    end = torch.arange(n) if ends is None else _t(ends, torch.long).reshape(-1)
    if end.numel() and (int(end.min()) < 0 or int(end.max()) >= n):
        raise ValueError(f"window ends must be flat step indices in 0..{n - 1}, got {end.tolist()[:8]}")
    episode = torch.searchsorted(starts, end, right=True) - 1
    offsets = torch.arange(context - 1, -1, -1)  # the window's steps, last one = end
    idx = end[:, None] - offsets[None]
    mask = idx >= starts[episode][:, None]
    safe = torch.where(mask, idx, 0)

    def take(x: Any, dtype: torch.dtype) -> Tensor:
        v = _t(x, dtype)[safe]
        return torch.where(mask.view(*mask.shape, *([1] * (v.dim() - 2))), v, torch.zeros((), dtype=dtype))

    return Windows(
        rtg=take(trajs.rtg, torch.float32),
        obs=take(trajs.obs, torch.uint8),
        actions=take(trajs.actions, torch.long),
        timesteps=take(trajs.timesteps, torch.long),
        mask=mask,
        episode=episode,
        end=end,
    )


# ---- caches over trajectories ----------------------------------------------------------------------
@dataclass(frozen=True)
class TrajectoryCache:
    """Activations of the last step's tokens of every window, one row per (window, token kind)."""

    acts: dict[str, Tensor]
    """site name -> [rows, d] (per-head sites flattened to one row of all heads)"""
    episode: Int[Tensor, " rows"]
    step: Int[Tensor, " rows"]
    """the step's index within its episode"""
    flat_step: Int[Tensor, " rows"]
    """the step's index in the trajectories (labels per step are indexed by it)"""
    kind: Int[Tensor, " rows"]
    """index into `TOKEN_KINDS`"""
    logits: Float[Tensor, "steps n_actions"]
    """the action logits of each window's last step"""

    @property
    def sites(self) -> list[str]:
        return list(self.acts)

    def rows(self, kind: str | None = None) -> Tensor:
        """Indices of the rows of one token kind (all rows if None)."""
        if kind is None:
            return torch.arange(self.kind.numel())
        if kind not in TOKEN_KINDS:
            raise ValueError(f"token kind {kind!r} is not one of {TOKEN_KINDS}")
        return (self.kind == TOKEN_KINDS.index(kind)).nonzero()[:, 0]

    def __getitem__(self, site: str | Site | tuple) -> Tensor:
        name = Site.parse(site).name
        if name not in self.acts:
            raise KeyError(f"{name!r} is not cached; cached sites: {self.sites}")
        return self.acts[name]

    def __repr__(self) -> str:
        return f"TrajectoryCache({len(self.acts)} sites, {self.kind.numel()} rows)"


def cache_trajectories(
    model: DTLike,
    trajs: TrajectoriesLike,
    sites: Sequence[str | Site | tuple],
    *,
    kinds: Sequence[str] = TOKEN_KINDS,
    ends: Sequence[int] | Tensor | None = None,
    batch_size: int = 256,
) -> TrajectoryCache:
    """Run the model on a window ending at each step (``ends``: flat step indices, default all) and keep each
    site's activation at that step's ``kinds`` tokens, with per-row metadata."""
    parsed = [Site.parse(s) for s in sites]
    if not parsed:
        raise ValueError("give at least one site to cache")
    for s in parsed:
        if s.kind in (SiteKind.PATTERN, SiteKind.ATTN_SCORES):
            raise ValueError(f"{s.name} is [batch head q k], not one row per token; see attention_figure")
        if s.name not in model.transformer.hook_names:
            raise ValueError(f"{s.name!r} is not a hook point of this model")
    bad = [k for k in kinds if k not in TOKEN_KINDS]
    if bad or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of {TOKEN_KINDS}, got {list(kinds)}")
    win = windows(trajs, model.cfg.context, ends=ends)
    last = win.steps - 1
    pos = torch.tensor([token_position(last, k) for k in kinds])
    dev = model.transformer.W_E.device
    out: dict[str, list[Tensor]] = {s.name: [] for s in parsed}
    logits = []
    for batch in win.batches(batch_size):
        store: dict[str, Tensor] = {}

        def save(act: Tensor, site: Site, store: dict[str, Tensor] = store) -> None:
            store[site.name] = act[:, pos.to(act.device)].detach()

        with torch.no_grad(), model.transformer.hooks(read_hooks=[(s.name, save) for s in parsed]):
            logits.append(model(*batch.inputs(dev))[:, -1].float().cpu())
        for s in parsed:
            a = store[s.name].float().cpu()  # batch kinds ...
            out[s.name].append(a.reshape(a.shape[0] * a.shape[1], -1))
    k = len(kinds)
    starts = _t(trajs.episode_starts, torch.long)
    return TrajectoryCache(
        acts={name: torch.cat(v) for name, v in out.items()},
        episode=win.episode.repeat_interleave(k),
        step=(win.end - starts[win.episode]).repeat_interleave(k),
        flat_step=win.end.repeat_interleave(k),
        kind=torch.tensor([TOKEN_KINDS.index(x) for x in kinds]).repeat(len(win)),
        logits=torch.cat(logits),
    )


# ---- labels --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EnvLabels:
    """Per-step environment variables (flat step axis), recovered by replaying each episode from its seed."""

    instruction: Int[Tensor, " steps"] | None
    """MemoryS*: the start-room object, 0 key 1 ball (None for other envs)"""
    target_side: Int[Tensor, " steps"] | None
    """MemoryS*: where the matching object is, 0 up (north) 1 down (south) (None for other envs)"""
    direction: Int[Tensor, " steps"]
    """the agent's direction when observing (0 east, 1 south, 2 west, 3 north)"""
    x: Int[Tensor, " steps"]
    y: Int[Tensor, " steps"]
    front_object: Int[Tensor, " steps"]
    """the object index of the cell in front of the agent (read from the view)"""
    key_in_view: Bool[Tensor, " steps"]
    ball_in_view: Bool[Tensor, " steps"]

    def as_dict(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


def _episode_bounds(trajs: TrajectoriesLike) -> list[tuple[int, int]]:
    s = _t(trajs.episode_starts, torch.long).tolist()
    return list(zip(s[:-1], s[1:], strict=True))


def _replay(
    trajs: TrajectoriesLike, swap_instruction: bool = False
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Replay every episode from its seed with its recorded actions: the per-step agent state and the
    observations (of the instruction-swapped layout when ``swap_instruction``). Unswapped observations must
    equal the recorded ones (otherwise the file is of another env or seeding)."""
    try:
        import gymnasium
        import minigrid  # noqa: F401  (registers the MiniGrid ids)
        from minigrid.core.world_object import Ball, Key
    except ImportError as err:
        raise ImportError(
            f"replaying MiniGrid episodes needs the rl extra (minigrid + gymnasium): {err}"
        ) from None
    memory = trajs.env.startswith(_MEMORY_PREFIX)
    if swap_instruction and not memory:
        raise ValueError(
            f"instruction swaps need a MiniGrid Memory env, the trajectories are of {trajs.env!r}"
        )
    obs_rec = np.asarray(trajs.obs)
    actions = np.asarray(trajs.actions)
    seeds = np.asarray(trajs.seeds)
    n = obs_rec.shape[0]
    keys = ("direction", "x", "y", "instruction", "target_side", "split_x")
    state = {k: np.zeros(n, dtype=np.int64) for k in keys}
    obs_out = np.empty_like(obs_rec)
    env = gymnasium.make(trajs.env, disable_env_checker=True)
    try:
        for e, (a, b) in enumerate(_episode_bounds(trajs)):
            obs, _ = env.reset(seed=int(seeds[e]))
            u: Any = env.unwrapped
            inst = side = split = 0
            if memory:
                cell = (1, u.height // 2 - 1)
                kind = u.grid.get(*cell).type
                inst = INSTRUCTION_NAMES.index(kind)
                if swap_instruction:
                    u.grid.set(*cell, (Key if kind == "ball" else Ball)("green"))
                    u.success_pos, u.failure_pos = u.failure_pos, u.success_pos
                    obs = u.gen_obs()
                side = int(u.success_pos[1] > u.height // 2)
                split = int(u.success_pos[0])
            for i in range(a, b):
                if not swap_instruction and not np.array_equal(obs["image"], obs_rec[i]):
                    raise ValueError(
                        f"episode {e} (seed {int(seeds[e])}) step {i - a}: replaying {trajs.env!r} from the seed "
                        "does not reproduce the recorded observation (trajectories of another env or seeding?)"
                    )
                obs_out[i] = obs["image"]
                state["direction"][i] = u.agent_dir
                state["x"][i], state["y"][i] = int(u.agent_pos[0]), int(u.agent_pos[1])
                state["instruction"][i], state["target_side"][i], state["split_x"][i] = inst, side, split
                if i + 1 < b:
                    obs, *_ = env.step(int(actions[i]))
    finally:
        env.close()
    return state, obs_out


def env_labels(trajs: TrajectoriesLike) -> EnvLabels:
    """The agent's direction and position, the object ahead and in view and, on MemoryS*, the instruction
    object and the side of the matching one, for every step (replayed from the seeds and checked against the
    recorded observations)."""
    state, _ = _replay(trajs)
    obs = _t(trajs.obs, torch.long)
    memory = trajs.env.startswith(_MEMORY_PREFIX)
    objects = obs[..., 0].flatten(1)
    return EnvLabels(
        instruction=torch.from_numpy(state["instruction"]) if memory else None,
        target_side=torch.from_numpy(state["target_side"]) if memory else None,
        direction=torch.from_numpy(state["direction"]),
        x=torch.from_numpy(state["x"]),
        y=torch.from_numpy(state["y"]),
        front_object=obs[:, 3, 5, 0],
        key_in_view=(objects == KEY).any(1),
        ball_in_view=(objects == BALL).any(1),
    )


def instruction_labels(trajs: TrajectoriesLike) -> Int[Tensor, " steps"]:
    """MemoryS*: the instruction (start-room) object of each step's episode, 0 key 1 ball.

    MiniGrid places it at ``(1, height // 2 - 1)`` while the agent starts facing east at x >= 1, so the
    first observation usually does not show it (the agent has to turn round to see it): the label is read
    from the episode's layout, regenerated from its seed and checked against the recorded observations."""
    if not trajs.env.startswith(_MEMORY_PREFIX):
        raise ValueError(f"instruction labels exist for MiniGrid Memory envs, got {trajs.env!r}")
    labels = env_labels(trajs).instruction
    assert labels is not None  # a Memory env
    return labels


def swapped_instruction_obs(trajs: TrajectoriesLike) -> Int[Tensor, "steps 7 7 3"]:
    """The observations each MemoryS* episode would have shown with the other instruction object (same seed,
    same actions): they differ from the recorded ones only where the instruction object is in view."""
    return torch.from_numpy(_replay(trajs, swap_instruction=True)[1])


@dataclass(frozen=True)
class InstructionPair:
    """Windows that differ only in the instruction object, and the action each one's instruction asks for."""

    clean: Windows
    corrupt: Windows
    answer: Int[Tensor, " batch"]
    """the correct action under the clean instruction"""
    wrong: Int[Tensor, " batch"]
    """the correct action under the swapped one"""


def decision_steps(trajs: TrajectoriesLike) -> Int[Tensor, " episodes"]:
    """MemoryS*: the flat step of each episode at which the agent first stands at the split facing east
    (where it must turn towards the matching object); -1 where it never does."""
    if not trajs.env.startswith(_MEMORY_PREFIX):
        raise ValueError(f"decision steps exist for MiniGrid Memory envs, got {trajs.env!r}")
    state, _ = _replay(trajs)
    at_split = (state["x"] == state["split_x"]) & (state["direction"] == 0)
    out = []
    for a, b in _episode_bounds(trajs):
        hit = np.nonzero(at_split[a:b])[0]
        out.append(a + int(hit[0]) if len(hit) else -1)
    return torch.tensor(out, dtype=torch.long)


def instruction_pair(trajs: TrajectoriesLike, ends: Sequence[int] | Tensor, context: int) -> InstructionPair:
    """Windows ending at the flat steps ``ends`` (e.g. `decision_steps`) and their instruction-swapped twins;
    the answer is the turn towards the clean matching object (left = north when facing east)."""
    ends_t = _t(ends, torch.long).reshape(-1)
    if bool((ends_t < 0).any()):
        raise ValueError("ends holds -1 (an episode that never reached the split): drop those episodes")
    clean = windows(trajs, context, ends=ends_t)
    swapped = _ObsView(trajs, obs=swapped_instruction_obs(trajs))
    corrupt = windows(swapped, context, ends=ends_t)
    state, _ = _replay(trajs)
    side = torch.from_numpy(state["target_side"])[ends_t]
    return InstructionPair(clean=clean, corrupt=corrupt, answer=side.clone(), wrong=1 - side)


@dataclass(frozen=True)
class _ObsView:
    """The fields `windows` reads, with replaceable observations."""

    env: str
    obs: Any
    actions: Any
    episode_starts: Any
    seeds: Any
    rtg: Any
    timesteps: Any

    def __init__(self, trajs: TrajectoriesLike, **changes: Any) -> None:
        for name in ("env", "obs", "actions", "episode_starts", "seeds", "rtg", "timesteps"):
            object.__setattr__(self, name, changes.get(name, getattr(trajs, name)))


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
    g = torch.Generator().manual_seed(seed)
    perm = episodes[torch.randperm(episodes.numel(), generator=g)]
    n_test = min(max(1, round(episodes.numel() * test_fraction)), episodes.numel() - 1)
    test = torch.isin(cache.episode[rows], perm[:n_test])
    logistic = ProbeKind(config.kind) is ProbeKind.LOGISTIC
    if logistic:
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


# ---- activation patching -------------------------------------------------------------------------
COMPONENTS: dict[str, tuple[PatchTarget, bool]] = {
    "resid": (PatchTarget.RESID_PRE, True),
    "attn": (PatchTarget.ATTN_OUT, True),
    "mlp": (PatchTarget.MLP_OUT, True),
    "heads": (PatchTarget.Z, False),
}
"""what `patch_instruction` can patch: name -> (target, by position); heads are patched at every position"""


def token_labels(win: Windows, example: int = 0) -> list[str]:
    """``R3=0.81``, ``s3``, ``a3=left`` for the tokens of one window (pads: ``pad``)."""
    out = []
    for i in range(win.steps):
        if not bool(win.mask[example, i]):
            out += ["pad"] * 3
            continue
        t, a = int(win.timesteps[example, i]), int(win.actions[example, i])
        name = ACTION_NAMES[a] if 0 <= a < len(ACTION_NAMES) else str(a)
        out += [f"R{t}={float(win.rtg[example, i]):.2f}", f"s{t}", f"a{t}={name}"]
    return out


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
            hm = plots.heatmap(self.normalized(name), x_labels=r.labels[x], y_labels=r.labels[y])
            trace = hm.data[0]
            trace.update(zmid=0, zmin=-1, zmax=1, showscale=i == 1)
            fig.add_trace(trace, row=i, col=1)
            fig.update_yaxes(autorange="reversed", type="category", title_text=y, row=i, col=1)
            fig.update_xaxes(type="category", row=i, col=1)
        fig.update_layout(
            template="plotly_white",
            height=260 * len(names),
            title=title or f"instruction patching (normalised logit difference at step {self.step})",
        )
        return fig

    def save(self, path: str | Path) -> Path:
        """``.html``/``.png``/``.svg`` (the picture) or ``.json`` (the numbers)."""
        return plots.save_result(self, path)


def patch_instruction(
    model: DTLike,
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
    step = step + n_steps if step < 0 else step
    if not 0 <= step < n_steps:
        raise ValueError(f"step {step} out of range for windows of {n_steps} steps")
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
    model: DTLike,
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


def action_dla(model: DTLike, win: Windows, *, step: int = -1) -> ActionDLA:
    """Direct logit attribution of the embeddings, every head, every attention bias and every MLP onto the
    action logits read at window step ``step``'s state token."""
    tf = model.transformer
    cfg = tf.cfg
    n_steps = win.steps
    step = step + n_steps if step < 0 else step
    if not 0 <= step < n_steps:
        raise ValueError(f"step {step} out of range for windows of {n_steps} steps")
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


# ---- attention over the token sequence ---------------------------------------------------------------
_OBJECT_RGB = {
    0: (0, 0, 0),  # unseen
    1: (40, 40, 40),  # empty
    2: (100, 100, 100),  # wall
    3: (60, 60, 60),  # floor
    8: (0, 200, 0),  # goal
    9: (255, 128, 0),  # lava
    10: (255, 0, 0),  # agent
}
_COLOR_RGB = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (112, 39, 195), (255, 255, 0), (100, 100, 100))
_COLOURED = (4, 5, 6, 7)  # door, key, ball, box: drawn in their own colour


def palette_obs(obs: Any, *, tile_size: int = 4) -> np.ndarray:
    """A plain RGB picture uint8 [7 * tile_size, 7 * tile_size, 3] of one [7, 7, 3] view (the agent's cell,
    bottom centre, marked red; keys drawn as a square's left half, balls as its centre): the fallback of
    MiniGrid's renderer when minigrid is not installed."""
    view = np.asarray(obs.detach().cpu() if isinstance(obs, Tensor) else obs)
    if view.ndim != 3 or view.shape[2] != 3:
        raise ValueError(f"a view is [7, 7, 3], got shape {tuple(view.shape)}")
    w, h = view.shape[:2]
    pic = np.zeros((h * tile_size, w * tile_size, 3), dtype=np.uint8)
    for x in range(w):
        for y in range(h):
            obj, col = int(view[x, y, 0]), int(view[x, y, 1])
            cell = pic[y * tile_size : (y + 1) * tile_size, x * tile_size : (x + 1) * tile_size]
            cell[:] = _OBJECT_RGB.get(obj, (40, 40, 40)) if obj not in _COLOURED else (40, 40, 40)
            if obj in _COLOURED:
                rgb = _COLOR_RGB[col % len(_COLOR_RGB)]
                q = max(1, tile_size // 4)
                if obj == KEY:
                    cell[q : -q or None, : tile_size // 2] = rgb
                elif obj == BALL:
                    cell[q : -q or None, q : -q or None] = rgb
                else:
                    cell[:] = rgb
    ax, ay = w // 2, h - 1
    q = max(1, tile_size // 4)
    pic[ay * tile_size + q : (ay + 1) * tile_size - q, ax * tile_size + q : (ax + 1) * tile_size - q] = (
        255,
        0,
        0,
    )
    return pic


def _render_state(obs: Any, tile_size: int) -> np.ndarray:
    try:
        from interplab.rl.envs import render_obs  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return palette_obs(obs, tile_size=tile_size)
    try:
        return render_obs(obs, tile_size=tile_size)
    except ImportError:  # no minigrid
        return palette_obs(obs, tile_size=tile_size)


def _png_uri(rgb: np.ndarray) -> str:
    """A data URI of an RGB picture as PNG (zlib only: no imaging library needed)."""
    import base64
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].astype(np.uint8).tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def attention_pattern(model: DTLike, win: Windows, layer: int, head: int, *, example: int = 0) -> Tensor:
    """One head's attention [query token, key token] over one window's real (unpadded) tokens."""
    tf = model.transformer
    if not 0 <= layer < tf.cfg.n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {tf.cfg.n_layers} layers")
    if not 0 <= head < tf.cfg.n_heads:
        raise ValueError(f"head {head} out of range: layers have {tf.cfg.n_heads} heads")
    if not 0 <= example < len(win):
        raise ValueError(f"example {example} out of range for {len(win)} windows")
    one = win.select([example])
    store: dict[str, Tensor] = {}

    def save(act: Tensor, site: Site) -> None:
        store["p"] = act[0, head].detach().float().cpu()

    with torch.no_grad(), tf.hooks(read_hooks=[(Site(SiteKind.PATTERN, layer).name, save)]):
        model(*one.inputs(tf.W_E.device))
    real = one.mask[0].repeat_interleave(3)
    return store["p"][real][:, real]


def attention_figure(
    model: DTLike, win: Windows, layer: int, head: int, *, example: int = 0, tile_size: int = 4
):  # noqa: ANN201 - plotly Figure
    """The attention pattern of ``layer``/``head`` over one window's tokens (labels ``R=``, ``s``, ``a=``),
    with each state token's observation drawn as a small grid under its column."""
    from plotly import graph_objects as go
    from plotly.subplots import make_subplots

    pattern = attention_pattern(model, win, layer, head, example=example)
    labels = [x for x in token_labels(win, example) if x != "pad"]
    n = len(labels)
    one = win.select([example])
    real_steps = one.mask[0].nonzero()[:, 0].tolist()
    px = 7 * tile_size
    strip = np.full((px, n * px, 3), 255, dtype=np.uint8)
    for j, i in enumerate(real_steps):
        col = 3 * j + 1
        strip[:, col * px : (col + 1) * px] = _render_state(one.obs[0, i], tile_size)[:px, :px]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.85, 0.15], vertical_spacing=0.02)
    fig.add_trace(
        go.Heatmap(
            z=pattern.tolist(),
            x=list(range(n)),
            y=list(range(n)),
            colorscale="Blues",
            zmin=0,
            zmax=1,
            customdata=[[f"{labels[q]} -> {labels[k]}" for k in range(n)] for q in range(n)],
            hovertemplate="%{customdata}: %{z:.3f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Image(source=_png_uri(strip), x0=-0.5 + 0.5 / px, dx=1 / px, y0=0, dy=1 / px), row=2, col=1
    )
    fig.update_yaxes(
        autorange="reversed", tickvals=list(range(n)), ticktext=labels, title_text="query", row=1, col=1
    )
    fig.update_yaxes(showticklabels=False, row=2, col=1)
    fig.update_xaxes(tickvals=list(range(n)), ticktext=labels, tickangle=-60, title_text="key", row=2, col=1)
    fig.update_layout(
        template="plotly_white",
        title=f"attention of L{layer}H{head} over the window's tokens",
        height=max(400, 22 * n + 200),
        width=max(500, 22 * n + 250),
    )
    return fig


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
    model: DTLike,
    win: Windows,
    direction: Tensor,
    site: str | Site | tuple,
    alpha: float,
    *,
    kinds: Sequence[str] | None = ("state",),
    step: int = -1,
) -> SteerResult:
    """Add ``alpha * direction`` at ``site`` on every token of ``kinds`` (all tokens if None) and compare the
    action distribution at window step ``step`` with the unsteered one."""
    tf = model.transformer
    name = Site.parse(site).name
    if name not in tf.hook_names:
        raise ValueError(f"{name!r} is not a hook point of this model")
    n_steps = win.steps
    step = step + n_steps if step < 0 else step
    if not 0 <= step < n_steps:
        raise ValueError(f"step {step} out of range for windows of {n_steps} steps")
    positions = None
    if kinds is not None:
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
    "COMPONENTS",
    "INSTRUCTION_NAMES",
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
