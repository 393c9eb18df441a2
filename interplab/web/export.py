"""Static export: a self-contained folder of HTML pages (index + one page per feature + local assets) to
share or publish; opens from the file system, needs no server and no network.

>>> export_html("features.db", "site/", features=range(3))    # the index and one page per feature
ExportReport(path='site', n_pages=..., n_bytes=...)
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from interplab.features.reader import FeatureReader
from interplab.io import atomic_write_text
from interplab.plots import ensure_plotly_js
from interplab.runs import Kind, write_json
from interplab.web.app import WEB_DIR, templates
from interplab.web.views import Links, feature_view, summary_rows


@dataclass(frozen=True)
class ExportReport:
    """Where the site went and what it holds."""

    path: str
    n_pages: int
    n_bytes: int

    def save(self, path: str | Path) -> None:
        write_json(path, Kind.FEATURE_EXPORT, self.__dict__)

    def plot(self):
        import plotly.graph_objects as go

        return go.Figure(go.Indicator(mode="number", value=self.n_pages, title={"text": "pages"}))


def export_html(
    db: str | Path,
    out: str | Path,
    *,
    features: Iterable[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportReport:
    """Write ``out/index.html``, ``out/feature/<i>.html`` and ``out/static/`` for the features of ``db``."""
    store = FeatureReader(db)
    out = Path(out)
    (out / "feature").mkdir(parents=True, exist_ok=True)
    shutil.copytree(WEB_DIR / "static", out / "static", dirs_exist_ok=True)
    ensure_plotly_js(out / "static")  # atomic, and kept when an identical copy is there
    env = templates().env
    meta, vocab = store.meta(), store.vocab()
    name = Path(str(db)).stem
    rows = store.list_features(limit=10**9)
    wanted = sorted(set(features)) if features is not None else [r["feature"] for r in rows]
    present = {r["feature"] for r in rows}
    wanted = [f for f in wanted if f in present]
    listed = [r for r in rows if r["feature"] in set(wanted)]
    root = Links(base=".", static_base="static", home_url="index.html", static_site=True)
    atomic_write_text(
        out / "index.html",
        env.get_template("list.html").render(
            db=name,
            rows=summary_rows(listed, vocab),
            n=len(listed),
            meta=meta,
            links=root,
            static_site=True,
            order="feature",
            page_no=0,
        ),
    )
    links = Links(base="..", static_base="../static", home_url="../index.html", static_site=True)
    page = env.get_template("feature.html")
    for k, f in enumerate(wanted):
        prev = wanted[k - 1] if k > 0 else None
        nxt = wanted[k + 1] if k + 1 < len(wanted) else None
        html = page.render(
            db=name,
            prev=prev,
            next=nxt,
            links=links,
            meta=meta,
            steering=False,
            static_site=True,
            plotly_url="../static/plotly.min.js",
            explanations=store.explanations(f),
            **feature_view(store.feature(f), meta, vocab),
        )
        atomic_write_text(out / "feature" / f"{f}.html", html)
        if progress is not None:
            progress(k + 1, len(wanted))
    store.close()
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportReport(path=str(out), n_pages=len(wanted) + 1, n_bytes=size)
