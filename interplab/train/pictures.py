"""Static pictures: PNG through Plotly + kaleido (needs a Chrome/Chromium), else a matplotlib fallback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from interplab.io import atomic_path


def write_png(
    fig: Any, path: Path, *, fallback: Callable[[Path], None] | None = None
) -> tuple[str | None, str | None]:
    """Write ``fig`` as a PNG; returns (path, None) on success or (None, why not)."""
    errors = []
    try:
        with atomic_path(path) as tmp:
            fig.write_image(str(tmp), format="png", scale=1)
        return str(path), None
    except Exception as err:  # kaleido raises several types when no browser is found
        errors.append(
            f"plotly/kaleido: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}"
        )
    if fallback is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            errors.append("matplotlib is not installed")
        else:
            with atomic_path(path) as tmp:
                fallback(tmp.with_suffix(".png"))
                tmp.with_suffix(".png").replace(tmp)
            return str(path), None
    return None, "; ".join(errors) + " (the interactive HTML has the same picture)"
