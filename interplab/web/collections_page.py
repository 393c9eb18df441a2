"""Pages over whole databases: the feature map, user-made feature lists (with JSON/CSV export), and one
feature index compared across every served database (the SAEs of a sweep), with each SAE's run linked.

Routes: ``/db/<name>/map``, ``/db/<name>/similar?q=`` (explanations nearest in meaning), ``/db/<name>/lists``, ``/db/<name>/lists/<id>`` (+ ``.json``, ``.csv``),
``/compare/<i>``; JSON API: POST ``/api/db/<name>/lists`` (create), ``/api/db/<name>/lists/<id>/items``
(add, or replace a note), ``.../remove``, ``.../order``, ``.../delete``. Every write goes through the
database's label writer, so a read-only database refuses it (403), and through the app's guard (same origin).
"""

from __future__ import annotations

import csv
import io
import json
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from interplab.features.clusters import MINILM, ExplanationClusters, cluster_explanations
from interplab.features.database import ReadOnlyDatabase
from interplab.features.feature_map import decoder_pca
from interplab.features.reader import MAX_QUERY, FeatureNotFound
from interplab.features.scorers import ScorerError, sentence_model
from interplab.web.api import INT64_MAX, FeatureIndex
from interplab.web.runs import Artifact
from interplab.web.views import Links, context_html

if TYPE_CHECKING:  # app.py imports this module
    from interplab.web.app import Resources

ListId = Annotated[int, PathParam(ge=0, le=INT64_MAX)]
MAP_META = "feature_map"
"""the ``meta`` key a writable database caches its map in (PCA coordinates of the decoder directions)"""


class ListIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=2000)


class ItemIn(BaseModel):
    feature: int = Field(ge=0, le=INT64_MAX)
    note: str = Field(default="", max_length=2000)


class OrderIn(BaseModel):
    features: list[int] = Field(max_length=100_000)


def sae_artifact(meta: dict[str, Any], artifacts: Sequence[Artifact]) -> int | None:
    """The index of the served run holding the database's SAE (``meta.sae_path``: the SAE's folder, or
    the ``sae train`` run folder above it), the deepest such run; None when it is not served."""
    recorded = meta.get("sae_path")
    if not recorded:
        return None
    sae = Path(recorded).resolve()
    best: tuple[int, int] | None = None
    for i, a in enumerate(artifacts):
        if sae == a.path or sae.is_relative_to(a.path):
            depth = len(a.path.parts)
            if best is None or depth > best[0]:
                best = (depth, i)
    return None if best is None else best[1]


def add_routes(
    app: FastAPI,
    res: Resources,
    page: Callable[..., HTMLResponse],
    links: Callable[[str], Links],
    artifacts: Sequence[Artifact],
) -> None:
    maps: dict[str, list[list[float]]] = {}
    models: dict[str, Any] = {}
    lock = threading.Lock()

    def coordinates(db: str) -> list[list[float]] | None:
        """The map of database ``db``: cached in its meta (when writable) or in memory; None without an SAE."""
        with lock:
            if db in maps:
                return maps[db]
            cached = res.meta[db].get(MAP_META)
            if cached is None:
                try:
                    sae = res.sae(db)
                except (ImportError, OSError, ValueError, KeyError):
                    sae = None
                if sae is None:
                    return None
                cached = [[round(float(v), 5) for v in p] for p in decoder_pca(sae).tolist()]
                writer = res.writers.get(db)
                if writer is not None:
                    writer.set_meta(**{MAP_META: cached})
                    res.meta[db][MAP_META] = cached
            maps[db] = cached
            return cached

    clustered: dict[str, tuple[tuple[str, ...], ExplanationClusters]] = {}

    def explanation_clusters(db: str, texts: tuple[str, ...]) -> ExplanationClusters:
        """The clusters of the map's explanations: all-MiniLM-L6-v2 embeddings when the ``judge`` extra is
        installed (the model `similar` uses), else TF-IDF; cached until the explanations change."""
        with lock:
            if db in clustered and clustered[db][0] == texts:
                return clustered[db][1]
            if "model" not in models:
                try:
                    models["model"] = sentence_model()
                except ScorerError:
                    models["model"] = None
            model = models["model"]
        embed = (lambda t: model.encode(t, normalize_embeddings=True)) if model is not None else None
        found = cluster_explanations(texts, embed=embed, method=MINILM if embed else None)
        with lock:
            clustered[db] = (texts, found)
        return found

    @app.get("/db/{db}/map", response_class=HTMLResponse)
    def map_page(
        request: Request, db: str, colour: Annotated[str, Query(pattern="^(density|cluster)$")] = "density"
    ):
        store = res.store(db)
        xy = coordinates(db)
        points: list[list[Any]] = []
        clusters: list[dict[str, Any]] | None = None
        method, has_explanations = None, False
        if xy is not None:
            rows = {r["feature"]: r for r in store.list_features(limit=len(xy) + 1)}
            for f, (x, y) in enumerate(xy):
                r = rows.get(f)
                if r is None:
                    continue
                d = float(r["density"])
                points.append([f, x, y, math.log10(d) if d > 0 else None, r["explanation"] or "", None])
            explained = [p for p in points if p[4]]
            has_explanations = bool(explained)
            # clustering may load a sentence model (seconds): only when the cluster colouring is asked for
            if explained and colour == "cluster":
                found = explanation_clusters(db, tuple(p[4] for p in explained))
                for p, c in zip(explained, found.labels, strict=True):
                    p[5] = c
                clusters = [{"name": n, "size": s} for n, s in zip(found.names, found.sizes, strict=True)]
                method = found.method
        return page(
            request,
            "map.html",
            db=db,
            links=links(db),
            points=points,
            clusters=clusters,
            method=method,
            colour=colour,
            has_explanations=has_explanations,
            has_sae=xy is not None,
        )

    # ---- lists ----------------------------------------------------------------------------------
    def list_or_404(db: str, list_id: int) -> dict[str, Any]:
        found = res.store(db).feature_list(list_id)
        if found is None:
            raise HTTPException(404, f"database {db!r} has no feature list {list_id}")
        return found

    @app.get("/db/{db}/lists", response_class=HTMLResponse)
    def lists_page(request: Request, db: str):
        store = res.store(db)
        writable = res.writers.get(db) is not None
        return page(
            request, "lists.html", db=db, links=links(db), lists=store.feature_lists(), writable=writable
        )

    @app.get("/db/{db}/lists/{list_id}", response_class=HTMLResponse)
    def list_page(request: Request, db: str, list_id: ListId):
        found = list_or_404(db, list_id)
        writable = res.writers.get(db) is not None
        return page(request, "flist.html", db=db, links=links(db), lst=found, writable=writable)

    @app.get("/db/{db}/lists/{list_id}/export.json")
    def list_json(db: str, list_id: ListId):
        found = list_or_404(db, list_id)
        body = {"database": db, **found}
        return Response(
            json.dumps(body, indent=1),
            media_type="application/json",
            headers={"Content-Disposition": f'attachment; filename="{db}-list-{list_id}.json"'},
        )

    @app.get("/db/{db}/lists/{list_id}/export.csv")
    def list_csv(db: str, list_id: ListId):
        found = list_or_404(db, list_id)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["position", "feature", "note", "explanation"])
        for it in found["items"]:
            w.writerow([it["position"], it["feature"], _cell(it["note"]), _cell(it["explanation"] or "")])
        return Response(
            buf.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{db}-list-{list_id}.csv"'},
        )

    def write(db: str, fn: Callable[[Any], Any]) -> Any:
        try:
            return fn(res.writer(db))
        except ReadOnlyDatabase as err:
            raise HTTPException(403, str(err).replace("labels", "lists")) from None
        except FeatureNotFound as err:
            raise HTTPException(404, f"feature {err.args[0]} is not in database {db!r}") from None
        except KeyError as err:
            raise HTTPException(404, str(err.args[0])) from None
        except ValueError as err:
            raise HTTPException(422, str(err)) from None

    @app.post("/api/db/{db}/lists")
    def api_create_list(db: str, body: ListIn):
        return {"id": write(db, lambda w: w.create_list(body.name, body.description))}

    @app.post("/api/db/{db}/lists/{list_id}/items")
    def api_add(db: str, list_id: ListId, body: ItemIn):
        write(db, lambda w: w.add_to_list(list_id, body.feature, body.note))
        return list_or_404(db, list_id)

    @app.post("/api/db/{db}/lists/{list_id}/remove")
    def api_remove(db: str, list_id: ListId, body: ItemIn):
        write(db, lambda w: w.remove_from_list(list_id, body.feature))
        return list_or_404(db, list_id)

    @app.post("/api/db/{db}/lists/{list_id}/order")
    def api_order(db: str, list_id: ListId, body: OrderIn):
        write(db, lambda w: w.reorder_list(list_id, body.features))
        return list_or_404(db, list_id)

    @app.post("/api/db/{db}/lists/{list_id}/delete")
    def api_delete(db: str, list_id: ListId):
        write(db, lambda w: w.delete_list(list_id))
        return {"deleted": list_id}

    # ---- search by embedding similarity of explanations ---------------------------------------------
    embedded: dict[str, tuple[tuple[str, ...], list[int], Any]] = {}

    def similar(db: str, query: str, limit: int = 50) -> list[dict[str, Any]]:
        """Features whose explanation (label) is nearest to ``query`` in all-MiniLM-L6-v2's embedding (the
        scorers' `sentence_model`), by cosine; the explanations' embeddings are cached until they change."""
        labels = res.store(db).labels()
        features = sorted(labels)
        texts = tuple(labels[f]["explanation"] for f in features)
        if not texts:
            return []
        with lock:
            if models.get("model") is None:
                models["model"] = sentence_model()
            model = models["model"]
            if db not in embedded or embedded[db][0] != texts:
                embedded[db] = (texts, features, model.encode(list(texts), normalize_embeddings=True))
            _, feats, vectors = embedded[db]
            q = model.encode([query], normalize_embeddings=True)[0]
        sims = vectors @ q
        order = sorted(range(len(feats)), key=lambda i: (-float(sims[i]), feats[i]))[:limit]
        return [{"feature": feats[i], "text": texts[i], "similarity": float(sims[i])} for i in order]

    @app.get("/db/{db}/similar", response_class=HTMLResponse)
    def similar_page(request: Request, db: str, q: Annotated[str, Query(max_length=MAX_QUERY)] = ""):
        res.store(db)
        hits, error = [], None
        if q.strip():
            try:
                hits = similar(db, q.strip())
            except ScorerError as err:
                error = str(err)
        return page(request, "similar.html", db=db, links=links(db), q=q, hits=hits, error=error)

    # ---- one feature across databases -------------------------------------------------------------
    @app.get("/compare/{index}", response_class=HTMLResponse)
    def compare_page(request: Request, index: FeatureIndex):
        columns = []
        for name, store in res.stores.items():
            meta = res.meta[name]
            col: dict[str, Any] = {
                "db": name,
                "meta": meta,
                "run": sae_artifact(meta, artifacts),
                "rec": None,
            }
            try:
                rec = store.feature(index)
            except FeatureNotFound:
                columns.append(col)
                continue
            vocab, center = store.vocab(), int(meta.get("window_left", 0))
            scale = float(rec["max_act"]) or 1.0
            col["rec"] = rec
            col["top"] = [context_html(c, vocab, center, scale) for c in rec["top"][:5]]
            columns.append(col)
        return page(request, "compare.html", index=index, columns=columns)


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet will not run as a formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
