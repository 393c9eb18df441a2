"""Read run directories (``log.jsonl``, ``report.json``) and model/SAE folders for the web app.

Everything here is tolerant: a run folder written by any interplab command shows its numeric curves
(training loss, learning rate, formation scores per checkpoint ...) and its scalar results.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_X_KEYS = ("step", "steps", "checkpoint", "checkpoints", "tokens", "epoch")


@dataclass(frozen=True)
class Artifact:
    """A folder the home page lists: a run, a model or an SAE."""

    kind: str  # "run" | "model" | "sae"
    name: str
    path: Path
    scalars: dict[str, Any] = field(default_factory=dict)


def _is_run(p: Path) -> bool:
    return any((p / n).is_file() for n in ("log.jsonl", "report.json", "formation.json"))


def _is_model(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def _is_sae(p: Path) -> bool:
    return (p / "cfg.json").is_file() and (p / "sae_weights.safetensors").is_file()


def find_artifacts(roots: list[Path], depth: int = 3) -> list[Artifact]:
    """Runs, models and SAEs under ``roots`` (each root itself included), sorted by kind and name."""
    found: dict[Path, Artifact] = {}

    def visit(p: Path, level: int, root: Path) -> None:
        if not p.is_dir() or p.name.startswith("."):
            return
        name = str(p.relative_to(root.parent)) if p != root else p.name
        if _is_model(p):
            found[p] = Artifact("model", name, p, _report_scalars(p))
        elif _is_sae(p):
            found[p] = Artifact("sae", name, p, {**_sae_scalars(p), **_report_scalars(p)})
        elif _is_run(p):
            found[p] = Artifact("run", name, p, _report_scalars(p))
        if level < depth:
            for child in sorted(p.iterdir()):
                visit(child, level + 1, root)

    for root in roots:
        visit(Path(root).resolve(), 0, Path(root).resolve())
    order = {"run": 0, "model": 1, "sae": 2}
    return sorted(found.values(), key=lambda a: (order[a.kind], a.name))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sae_scalars(p: Path) -> dict[str, Any]:
    cfg = _read_json(p / "cfg.json") or {}
    return {k: cfg[k] for k in ("architecture", "d_in", "d_sae", "hook_name") if k in cfg}


def _report_scalars(p: Path, limit: int = 12) -> dict[str, Any]:
    rep = _read_json(p / "report.json")
    if not isinstance(rep, dict):
        return {}
    out = {}
    for k, v in rep.items():
        if isinstance(v, (int, float, str, bool)):
            out[k] = round(v, 5) if isinstance(v, float) else v
        if len(out) >= limit:
            break
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def log_curves(path: Path) -> dict[str, dict[str, list]]:
    """Numeric series of a ``log.jsonl``: ``{"loss": {"x": steps, "y": values}, "eval/val_loss": ...}``."""
    curves: dict[str, dict[str, list]] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return curves
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        x = next((rec[k] for k in _X_KEYS if _num(rec.get(k))), i)
        prefix = f"{rec['event']}/" if isinstance(rec.get("event"), str) else ""
        for k, v in rec.items():
            if k in _X_KEYS or not _num(v) or k in ("time", "elapsed", "wall"):
                continue
            c = curves.setdefault(prefix + k, {"x": [], "y": []})
            c["x"].append(x)
            c["y"].append(v)
    return curves


def report_curves(report: Any) -> dict[str, dict[str, list]]:
    """Series in a ``report.json``: lists of numbers (against a sibling step list when there is one) and
    lists of records (``[{"step": 100, "induction": 0.3}, ...]``), found at any depth."""
    curves: dict[str, dict[str, list]] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            xs = next(
                (node[k] for k in _X_KEYS if isinstance(node.get(k), list) and all(_num(v) for v in node[k])),
                None,
            )
            for k, v in node.items():
                name = f"{prefix}{k}"
                if isinstance(v, list) and len(v) > 1 and all(_num(e) for e in v) and k not in _X_KEYS:
                    x = xs if xs is not None and len(xs) == len(v) else list(range(len(v)))
                    curves[name] = {"x": list(x), "y": list(v)}
                elif isinstance(v, list) and len(v) > 1 and all(isinstance(e, list) for e in v):
                    flat = [_flatten(e) for e in v]  # e.g. a score per layer and head at each checkpoint
                    if all(flat) and all(_num(x) for e in flat for x in e):
                        x = xs if xs is not None and len(xs) == len(v) else list(range(len(v)))
                        curves[f"{name} (max)"] = {"x": list(x), "y": [max(e) for e in flat]}
                elif isinstance(v, list) and v and all(isinstance(e, dict) for e in v):
                    for key in sorted({kk for e in v for kk, vv in e.items() if _num(vv)} - set(_X_KEYS)):
                        pts = [
                            (next((e[x] for x in _X_KEYS if _num(e.get(x))), i), e[key])
                            for i, e in enumerate(v)
                            if _num(e.get(key))
                        ]
                        curves[f"{name}/{key}"] = {"x": [p[0] for p in pts], "y": [p[1] for p in pts]}
                elif isinstance(v, dict):
                    walk(v, f"{name}/")

    walk(report, "")
    return curves


def _flatten(node: Any) -> list:
    if isinstance(node, list):
        return [x for e in node for x in _flatten(e)]
    return [node]


def run_view(path: Path) -> dict[str, Any]:
    """Everything the run page shows (``formation.json`` of `interplab formation` included)."""
    report = _read_json(path / "report.json")
    formation = _read_json(path / "formation.json")
    if isinstance(formation, dict):
        report = {**(report if isinstance(report, dict) else {}), "formation": formation}
    config = _read_json(path / "config.json")
    return {
        "attributions": attributions(path),
        "curves": log_curves(path / "log.jsonl"),
        "report_curves": report_curves(report) if report is not None else {},
        "scalars": _report_scalars(path, limit=40),
        "config": config if isinstance(config, dict) else {},
    }


def attributions(path: Path) -> list[dict[str, Any]]:
    """The training-data attributions of a run (``interplab attribute`` writes ``attribution/<target>/``)."""
    out = []
    root = path / "attribution"
    if not root.is_dir():
        return out
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        report = _read_json(folder / "report.json")
        if not isinstance(report, dict) or "target" not in report:
            continue
        out.append(
            {
                "target": report["target"],
                "window": report.get("window", []),
                "n_candidates": report.get("n_candidates"),
                "top": report.get("top", [])[:5],
                "enriched": [e.get("token", "") for e in report.get("enriched_tokens", [])[:12]],
                "method": report.get("method", ""),
            }
        )
    return out
