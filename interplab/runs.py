"""The run-directory contract: every file and folder name of every run kind, defined once.

Every command writes one folder; every JSON document interplab writes carries ``kind`` and ``version``
(`write_json`), and every reader opens folders through the typed openers below (`TrainRun`, `SAERun`,
`CacheRun`, `ModelDir`, `Report`, `open_run`), which accept the run folder itself and raise a `RunError` that
says what a folder is and what was expected when it is not what the caller wanted. Folders written before
``kind`` existed are recognised in one place, `detect` (by the files they hold), so they keep opening.

The layout of each kind (``RUN/`` is the folder a command was given as ``--out``)::

    training run (Kind.TRAIN)           `interplab train`
        config.json                     {kind: train, version, ...TrainConfig}
        log.jsonl                       one JSON object per logged step or event (lines, not documents: the
                                        folder's config.json says what they are)
        checkpoints/step_000123/        a checkpoint (Kind.CHECKPOINT): a model folder + optimizer.safetensors,
                                        rng.safetensors and state.json (written last: step, counters, the size
                                        and SHA-256 of every file)
        final/                          the finished model (Kind.MODEL); absent while the run is unfinished
        report.json                     {kind: train_report, version, ...}
        formation/ attribution/ sae/ features.db    what later commands wrote into the run (each its own kind)
    model folder (Kind.MODEL)           config.json {kind: model, version, ...ModelConfig} + model.safetensors
                                        (+ tokenizer.json, checksums.json)
    SAE training run (Kind.SAE_TRAIN)   `interplab sae train`
        config.json                     {kind: sae_train, version, saes, train, data}
        log.jsonl, train_summary.json (Kind.SAE_TRAIN_SUMMARY), checkpoints/step_N/NAME/,
        eval/report.json, eval/NAME/report.json (Kind.SAE_EVAL: the set, and each SAE's)
        saes/NAME/                      each finished SAE (Kind.SAE): SAELens' layout, cfg.json +
                                        sae_weights.safetensors (a foreign format: cfg.json stays SAELens')
    activation cache (Kind.ACTIVATION_CACHE)   manifest.json {kind: activation_cache, version, ...} + shards
    feature database (Kind.FEATURE_DB)  features.db, SQLite; its ``meta`` table holds the kind and version
    analysis reports                    config.json + report.json {kind: scrub|circuit|discovery|patch|heads|
                                        lens|formation|attribution|routing|sae_eval, version, ...} + pictures
    gradient recording (Kind.GRADIENTS) config.json {kind: gradients, version, record, projector, group_numel}
                                        + index.json {kind: gradient_index, version, entries} + step_N.safetensors
    JSON documents anywhere            a result's ``.save(x.json)`` {kind: result, version, type: its class, ...};
                                        Generation.save {kind: generation}; feature build/export/explanations/
                                        steering {kind: feature_build|feature_export|auto_interp|steering}; the
                                        token cache's ``<key>.json`` {kind: token_store}; a character
                                        ``tokenizer.json`` {kind: tokenizer}; ``checksums.json`` {kind: checksums}
    foreign formats (no kind)           SAELens' ``cfg.json``, a BPE ``tokenizer.json`` (the tokenizers library's),
                                        a Hugging Face ``config.json``: kept exactly as their tools write them

This module is the bottom layer: it imports only the standard library, `interplab.io` and
`interplab.integrity`, so configs are returned as plain dicts (``TrainConfig.from_dict(run.config)``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from interplab.integrity import CHECKSUMS, check_file
from interplab.io import atomic_write_json

# ----------------------------------------------------------------------------------------------- names
CONFIG = "config.json"
LOG = "log.jsonl"
REPORT = "report.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
STATE = "state.json"
MODEL_WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
SAE_CFG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_SPARSITY = "sparsity.safetensors"
SAES = "saes"
SAE_DIR = "sae"
EVAL = "eval"
TRAIN_SUMMARY = "train_summary.json"
MANIFEST = "manifest.json"
FEATURE_DB = "features.db"
FORMATION = "formation"
FORMATION_JSON = "formation.json"
ATTRIBUTION = "attribution"
GRADIENT_INDEX = "index.json"
PLOTLY_JS = "plotly.min.js"
__all__ = [
    "CHECKSUMS",
    "Checkpoint",
    "check_out",
    "Kind",
    "RunError",
    "TrainRun",
    "SAERun",
    "CacheRun",
    "ModelDir",
    "Report",
    "checkpoint_name",
    "checkpoint_step",
    "describe",
    "detect",
    "model_folder",
    "open_run",
    "read_json",
    "read_log",
    "sae_folders",
    "pick_sae",
    "write_json",
]

_CKPT_PREFIX = "step_"
_CKPT_DIGITS = 6
_SQLITE_MAGIC = b"SQLite format 3\x00"


class RunError(ValueError):
    """A folder or file that is not what the caller expected; the message says what it is and what was."""


class NotARunError(RunError, FileNotFoundError):
    """A folder that holds none of interplab's kinds (or does not exist) where a run was expected: both a
    `RunError` and a ``FileNotFoundError`` (what readers raised before the contract)."""


class Kind(str, Enum):
    """What a folder or a JSON document is. The value is what ``kind`` holds on disk (a file format)."""

    MODEL = "model"
    """an interplab model folder (config.json with a ModelConfig + model.safetensors)"""
    HF_MODEL = "hf_model"
    """a Hugging Face model folder (config.json with a ``model_type``): read, never written, by interplab"""
    CHECKPOINT = "checkpoint"
    """one checkpoint of a training run (a model folder + optimizer/RNG state + state.json)"""
    TRAIN = "train"
    """a training run (config.json with a TrainConfig)"""
    TRAIN_REPORT = "train_report"
    """the report.json of a training run"""
    SAE_TRAIN = "sae_train"
    """an SAE training run (config.json: the SAEs, their training configs, the data)"""
    SAE = "sae"
    """one SAE in SAELens' layout (cfg.json + sae_weights.safetensors)"""
    SAE_TRAIN_SUMMARY = "sae_train_summary"
    """the train_summary.json of an SAE training run (tokens, steps, each SAE's final log row)"""
    SAE_EVAL = "sae_eval"
    """an SAE evaluation report"""
    ACTIVATION_CACHE = "activation_cache"
    """activations cached on disk (manifest.json + shards)"""
    FEATURE_DB = "feature_db"
    """a feature database (SQLite)"""
    CHECKSUMS = "checksums"
    """checksums.json: the size and SHA-256 of each file of a folder"""
    FORMATION = "formation"
    """head scores along a run's checkpoints (`interplab formation`)"""
    ATTRIBUTION = "attribution"
    """training-data attribution along a run's checkpoints (`interplab attribute`)"""
    ROUTING = "routing"
    """a gradient-routing experiment (`interplab route`)"""
    SCRUB = "scrub"
    """a causal-scrubbing experiment (`interplab scrub`)"""
    CIRCUIT = "circuit"
    """a circuit (edges + faithfulness)"""
    DISCOVERY = "discovery"
    """circuit discovery (`interplab discover`)"""
    PATCH = "patch"
    """activation patching (`interplab patch`)"""
    HEADS = "heads"
    """head scores of one model (`interplab heads`)"""
    LENS = "lens"
    """logit/tuned lens (`interplab lens`)"""
    GRADIENTS = "gradients"
    """a recording of projected per-example gradients (its config.json: parameter group + projection)"""
    GRADIENT_INDEX = "gradient_index"
    """a gradient recording's index.json (one entry per recorded step)"""
    FEATURE_BUILD = "feature_build"
    """what a feature-database build did (`BuildReport`)"""
    FEATURE_EXPORT = "feature_export"
    """a static-site export of a feature database (`ExportReport`)"""
    AUTO_INTERP = "auto_interp"
    """feature explanations and their scores (`AutoInterpResult`)"""
    STEERING = "steering"
    """a continuation with and without a feature steered (`SteeringResult`)"""
    RESULT = "result"
    """a result object saved as JSON by its ``.save(path)`` (``type`` names its class: ``PatchResult`` ...)"""
    GENERATION = "generation"
    """generated tokens, their mask and text (`Generation.save`)"""
    TOKEN_STORE = "token_store"
    """the record of a tokenised corpus split in the token cache (beside its ``.bin``)"""
    TOKENIZER = "tokenizer"
    """interplab's character tokenizer (``tokenizer.json``; a BPE ``tokenizer.json`` is the tokenizers
    library's own format, foreign, and carries no kind)"""

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    Kind.MODEL: "an interplab model folder",
    Kind.HF_MODEL: "a Hugging Face model folder",
    Kind.CHECKPOINT: "a training checkpoint",
    Kind.TRAIN: "a training run",
    Kind.TRAIN_REPORT: "a training report",
    Kind.SAE_TRAIN: "an SAE training run",
    Kind.SAE: "an SAE folder",
    Kind.SAE_TRAIN_SUMMARY: "an SAE training summary",
    Kind.SAE_EVAL: "an SAE evaluation",
    Kind.ACTIVATION_CACHE: "an activation cache",
    Kind.FEATURE_DB: "a feature database",
    Kind.CHECKSUMS: "a checksums record",
    Kind.FORMATION: "a formation report",
    Kind.ATTRIBUTION: "a training-data attribution",
    Kind.ROUTING: "a gradient-routing run",
    Kind.SCRUB: "a causal-scrubbing run",
    Kind.CIRCUIT: "a circuit",
    Kind.DISCOVERY: "a circuit-discovery run",
    Kind.PATCH: "an activation-patching run",
    Kind.HEADS: "a head-scores run",
    Kind.LENS: "a lens run",
    Kind.GRADIENTS: "a gradient recording",
    Kind.GRADIENT_INDEX: "a gradient recording's index",
    Kind.FEATURE_BUILD: "a feature-database build report",
    Kind.FEATURE_EXPORT: "a feature-database export report",
    Kind.AUTO_INTERP: "a set of feature explanations",
    Kind.STEERING: "a steering result",
    Kind.RESULT: "a saved result",
    Kind.GENERATION: "a generation",
    Kind.TOKEN_STORE: "a token-store record",
    Kind.TOKENIZER: "a character tokenizer",
}

VERSIONS: dict[Kind, int] = {k: 1 for k in Kind}
"""The schema version each kind is written with now; a reader accepts this version and older ones."""
VERSIONS[Kind.ACTIVATION_CACHE] = 2
VERSIONS[Kind.FEATURE_DB] = 3


def _as_kind(kind: Kind | str) -> Kind:
    try:
        return Kind(kind)
    except ValueError:
        raise ValueError(f"unknown run kind {kind!r}; valid: {', '.join(k.value for k in Kind)}") from None


# ----------------------------------------------------------------------------------------------- JSON
def write_json(
    path: str | Path, kind: Kind | str, data: Mapping[str, Any], *, version: int | None = None
) -> Path:
    """Write ``{kind, version, **data}`` atomically. ``version`` defaults to ``data["version"]`` (configs carry
    their own) and then to the kind's current version (`VERSIONS`)."""
    kind = _as_kind(kind)
    if data.get("kind") not in (None, kind.value):
        raise ValueError(f"{path}: data says kind {data['kind']!r} but is written as {kind.value!r}")
    ver = version if version is not None else data.get("version", VERSIONS[kind])
    body = {k: v for k, v in data.items() if k not in ("kind", "version")}
    atomic_write_json(path, {"kind": kind.value, "version": ver, **body})
    return Path(path)


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunError(f"{path} is not readable JSON ({err})") from None


def read_json(
    path: str | Path, expect: Kind | str | Iterable[Kind | str] | None = None, *, strip: bool = False
) -> dict[str, Any]:
    """The JSON document in ``path`` with its ``kind`` (recognised by `detect_document` when an older
    interplab wrote it without one). With ``expect``, a document of another kind, or of a newer version than
    this interplab reads, raises `RunError` saying what it is. ``strip`` drops ``kind`` and ``version``."""
    path = Path(path)
    data = _load(path)
    if not isinstance(data, dict):
        raise RunError(f"{path} holds a JSON {type(data).__name__}, not an object")
    kind = detect_document(path.name, data)
    if expect is not None:
        wanted = [_as_kind(expect)] if isinstance(expect, (Kind, str)) else [_as_kind(k) for k in expect]
        if kind not in wanted:
            what = kind.label if kind is not None else "not a document interplab wrote"
            raise RunError(f"{path} is {what}; expected {' or '.join(k.label for k in wanted)}")
    if kind is not None and isinstance(data.get("version"), int) and data["version"] > VERSIONS[kind]:
        raise RunError(
            f"{path} is {kind.label} of version {data['version']}, written by a newer interplab "
            f"(this one reads up to version {VERSIONS[kind]}): upgrade interplab"
        )
    if strip:
        return {k: v for k, v in data.items() if k not in ("kind", "version")}
    return data


_TRAIN_KEYS = {"model", "data", "optim", "steps", "batch_size"}
_COMMANDS = {  # config.json of analysis runs before kind: {"command": ..., options}
    "patch": Kind.PATCH,
    "heads": Kind.HEADS,
    "lens": Kind.LENS,
    "scrub": Kind.SCRUB,
    "discover": Kind.DISCOVERY,
}
_GRADIENTS_FORMAT = "interplab-gradients"  # gradient recordings before kind: {"format": ..., ...}


def detect_document(name: str, data: Mapping[str, Any]) -> Kind | None:
    """The kind of a JSON document named ``name``: its ``kind`` field, else (written by an older interplab,
    or by another tool) what its keys say. None when it is none of interplab's."""
    raw = data.get("kind")
    if isinstance(raw, str):
        try:
            return Kind(raw)
        except ValueError:
            return None
    if name == CONFIG:
        if data.get("format") == "interplab":
            return Kind.MODEL
        if "model_type" in data:
            return Kind.HF_MODEL
        if _TRAIN_KEYS <= set(data):
            return Kind.TRAIN
        if isinstance(data.get("command"), str) and data["command"] in _COMMANDS:
            return _COMMANDS[data["command"]]
        if data.get("format") == _GRADIENTS_FORMAT:
            return Kind.GRADIENTS
        return None
    if name == SAE_CFG and {"d_in", "d_sae"} <= set(data):
        return Kind.SAE
    if name == MANIFEST and {"hooks", "shards"} <= set(data):  # version-1 caches wrote no kind
        return Kind.ACTIVATION_CACHE
    if name == TRAIN_SUMMARY and {"tokens", "steps", "final"} <= set(data):
        return Kind.SAE_TRAIN_SUMMARY
    if name == STATE and "step" in data and "sha256" in data:
        return Kind.CHECKPOINT
    if name == REPORT and "tokens_per_s" in data and "step" in data:
        return Kind.TRAIN_REPORT
    if name == REPORT and ("ce_loss_recovered" in data or isinstance(data.get("saes"), list)):
        return Kind.SAE_EVAL  # `sae eval` before kinds: one SAE's report, or a run's list of them
    if name == REPORT and {"target", "top"} <= set(data):
        return Kind.ATTRIBUTION
    if name == REPORT and data.get("experiment") in ("digits-split", "era"):
        return Kind.ROUTING
    if name == GRADIENT_INDEX and data.get("format") == _GRADIENTS_FORMAT:
        return Kind.GRADIENT_INDEX
    if name == FORMATION_JSON:
        return Kind.FORMATION
    return None


# ----------------------------------------------------------------------------------------------- folders
@dataclass(frozen=True)
class Reader:
    """How `detect` looks at the disk. The default reads anything; the web app passes one that stays inside
    its ``--runs`` folders and refuses files over a size limit."""

    is_file: Callable[[Path], bool] = Path.is_file
    is_dir: Callable[[Path], bool] = Path.is_dir
    read_json: Callable[[Path], Any] = field(default=lambda p: _load(p))
    read_head: Callable[[Path, int], bytes | None] = field(default=lambda p, n: _head(p, n))


def _head(path: Path, n: int) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


_DEFAULT = Reader()


def _doc_kind(path: Path, reader: Reader) -> Kind | None:
    if not reader.is_file(path):
        return None
    try:
        data = reader.read_json(path)
    except RunError:
        return None
    return detect_document(path.name, data) if isinstance(data, dict) else None


def is_sqlite(path: Path, reader: Reader = _DEFAULT) -> bool:
    return reader.is_file(path) and reader.read_head(path, len(_SQLITE_MAGIC)) == _SQLITE_MAGIC


def detect(path: str | Path, reader: Reader = _DEFAULT) -> Kind | None:
    """What ``path`` is (a `Kind`), or None when it is none of the kinds interplab writes or reads.

    The one place where folders are recognised, including those written before ``kind`` existed: a folder's
    ``config.json`` (or ``manifest.json``, ``cfg.json``, ``report.json``, ``formation.json``) says what it is;
    a checkpoint is a model folder with a ``state.json``; a feature database is an SQLite file."""
    path = Path(path)
    if reader.is_file(path):
        if is_sqlite(path, reader):
            return Kind.FEATURE_DB
        return _doc_kind(path, reader)
    if not reader.is_dir(path):
        return None
    kind = _doc_kind(path / CONFIG, reader)
    if kind is Kind.MODEL and reader.is_file(path / STATE):
        return Kind.CHECKPOINT
    if kind is not None:
        return kind
    for name in (MANIFEST, SAE_CFG, REPORT, FORMATION_JSON):
        kind = _doc_kind(path / name, reader)
        if kind is Kind.SAE and not reader.is_file(path / SAE_WEIGHTS):
            continue
        if kind is not None:
            return kind
    return None


def describe(path: str | Path) -> str:
    """One phrase for error messages: what ``path`` is (``"a training run (12 checkpoints, no final/ yet)"``)."""
    path = Path(path)
    if not path.exists():
        return "missing (no such file or folder)"
    kind = detect(path)
    if kind is None:
        if path.is_file():
            return "a file that is none of interplab's"
        names = sorted(p.name for p in path.iterdir())[:6]
        if not names:
            return "an empty folder"
        return f"a folder that is none of interplab's (it holds {', '.join(names)})"
    if kind is Kind.TRAIN:
        n = len(list_checkpoints(path))
        final = "final/" if (path / FINAL / CONFIG).is_file() else "no final/ yet"
        return f"{kind.label} ({n} checkpoint{'s' * (n != 1)}, {final})"
    if kind is Kind.SAE_TRAIN:
        names = sorted(sae_folders(path))
        return f"{kind.label} (SAEs: {', '.join(names) or 'none finished yet'})"
    return kind.label


def check_out(path: str | Path, kind: Kind | str, *also: Kind | str) -> Path:
    """``path`` as the output folder of a ``kind`` run, checked before anything is written: a folder that holds
    another kind of run (a training run given as ``--out`` of an analysis ...) is refused, saying what it is,
    since the new run would replace its ``config.json`` or ``report.json``. A new, empty or unrecognised folder,
    or one holding a run of ``kind`` (or of ``also``: rewritten), is fine."""
    path = Path(path)
    allowed = [_as_kind(k) for k in (kind, *also)]
    found = detect(path) if path.exists() else None
    if found is not None and found not in allowed:
        raise RunError(
            f"{path} is {describe(path)}: writing {allowed[0].label} there would replace its files; "
            "choose another output folder"
        )
    return path


def _expect(path: str | Path, kinds: Iterable[Kind], hint: str = "") -> tuple[Path, Kind]:
    path = Path(path)
    kinds = tuple(kinds)
    kind = detect(path)
    if kind not in kinds:
        raise RunError(
            f"{path} is {describe(path)}; expected {' or '.join(k.label for k in kinds)}"
            + (f" ({hint})" if hint else "")
        )
    return path, kind


# ----------------------------------------------------------------------------------------------- checkpoints
def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint of ``step`` (``step_000123``; every run kind uses this)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{_CKPT_PREFIX}{step:0{_CKPT_DIGITS}d}"


_CKPT_RE = re.compile(rf"^{_CKPT_PREFIX}(\d+)$")


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder name (any number of digits: older SAE runs wrote 8), else None."""
    m = _CKPT_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path


def list_checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """Every finished checkpoint folder under ``run_dir/checkpoints`` (temp folders of interrupted writes are
    ignored), by step. Not verified: see `verify_checkpoint`."""
    root = Path(run_dir) / CHECKPOINTS
    out = []
    if root.is_dir():
        for p in root.iterdir():
            step = checkpoint_step(p.name)
            if step is not None and p.is_dir():
                out.append(Checkpoint(step, p))
    return sorted(out, key=lambda c: c.step)


MODEL_CHECKPOINT_FILES = (MODEL_WEIGHTS, CONFIG)
RESUME_FILES = (OPTIMIZER, RNG)


def verify_checkpoint(
    path: Path, *, need_optimizer: bool = True, required: Iterable[str] | None = None
) -> str | None:
    """None if the checkpoint is complete and intact, else the reason it is not. ``required``: the files it
    must hold (default: a model checkpoint's, with the optimizer and RNG state when ``need_optimizer``)."""
    state_file = Path(path) / STATE
    if not state_file.is_file():
        return f"no {STATE} (interrupted write?)"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        return f"{STATE} is not valid JSON ({err})"
    hashes = state.get("sha256") if isinstance(state, dict) else None
    if not isinstance(hashes, dict):
        return f"{STATE} has no file hashes"
    if required is None:
        required = set(MODEL_CHECKPOINT_FILES) | (set(RESUME_FILES) if need_optimizer else set())
    missing = sorted(set(required) - set(hashes))
    if missing:
        return f"missing {', '.join(missing)}"
    sizes = state.get("sizes") or {}
    for name, digest in hashes.items():
        problem = check_file(Path(path) / name, {"sha256": digest, "size": sizes.get(name)})
        if problem is not None:
            return f"{name} {problem}"
    return None


def _checkpoints(
    path: Path, intact: bool, required: Iterable[str] | None, need_optimizer: bool
) -> list[Checkpoint]:
    found = list_checkpoints(path)
    if not intact:
        return found
    req = None if required is None else tuple(required)
    return [
        c for c in found if verify_checkpoint(c.path, need_optimizer=need_optimizer, required=req) is None
    ]


def read_log(folder: str | Path) -> list[dict[str, Any]]:
    """The rows of ``folder/log.jsonl`` (empty when there is none); a torn last line is skipped."""
    return _read_log(Path(folder))


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``log.jsonl``; a torn last line (a job killed mid-write) is skipped."""
    file = path / LOG
    if not file.is_file():
        return []
    rows = []
    lines = file.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise RunError(f"{file} line {i + 1} is not JSON") from None
    return rows


def _report(path: Path) -> dict[str, Any] | None:
    return read_json(path / REPORT) if (path / REPORT).is_file() else None


# ----------------------------------------------------------------------------------------------- openers
@dataclass(frozen=True)
class TrainRun:
    """A training run folder (`interplab train`). ``config`` is the TrainConfig as a dict (without ``kind``
    and ``version``: ``TrainConfig.from_dict(run.config)``)."""

    path: Path
    config: dict[str, Any]
    version: int

    @classmethod
    def open(cls, path: str | Path) -> TrainRun:
        hint = "a folder written by `interplab train`, holding config.json"
        if detect(path) is None:
            raise NotARunError(f"{path} is not a training run: it is {describe(path)} ({hint})")
        path, _ = _expect(path, [Kind.TRAIN], hint)
        data = read_json(path / CONFIG, Kind.TRAIN)
        version = int(data.get("version", 1))
        return cls(path, {k: v for k, v in data.items() if k != "kind"}, version)

    def checkpoints(self, intact: bool = True, *, need_optimizer: bool = False) -> list[Checkpoint]:
        """The run's checkpoints by step; ``intact``: only those whose files match their recorded checksums
        (``need_optimizer``: and that hold the optimizer and RNG state a resume needs)."""
        return _checkpoints(self.path, intact, None, need_optimizer)

    def checkpoint(self, step: int) -> Checkpoint:
        for c in list_checkpoints(self.path):
            if c.step == step:
                return c
        steps = [c.step for c in list_checkpoints(self.path)]
        raise RunError(f"{self.path} has no checkpoint of step {step}; it has {steps or 'none'}")

    @property
    def has_final(self) -> bool:
        return (self.path / FINAL / CONFIG).is_file()

    @property
    def final(self) -> Path:
        """The finished model's folder (``final/``). An unfinished run raises, naming its latest intact
        checkpoint (which `interplab.load_model` also reads)."""
        if self.has_final:
            return self.path / FINAL
        good = self.checkpoints(intact=True)
        hint = (
            f"load its latest intact checkpoint, {good[-1].path}, or resume the run"
            if good
            else "it has no intact checkpoint either: resume it"
        )
        raise RunError(f"{self.path} is a training run with no {FINAL}/ yet (it did not finish): {hint}")

    @property
    def log(self) -> list[dict[str, Any]]:
        return _read_log(self.path)

    @property
    def report(self) -> dict[str, Any] | None:
        return _report(self.path)


@dataclass(frozen=True)
class ModelDir:
    """A model folder interplab reads: its own (`Kind.MODEL`, also each checkpoint) or a Hugging Face one."""

    path: Path
    kind: Kind
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> ModelDir:
        path, kind = _expect(path, [Kind.MODEL, Kind.CHECKPOINT, Kind.HF_MODEL], "config.json + weights")
        return cls(path, kind, read_json(path / CONFIG))

    @property
    def tokenizer(self) -> Path | None:
        p = self.path / TOKENIZER
        return p if p.is_file() else None


def model_folder(path: str | Path) -> Path:
    """The model folder a path names: a training run gives its ``final/`` (an unfinished one raises, naming its
    latest intact checkpoint); a checkpoint, an interplab or a Hugging Face model folder is itself. Anything else
    raises, saying what it is."""
    path = Path(path)
    kind = detect(path)
    if kind is Kind.TRAIN:
        return TrainRun.open(path).final
    if kind in (Kind.MODEL, Kind.CHECKPOINT, Kind.HF_MODEL):
        return path
    raise RunError(
        f"{path} is {describe(path)}; expected a model: a training run (its final/ is loaded), a checkpoint, "
        "an interplab model folder or a Hugging Face model folder"
    )


def sae_folders(path: str | Path) -> dict[str, Path]:
    """The SAE folders a path holds, by name: an SAE folder is itself; an SAE training run gives its ``saes/*``;
    any other folder, the SAEs of the SAE runs (and SAE folders) directly inside it or in its ``sae/``."""
    path = Path(path)
    kind = detect(path)
    if kind is Kind.SAE:
        return {path.name: path}
    if kind is Kind.SAE_TRAIN:
        root = path / SAES
        return {p.name: p for p in sorted(root.iterdir()) if detect(p) is Kind.SAE} if root.is_dir() else {}
    out: dict[str, Path] = {}
    if path.is_dir():
        for child in sorted(path.iterdir()):
            ck = detect(child) if child.is_dir() else None
            if ck is Kind.SAE:
                out[child.name] = child
            elif ck is Kind.SAE_TRAIN or (ck is None and child.name == SAE_DIR):
                for name, p in sae_folders(child).items():
                    out.setdefault(name, p)
    return out


def pick_sae(path: str | Path, name: str | None = None) -> Path:
    """The one SAE folder ``path`` names (`sae_folders`); with several, ``name`` picks one, and without it the
    error lists them."""
    path = Path(path)
    found = sae_folders(path)
    if name is not None:
        if name in found:
            return found[name]
        raise RunError(f"{path} holds no SAE named {name!r}; it holds {', '.join(found) or 'none'}")
    if len(found) == 1:
        return next(iter(found.values()))
    if not found:
        raise RunError(
            f"{path} is {describe(path)}; expected an SAE folder or an SAE training run holding one"
        )
    raise RunError(
        f"{path} holds {len(found)} SAEs ({', '.join(found)}): name one (e.g. {next(iter(found.values()))})"
    )


@dataclass(frozen=True)
class SAERun:
    """An SAE training run folder (`interplab sae train`). ``config``: what was trained (SAE configs, their
    training configs, the data), as a dict."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> SAERun:
        path, _ = _expect(path, [Kind.SAE_TRAIN], "a folder written by `interplab sae train`")
        return cls(path, read_json(path / CONFIG, Kind.SAE_TRAIN))

    @property
    def saes(self) -> dict[str, Path]:
        """The finished SAEs (``saes/NAME/``), by name."""
        return sae_folders(self.path)

    def sae(self, name: str | None = None) -> Path:
        return pick_sae(self.path, name)

    def checkpoints(self, intact: bool = True) -> list[Checkpoint]:
        """The run's training checkpoints (each SAE in a sub-folder), by step."""
        return _checkpoints(self.path, intact, (), need_optimizer=False)

    @property
    def log(self) -> list[dict[str, Any]]:
        return _read_log(self.path)

    @property
    def summary(self) -> dict[str, Any] | None:
        return read_json(self.path / TRAIN_SUMMARY) if (self.path / TRAIN_SUMMARY).is_file() else None


@dataclass(frozen=True)
class CacheRun:
    """An activation cache folder (``manifest.json`` + safetensors shards)."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> CacheRun:
        path, _ = _expect(path, [Kind.ACTIVATION_CACHE], "a folder written by `interplab sae cache`")
        return cls(path, read_json(path / MANIFEST, Kind.ACTIVATION_CACHE))


REPORT_KINDS = (
    Kind.TRAIN_REPORT,
    Kind.SAE_EVAL,
    Kind.FORMATION,
    Kind.ATTRIBUTION,
    Kind.ROUTING,
    Kind.SCRUB,
    Kind.CIRCUIT,
    Kind.DISCOVERY,
    Kind.PATCH,
    Kind.HEADS,
    Kind.LENS,
    Kind.FEATURE_BUILD,
    Kind.FEATURE_EXPORT,
    Kind.AUTO_INTERP,
    Kind.STEERING,
)


@dataclass(frozen=True)
class Report:
    """A report a command wrote: ``path`` is its JSON file, ``data`` the document (with ``kind``/``version``)."""

    path: Path
    kind: Kind
    data: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, kind: Kind | str | Iterable[Kind | str] | None = None) -> Report:
        """``path``: the report file or the folder holding it (``report.json``, else ``formation.json``)."""
        path = Path(path)
        if path.is_dir():
            file = next((path / n for n in (REPORT, FORMATION_JSON) if (path / n).is_file()), None)
            if file is None:
                raise RunError(f"{path} is {describe(path)}; expected a folder holding {REPORT}")
            path = file
        data = read_json(path, REPORT_KINDS if kind is None else kind)
        return cls(path, detect_document(path.name, data), data)  # type: ignore[arg-type]


def open_run(path: str | Path) -> TrainRun | SAERun | CacheRun | ModelDir | Report:
    """The typed view of any folder interplab wrote (dispatching on `detect`); `RunError` for anything else."""
    path = Path(path)
    kind = detect(path)
    if kind is Kind.TRAIN:
        return TrainRun.open(path)
    if kind is Kind.SAE_TRAIN:
        return SAERun.open(path)
    if kind is Kind.ACTIVATION_CACHE:
        return CacheRun.open(path)
    if kind in (Kind.MODEL, Kind.CHECKPOINT, Kind.HF_MODEL):
        return ModelDir.open(path)
    if kind in REPORT_KINDS:
        return Report.open(path)
    raise RunError(f"{path} is {describe(path)}; expected a folder an interplab command wrote")
