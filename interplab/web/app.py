"""The feature explorer: a FastAPI app over feature databases and run directories (``interplab serve``).

>>> app = create_app(["features.db"], runs=["runs/"])
>>> import uvicorn
>>> uvicorn.run(app, host="127.0.0.1", port=8000)   # serves until stopped  # doctest: +SKIP

Pages: ``/`` (databases, runs, models, SAEs), ``/db/<name>/`` (feature list), ``/db/<name>/feature/<i>``,
``/db/<name>/search``, ``/db/<name>/random``, ``/run/<i>`` (training curves, formation plots, scrubbed
hypotheses ...), ``/run/<i>/files/<path>`` (a run's report pages and pictures, sandboxed),
``/run/<i>/dt/frame/<e>/<t>.png`` (a decision-transformer run's grid view of episode e, step t),
``/run/<i>/graph?at=<folder>`` (an attribution graph inside a run; a graph run's own page shows it),
``/attention`` (attention patterns for a typed prompt). JSON API under ``/api``: a feature, its label
(POST to edit), steering (POST), attention patterns (POST), an attribution graph's pins and supernodes
(POST ``/api/run/<i>/graph``). No asset comes from the network.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from interplab.features.database import ReadOnlyDatabase, database_key, is_url
from interplab.features.reader import MAX_QUERY, FeatureNotFound, FeatureReader
from interplab.features.steer import DEFAULT_STRENGTH
from interplab.features.writer import FeatureWriter, label_writer
from interplab.model import Transformer
from interplab.model.load import load_model
from interplab.plots import PLOTLY_JS, plotly_js_source
from interplab.sae import SAE, load_sae
from interplab.web import api, collections_page, graph_page
from interplab.web.api import INT64_MAX, FeatureIndex
from interplab.web.dt_page import db_frame, dt_feature_view, dt_view, player_frame
from interplab.web.guard import HostOriginGuard, normalise_allowed
from interplab.web.run_page import run_view
from interplab.web.runs import Artifact, contained, find_artifacts, read_bytes
from interplab.web.views import (
    Links,
    crosscoder_view,
    feature_view,
    format_number,
    json_for_html,
    summary_rows,
)

WEB_DIR = Path(__file__).parent
PAGE_SIZE = 100
PageNo = Annotated[int, Query(ge=0, le=INT64_MAX // PAGE_SIZE - 1)]
SearchText = Annotated[str, Query(max_length=MAX_QUERY)]
RunIndex = Annotated[int, PathParam(ge=0, le=INT64_MAX)]


REPORT_FILES = {".html": "text/html; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}
"""the files of a run folder the app serves (``/run/<i>/files/...``): its report pages and pictures"""
MAX_REPORT_BYTES = 50 * 2**20
REPORT_POLICY = (
    "sandbox allow-scripts; default-src 'none'; script-src 'self' 'unsafe-inline'; "
    "style-src 'unsafe-inline'; img-src 'self' data:; font-src data:; connect-src 'none'; form-action 'none'"
)
"""Content-Security-Policy of a served report: a page written into a run folder is not the app's own page,
so it runs sandboxed (an opaque origin: it can neither read the app's pages nor send it labels, which the
guard refuses from origin ``null``), may load scripts only from this server (plotly.js) and its own inline
ones, and can reach nothing else"""


def templates() -> Jinja2Templates:
    t = Jinja2Templates(directory=str(WEB_DIR / "templates"))
    t.env.add_extension("jinja2.ext.do")
    t.env.globals["fmt"] = format_number
    t.env.filters["json_script"] = json_for_html
    return t


def _url_database(url: str) -> str:
    """The database name of a URL (``postgresql://u@h/layer3`` -> ``layer3``): what the app calls it."""
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]


class Resources:
    """Feature databases by name (a `FeatureReader` each, and a `FeatureWriter` for labels where it can be
    written), and the model / SAEs they were built from (loaded on first use)."""

    def __init__(
        self,
        dbs: Sequence[str | Path],
        model: Transformer | str | Path | None = None,
        sae: SAE | str | Path | None = None,
        read_only: bool | None = None,
    ) -> None:
        self.stores: dict[str, FeatureReader] = {}
        self.writers: dict[str, FeatureWriter | None] = {}
        for db in dbs:
            # the writer first (opening it migrates an older schema); none where the file cannot be written
            writer = label_writer(db, read_only=read_only)
            store = FeatureReader(db)
            raw = _url_database(str(db)) if is_url(db) else Path(db).stem
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", raw) or "db"  # a URL path segment: no ? # % / in it
            while name in self.stores:
                name += "_"
            self.stores[name], self.writers[name] = store, writer
        self._model, self._sae = model, sae
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.meta = {name: s.meta() for name, s in self.stores.items()}

    def store(self, name: str) -> FeatureReader:
        if name not in self.stores:
            raise HTTPException(404, f"no feature database named {name!r}; served: {sorted(self.stores)}")
        return self.stores[name]

    def writer(self, name: str) -> FeatureWriter:
        """The writer of labels for database ``name`` (`ReadOnlyDatabase` when it is served read-only)."""
        self.store(name)
        writer = self.writers[name]
        if writer is None:
            raise ReadOnlyDatabase(f"database {name!r} is served read-only: labels cannot be saved")
        return writer

    def _load(self, key: str, value: Any, loader: Callable[[Any], Any]) -> Any:
        if value is None or not isinstance(value, (str, Path)):
            return value
        with self._lock:
            if key not in self._loaded:
                self._loaded[key] = loader(value)
            return self._loaded[key]

    def model(self, db: str | None = None) -> Transformer | None:
        recorded = self.meta.get(db, {}) if db is not None else {}
        source = self._model if self._model is not None else recorded.get("model_path")
        if source is None:
            first = next((m.get("model_path") for m in self.meta.values() if m.get("model_path")), None)
            source = first
        return self._load(f"model:{source}", source, load_model)

    def sae(self, db: str) -> SAE | None:
        source = self._sae if self._sae is not None else self.meta[db].get("sae_path")
        return self._load(f"sae:{source}", source, load_sae)


def create_app(
    dbs: Sequence[str | Path] = (),
    *,
    runs: Sequence[str | Path] = (),
    model: Transformer | str | Path | None = None,
    sae: SAE | str | Path | None = None,
    read_only: bool | None = None,
    allowed_hosts: Sequence[str] = (),
) -> FastAPI:
    """The web app. ``model``/``sae`` (objects or folders) serve steering and attention views; by default the
    paths recorded in each database are used. Databases open read-only where they cannot be written
    (``read_only=None``), or as ``read_only`` says; labels cannot be saved to a read-only one.

    Requests are answered only for loopback host names and ``allowed_hosts``, and state-changing requests
    only from the app's own origin (`interplab.web.guard`)."""
    res = Resources(dbs, model=model, sae=sae, read_only=read_only)
    tpl = templates()
    app = FastAPI(title="interplab feature explorer", docs_url="/api/docs", redoc_url=None)
    app.state.resources = res
    app.add_middleware(
        HostOriginGuard, allowed_hosts=normalise_allowed(allowed_hosts)
    )  # refuses bad names now
    app.mount("/static", StaticFiles(directory=str(WEB_DIR / "static")), name="static")
    roots = [Path(r) for r in runs]
    artifacts: list[Artifact] = find_artifacts(roots)
    served: dict[Path | str, str] = {  # database file or URL -> its name here, to link runs to its pages
        database_key(db): name for db, name in zip(dbs, res.stores, strict=True)
    }

    @app.get("/static-vendor/plotly.min.js", include_in_schema=False)
    def _plotly():
        return FileResponse(
            plotly_js_source(),  # the plotly package's own bundle: served locally, never from a CDN
            media_type="application/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    def links(db: str) -> Links:
        return Links(base=f"/db/{db}", static_base="/static", home_url="/")

    def page(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        ctx.setdefault("links", Links(base="", static_base="/static", home_url="/"))
        ctx.setdefault("plotly_url", "/static-vendor/plotly.min.js")
        ctx.setdefault("static_site", False)
        return tpl.TemplateResponse(request, name, ctx, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
        return page(request, "error.html", status=exc.status_code, code=exc.status_code, message=exc.detail)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": msg}, status_code=422)
        return page(request, "error.html", status=422, code=422, message=msg)

    @app.get("/", response_class=HTMLResponse)
    def home(request: Request):
        dbs_info = []
        for name, store in res.stores.items():
            meta = res.meta[name]
            dbs_info.append(
                {
                    "name": name,
                    "n_features": store.n_features(),
                    "meta": meta,
                    "fingerprint": meta.get("fingerprint", {}),
                }
            )
        return page(request, "home.html", dbs=dbs_info, artifacts=artifacts)

    @app.get("/db/{db}/", response_class=HTMLResponse)
    def feature_list(
        request: Request,
        db: str,
        order: Annotated[str, Query(max_length=40)] = "feature",
        page_no: PageNo = 0,
    ):
        store = res.store(db)
        try:
            rows = store.list_features(order=order, limit=PAGE_SIZE, offset=page_no * PAGE_SIZE)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        return page(
            request,
            "list.html",
            db=db,
            rows=summary_rows(rows, store.vocab()),
            order=order,
            page_no=page_no,
            n=store.n_features(),
            links=links(db),
            meta=res.meta[db],
        )

    @app.get("/db/{db}/feature/{index}", response_class=HTMLResponse)
    def feature_page(request: Request, db: str, index: FeatureIndex):
        store = res.store(db)
        try:
            rec = store.feature(index)
        except FeatureNotFound:
            n = store.n_features()
            raise HTTPException(
                404, f"feature {index} is not in database {db!r} ({n} features: 0..{n - 1})"
            ) from None
        prev, nxt = store.neighbours(index)
        dt = dt_feature_view(rec, res.meta[db], store, roots, f"/db/{db}/dt/frame")  # a DT database's
        crosscoder = crosscoder_view(res.meta[db], index)  # a crosscoder's latent: its sides
        return page(
            request,
            "feature.html",
            db=db,
            prev=prev,
            next=nxt,
            links=links(db),
            meta=res.meta[db],
            steering=dt is None and crosscoder is None,
            dt=dt,
            crosscoder=crosscoder,
            default_strength=DEFAULT_STRENGTH,
            explanations=store.explanations(index),
            sae_run=collections_page.sae_artifact(res.meta[db], artifacts),
            lists=store.feature_lists(),
            writable=res.writers.get(db) is not None,
            **feature_view(rec, res.meta[db], store.vocab(), store.context_loss(index)),
        )

    @app.get("/db/{db}/dt/frame/{episode}/{step}.png")
    def db_dt_frame(db: str, episode: RunIndex, step: RunIndex):
        """A state of a decision transformer's feature database, drawn from its trajectory folder (read only
        inside the --runs folders)."""
        res.store(db)
        data = db_frame(res.meta[db], roots, episode, step)
        if data is None:
            raise HTTPException(404, f"database {db!r} has no picture of episode {episode}, step {step}")
        return Response(data, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/db/{db}/random")
    def random_feature(db: str):
        f = res.store(db).random_feature()
        if f is None:
            raise HTTPException(404, f"database {db!r} has no firing feature")
        return RedirectResponse(f"/db/{db}/feature/{f}", status_code=303)

    @app.get("/search", response_class=HTMLResponse)
    def search_all(request: Request, q: SearchText = ""):
        """Every served database searched at once (a database split by SAE or layer is served as several):
        each hit named ``<database>/<feature>``, so equal feature indices of two databases never collide."""
        hits: list[dict[str, Any]] = []
        if q.strip():
            for name, store in res.stores.items():
                try:
                    found = store.search_text(q.strip())
                except ValueError as err:
                    raise HTTPException(422, str(err)) from None
                hits += [{**h, "db": name, "id": f"{name}/{h['feature']}"} for h in found]
        return page(request, "search_all.html", q=q, hits=hits, dbs=list(res.stores))

    @app.get("/db/{db}/search", response_class=HTMLResponse)
    def search(request: Request, db: str, q: SearchText = "", token: SearchText = ""):
        store = res.store(db)
        token_hits, text_hits, token_id, explanation_hits = [], [], None, []
        if token:
            token_id = store.token_id(token)
            if token_id is not None:
                token_hits = store.search_token(token_id)
        if q.strip():
            try:
                text_hits = store.search_text(q.strip())
                explanation_hits = store.search_explanations(q.strip())
            except ValueError as err:
                raise HTTPException(422, str(err)) from None
        return page(
            request,
            "search.html",
            db=db,
            q=q,
            token=token,
            token_id=token_id,
            token_hits=token_hits,
            text_hits=text_hits,
            explanation_hits=explanation_hits,
            links=links(db),
            labels=store.labels(),
        )

    def explanations(db: str) -> dict[int, str]:  # a served database's labels, for graph nodes
        return {f: row["explanation"] for f, row in res.store(db).labels().items()}

    def artifact(index: int) -> Artifact:
        if not 0 <= index < len(artifacts):
            raise HTTPException(404, f"no run {index}: {len(artifacts)} runs, models and SAEs are listed")
        return artifacts[index]

    @app.get("/run/{index}", response_class=HTMLResponse)
    def run_page(request: Request, index: RunIndex):
        art = artifact(index)
        view = run_view(art)
        databases = [{"path": str(p), "name": served.get(p)} for p in view.pop("databases")]
        for d in view["diffs"]:  # a diff's latent pages: its feature database, where it is served
            db_file = d.pop("database")
            d["db"] = served.get(database_key(db_file)) if db_file is not None else None
            d["db_file"] = str(db_file) if db_file is not None else None
        dt = dt_view(art, artifacts, served)
        graphs = view.pop("graphs")  # the run's own graph is shown in the page, the others linked
        graph = (
            graph_page.graph_view(art.path, art.root, served, explanations) if art.path in graphs else None
        )
        nested = [str(g.relative_to(art.path)) for g in graphs if g != art.path]
        return page(
            request,
            "run.html",
            art=art,
            view=view,
            databases=databases,
            index=index,
            dt=dt,
            graph=graph,
            graph_at="",
            graphs=nested,
        )

    @app.get("/run/{index}/dt/frame/{episode}/{step}.png")
    def dt_frame(index: RunIndex, episode: RunIndex, step: RunIndex):
        """The grid view of one step of a decision-transformer run's trajectory player."""
        data = player_frame(artifact(index), episode, step)
        if data is None:
            raise HTTPException(404, f"run {index} has no picture of episode {episode}, step {step}")
        return Response(data, media_type="image/png", headers={"Cache-Control": "public, max-age=3600"})

    @app.get("/run/{index}/files/{rel:path}")
    def run_file(index: RunIndex, rel: str):
        """A report page or picture inside run ``index`` (`REPORT_FILES`), sandboxed (`REPORT_POLICY`).
        Any ``plotly.min.js`` a page asks for is the app's own bundle, never the folder's copy."""
        art = artifact(index)
        if rel.rsplit("/", 1)[-1] == PLOTLY_JS:
            return _plotly()
        missing = HTTPException(404, f"run {index} has no report file {rel[:200]!r}")
        try:
            real = contained(art.path / rel, art.root)
        except ValueError:  # a NUL byte in the path
            raise missing from None
        kind = REPORT_FILES.get(real.suffix.lower()) if real is not None else None
        if real is None or kind is None or not real.is_relative_to(art.path):
            raise missing
        data = read_bytes(real, art.root, MAX_REPORT_BYTES)
        if data is None:
            raise missing
        headers = {"Content-Security-Policy": REPORT_POLICY, "X-Content-Type-Options": "nosniff"}
        return Response(data, media_type=kind, headers=headers)

    @app.get("/attention", response_class=HTMLResponse)
    def attention_page(request: Request):
        try:
            has_model = res.model() is not None
        except (ImportError, OSError, ValueError):
            has_model = False
        return page(request, "attention.html", has_model=has_model)

    api.add_routes(app, res)
    collections_page.add_routes(app, res, page, links, artifacts)
    graph_page.add_routes(app, artifact, page, served, read_only=read_only, labels=explanations)
    return app
