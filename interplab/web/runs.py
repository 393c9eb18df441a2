"""Read run directories (``log.jsonl``, ``report.json``, ``formation/``, ``sae/``, ``attribution/`` ...) and
model/SAE folders for the web app.

What a folder is, is decided by the run contract, `interplab.runs.detect` (which also recognises folders
written before ``kind`` existed), read through a `runs.Reader` that applies this module's rules below; the
file names are the contract's. A folder the contract does not know but that holds a ``log.jsonl`` or a
``report.json`` is still shown, as a run of unknown kind (its curves and numbers).

Everything here is tolerant: a run folder written by any interplab command shows its numeric curves
(training loss, learning rate, formation scores per checkpoint ...) and its results; a file that is missing,
unreadable or of an unexpected shape shows as missing, never as an error.

Everything here stays inside the ``--runs`` folders: every path is resolved (symlinks followed) and one that
leads outside the folder it was found under is ignored, as if it were not there.

A run owns its sub-folders: the home page lists a training run once (not each of its checkpoints), and the
run page gathers what the later commands wrote into it (formation scores, SAEs and their evaluation,
training-data attributions, feature databases). (`contents`); the page's view is built from those parts in
`interplab.web.run_page`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interplab import runs
from interplab.runs import Kind

MAX_JSON_BYTES = 50 * 2**20  # a larger report.json is shown as missing (the page must stay fast)
MAX_LOG_BYTES = 200 * 2**20
HEADLINE = {  # the home page's columns for a run, in order (when present in its report.json)
    "step": "steps",
    "loss": "loss",
    "val_loss": "val loss",
    "tokens": "tokens",
    "tokens_per_s": "tokens/s",
    "finished": "finished",
}


@dataclass(frozen=True)
class Artifact:
    """A folder the home page lists: a run, a model or an SAE (``path`` resolved, inside ``root``)."""

    kind: str  # "run" | "model" | "sae"
    name: str
    path: Path
    root: Path
    scalars: dict[str, Any] = field(default_factory=dict)
    """headline numbers (label -> value) for the home page"""
    parts: tuple[str, ...] = ()
    """what else the run holds, e.g. "28 checkpoints", "formation", "1 SAE\""""
    what: str = ""
    """what the folder is, in words (`interplab.runs.Kind.label`; empty when the contract does not know it)"""


def _label(kind: Kind | None) -> str:
    return kind.label if kind is not None else ""


def contained(path: Path, root: Path) -> Path | None:
    """``path`` resolved (symlinks followed) when it exists and stays inside ``root`` (resolved); else None."""
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, a symlink loop, unreadable
        return None
    return real if real == root or real.is_relative_to(root) else None


def _file(path: Path, root: Path) -> Path | None:
    real = contained(path, root)
    return real if real is not None and real.is_file() else None


def _dir(path: Path, root: Path) -> Path | None:
    real = contained(path, root)
    return real if real is not None and real.is_dir() else None


def _children(path: Path, root: Path) -> list[Path]:
    """The sub-folders of ``path`` that stay inside ``root`` (hidden ones skipped), resolved, by name."""
    try:
        entries = sorted(path.iterdir())
    except OSError:
        return []
    out = []
    for p in entries:
        real = None if p.name.startswith(".") else _dir(p, root)
        if real is not None and real != path and real not in out:
            out.append(real)
    return out


def read_bytes(path: Path, root: Path, limit: int) -> bytes | None:
    """The bytes of ``path``, or None when it is missing, outside ``root``, unreadable or over ``limit``."""
    real = _file(path, root)
    try:
        return None if real is None or real.stat().st_size > limit else real.read_bytes()
    except OSError:
        return None


def read_json(path: Path, root: Path) -> Any:
    """The JSON in ``path``, or None when it is missing, outside ``root``, too large or not JSON."""
    data = read_bytes(path, root, MAX_JSON_BYTES)
    try:
        return None if data is None else json.loads(data)
    except (ValueError, RecursionError):
        return None


_DISK = runs.Reader()  # the contract's plain reader, used on paths already checked to stay inside root


def _head(path: Path, root: Path, n: int) -> bytes | None:
    """The first ``n`` bytes of ``path`` (None when it is missing, outside ``root`` or unreadable)."""
    real = _file(path, root)
    return None if real is None else _DISK.read_head(real, n)


def reader(root: Path) -> runs.Reader:
    """How `runs.detect` reads the disk for the web app: inside ``root`` only, JSON over the size limit or
    unreadable as missing (never an error)."""
    return runs.Reader(
        is_file=lambda p: _file(p, root) is not None,
        is_dir=lambda p: _dir(p, root) is not None,
        read_json=lambda p: read_json(p, root),
        read_head=lambda p, n: _head(p, root, n),
    )


_MODELS = (Kind.MODEL, Kind.CHECKPOINT, Kind.HF_MODEL)
_NOT_LISTED = (Kind.ACTIVATION_CACHE, Kind.FEATURE_DB, Kind.CHECKSUMS, Kind.GRADIENTS, Kind.GRADIENT_INDEX)
"""kinds the home page does not list (databases are served by --db; caches and recordings have no page)"""


def _kind(p: Path, root: Path) -> Kind | None:
    return runs.detect(p, reader(root))


def _is_model(p: Path, root: Path, kind: Kind | None) -> bool:
    # a model folder's config.json is written last, but a folder can lose its weights since: not a model
    return kind in _MODELS and (kind is Kind.HF_MODEL or _file(p / runs.MODEL_WEIGHTS, root) is not None)


def _is_run(p: Path, root: Path, kind: Kind | None) -> bool:
    if kind is None:  # one the contract does not know, shown for what it holds (a graph circuit-tracer wrote)
        return any(_file(p / n, root) for n in (runs.LOG, runs.REPORT, runs.GRAPH_JSON))
    return kind not in (*_MODELS, Kind.SAE, *_NOT_LISTED)


def _report_kind(folder: Path, root: Path) -> Kind | None:
    """The kind of ``folder``'s ``report.json`` (None when it has none or it is none of interplab's)."""
    data = read_json(folder / runs.REPORT, root)
    return runs.detect_document(runs.REPORT, data) if isinstance(data, dict) else None


def find_artifacts(roots: list[Path], depth: int = 3) -> list[Artifact]:
    """Runs, models and SAEs under ``roots`` (each root itself included), sorted by kind and name.

    The search stops at a run, a model or an SAE: what lies inside belongs to it (a training run's
    checkpoints and final model are shown on its page, not listed one by one)."""
    found: dict[Path, Artifact] = {}

    def visit(p: Path, level: int, root: Path) -> None:
        if p in found:
            return
        name = str(p.relative_to(root.parent)) if p != root else p.name
        kind = _kind(p, root)
        if _is_model(p, root, kind):
            found[p] = Artifact("model", name, p, root, _model_scalars(p, root), what=_label(kind))
        elif kind is Kind.SAE:
            found[p] = Artifact("sae", name, p, root, _sae_scalars(p, root), what=_label(kind))
        elif _is_run(p, root, kind):
            found[p] = Artifact("run", name, p, root, _headline(p, root), _parts(p, root), _label(kind))
        elif kind not in _NOT_LISTED and level < depth:
            for child in _children(p, root):
                visit(child, level + 1, root)

    for r in roots:
        try:
            root = Path(r).resolve(strict=True)
        except (OSError, RuntimeError):
            continue
        if root.is_dir():
            visit(root, 0, root)
    order = {"run": 0, "model": 1, "sae": 2}
    return sorted(found.values(), key=lambda a: (order[a.kind], a.name))


def _scalar(v: Any) -> bool:
    return isinstance(v, (int, float, str, bool)) and not (isinstance(v, float) and not math.isfinite(v))


def _model_scalars(p: Path, root: Path) -> dict[str, Any]:
    cfg = read_json(p / runs.CONFIG, root)
    cfg = cfg if isinstance(cfg, dict) else {}
    keys = ("architecture", "n_layers", "d_model", "n_heads", "d_vocab", "n_ctx")
    return {k.replace("_", " "): cfg[k] for k in keys if _scalar(cfg.get(k))}


def sae_config(p: Path, root: Path) -> dict[str, Any]:
    """An SAE's architecture, site and sizes from its ``cfg.json`` (SAELens layouts old and new: the site
    is at the top or under ``metadata``)."""
    cfg = read_json(p / runs.SAE_CFG, root)
    cfg = cfg if isinstance(cfg, dict) else {}
    meta = cfg["metadata"] if isinstance(cfg.get("metadata"), dict) else {}
    merged = {**{k: v for k, v in meta.items() if _scalar(v)}, **{k: v for k, v in cfg.items() if _scalar(v)}}
    return {k: merged[k] for k in ("architecture", "hook_name", "d_in", "d_sae", "k") if k in merged}


def _sae_scalars(p: Path, root: Path) -> dict[str, Any]:
    out = {k.replace("_", " "): v for k, v in sae_config(p, root).items()}
    return {**out, **report_scalars(read_json(p / runs.REPORT, root), limit=6)}


def report_scalars(report: Any, limit: int = 40) -> dict[str, Any]:
    """The top-level scalars of a report (label -> value), at most ``limit``."""
    if not isinstance(report, dict):
        return {}
    out = {}
    for k, v in report.items():
        if _scalar(v) and k not in ("run_dir", "kind", "version"):
            out[str(k).replace("_per_s", "/s").replace("_", " ")] = v
        if len(out) >= limit:
            break
    return out


def _headline(p: Path, root: Path) -> dict[str, Any]:
    report = read_json(p / runs.REPORT, root)
    if not isinstance(report, dict):
        from interplab.web.dt_page import dt_headline  # a trajectory data set, a DT evaluation

        return dt_headline(p, root)
    chosen = {label: report[k] for k, label in HEADLINE.items() if _scalar(report.get(k))}
    return chosen or report_scalars(report, limit=6)


def _parts(p: Path, root: Path) -> tuple[str, ...]:
    """What a run holds besides its own log and report, for the home page."""
    c = contents(p, root)
    out = []
    if c["checkpoints"]:
        out.append(_count(len(c["checkpoints"]), "checkpoint"))
    if c["final"]:
        out.append("final model")
    if c["formation"]:
        out.append("formation")
    if c["saes"]:
        out.append(_count(len(c["saes"]), "SAE"))
    if c["attributions"]:
        out.append(_count(len(c["attributions"]), "attribution"))
    if c["llc"]:
        out.append("LLC")
    if c["scrubs"]:
        out.append(_count(len(c["scrubs"]), "scrubbed hypothesis", "scrubbed hypotheses"))
    if c["databases"]:
        out.append(_count(len(c["databases"]), "feature database"))
    if c["graphs"]:
        out.append(_count(len(c["graphs"]), "attribution graph"))
    return tuple(out)


def _count(n: int, what: str, plural: str | None = None) -> str:
    return f"{n} {what if n == 1 else plural or what + 's'}"


def contents(path: Path, root: Path, depth: int = 3) -> dict[str, list[Path]]:
    """The parts of a run folder, by what `interplab.runs.detect` says each sub-folder is, inside ``root``:
    checkpoints, final model, formation files, SAE folders, evaluation reports, attribution reports, LLC curves,
    causal-scrubbing reports (one folder per hypothesis, or the folder itself), sub-runs with their own
    ``log.jsonl``, feature databases, attribution graphs (folders holding a ``graph.json``)."""
    out: dict[str, list[Path]] = {
        k: []
        for k in (
            "checkpoints",
            "final",
            "formation",
            "saes",
            "evals",
            "attributions",
            "llc",
            "scrubs",
            "logs",
            "databases",
            "graphs",
        )  # fmt: skip
    }
    if _dir(path / runs.CHECKPOINTS, root):
        out["checkpoints"] = [
            c.path for c in runs.list_checkpoints(path) if _is_model(c.path, root, _kind(c.path, root))
        ]
    _classify(path, root, out)

    def visit(p: Path, level: int) -> None:
        for child in _children(p, root):
            if child.name == runs.CHECKPOINTS and p == path:
                continue
            kind = _kind(child, root)
            if _is_model(child, root, kind):
                if child.name == runs.FINAL and p == path:
                    out["final"].append(child)
                continue
            if kind is Kind.SAE:
                out["saes"].append(child)
                continue
            _classify(child, root, out)
            if _file(child / runs.LOG, root):
                out["logs"].append(child)
            if level < depth:
                visit(child, level + 1)

    visit(path, 1)
    for level_dir in [path, *_children(path, root)]:
        try:
            files = sorted(level_dir.iterdir())
        except OSError:
            continue
        found = [f for f in files if f.suffix == ".db" and _kind(f, root) is Kind.FEATURE_DB]
        out["databases"] += [f for f in (_file(d, root) for d in found) if f is not None]
    return out


def _classify(folder: Path, root: Path, out: dict[str, list[Path]]) -> None:
    """File ``folder`` under the parts its documents make it: formation scores, an attribution, an SAE
    evaluation, a causal-scrubbing report, an attribution graph."""
    kind = _report_kind(folder, root)
    if _file(folder / runs.GRAPH_JSON, root) or kind is Kind.ATTRIBUTION_GRAPH:
        out["graphs"].append(folder)
    if _file(folder / runs.FORMATION_JSON, root):
        out["formation"].append(folder / runs.FORMATION_JSON)
    if kind is Kind.ATTRIBUTION:
        out["attributions"].append(folder)
    elif kind is Kind.LLC:
        out["llc"].append(folder)
    elif kind is Kind.SAE_EVAL:
        out["evals"].append(folder)
    elif kind is Kind.SCRUB:
        out["scrubs"].append(folder)
