"""Shared Plotly helpers: every result's ``.plot()`` is built from these.

Small and general: a labelled heatmap, line plots, a scatter plot, a token-highlight view, an
interactive attention-pattern view, and the writers every picture goes through: `save_figure`
(``.html``, ``.png``, ``.svg``) and `figure_html` (a page or a fragment for a bigger report). An HTML
picture does not inline plotly.js (4.8 MB); it loads the one ``plotly.min.js`` that `ensure_plotly_js`
copies once into its folder, or into the run folder above it (``assets``: the reports of a run's sub-folders
load ``../plotly.min.js``), so a run of many reports stays small and still opens offline. Plotly is
imported inside the functions so ``import interplab`` stays fast.

>>> fig = heatmap(torch.randn(2, 3), x_labels=["a", "b", "c"], y_labels=["0", "1"], x_title="pos", y_title="layer")
>>> save_figure(fig, "out.html")
PosixPath('out.html')
"""

from __future__ import annotations

import filecmp
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab import runs
from interplab.io import atomic_path, atomic_write_text

DIVERGING = "RdBu"


def _rows(values: Tensor | Sequence) -> list[list[float]]:
    t = torch.as_tensor(values).detach().float().cpu()
    if t.dim() != 2:
        raise ValueError(f"a heatmap needs a 2-d array, got shape {tuple(t.shape)}")
    return t.tolist()


def unique_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` with repeats kept apart by zero-width spaces (Plotly merges equal category labels)."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append(label + "\u200b" * n)
    return out


def heatmap(
    values: Tensor | Sequence,
    *,
    x_labels: Sequence[str] | None = None,
    y_labels: Sequence[str] | None = None,
    x_title: str = "",
    y_title: str = "",
    title: str = "",
    colorbar_title: str = "",
    diverging: bool = True,
    zmid: float = 0.0,
    text: Sequence[Sequence[str]] | None = None,
) -> Any:
    """A heatmap with labelled axes (row 0 at the top). Diverging colours centred on ``zmid`` by default;
    ``text`` (same shape as ``values``) is written in the cells."""
    import plotly.graph_objects as go

    z = _rows(values)
    n_rows, n_cols = len(z), len(z[0]) if z else 0
    x = unique_labels([str(s) for s in x_labels]) if x_labels is not None else [str(i) for i in range(n_cols)]
    y = unique_labels([str(s) for s in y_labels]) if y_labels is not None else [str(i) for i in range(n_rows)]
    if len(x) != n_cols or len(y) != n_rows:
        raise ValueError(f"labels ({len(y)} rows, {len(x)} columns) do not match values {n_rows}x{n_cols}")
    kw: dict[str, Any] = (
        {"colorscale": DIVERGING, "zmid": zmid, "reversescale": True}
        if diverging
        else {"colorscale": "Viridis"}
    )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=x,
            y=y,
            colorbar={"title": colorbar_title},
            hovertemplate=f"{y_title or 'y'}: %{{y}}<br>{x_title or 'x'}: %{{x}}<br>value: %{{z:.4g}}<extra></extra>",
            **kw,
        )
    )
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white")
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


def line(
    series: Mapping[str, Tensor | Sequence],
    *,
    x_labels: Sequence[str] | None = None,
    x_title: str = "",
    y_title: str = "",
    title: str = "",
) -> Any:
    """One line per named series over shared x labels."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, ys in series.items():
        y = torch.as_tensor(ys).detach().float().cpu().tolist()
        x = list(x_labels) if x_labels is not None else list(range(len(y)))
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white")
    return fig


def scatter(
    x: Tensor | Sequence,
    y: Tensor | Sequence,
    *,
    labels: Sequence[str] | None = None,
    x_title: str = "",
    y_title: str = "",
    title: str = "",
    diagonal: bool = False,
) -> Any:
    """Points with hover labels; ``diagonal`` draws y = x."""
    import plotly.graph_objects as go

    xs = torch.as_tensor(x).detach().float().cpu().reshape(-1).tolist()
    ys = torch.as_tensor(y).detach().float().cpu().reshape(-1).tolist()
    fig = go.Figure(
        go.Scatter(
            x=xs,
            y=ys,
            mode="markers",
            text=list(labels) if labels is not None else None,
            hovertemplate="%{text}<br>x: %{x:.4g}<br>y: %{y:.4g}<extra></extra>",
        )
    )
    if diagonal and xs:
        lo, hi = min(xs + ys), max(xs + ys)
        fig.add_trace(
            go.Scatter(
                x=[lo, hi],
                y=[lo, hi],
                mode="lines",
                line={"dash": "dash", "color": "grey"},
                name="y = x",
                hoverinfo="skip",
            )
        )
    fig.update_layout(
        title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white", showlegend=False
    )
    return fig


def bars(
    values: Tensor | Sequence,
    labels: Sequence[str],
    *,
    x_title: str = "",
    y_title: str = "",
    title: str = "",
) -> Any:
    """A bar per labelled value (positive and negative bars coloured apart)."""
    import plotly.graph_objects as go

    v = torch.as_tensor(values).detach().float().cpu().reshape(-1).tolist()
    if len(v) != len(labels):
        raise ValueError(f"{len(labels)} labels but {len(v)} values")
    fig = go.Figure(
        go.Bar(
            x=unique_labels([str(s) for s in labels]),
            y=v,
            marker_color=["#b2182b" if x >= 0 else "#2166ac" for x in v],
        )
    )
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, template="plotly_white")
    return fig


def token_highlight(
    tokens: Sequence[str], values: Tensor | Sequence, *, title: str = "", value_name: str = "value"
) -> Any:
    """Tokens in a row, each coloured by its value (hover shows the number)."""
    import plotly.graph_objects as go

    v = torch.as_tensor(values).detach().float().cpu().reshape(-1).tolist()
    if len(v) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(v)} values")
    x = unique_labels([str(t) for t in tokens])
    fig = go.Figure(
        go.Heatmap(
            z=[v],
            x=x,
            y=[value_name],
            text=[[str(t) for t in tokens]],
            texttemplate="%{text}",
            colorscale=DIVERGING,
            reversescale=True,
            zmid=0,
            hovertemplate="%{x}<br>" + value_name + ": %{z:.4g}<extra></extra>",
        )
    )
    fig.update_layout(title=title, template="plotly_white", height=220)
    fig.update_xaxes(type="category", showticklabels=False)
    return fig


def attention_view(
    patterns: Tensor,
    tokens: Sequence[str],
    *,
    head_labels: Sequence[str] | None = None,
    title: str = "attention patterns",
) -> Any:
    """Interactive attention patterns [head, query, key]: a menu chooses the head; hovering a cell shows
    ``query token -> key token: weight``."""
    import plotly.graph_objects as go

    p = torch.as_tensor(patterns).detach().float().cpu()
    if p.dim() != 3 or p.shape[1] != len(tokens) or p.shape[2] != len(tokens):
        raise ValueError(f"patterns must be [head, {len(tokens)}, {len(tokens)}], got {tuple(p.shape)}")
    heads = list(head_labels) if head_labels is not None else [f"H{h}" for h in range(p.shape[0])]
    toks = unique_labels([str(t) for t in tokens])
    fig = go.Figure()
    for i, name in enumerate(heads):
        fig.add_trace(
            go.Heatmap(
                z=p[i].tolist(),
                x=toks,
                y=toks,
                colorscale="Blues",
                zmin=0,
                zmax=1,
                visible=i == 0,
                name=name,
                hovertemplate="%{y} -> %{x}: %{z:.3f}<extra>" + name + "</extra>",
            )
        )
    buttons = [
        {
            "label": name,
            "method": "update",
            "args": [{"visible": [j == i for j in range(len(heads))]}, {"title": f"{title}: {name}"}],
        }
        for i, name in enumerate(heads)
    ]
    fig.update_layout(
        title=f"{title}: {heads[0]}",
        template="plotly_white",
        xaxis_title="key (source)",
        yaxis_title="query (destination)",
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "y": 1.15}],
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category")
    return fig


PLOTLY_JS = runs.PLOTLY_JS
"""The plotly.js bundle the HTML pictures load; the pages of a folder (or of a run: `figure_html`'s
``assets``) share one copy."""


def plotly_js_source() -> Path:
    """The plotly.js bundled with the installed plotly package (never a CDN: pictures open offline)."""
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / PLOTLY_JS
    if not path.is_file():
        raise FileNotFoundError(f"{PLOTLY_JS} not found at {path}: reinstall the plotly package")
    return path


def ensure_plotly_js(folder: str | Path) -> Path:
    """Put plotly's bundle at ``folder/plotly.min.js`` unless an identical copy is there (written
    atomically, so concurrent writers and readers never see half a file); returns its path."""

    src, dst = plotly_js_source(), Path(folder) / PLOTLY_JS
    if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
        return dst
    with atomic_path(dst) as tmp:
        tmp.write_bytes(src.read_bytes())
    return dst


def figure_html(
    fig: Any, folder: str | Path, *, full_html: bool = True, assets: str | Path | None = None
) -> str:
    """``fig`` as HTML to be written into ``folder``: a whole page (or, with ``full_html=False``, a fragment
    to embed in a page of that folder) that loads the shared ``plotly.min.js`` by a relative ``<script src>``.

    The bundle lies in ``assets`` when ``folder`` is inside it (e.g. the run folder, so that the reports in
    its sub-folders share one copy: ``../plotly.min.js``), else in ``folder`` itself; either way the folder
    (or the run, moved as a whole) opens offline from the file system."""
    js_folder = _assets_folder(folder, assets)
    ensure_plotly_js(js_folder)
    src = Path(os.path.relpath(Path(js_folder) / PLOTLY_JS, Path(folder))).as_posix()
    return fig.to_html(include_plotlyjs=src, full_html=full_html)


def write_figure_files(
    fig: Any,
    folder: str | Path,
    stem: str,
    *,
    assets: str | Path | None = None,
    fallback: Callable[[Path], None] | None = None,
) -> dict[str, str | None]:
    """A report's picture in ``folder``: ``stem.html`` (loading the shared ``plotly.min.js``, from ``assets``
    when ``folder`` is inside it, see `figure_html`) and ``stem.png`` (see `write_image`). Returns the paths
    ``{"html", "png", "png_error"}``: ``png`` is None, with ``png_error`` saying why, when no renderer works."""
    folder = Path(folder)
    atomic_write_text(folder / f"{stem}.html", figure_html(fig, folder, assets=assets))
    error = write_image(fig, folder / f"{stem}.png", fallback=fallback)
    return {
        "html": str(folder / f"{stem}.html"),
        "png": None if error else str(folder / f"{stem}.png"),
        "png_error": error,
    }


def _assets_folder(folder: str | Path, assets: str | Path | None) -> Path:
    if assets is None:
        return Path(folder)
    inner, outer = Path(os.path.abspath(folder)), Path(os.path.abspath(assets))
    return Path(assets) if inner == outer or inner.is_relative_to(outer) else Path(folder)


def save_figure(fig: Any, path: str | Path) -> Path:
    """Write ``.html`` (loads the folder's shared ``plotly.min.js``, works offline), ``.png`` or ``.svg``
    (see `write_image`), atomically. Raises ``RuntimeError`` when no static image renderer works."""

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".html", ".png", ".svg"):
        raise ValueError(f"cannot save a figure as {path.name!r}: use .html, .png or .svg")
    if suffix == ".html":
        atomic_write_text(path, figure_html(fig, path.parent))
        return path
    error = write_image(fig, path)
    if error is not None:
        raise RuntimeError(f"cannot write {path}: {error}")
    return path


def png_bytes(rgb: Any) -> bytes:
    """An RGB picture (uint8 ``[H, W, 3]``) as PNG bytes: no imaging library, only zlib (observation frames,
    small grids drawn inline in a page)."""
    import struct
    import zlib

    import numpy as np

    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"a PNG needs a uint8 [H, W, 3] array, got {rgb.dtype} {tuple(rgb.shape)}")
    h, w = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))  # filter type 0 on every row

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + tag + body + crc

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


IMAGE_HOWTO = "pip install kaleido==0.2.1 (it ships its own Chromium, works offline)"
"""How to get static pictures when no renderer works; the default install has it."""


def write_image(fig: Any, path: str | Path, *, fallback: Callable[[Path], None] | None = None) -> str | None:
    """Write ``fig`` as a static ``.png`` or ``.svg`` at ``path`` (atomically); returns None when written, else
    one line saying why not and how to get pictures (the HTML has the same picture).

    Renderers, first that works: kaleido 0.2 (a dependency of interplab: its wheel ships a headless Chromium,
    so pictures need no browser and no network), plotly's own export when kaleido 1.x is installed instead
    (it drives a Chrome or Chromium found on the machine), then ``fallback(path)`` if given (e.g. matplotlib)."""

    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg"):
        raise ValueError(f"cannot write a static picture as {path.name!r}: use .png or .svg")
    try:
        data = _render(fig, fmt)
    except Exception as err:  # the renderers raise many types (no browser, a crashed or missing executable)
        reason = _first_line(err)
        if fallback is not None:
            try:
                with atomic_path(path) as tmp:
                    named = tmp.with_name(tmp.name + path.suffix)  # renderers pick the format by suffix
                    fallback(named)
                    named.replace(tmp)
                return None
            except ImportError as fallback_err:
                reason += f"; the fallback needs {fallback_err.name or 'a missing package'}"
        return f"no {fmt.upper()} renderer worked ({reason}): {IMAGE_HOWTO}; the HTML has the same picture"
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return None


_SCOPE: list[Any] = []  # one kaleido 0.2 renderer per process: its Chromium starts once (~4 s)


def _render(fig: Any, fmt: str) -> bytes:
    from importlib.metadata import PackageNotFoundError, version

    try:
        kaleido_version = version("kaleido")
    except PackageNotFoundError:
        raise RuntimeError("kaleido is not installed") from None
    if int(kaleido_version.split(".")[0]) >= 1:
        return fig.to_image(format=fmt)  # plotly's export, through the Chrome that kaleido 1.x finds
    spec = fig.to_plotly_json()
    try:
        return _kaleido_transform(spec, fmt)
    except TimeoutError:
        raise
    except Exception:
        # a Chromium that crashed or failed to start (seen once in CI, under load: the demo's formation.png
        # was missing while the plot tests of the same run passed) is shut down, and a fresh one tries once
        _drop_scope()
        return _kaleido_transform(spec, fmt)


def _kaleido_transform(spec: dict[str, Any], fmt: str) -> bytes:
    if not _SCOPE:
        _SCOPE.append(_new_scope())
    scope = _SCOPE[0]
    return _with_timeout(lambda: scope.transform(spec, format=fmt))


# run as kaleido's command: a session (and process group) of its own, then its real command in the same process
_NEW_SESSION = "import os, sys; os.setsid(); os.execv(sys.argv[1], sys.argv[1:])"


def _new_scope() -> Any:
    """A kaleido 0.2 renderer whose process (a shell wrapper, the kaleido binary and the Chromium processes it
    starts) runs in a process group of its own, so that `_drop_scope` can stop all of it at once."""
    import sys

    from kaleido.scopes.plotly import PlotlyScope

    scope = PlotlyScope(plotlyjs=str(plotly_js_source()), mathjax=False)
    build = getattr(scope, "_build_proc_args", None)  # the command kaleido starts its process with
    if build is not None and hasattr(os, "setsid"):
        scope._build_proc_args = lambda: [sys.executable, "-c", _NEW_SESSION, *build()]
    return scope


def _drop_scope() -> None:
    """Forget the kaleido renderer and kill its whole process group (the wrapper, kaleido and every Chromium
    child: none is left behind), without waiting on kaleido's lock, which a transform that stopped answering
    holds; the blocked transform then reads the end of its pipe and returns."""
    import signal
    import subprocess
    import threading

    while _SCOPE:
        scope = _SCOPE.pop()
        proc = getattr(scope, "_proc", None)
        if isinstance(proc, subprocess.Popen):
            # first: kaleido's stderr reader then stops at the end of the pipe instead of spinning on it
            scope._proc = None
            try:
                if hasattr(os, "killpg") and os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except (ProcessLookupError, PermissionError):
                pass  # already gone
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        shutdown = getattr(scope, "_shutdown_kaleido", None)
        if shutdown is not None:  # in a thread: a renderer of another kind may block on a dead pipe
            threading.Thread(target=shutdown, daemon=True).start()


IMAGE_TIMEOUT_S = 120.0
"""Seconds a static picture may take before the renderer is given up on (``INTERPLAB_IMAGE_TIMEOUT``
overrides): kaleido 0.2 talks to its Chromium over a pipe, and a Chromium that stops answering would otherwise
block the caller for ever (seen once: a test hung 12 minutes)."""


def _with_timeout(render: Callable[[], bytes]) -> bytes:
    """``render()`` in a worker thread; past the timeout the renderer's process group (kaleido and its Chromium)
    is killed and forgotten (the next picture starts a fresh one) and a ``TimeoutError`` says so."""
    import threading

    timeout = float(os.environ.get("INTERPLAB_IMAGE_TIMEOUT", IMAGE_TIMEOUT_S))
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["data"] = render()
        except BaseException as err:  # handed to the caller's thread
            out["error"] = err

    worker = threading.Thread(target=work, name="interplab-image", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        _drop_scope()
        raise TimeoutError(f"the static image renderer (kaleido) did not answer in {timeout:g} s")
    if "error" in out:
        raise out["error"]
    return out["data"]


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0].rstrip(":,.") if lines else type(err).__name__


def save_result(result: Any, path: str | Path) -> Path:
    """Save a result object: ``.json`` writes ``result.to_dict()`` as a `runs.Kind.RESULT` document (``type``:
    the result's class), ``.html``/``.png``/``.svg`` its ``plot()``."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return runs.write_json(path, runs.Kind.RESULT, {"type": type(result).__name__, **result.to_dict()})
    return save_figure(result.plot(), path)
