"""The attribution-graph viewer: a run folder holding a ``graph.json`` (circuit-tracer's / Neuronpedia's graph
schema: ``metadata``, ``qParams``, ``nodes``, ``links``, plus interplab's ``interplab`` extras) shown as its
pruned graph laid out by layer and position, with pinned nodes and labelled supernodes saved back into the
file's ``qParams`` (`save_qparams`).

It keeps `interplab.web.runs`' guarantees: ``graph.json`` is read only when it stays inside the ``--runs``
folder the run was found under and is not over `MAX_GRAPH_BYTES`; a missing or damaged file shows as a clear
message, never as an error, and every field of every node and link is checked (`graph_view`): a string is
text (the page writes it with ``textContent``, never as markup), a number is finite and bounded, and a node
or link of another shape is left out and counted.

    view = graph_view(run_folder, runs_root)
    view["nodes"][0]["kind"], view["links"][0]["weight"]
('feature', 0.73)
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from interplab import runs
from interplab.features.database import database_key, database_link, is_url
from interplab.io import atomic_write_json
from interplab.runs import GRAPH_JSON, Kind
from interplab.web.api import INT64_MAX
from interplab.web.runs import Artifact, contained, read_bytes, read_json, reader

MAX_GRAPH_BYTES = 50 * 2**20
"""a larger graph.json is not loaded by the page"""
MAX_NODES = 5000
"""nodes the viewer lays out (a pruned graph has hundreds; the rest are counted as left out)"""
MAX_LINKS = 50_000
"""links the viewer draws: the strongest by |weight| when a graph has more"""
MAX_TOKENS = 1024
MAX_POSITION = 1_000_000
MAX_LAYER = 100_000
MAX_ID = 200
MAX_LABEL = 200
MAX_PINS = 5000
MAX_SUPERNODES = 1000

FEATURE, ERROR, EMBEDDING, LOGIT = "feature", "error", "embedding", "logit"
_CANTOR_LIMIT = 2**62
RunIndex = Annotated[int, PathParam(ge=0, le=INT64_MAX)]


def _num(v: Any) -> float | None:
    """A finite number as float (None otherwise; booleans are not numbers)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        f = float(v)
    except OverflowError:  # an integer too large for a float
        return None
    return f if math.isfinite(f) else None


def _int(v: Any, lo: int, hi: int) -> int | None:
    """An integer in [lo, hi] (an integral float counts; a string of digits too), else None."""
    if isinstance(v, str) and re.fullmatch(r"-?\d{1,12}", v.strip()):
        v = int(v.strip())
    f = _num(v)
    if f is None or f != int(f) or not lo <= f <= hi:
        return None
    return int(f)


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _text(v: Any, limit: int) -> str:
    return v[:limit] if isinstance(v, str) else ""


def _kind(node: Mapping[str, Any]) -> str:
    ftype = _text(node.get("feature_type"), 100).lower()
    if ftype == "logit":
        return LOGIT
    if ftype == "embedding" or node.get("layer") == "E":
        return EMBEDDING
    if "error" in ftype:
        return ERROR
    return FEATURE


def feature_index(node_id: str, layer: int, position: int, feature: Any) -> int | None:
    """A feature node's index among its layer's latents. circuit-tracer writes the id
    ``"{layer}_{feature}_{position}"`` and, in ``feature``, the Cantor pairing of (layer, feature): the id
    is read first, the pairing inverted second, and ``feature`` itself is taken when neither fits."""
    m = re.fullmatch(r"(\d+)_(\d+)_(\d+)", node_id)
    if m and int(m.group(1)) == layer and int(m.group(3)) == position:
        return int(m.group(2))
    z = _int(feature, 0, _CANTOR_LIMIT)
    if z is None:
        return None
    w = (math.isqrt(8 * z + 1) - 1) // 2
    y = z - w * (w + 1) // 2
    return y if w - y == layer else z


def _node(raw: Any) -> dict[str, Any] | None:
    """One node of graph.json as the page shows it, or None when it lacks what the layout needs."""
    if not isinstance(raw, dict):
        return None
    node_id = raw.get("node_id")
    if not isinstance(node_id, str) or not 0 < len(node_id) <= MAX_ID:
        return None
    kind = _kind(raw)
    position = _int(raw.get("ctx_idx"), 0, MAX_POSITION)
    if position is None:
        return None
    layer = None if kind in (EMBEDDING, LOGIT) else _int(raw.get("layer"), 0, MAX_LAYER)
    if kind in (FEATURE, ERROR) and layer is None:
        return None
    out: dict[str, Any] = {
        "id": node_id,
        "kind": kind,
        "layer": layer,
        "position": position,
        "feature": None,
        "activation": _num(raw.get("activation")),
        "influence": _num(raw.get("influence")),
        "label": _text(raw.get("clerp"), 500),
    }
    if kind == FEATURE and layer is not None:
        out["feature"] = feature_index(node_id, layer, position, raw.get("feature"))
    elif kind in (LOGIT, EMBEDDING):
        out["token_id"] = _int(raw.get("feature"), 0, _CANTOR_LIMIT) if kind == LOGIT else None
    if kind == LOGIT:
        out["probability"] = _num(raw.get("token_prob"))
        out["target"] = raw.get("is_target_logit") is True
    return out


def _links(raw: Any, ids: set[str]) -> tuple[list[dict[str, Any]], int, int]:
    """The links between known nodes with a finite weight (the `MAX_LINKS` strongest), how many were left
    out as malformed, and how many as beyond the limit."""
    good: list[dict[str, Any]] = []
    bad = 0
    for link in raw if isinstance(raw, list) else []:
        if not isinstance(link, dict):
            bad += 1
            continue
        s, t, w = link.get("source"), link.get("target"), _num(link.get("weight"))
        if not (isinstance(s, str) and isinstance(t, str) and s in ids and t in ids and w is not None):
            bad += 1
            continue
        good.append({"source": s, "target": t, "weight": w})
    over = max(0, len(good) - MAX_LINKS)
    if over:
        good = sorted(good, key=lambda e: -abs(e["weight"]))[:MAX_LINKS]
    return good, bad, over


def _qparams(raw: Any, ids: set[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """Pinned ids and supernodes (``[[label, id, ...], ...]``) of ``qParams``, keeping only known nodes."""
    q = _dict(raw)
    pins = q.get("pinnedIds")
    pinned = (
        list(dict.fromkeys(p for p in pins if isinstance(p, str) and p in ids))
        if isinstance(pins, list)
        else []
    )
    groups = []
    taken: set[str] = set()
    supernodes = q.get("supernodes")
    for sn in supernodes if isinstance(supernodes, list) else []:
        if not (isinstance(sn, list) and sn and isinstance(sn[0], str)):
            continue
        members = [m for m in dict.fromkeys(sn[1:]) if isinstance(m, str) and m in ids and m not in taken]
        if members:
            taken.update(members)
            groups.append({"label": sn[0][:MAX_LABEL], "members": members})
    return pinned, groups[:MAX_SUPERNODES]


def read_graph(folder: Path, root: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The parsed ``graph.json`` of ``folder`` and None, or None and why it cannot be shown."""
    data = read_bytes(folder / GRAPH_JSON, root, MAX_GRAPH_BYTES)
    if data is None:
        return None, (
            f"no {GRAPH_JSON} here (it is missing, unreadable, outside the --runs folder or larger than "
            f"{MAX_GRAPH_BYTES // 2**20} MB)"
        )
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as err:
        return None, f"{GRAPH_JSON} is not JSON ({str(err)[:200]})"
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        return None, f"{GRAPH_JSON} is not an attribution graph: it has no list of nodes"
    return doc, None


def _served_name(db: Any, folder: Path, served: Mapping[Path | str, str]) -> dict[str, Any] | None:
    if not isinstance(db, str) or not db or "\x00" in db:
        return None
    try:
        if is_url(db):
            return {"path": database_link(db)[:1000], "name": served.get(database_key(db))}
        path = Path(db) if Path(db).is_absolute() else folder / db
        name = served.get(path.resolve())
    except (OSError, RuntimeError, ValueError):
        name = None
    return {"path": db[:1000], "name": name}


def feature_links(extras: Any, folder: Path, served: Mapping[Path | str, str]) -> dict[str, Any]:
    """Where the graph's feature nodes link to, from its ``interplab`` extras: ``feature_db``, one database
    of every layer's latents (a node's index there is ``layer * d_sae + feature`` when ``d_sae`` is given,
    else ``feature``), or ``feature_dbs``, one database per layer (``{"0": path, ...}``, index ``feature``).
    A path is relative to the graph's folder unless absolute, a URL (``postgresql://...``) is shown without
    its password and matched to a served database by `interplab.features.database.database_key`; ``name`` is the database's name in this app
    when it is served (None when not). ``{"path": None, ...}`` when the graph links none."""
    extras = extras if isinstance(extras, dict) else {}
    out: dict[str, Any] = {"path": None, "name": None, "d_sae": None, "layers": {}}
    one = _served_name(extras.get("feature_db"), folder, served)
    if one is not None:
        out.update(one)
        out["d_sae"] = _int(extras.get("d_sae"), 1, _CANTOR_LIMIT)
    per_layer = extras.get("feature_dbs")
    if isinstance(per_layer, dict):
        for k, v in list(per_layer.items())[:MAX_LAYER]:
            layer, db = _int(k, 0, MAX_LAYER), _served_name(v, folder, served)
            if layer is not None and db is not None:
                out["layers"][str(layer)] = db
    return out


def feature_page(links: Mapping[str, Any], layer: int | None, feature: int | None) -> dict[str, Any] | None:
    """The served database and index of a feature node (`feature_links`): ``{"db", "index"}`` or None when
    its database is not linked; ``db`` is None when it is linked but not served here."""
    if layer is None or feature is None:
        return None
    per_layer = links["layers"].get(str(layer))
    if per_layer is not None:
        return {"db": per_layer["name"], "path": per_layer["path"], "index": feature}
    if links["path"] is None:
        return None
    d_sae = links["d_sae"]
    index = layer * d_sae + feature if d_sae is not None and feature < d_sae else feature
    return {"db": links["name"], "path": links["path"], "index": index}


LabelsOf = Callable[[str], Mapping[int, str]]
"""a served feature database's explanations by feature index (`graph_view` labels feature nodes with them)"""


def graph_view(
    folder: Path, root: Path, served: Mapping[Path | str, str] | None = None, labels: LabelsOf | None = None
) -> dict[str, Any]:
    """What the viewer shows of the graph in ``folder``: ``error`` (a message, or None), the prompt and its
    tokens, the nodes (``id``, ``kind`` feature | error | embedding | logit, ``layer``, ``position``,
    ``feature``, ``activation``, ``influence``, ``label``), the links (``source``, ``target``, ``weight``),
    the saved ``pinned`` ids and ``supernodes`` (``label``, ``members``), the feature database it links,
    its scores and settings, and how many nodes and links were ``left_out`` (malformed, or over the limits).
    A feature node without a label (``clerp``) takes its explanation in its served database (``labels``).

    Every value is plain (str, finite number, bool, None, lists and dicts of those)."""
    view: dict[str, Any] = {
        "error": None,
        "prompt": "",
        "tokens": [],
        "nodes": [],
        "links": [],
        "pinned": [],
        "supernodes": [],
        "feature_db": {"path": None, "name": None, "d_sae": None, "layers": {}},
        "info": {},
        "left_out": {"nodes": 0, "links": 0, "links_over_limit": 0, "nodes_over_limit": 0},
    }
    doc, error = read_graph(folder, root)
    if doc is None:
        view["error"] = error
        return view
    meta = _dict(doc.get("metadata"))
    tokens = meta.get("prompt_tokens")
    view["tokens"] = [_text(t, 100) for t in tokens[:MAX_TOKENS]] if isinstance(tokens, list) else []
    view["prompt"] = _text(meta.get("prompt"), 5000)
    nodes, seen, bad = [], set(), 0
    for raw in doc["nodes"]:
        node = _node(raw)
        if node is None or node["id"] in seen:
            bad += 1
            continue
        seen.add(node["id"])
        nodes.append(node)
    over = max(0, len(nodes) - MAX_NODES)
    if (
        over
    ):  # keep the logits, the embeddings and the most influential features (lowest cumulative influence)
        nodes.sort(key=lambda n: (n["kind"] not in (LOGIT, EMBEDDING), n["influence"] or 0.0))
        nodes = nodes[:MAX_NODES]
        seen = {n["id"] for n in nodes}
    links, bad_links, links_over = _links(doc.get("links"), seen)
    view["nodes"], view["links"] = nodes, links
    view["pinned"], view["supernodes"] = _qparams(doc.get("qParams"), seen)
    view["left_out"] = {
        "nodes": bad,
        "nodes_over_limit": over,
        "links": bad_links,
        "links_over_limit": links_over,
    }
    extras = doc.get("interplab")
    links_to = feature_links(extras, folder, served or {})
    view["feature_db"] = links_to
    explanations: dict[str, Mapping[int, str]] = {}
    for n in nodes:
        if n["kind"] == FEATURE:
            n["page"] = page = feature_page(links_to, n["layer"], n["feature"])
            if labels is not None and page is not None and page["db"] is not None and not n["label"]:
                if page["db"] not in explanations:
                    explanations[page["db"]] = labels(page["db"])
                n["label"] = _text(explanations[page["db"]].get(page["index"]), 500)
    info = {k: meta.get(k) for k in ("slug", "scan", "node_threshold", "schema_version")}
    pruning = _dict(meta.get("pruning_settings"))
    info["edge_threshold"] = pruning.get("edge_threshold")
    report = _dict(read_json(folder / runs.REPORT, root))  # `interplab graph build`'s: the scores
    scores = _dict(report.get("scores"))
    info["replacement score"], info["completeness score"] = (
        scores.get("replacement"),
        scores.get("completeness"),
    )
    for key in ("run", "clt"):
        info[key] = _dict(extras).get(key)
    view["info"] = {
        k.replace("_", " "): v if not isinstance(v, str) else v[:300]
        for k, v in info.items()
        if isinstance(v, str) or _num(v) is not None
    }
    return view


# --- saving pins and supernodes -----------------------------------------------------------------------------


class GraphQParams(BaseModel):
    """What the viewer saves: the pinned node ids and the supernodes (``[label, node_id, ...]``)."""

    at: str = Field(default="", max_length=1000)
    """the graph's folder relative to the run's ("" is the run itself)"""
    pinnedIds: list[Annotated[str, Field(max_length=MAX_ID)]] = Field(default=[], max_length=MAX_PINS)  # noqa: N815
    supernodes: list[list[Annotated[str, Field(max_length=MAX_ID)]]] = Field(  # noqa: N815
        default=[], max_length=MAX_SUPERNODES
    )


def check_qparams(doc: dict[str, Any], pinned: list[str], supernodes: list[list[str]]) -> list[list[str]]:
    """``supernodes`` cleaned (labels stripped), after checking that every id is a node of ``doc`` and none
    is in two supernodes; raises ValueError naming the first bad value."""
    ids = {n.get("node_id") for n in doc["nodes"] if isinstance(n, dict)}
    for p in pinned:
        if p not in ids:
            raise ValueError(f"pinned id {p[:80]!r} is not a node of this graph")
    out, taken = [], set()
    for sn in supernodes:
        if len(sn) < 2:
            raise ValueError(f"supernode {sn[:1]!r} has no members: give [label, node_id, ...]")
        label = sn[0].strip()
        if not label or len(label) > MAX_LABEL:
            raise ValueError(f"supernode label {sn[0][:80]!r} must be 1 to {MAX_LABEL} characters")
        for m in sn[1:]:
            if m not in ids:
                raise ValueError(f"supernode {label[:80]!r}: {m[:80]!r} is not a node of this graph")
            if m in taken:
                raise ValueError(f"node {m[:80]!r} is in two supernodes")
            taken.add(m)
        out.append([label, *sn[1:]])
    return out


def save_qparams(folder: Path, root: Path, pinned: list[str], supernodes: list[list[str]]) -> dict[str, Any]:
    """Write ``pinned`` and ``supernodes`` into the ``qParams`` of ``folder``'s ``graph.json`` atomically
    (the rest of the file, the other ``qParams`` included, is kept). The file must stay inside ``root``.
    Raises FileNotFoundError (no graph there), ValueError (a bad id or label) or PermissionError."""
    real = contained(folder / GRAPH_JSON, root)
    if real is None or not real.is_file():
        raise FileNotFoundError(f"no {GRAPH_JSON} in this folder")
    doc, error = read_graph(folder, root)
    if doc is None:
        raise ValueError(error)
    groups = check_qparams(doc, pinned, supernodes)
    q = doc["qParams"] if isinstance(doc.get("qParams"), dict) else {}
    doc["qParams"] = {**q, "pinnedIds": list(dict.fromkeys(pinned)), "supernodes": groups}
    try:
        atomic_write_json(real, doc)
    except OSError as err:
        raise PermissionError(f"{GRAPH_JSON} cannot be written here ({err.strerror or err})") from None
    return {"pinnedIds": doc["qParams"]["pinnedIds"], "supernodes": groups}


# --- routes -------------------------------------------------------------------------------------------------


def graph_folder(art: Artifact, at: str) -> Path:
    """The folder ``at`` (relative) inside run ``art`` that holds a graph (a graph.json, or the report of
    `interplab graph build` without it: the page says what is missing), or HTTP 404."""
    missing = HTTPException(404, f"run {art.name!r} has no attribution graph at {at[:200]!r}")
    if "\x00" in at or Path(at).is_absolute():
        raise missing
    real = contained(art.path / at, art.root)
    if real is None or not real.is_dir() or not (real == art.path or real.is_relative_to(art.path)):
        raise missing
    if (
        contained(real / GRAPH_JSON, art.root) is None
        and runs.detect(real, reader(art.root)) is not Kind.ATTRIBUTION_GRAPH
    ):
        raise missing
    return real


def add_routes(
    app: FastAPI,
    artifact: Callable[[int], Artifact],
    page: Callable[..., Any],
    served: Mapping[Path | str, str],
    read_only: bool | None = None,
    labels: LabelsOf | None = None,
) -> None:
    """``GET /run/<i>/graph?at=<folder>``: the viewer of a graph inside run ``i`` (a run holding several);
    ``POST /api/run/<i>/graph``: save its pins and supernodes (`GraphQParams`). ``read_only=True`` refuses
    saving. Both answer only for folders inside the run (`graph_folder`)."""
    lock = threading.Lock()

    @app.get("/run/{index}/graph")
    def graph_page(request: Request, index: RunIndex, at: Annotated[str, Query(max_length=1000)] = ""):
        art = artifact(index)
        folder = graph_folder(art, at)
        view = graph_view(folder, art.root, served, labels)
        where = str(folder.relative_to(art.path)) if folder != art.path else ""
        return page(request, "graph.html", art=art, index=index, graph=view, graph_at=where)

    @app.post("/api/run/{index}/graph")
    def save_graph(index: RunIndex, body: GraphQParams):
        art = artifact(index)
        if read_only:
            raise HTTPException(403, "the app is serving runs read-only: pins and supernodes cannot be saved")
        folder = graph_folder(art, body.at)
        try:
            with lock:
                return save_qparams(folder, art.root, body.pinnedIds, body.supernodes)
        except FileNotFoundError as err:
            raise HTTPException(404, str(err)) from None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        except PermissionError as err:
            raise HTTPException(403, str(err)) from None
