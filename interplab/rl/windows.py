"""Windows of trajectories as decision-transformer inputs, and caches of activations over them.

A `Windows` holds left-padded model inputs of ``context`` steps cut from `Trajectories`, each ending at one step
of an episode (the step being analysed sits last, so it sees as much history as the model allows). Sequence
positions are tokens ``[R_1, s_1, a_1, ..., R_K, s_K, a_K]``; the action logits of a step are read at its
state token. `cache_trajectories` keeps a site's activation at each window's last-step tokens, one row per
(step, token kind) with its episode, step and kind.

>>> win = windows(trajs, dt.cfg.context)                   # one window per step, ending at that step
>>> cache = cache_trajectories(dt, trajs, ["blocks.0.hook_resid_post"], kinds=["state"])
>>> cache["blocks.0.hook_resid_post"].shape                   # [steps, d_model]
torch.Size([115, 32])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interplab.hooks.site import Site, SiteKind
from interplab.rl.envs import ACTION_NAMES
from interplab.rl.model import TOKEN_KINDS, DecisionTransformer, token_index
from interplab.rl.trajectories import Trajectories

KEY, BALL = 5, 6
"""MiniGrid's object indices of the two instruction objects (``OBJECT_TO_IDX``)"""


def token_position(step: int, kind: str) -> int:
    """The sequence position of window step ``step``'s ``kind`` token (`interplab.rl.model.token_index`)."""
    return token_index(step, kind)


def to_tensor(x: Any, dtype: torch.dtype | None = None) -> Tensor:
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

    def step_index(self, step: int) -> int:
        """A window step (negative counts from the end) as an index in 0..T-1, or a clear error."""
        index = step + self.steps if step < 0 else step
        if not 0 <= index < self.steps:
            raise ValueError(f"step {step} out of range for windows of {self.steps} steps")
        return index

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


def windows(trajs: Trajectories, context: int, *, ends: Sequence[int] | Tensor | None = None) -> Windows:
    """Windows of ``context`` steps ending at the flat steps ``ends`` (default: every step), left-padded
    where the episode began less than ``context`` steps before (padding: zeros, mask False)."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    starts = to_tensor(trajs.episode_starts, torch.long)
    n = int(starts[-1])
    end = torch.arange(n) if ends is None else to_tensor(ends, torch.long).reshape(-1)
    if end.numel() and (int(end.min()) < 0 or int(end.max()) >= n):
        raise ValueError(f"window ends must be flat step indices in 0..{n - 1}, got {end.tolist()[:8]}")
    episode = torch.searchsorted(starts, end, right=True) - 1
    offsets = torch.arange(context - 1, -1, -1)  # the window's steps, last one = end
    idx = end[:, None] - offsets[None]
    mask = idx >= starts[episode][:, None]
    safe = torch.where(mask, idx, 0)

    def take(x: Any, dtype: torch.dtype) -> Tensor:
        v = to_tensor(x, dtype)[safe]
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
    model: DecisionTransformer,
    trajs: Trajectories,
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
    starts = to_tensor(trajs.episode_starts, torch.long)
    return TrajectoryCache(
        acts={name: torch.cat(v) for name, v in out.items()},
        episode=win.episode.repeat_interleave(k),
        step=(win.end - starts[win.episode]).repeat_interleave(k),
        flat_step=win.end.repeat_interleave(k),
        kind=torch.tensor([TOKEN_KINDS.index(x) for x in kinds]).repeat(len(win)),
        logits=torch.cat(logits),
    )


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
