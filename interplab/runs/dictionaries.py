"""What a dictionary folder is, read from its JSON alone (no tensor is loaded): an SAE (SAELens' ``cfg.json``),
a crosscoder (``cfg.json`` with kind ``crosscoder``) or a cross-layer transcoder (``cfg.json`` with kind
``clt``). `DictionaryInfo` says which it is, which sites (of which models or checkpoints) it reads and writes,
its size, and how its training ended, from the run that holds it: an SAE training run's ``train_summary.json``
(and ``eval/NAME/report.json``), a model diff's ``diff.json`` (the crosscoder's training row and held-out FVU),
a CLT training run's last ``log.jsonl`` row (and ``eval/report.json``). `interplab.sae.load_dictionary` loads
any of the three; `interplab info PATH` prints this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interplab.runs.documents import _load, detect_document, read_log
from interplab.runs.kinds import Kind, RunError
from interplab.runs.names import (
    CONFIG,
    DIFF_JSON,
    EVAL,
    REPORT,
    SAE_CFG,
    SAES,
    TRAIN_SUMMARY,
)

DICTIONARY_KINDS = (Kind.SAE, Kind.CROSSCODER, Kind.CLT)
"""the dictionaries `interplab.sae.load_dictionary` loads"""
LOADERS = {
    Kind.SAE: "interplab.sae.load_sae",
    Kind.CROSSCODER: "interplab.sae.crosscoder.load_crosscoder",
    Kind.CLT: "interplab.sae.clt.load_clt",
}
"""the loader of each dictionary kind (`interplab.sae.load_dictionary` takes all three)"""
TAKEN_BY = {
    Kind.CROSSCODER: "a crosscoder is trained, evaluated (held-out FVU) and given feature pages by "
    "`interplab sae diff RUN --before STEP --after STEP` (its features.db; any crosscoder: "
    "interplab.features.crosscoder_db.build_crosscoder_db); load it with interplab.sae.load_dictionary",
    Kind.MODEL_DIFF: "a model diff's crosscoder is its crosscoder/ folder, its feature pages its features.db "
    "(`interplab serve --db DIFF/features.db`); `interplab sae diff` makes one; load the crosscoder with "
    "interplab.sae.load_dictionary",
    Kind.CLT: "a CLT is evaluated by `interplab clt eval` and used by `interplab graph build --clt`; load it "
    "with interplab.sae.load_dictionary",
    Kind.CLT_TRAIN: "a CLT training run is evaluated by `interplab clt eval` and used by "
    "`interplab graph build --clt`; load its CLT with interplab.sae.load_dictionary",
}
"""for each dictionary (or folder of one) that is not an SAE: which commands take it, for the error of a
command that takes only SAEs"""


@dataclass(frozen=True)
class DictionaryInfo:
    """One dictionary folder as its JSON describes it (`dictionary_info`)."""

    path: Path
    kind: Kind
    """Kind.SAE, Kind.CROSSCODER or Kind.CLT"""
    architecture: str
    """``topk (k 32)``, ``BatchTopK crosscoder (k 16)``, ``jumprelu CLT, cross-layer`` ..."""
    reads: tuple[str, ...]
    """the sites it encodes: an SAE's hook, a crosscoder's sources (``step_000100:blocks.1.hook_resid_post``
    for a diffing one), a CLT's ``hook_in`` per layer"""
    writes: tuple[str, ...]
    """the sites it reconstructs (an SAE: its hook, or a transcoder's output hook; a CLT: ``hook_out`` per
    layer; a crosscoder: its sources)"""
    d_in: int
    n_latents: int
    """the dictionary's size in all (a CLT: n_layers * d_sae)"""
    model: str | None = None
    """the model (or run) it was trained on, as its config records it"""
    training: dict[str, Any] | None = None
    """how its training ended, from the run that holds it: ``{"run": folder, "final": {metric: value},
    "eval": report file or None, ...}``; None for a folder outside any run"""

    @property
    def loader(self) -> str:
        return LOADERS[self.kind]

    def summary(self) -> str:
        """One phrase: the size, the architecture and what it reads."""
        reads = _listing(self.reads)
        size = f"{self.n_latents:,} latents"
        if self.kind is Kind.CLT:
            per = self.n_latents // max(len(self.reads), 1)
            size = f"{len(self.reads)} layers x {per:,} latents"
        return f"{size}, {self.architecture}, reading {reads}"

    def rows(self) -> list[tuple[str, str]]:
        """``(field, value)`` rows for a table (`interplab info`)."""
        out = [
            ("kind", self.kind.label),
            ("architecture", self.architecture),
            ("reads", ", ".join(self.reads)),
            ("writes", ", ".join(self.writes)),
            ("d_in", str(self.d_in)),
            ("latents", f"{self.n_latents:,}"),
            ("model", self.model or "(not recorded)"),
            ("load with", self.loader),
        ]
        t = self.training
        if t is None:
            return [*out, ("training", "(no training run around this folder)")]
        out.append(("trained in", str(t["run"])))
        out += [(f"final {k}", _fmt(v)) for k, v in (t.get("final") or {}).items()]
        out += [(k, _fmt(v)) for k, v in t.items() if k not in ("run", "final")]
        return out


def _fmt(v: Any) -> str:
    if v is None:
        return "(none)"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _listing(items: tuple[str, ...], n: int = 3) -> str:
    shown = " and ".join(items) if len(items) <= 2 else ", ".join(items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > max(n, 2) else "")


def _doc(path: Path) -> dict[str, Any] | None:
    try:
        data = _load(path) if path.is_file() else None
    except RunError:
        return None
    return data if isinstance(data, dict) else None


def _kind_of(path: Path) -> Kind | None:
    data = _doc(path)
    return detect_document(path.name, data) if data is not None else None


def _sub(data: dict[str, Any], key: str) -> dict[str, Any]:
    """``data[key]`` when it is an object, else empty (a document another tool or version wrote)."""
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def _scalars(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in row.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def dictionary_info(path: str | Path, kind: Kind) -> DictionaryInfo:
    """The `DictionaryInfo` of dictionary folder ``path`` of ``kind`` (Kind.SAE, CROSSCODER or CLT: what
    `interplab.runs.detect` says it is); `interplab.runs.open_dictionary` finds the folder inside a run."""
    path = Path(path)
    cfg = _doc(path / SAE_CFG)
    if cfg is None or kind not in DICTIONARY_KINDS:
        raise RunError(
            f"{path} is not a dictionary folder (an SAE, a crosscoder or a CLT with its {SAE_CFG})"
        )
    try:
        if kind is Kind.SAE:
            return _sae(path, cfg)
        if kind is Kind.CROSSCODER:
            return _crosscoder(path, cfg)
        return _clt(path, cfg)
    except (KeyError, TypeError, ValueError) as err:
        raise RunError(f"{path / SAE_CFG} is not a readable {kind.label[2:]} config ({err!r})") from None


def _sae(path: Path, cfg: dict[str, Any]) -> DictionaryInfo:
    meta = _sub(cfg, "metadata")
    ours = _sub(meta, "interplab")
    arch = str(ours.get("architecture") or cfg.get("architecture") or "standard")
    k = ours.get("k", cfg.get("k"))
    hook = str(meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point") or "")
    out = meta.get("hook_name_out") or ours.get("hook_name_out")
    training = None
    run = path.parent.parent
    if path.parent.name == SAES and _kind_of(run / CONFIG) is Kind.SAE_TRAIN:
        summary = _doc(run / TRAIN_SUMMARY) or {}
        final = _sub(summary, "final").get(path.name)
        report = run / EVAL / path.name / REPORT
        training = {
            "run": run,
            "final": {k: v for k, v in _scalars(final).items() if k != "sae"}
            if isinstance(final, dict)
            else {},
            "steps": summary.get("steps", "unfinished"),
            "eval": report if report.is_file() else None,
        }
    return DictionaryInfo(
        path=path,
        kind=Kind.SAE,
        architecture=arch + (f" (k {k})" if k is not None else "") + (" transcoder" if out else ""),
        reads=(hook,),
        writes=(str(out or hook),),
        d_in=int(cfg["d_in"]),
        n_latents=int(cfg["d_sae"]),
        model=meta.get("model_name") or cfg.get("model_name"),
        training=training,
    )


def _crosscoder(path: Path, cfg: dict[str, Any]) -> DictionaryInfo:
    sources = tuple(str(s) for s in cfg["sources"])
    training = None
    diff = _doc(path.parent / DIFF_JSON)
    if diff is not None and detect_document(DIFF_JSON, diff) is Kind.MODEL_DIFF:
        meta = _sub(diff, "meta")
        training = {
            "run": path.parent,
            "final": _scalars(_sub(meta, "train")),
            "held-out fvu": diff.get("fvu"),
            "counts": ", ".join(f"{v} {k}" for k, v in _sub(diff, "counts").items()),
            "formation": _sub(diff, "formation").get("report"),
        }
    meta = _sub(cfg, "meta")
    return DictionaryInfo(
        path=path,
        kind=Kind.CROSSCODER,
        architecture=f"BatchTopK crosscoder (k {cfg['k']}, {len(sources)} sources)",
        reads=sources,
        writes=sources,
        d_in=int(cfg["d_in"]),
        n_latents=int(cfg["d_sae"]),
        model=cfg.get("model_name") or meta.get("run"),
        training=training,
    )


def _clt(path: Path, cfg: dict[str, Any]) -> DictionaryInfo:
    n = int(cfg["n_layers"])
    hook_in, hook_out = str(cfg["hook_in"]), str(cfg["hook_out"])
    training = None
    run = path.parent
    if _kind_of(run / CONFIG) is Kind.CLT_TRAIN:
        rows = [r for r in read_log(run) if isinstance(r, dict) and "step" in r]
        report = run / EVAL / REPORT
        training = {
            "run": run,
            "final": _scalars(rows[-1]) if rows else {},
            "eval": report if report.is_file() else None,
        }
    k = cfg.get("k")
    kind = "cross-layer" if cfg.get("cross_layer", True) else "per-layer"
    return DictionaryInfo(
        path=path,
        kind=Kind.CLT,
        architecture=f"{cfg.get('activation', 'jumprelu')}{f' (k {k})' if k else ''} CLT, {kind}",
        reads=tuple(hook_in.format(layer=layer) for layer in range(n)),
        writes=tuple(hook_out.format(layer=layer) for layer in range(n)),
        d_in=int(cfg["d_model"]),
        n_latents=n * int(cfg["d_sae"]),
        model=cfg.get("model_name"),
        training=training,
    )
