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
import types
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
            install_fast_obs(env.unwrapped)

        def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> Any:
            if seed is None:
                seed, self._first_seed = self._first_seed, None
            else:
                self._first_seed = None
            return super().reset(seed=seed, options=options)

    return ImageObs


@functools.cache
def _view_cells(size: int, agent_dir: int) -> tuple[tuple[int, int], ...]:
    """For each cell ``(x, y)`` of the agent's view (flat index ``x * size + y``), the cell ``(i, j)`` of the
    unrotated slice of the grid that MiniGrid's ``gen_obs_grid`` puts there (it rotates the slice left
    ``agent_dir + 1`` times: ``rotated[x, y] = slice[size - 1 - y, x]``)."""
    index = np.arange(size * size).reshape(size, size)  # index[i, j] = i * size + j
    x, y = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    for _ in range(agent_dir + 1):
        index = index[size - 1 - y, x]
    return tuple((int(k) // size, int(k) % size) for k in index.reshape(-1))


def fast_gen_obs(env: Any) -> dict[str, Any]:
    """MiniGrid's ``env.gen_obs()`` (the view image, direction and mission), computed without the copies
    ``gen_obs_grid`` makes (a sliced grid, ``agent_dir + 1`` rotated grids of fresh cells, then ``encode``):
    the view's cells are read from the grid's cell list through a precomputed index per direction, occlusion
    is MiniGrid's ``Grid.process_vis`` propagation on them, and the encoding is each object's own
    ``encode()``. Equal to MiniGrid's observation (tested on random states of every supported environment);
    about a quarter of its time."""
    from minigrid.core.constants import OBJECT_TO_IDX

    grid = env.grid
    width, height, cells = grid.width, grid.height, grid.grid
    size = env.agent_view_size
    top_x, top_y, _, _ = env.get_view_exts()
    wall = _wall()
    view: list[Any] = []
    for i, j in _view_cells(size, env.agent_dir):
        x, y = top_x + i, top_y + j
        view.append(cells[y * width + x] if 0 <= x < width and 0 <= y < height else wall)
    agent = (size // 2) * size + size - 1  # the agent's cell (size // 2, size - 1)
    if env.see_through_walls:
        visible = [True] * (size * size)
    else:  # Grid.process_vis, on the flat index x * size + y
        visible = [False] * (size * size)
        visible[agent] = True
        for j in range(size - 1, -1, -1):
            # each row is swept rightwards, then leftwards; `step` is the flat offset of the next cell
            for columns, step in ((range(size - 1), size), (range(size - 1, 0, -1), -size)):
                for i in columns:
                    k = i * size + j
                    if not visible[k]:
                        continue
                    cell = view[k]
                    if cell and not cell.see_behind():
                        continue
                    visible[k + step] = True
                    if j > 0:
                        visible[k + step - 1] = True
                        visible[k - 1] = True
    view[agent] = env.carrying if env.carrying else None
    empty, unseen = (OBJECT_TO_IDX["empty"], 0, 0), (0, 0, 0)
    codes = [
        (c.encode() if c is not None else empty) if v else unseen for c, v in zip(view, visible, strict=True)
    ]
    image = np.array(codes, dtype=np.uint8).reshape(size, size, 3)
    return {"image": image, "direction": env.agent_dir, "mission": env.mission}


@functools.cache
def _wall() -> Any:
    """The object `Grid.slice` puts outside the grid (a grey wall; only its encoding and opacity are read)."""
    from minigrid.core.world_object import Wall

    return Wall()


def install_fast_obs(env: Any) -> bool:
    """Make a MiniGrid env's ``gen_obs`` (what its ``reset`` and ``step`` return) `fast_gen_obs`, where the
    env uses MiniGrid's own observation code (neither ``gen_obs`` nor ``gen_obs_grid`` overridden, a plain
    `Grid`); at each call a grid that is not a plain `Grid` goes back to MiniGrid's ``gen_obs``. Returns
    whether it was installed."""
    from minigrid.minigrid_env import MiniGridEnv

    cls = type(env)
    if not (
        isinstance(env, MiniGridEnv)
        and cls.gen_obs is MiniGridEnv.gen_obs
        and cls.gen_obs_grid is MiniGridEnv.gen_obs_grid
    ):
        return False
    env.gen_obs = types.MethodType(_gen_obs, env)  # type: ignore[method-assign]  # bound: a deep copy rebinds it
    return True


def _gen_obs(env: Any) -> dict[str, Any]:
    from minigrid.core.grid import Grid
    from minigrid.minigrid_env import MiniGridEnv

    if type(env.grid) is not Grid:
        return MiniGridEnv.gen_obs(env)
    return fast_gen_obs(env)


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
