"""Turn feature-database records into what the pages show: highlighted contexts, chart data, links.

Shared by the live app and the static export, so both pages look the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from markupsafe import Markup, escape


@dataclass(frozen=True)
class Links:
    """URLs for one way of serving pages: the live app (``base`` = "/db/<name>") or a static folder."""

    base: str
    static_base: str
    home_url: str
    static_site: bool = False

    def feature(self, i: int) -> str:
        return f"{self.base}/feature/{i}.html" if self.static_site else f"{self.base}/feature/{i}"

    def static(self, name: str) -> str:
        return f"{self.static_base}/{name}"

    def index(self) -> str:
        return f"{self.base}/index.html" if self.static_site else f"{self.base}/"


def show_token(s: str) -> str:
    """A token as text with whitespace made visible."""
    return s.replace("\n", "\u21b5").replace("\t", "\u21e5") if s else "\u2205"


def context_html(ctx: dict[str, Any], vocab: dict[int, str], center: int, scale: float) -> Markup:
    """A context as spans, each shaded by its activation (relative to ``scale``), with the value on hover."""
    parts = []
    for k, (tok, act) in enumerate(zip(ctx["tokens"], ctx["acts"], strict=True)):
        if tok < 0:
            continue
        raw = vocab.get(tok, f"#{tok}")
        text = show_token(raw)
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale))
        cls = "tok peak" if k == center else "tok"
        if raw == f"#{tok}":  # no tokenizer: ids, spaced apart
            cls += " id"
        style = f' style="background:rgba(255,110,0,{alpha:.3f})"' if alpha > 0 else ""
        parts.append(
            f'<span class="{cls}"{style} data-act="{act:.4g}" title="{escape(text)} #{tok}: {act:.4g}">'
            f"{escape(text)}</span>"
        )
    return Markup("".join(parts))


def sample_groups(samples: list[dict], max_act: float, n: int = 4) -> list[dict]:
    """Samples grouped into ``n`` equal activation intervals of [0, max], strongest first."""
    groups = []
    for g in range(n, 0, -1):
        lo, hi = max_act * (g - 1) / n, max_act * g / n
        members = [s for s in samples if lo < s["act"] <= hi or (g == n and s["act"] > hi)]
        if members:
            groups.append({"lo": lo, "hi": hi, "contexts": members})
    return groups


def feature_view(rec: dict[str, Any], meta: dict[str, Any], vocab: dict[int, str]) -> dict[str, Any]:
    """Template variables for a feature page."""
    center = int(meta.get("window_left", 0))
    scale = float(rec["max_act"]) or 1.0
    top = [{**c, "html": context_html(c, vocab, center, scale)} for c in rec["top"]]
    samples = [{**c, "html": context_html(c, vocab, center, scale)} for c in rec["samples"]]
    edges = meta.get("hist_edges") or []
    hist = rec["hist"]
    nz = [i for i, c in enumerate(hist) if c]
    lo, hi = (nz[0], nz[-1] + 1) if nz else (0, 0)
    centers = [(edges[i] * edges[i + 1]) ** 0.5 for i in range(lo, hi)] if len(edges) == len(hist) + 1 else []
    logits = {
        side: [[show_token(vocab.get(t, f"#{t}")), v] for t, v in rec["logits"][side]]
        for side in ("pos", "neg")
    }
    charts = {"hist": {"x": centers, "y": hist[lo:hi]}, "logits": logits, "feature": rec["feature"]}
    return {
        "rec": rec,
        "top": top,
        "groups": sample_groups(samples, scale),
        "charts_json": Markup(json.dumps(charts).replace("</", "<\\/")),
        "top_token": show_token(vocab.get(rec["top_token"], "")) if rec["top_token"] is not None else None,
        "cooc": rec["cooc"],
        "label": rec["label"],
    }


def summary_rows(rows: list[dict], vocab: dict[int, str]) -> list[dict]:
    return [
        {
            **r,
            "top_token_text": show_token(vocab.get(r["top_token"], "")) if r["top_token"] is not None else "",
        }
        for r in rows
    ]
