"""The gridworlds decision transformers are trained on: MiniGrid environments through the maintained
``minigrid`` + ``gymnasium`` packages, observed as MiniGrid's partial egocentric view.

An observation is ``obs["image"]`` of MiniGrid: uint8 ``[7, 7, 3]`` (object index, colour index, state index)
indexed ``[x, y]`` in the agent's frame (the agent stands at ``[3, 6]`` facing "up", towards ``y = 0``).
Actions are MiniGrid's 7 discrete actions (0 left, 1 right, 2 forward, 3 pickup, 4 drop, 5 toggle, 6 done).
The reward is MiniGrid's: ``1 - 0.9 * step_count / max_steps`` on success, else 0.

``minigrid`` and ``gymnasium`` (the ``rl`` extra) are imported only when an environment is made or a view is
drawn, so this module imports without them.

>>> env = make_env("MiniGrid-MemoryS7-v0", seed=0)
>>> obs, info = env.reset()
>>> obs.shape, obs.dtype
((7, 7, 3), dtype('uint8'))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

OBS_SHAPE = (7, 7, 3)
"""MiniGrid's default partial view: 7 x 7 cells of (object, colour, state)."""
N_ACTIONS = 7
"""MiniGrid's discrete actions: left, right, forward, pickup, drop, toggle, done."""
ACTION_NAMES = ("left", "right", "forward", "pickup", "drop", "toggle", "done")
"""The name of each action index."""


@dataclass(frozen=True, kw_only=True)
class EnvSpec:
    """What a decision transformer needs to know about an environment, without making it."""

    name: str
    """the gymnasium id (``MiniGrid-MemoryS7-v0``)"""
    max_steps: int
    """MiniGrid's step limit: the episode is truncated after this many steps"""
    n_actions: int = N_ACTIONS
    """the size of the discrete action space"""
    obs_shape: tuple[int, int, int] = OBS_SHAPE
    """the observation's shape (the partial view)"""
    max_return: float = 1.0
    """an upper bound of an episode's return (MiniGrid pays ``1 - 0.9 * steps / max_steps`` on success)"""
    description: str = ""
    """one line: what the task is"""

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ValueError(f"EnvSpec {self.name!r}: max_steps must be > 0, got {self.max_steps}")
        if self.n_actions <= 0:
            raise ValueError(f"EnvSpec {self.name!r}: n_actions must be > 0, got {self.n_actions}")


SUPPORTED_ENVS: dict[str, EnvSpec] = {
    spec.name: spec
    for spec in (
        EnvSpec(
            name="MiniGrid-MemoryS7-v0",
            max_steps=5 * 7**2,
            description="see the instruction object (key or ball) in the start room, walk the corridor, go to "
            "the matching object at the split",
        ),
        EnvSpec(
            name="MiniGrid-DoorKey-5x5-v0",
            max_steps=10 * 5**2,
            description="pick up the key, open the door, reach the goal",
        ),
        EnvSpec(
            name="MiniGrid-Empty-5x5-v0",
            max_steps=4 * 5**2,
            description="reach the goal in an empty room (fixed start)",
        ),
        EnvSpec(
            name="MiniGrid-Empty-Random-5x5-v0",
            max_steps=4 * 5**2,
            description="reach the goal in an empty room (random start)",
        ),
    )
}
"""The environments interplab's collectors, experts and evaluation know (name -> spec)."""


def env_spec(name: str) -> EnvSpec:
    """The spec of a supported environment; an unknown name raises ValueError listing the supported ones."""
    spec = SUPPORTED_ENVS.get(name)
    if spec is None:
        raise ValueError(f"unknown environment {name!r}; supported: {', '.join(SUPPORTED_ENVS)}")
    return spec


@functools.cache
def _image_env_class() -> type:
    """The wrapper class (built on first use: gymnasium and minigrid are optional)."""
    try:
        import minigrid  # noqa: F401  (registers the MiniGrid-* ids with gymnasium)
        from minigrid.wrappers import ImgObsWrapper
    except ImportError as err:
        raise ImportError(
            f"MiniGrid environments need the rl extra (pip install 'interplab[rl]'): {err}"
        ) from None

    class ImageObs(ImgObsWrapper):
        """MiniGrid's ``obs["image"]`` as the observation; the first ``reset()`` without a seed uses the
        seed given at construction (so ``make_env(name, seed=s).reset()`` equals ``reset(seed=s)``)."""

        def __init__(self, env: Any, seed: int | None) -> None:
            super().__init__(env)
            self._first_seed = seed

        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
            if seed is None:
                seed, self._first_seed = self._first_seed, None
            else:
                self._first_seed = None
            return super().reset(seed=seed, options=options)

    return ImageObs


def make_env(name: str, seed: int | None = None, **kwargs: Any) -> Any:
    """A gymnasium env of a supported MiniGrid task whose observations are the uint8 ``[7, 7, 3]`` view
    (equal to minigrid's own ``obs["image"]``). ``seed`` seeds the first ``reset()`` (a later
    ``reset(seed=...)`` overrides it); ``kwargs`` go to ``gymnasium.make`` (e.g. ``render_mode="rgb_array"``)."""
    env_spec(name)
    wrapper = _image_env_class()
    import gymnasium

    return wrapper(gymnasium.make(name, disable_env_checker=True, **kwargs), seed)


def make_vector_env(name: str, n: int, seed: int = 0, *, autoreset_mode: str = "NextStep") -> Any:
    """A gymnasium `SyncVectorEnv` of ``n`` envs of ``name`` (env ``i`` seeded ``seed + i`` on the first
    reset, as ``reset(seed=seed)`` of the vector env also does). ``autoreset_mode``: gymnasium's
    ``"NextStep"`` (its default), ``"SameStep"`` or ``"Disabled"``."""
    env_spec(name)
    if n <= 0:
        raise ValueError(f"a vector env needs n >= 1 environments, got {n}")
    _image_env_class()  # the friendly ImportError before gymnasium's
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    modes = {m.value: m for m in AutoresetMode}
    if autoreset_mode not in modes:
        raise ValueError(f"unknown autoreset_mode {autoreset_mode!r}; valid: {', '.join(modes)}")
    fns = [functools.partial(make_env, name, seed + i) for i in range(n)]
    return SyncVectorEnv(fns, autoreset_mode=modes[autoreset_mode])


def render_obs(obs: Any, *, tile_size: int = 8) -> np.ndarray:
    """An RGB picture (uint8 ``[7 * tile_size, 7 * tile_size, 3]``) of one ``[7, 7, 3]`` view, drawn with
    minigrid's tile renderer as minigrid draws the agent's view: visible cells highlighted, unseen ones
    black, the agent at the bottom centre facing up."""
    view = np.asarray(obs.detach().cpu() if hasattr(obs, "detach") else obs)
    if view.shape != OBS_SHAPE:
        raise ValueError(f"render_obs draws one view of shape {OBS_SHAPE}, got {tuple(view.shape)}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    _image_env_class()
    from minigrid.core.grid import Grid

    grid, visible = Grid.decode(view.astype(np.uint8))
    width, height = view.shape[0], view.shape[1]
    return grid.render(tile_size, agent_pos=(width // 2, height - 1), agent_dir=3, highlight_mask=visible)
