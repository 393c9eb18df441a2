"""Turn feature-database records into what the pages show: highlighted contexts, chart data, links.

Shared by the live app and the static export, so both pages look the same.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from jinja2 import Undefined
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


_HTML_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def _finite(node: Any) -> Any:
    if isinstance(node, float):
        return node if math.isfinite(node) else None
    if isinstance(node, dict):
        return {str(k): _finite(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_finite(v) for v in node]
    return node


def json_for_html(data: Any) -> Markup:
    """``data`` as JSON safe to embed in HTML inside ``<script type="application/json">``.

    ``<``, ``>``, ``&``, U+2028 and U+2029 are written as ``\\u003c``-style escapes, so no string in the
    data (a token ``<!--<script>`` or ``</script>``) can end the script element or open a comment that
    swallows the rest of the page; ``JSON.parse`` reads the same strings back. Non-finite floats become
    ``null`` (``NaN`` is not JSON). Every template and the static export embed data through this one helper
    (the ``json_script`` filter).
    """
    text = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False)
    return Markup(re.sub("[<>&\u2028\u2029]", lambda m: _HTML_UNSAFE[m.group()], text))


def format_number(v: Any, digits: int = 4) -> str:
    """A value as a table shows it: ``22,121`` (not ``22120.75621``), ``4.765``, ``0.2295``, ``4.2e-06``,
    ``1,500`` for integers, ``yes``/``no``, ``—`` for None; anything else as short text."""
    if v is None or isinstance(v, Undefined):  # a field a template asks for that is not there
        return "\u2014"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == 0 or 10**digits <= abs(v) < 1e12:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    if isinstance(v, str):
        return v
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:79] + "\u2026"


def show_token(s: str) -> str:
    """A token as text with whitespace made visible."""
    return s.replace("\n", "\u21b5").replace("\t", "\u21e5") if s else "\u2205"


NEAR_LEFT, NEAR_RIGHT = 6, 3
"""tokens of a context shown before it is expanded: this many before and after its peak (the rest, up to
the stored window, appear on a click)"""


def context_html(
    ctx: dict[str, Any],
    vocab: dict[int, str],
    center: int,
    scale: float,
    loss: list[float | None] | None = None,
) -> Markup:
    """A context as spans, each shaded by its activation (relative to ``scale``), with the value (and the
    per-token loss effect, `interplab.features.loss_effects`, when given) on hover. Tokens further than
    `NEAR_LEFT`/`NEAR_RIGHT` from the peak have class ``far`` (hidden until the context is expanded)."""
    parts = []
    finite = [abs(v) for v in loss or [] if v is not None and math.isfinite(v)]
    loss_scale = max(finite, default=0.0)
    for k, (tok, act) in enumerate(zip(ctx["tokens"], ctx["acts"], strict=True)):
        if tok < 0:
            continue
        raw = vocab.get(tok, f"#{tok}")
        text = show_token(raw)
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, act / scale))
        far = " far" if not center - NEAR_LEFT <= k <= center + NEAR_RIGHT else ""
        cls = ("tok peak" if k == center else "tok") + far
        if raw == f"#{tok}":  # no tokenizer: ids, spaced apart
            cls += " id"
        dl = loss[k] if loss is not None and k < len(loss) else None
        extra, styles = "", [f"background:rgba(255,110,0,{alpha:.3f})"] if alpha > 0 else []
        if dl is not None and math.isfinite(dl):
            extra = f' data-loss="{dl:+.4g}"'
            # underlined blue where the feature helped predict the token (removing it raises the loss), red
            # where it hurt; the context's strongest effect is opaque
            a = abs(dl) / loss_scale if loss_scale > 0 else 0.0
            if a > 0:
                styles.append(
                    f"border-bottom:3px solid rgba({'42,122,184' if dl > 0 else '200,50,40'},{a:.3f})"
                )
        style = f' style="{";".join(styles)}"' if styles else ""
        parts.append(
            f'<span class="{cls}"{style} data-act="{act:.4g}"{extra} title="{escape(text)} #{tok}: {act:.4g}">'
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


def feature_view(
    rec: dict[str, Any],
    meta: dict[str, Any],
    vocab: dict[int, str],
    losses: dict[tuple[int, int], list[float | None]] | None = None,
) -> dict[str, Any]:
    """Template variables for a feature page (``losses``: `FeatureReader.context_loss`, by (kind, rank))."""
    center = int(meta.get("window_left", 0))
    scale = float(rec["max_act"]) or 1.0
    losses = losses or {}

    def html(c: dict[str, Any]) -> Markup:
        return context_html(c, vocab, center, scale, losses.get((int(c["kind"]), int(c["rank"]))))

    top = [{**c, "html": html(c)} for c in rec["top"]]
    samples = [{**c, "html": html(c)} for c in rec["samples"]]
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
        "charts": charts,
        "top_token": show_token(vocab.get(rec["top_token"], "")) if rec["top_token"] is not None else None,
        "cooc": rec["cooc"],
        "label": rec["label"],
        "has_loss": bool(losses),
    }


def summary_rows(rows: list[dict], vocab: dict[int, str]) -> list[dict]:
    return [
        {
            **r,
            "top_token_text": show_token(vocab.get(r["top_token"], "")) if r["top_token"] is not None else "",
        }
        for r in rows
    ]


def crosscoder_view(meta: dict[str, Any], feature: int) -> dict[str, Any] | None:
    """A crosscoder latent's sides (`interplab.features.crosscoder_db`): per source its name, decoder norm and
    share of the decoder norms, and the latent's side label (``B-only`` ...); None for an SAE's database.
    Every value is checked (a malformed record gives None or empty fields)."""
    rec = meta.get("crosscoder")
    if not isinstance(rec, dict):
        return None

    def at(key: str) -> Any:
        rows = rec.get(key)
        return rows[feature] if isinstance(rows, list) and 0 <= feature < len(rows) else None

    sources = [str(s) for s in rec.get("sources") or [] if isinstance(s, str)]
    names = [str(s) for s in rec.get("sides") or [] if isinstance(s, str)]
    names = names if len(names) == len(sources) else sources
    shares, norms = at("shares"), at("decoder_norms")
    sides = []
    for i, source in enumerate(sources):
        share = shares[i] if isinstance(shares, list) and i < len(shares) else None
        norm = norms[i] if isinstance(norms, list) and i < len(norms) else None
        sides.append(
            {
                "letter": chr(ord("A") + i) if i < 26 else str(i),
                "name": names[i],
                "source": source,
                "share": float(share) if isinstance(share, (int, float)) and math.isfinite(share) else None,
                "norm": float(norm) if isinstance(norm, (int, float)) and math.isfinite(norm) else None,
            }
        )
    label = at("labels")
    return {"label": str(label) if isinstance(label, str) else None, "sides": sides, "diff": rec.get("diff")}
