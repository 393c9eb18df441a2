"""Attention of a decision transformer over its token sequence, with each state token's observation drawn as
a small grid image under its column (MiniGrid's renderer through `interplab.rl.envs.render_obs`, or a plain
palette when minigrid is not installed).

>>> from interplab import plots
>>> from interplab.rl.windows import windows
>>> fig = attention_figure(dt, windows(trajs, 4, ends=[10]), layer=1, head=0)
>>> plots.save_figure(fig, "attn.html").name
'attn.html'
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from interplab.hooks.site import Site, SiteKind
from interplab.plots import png_bytes
from interplab.rl.envs import render_obs
from interplab.rl.model import DecisionTransformer
from interplab.rl.windows import BALL, KEY, Windows, token_labels

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
        return render_obs(obs, tile_size=tile_size)
    except ImportError:  # no minigrid: the plain palette
        return palette_obs(obs, tile_size=tile_size)


def _png_uri(rgb: np.ndarray) -> str:
    """A data URI of an RGB picture as PNG."""
    import base64

    return "data:image/png;base64," + base64.b64encode(png_bytes(np.asarray(rgb, dtype=np.uint8))).decode()


def attention_pattern(
    model: DecisionTransformer, win: Windows, layer: int, head: int, *, example: int = 0
) -> Tensor:
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
    model: DecisionTransformer, win: Windows, layer: int, head: int, *, example: int = 0, tile_size: int = 4
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
