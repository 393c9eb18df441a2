"""Typed views of the folders interplab writes: `TrainRun`, `SAERun`, `CacheRun`, `ModelDir`, `Report`, the
dictionaries (`SAEDir`, `CrosscoderDir`, `CLTDir`, `ModelDiffRun`, `CLTTrainRun`; `dictionary_folder` /
`open_dictionary` for any of them), the decision-transformer ones (`TrajectoriesDir`, `DTModelDir`, `DTTrainRun`,
`DTEvalRun`, `PPORun`), and `open_run` for any of them; each accepts the folder itself and says what a folder is
when it is not one."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interplab.runs.checkpoints import Checkpoint, _checkpoints, list_checkpoints
from interplab.runs.dictionaries import DictionaryInfo, dictionary_info
from interplab.runs.documents import detect_document, read_json, read_log
from interplab.runs.folders import _expect, describe, detect, pick_sae, sae_folders
from interplab.runs.kinds import Kind, NotARunError, RunError
from interplab.runs.names import (
    _SHARD_PREFIX,
    CALIBRATION_JSON,
    CLT_CFG,
    CLT_DIR,
    CLTS_DIR,
    CONFIG,
    CROSSCODER_CFG,
    CROSSCODER_DIR,
    DIFF_JSON,
    DIFFS,
    FEATURE_DB,
    FINAL,
    FORMATION_JSON,
    GRAPH_JSON,
    GRAPH_TENSORS,
    MANIFEST,
    MODEL_WEIGHTS,
    REPORT,
    ROLLOUTS,
    SAE_CFG,
    TOKENIZER,
    TRAIN_SUMMARY,
)


def _open_doc(path: str | Path, kind: Kind, name: str, hint: str) -> tuple[Path, dict[str, Any]]:
    """``path`` checked to be a ``kind`` folder, and its document ``name`` (read checking its kind)."""
    folder, _ = _expect(path, [kind], hint)
    return folder, read_json(folder / name, kind)


def _read_if_there(file: Path) -> dict[str, Any] | None:
    """The document in ``file``, or None while the run has not written it."""
    return read_json(file) if file.is_file() else None


class _LoggedRun:
    """What every training run folder has: its ``log.jsonl`` rows and its ``report.json`` once finished."""

    path: Path

    @property
    def log(self) -> list[dict[str, Any]]:
        return read_log(self.path)

    @property
    def report(self) -> dict[str, Any] | None:
        return _read_if_there(self.path / REPORT)


@dataclass(frozen=True)
class TrainRun(_LoggedRun):
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
        found = list_checkpoints(self.path)
        for c in found:
            if c.step == step:
                return c
        steps = [c.step for c in found]
        raise RunError(f"{self.path} has no checkpoint of step {step}; it has {steps or 'none'}")

    @property
    def has_final(self) -> bool:
        return (self.path / FINAL / CONFIG).is_file()

    @property
    def diffs(self) -> dict[str, Path]:
        """The model diffs between the run's checkpoints (``diffs/step_A-step_B/``, Kind.MODEL_DIFF), by name."""
        root = self.path / DIFFS
        found = sorted(root.iterdir()) if root.is_dir() else []
        return {p.name: p for p in found if detect(p) is Kind.MODEL_DIFF}

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
        return read_log(self.path)

    @property
    def summary(self) -> dict[str, Any] | None:
        return _read_if_there(self.path / TRAIN_SUMMARY)


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
    Kind.LLC,
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
    Kind.DT_TRAIN_REPORT,
    Kind.DT_ANALYSIS,
    Kind.DT_FEATURES,
    Kind.CLT_EVAL,
    Kind.PPO_REPORT,
    Kind.GRAPH_ACROSS,
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


@dataclass(frozen=True)
class TrajectoriesDir:
    """A trajectory data set (`interplab dt collect`, `interplab.rl.TrajectoryWriter`): ``manifest`` is its
    manifest.json (the env, the shards, the source); `interplab.rl.load_trajectories` reads the steps."""

    path: Path
    manifest: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> TrajectoriesDir:
        return cls(
            *_open_doc(path, Kind.TRAJECTORIES, MANIFEST, "a folder written by `interplab dt collect`")
        )

    @property
    def env(self) -> str | None:
        env = self.manifest.get("env")
        return env if isinstance(env, str) else None

    @property
    def shards(self) -> list[Path]:
        """The shard files present, in order (``shard_00000.safetensors`` ...)."""
        return sorted(p for p in self.path.glob(f"{_SHARD_PREFIX}*.safetensors") if p.is_file())


@dataclass(frozen=True)
class DTModelDir:
    """A decision-transformer model folder (`interplab.rl.save_dt`; also a DT training run's ``final/``).
    ``config``: its DTConfig as a dict (with ``kind`` and ``version``)."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> DTModelDir:
        return cls(*_open_doc(path, Kind.DT_MODEL, CONFIG, "config.json with a DTConfig + model.safetensors"))


@dataclass(frozen=True)
class DTTrainRun(_LoggedRun):
    """A decision-transformer training run (`interplab dt train`, `interplab.rl.train_dt`). ``config``: its
    config.json as a dict (the model and training configs, the data), without ``kind``."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> DTTrainRun:
        path, data = _open_doc(path, Kind.DT_TRAIN, CONFIG, "a folder written by `interplab dt train`")
        return cls(path, {k: v for k, v in data.items() if k != "kind"})

    def checkpoints(self, intact: bool = True) -> list[Checkpoint]:
        """The run's checkpoints (each a model folder with its state.json), by step; ``intact``: only those
        whose files match their recorded checksums."""
        return _checkpoints(self.path, intact, None, need_optimizer=False)

    @property
    def has_final(self) -> bool:
        return detect(self.path / FINAL) is Kind.DT_MODEL

    @property
    def final(self) -> Path:
        """The trained model's folder (``final/``); an unfinished run raises, naming its latest checkpoint."""
        if self.has_final:
            return self.path / FINAL
        good = self.checkpoints(intact=True)
        hint = (
            f"evaluate its latest intact checkpoint, {good[-1].path}, or resume it" if good else "resume it"
        )
        raise RunError(f"{self.path} is a decision-transformer training run with no {FINAL}/ yet: {hint}")


def dt_model_folder(path: str | Path) -> Path:
    """The decision-transformer model folder a path names: a DT training run gives its ``final/`` (an unfinished
    one raises, naming its latest intact checkpoint); a DT model folder or checkpoint is itself."""
    path = Path(path)
    kind = detect(path)
    if kind is Kind.DT_TRAIN:
        return DTTrainRun.open(path).final
    if kind is Kind.DT_MODEL:
        return path
    raise RunError(
        f"{path} is {describe(path)}; expected a decision transformer: a DT training run (its final/ is "
        "loaded) or a DT model folder"
    )


@dataclass(frozen=True)
class DTEvalRun:
    """A decision-transformer evaluation (`interplab dt eval`, `interplab.rl.Calibration.save`): ``data`` is
    its calibration.json (per target return: episodes, mean achieved return, 95% CI)."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> DTEvalRun:
        path = Path(path)
        if path.is_file():
            return cls(path.parent, read_json(path, Kind.DT_EVAL))
        return cls(
            *_open_doc(path, Kind.DT_EVAL, CALIBRATION_JSON, "a folder written by `interplab dt eval`")
        )

    @property
    def rollouts(self) -> Path | None:
        """The episodes the evaluation played (a trajectories folder), when it kept them."""
        p = self.path / ROLLOUTS
        return p if detect(p) is Kind.TRAJECTORIES else None


@dataclass(frozen=True)
class GraphRun:
    """An attribution graph folder (`interplab graph build`, `interplab.graphs.AttributionGraph.save`):
    ``report`` is its report.json (scores, sizes, targets, where the model and CLT were); `interplab.graphs`
    reads the tensors (``graph.safetensors``) and writes ``graph.json`` (Neuronpedia's schema, the pruned graph,
    where the web app saves pins and supernodes)."""

    path: Path
    report: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> GraphRun:
        return cls(
            *_open_doc(path, Kind.ATTRIBUTION_GRAPH, REPORT, "a folder written by `interplab graph build`")
        )

    @property
    def graph_json(self) -> Path:
        return self.path / GRAPH_JSON

    @property
    def tensors(self) -> Path:
        return self.path / GRAPH_TENSORS


@dataclass(frozen=True)
class CLTDir:
    """A cross-layer (or per-layer) transcoder folder (`interplab.sae.clt.save_clt`); ``config`` its cfg.json
    (the CLTConfig, kind ``clt``). `interplab.sae.clt.load_clt` reads the weights."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> CLTDir:
        return cls(
            *_open_doc(path, Kind.CLT, CLT_CFG, "a folder written by save_clt / `interplab clt train`")
        )


@dataclass(frozen=True)
class CLTTrainRun:
    """A CLT training run (`interplab clt train`): one CLT (``clt/``), or one per checkpoint of a model's
    training run (``clts/step_N/``, each a CLT training run of its own). ``config``: config.json, no kind."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> CLTTrainRun:
        path, data = _open_doc(path, Kind.CLT_TRAIN, CONFIG, "a folder written by `interplab clt train`")
        return cls(path, {k: v for k, v in data.items() if k != "kind"})

    @property
    def across(self) -> bool:
        """Whether this run trained one CLT per checkpoint (``clts/``)."""
        return "across" in self.config

    @property
    def shared(self) -> dict[str, Any] | None:
        """For one CLT trained on activations pooled from several checkpoints (`train_clt_shared`): where
        they came from (``run``, ``checkpoints``: names, ``rows_per_checkpoint``); else None."""
        data = self.config.get("data")
        return data.get("shared") if isinstance(data, dict) else None

    @property
    def runs(self) -> dict[str, Path]:
        """The single-CLT runs inside, by name: this run itself, or each checkpoint's (``clts/NAME``)."""
        if not self.across:
            return {CLT_DIR: self.path}
        root = self.path / CLTS_DIR
        names = [str(n) for n in self.config["across"].get("checkpoints", [])]
        return {n: root / n for n in names if detect(root / n) is Kind.CLT_TRAIN}

    @property
    def clts(self) -> dict[str, Path]:
        """The finished CLT folders, by name (``clt`` for a single run, the checkpoint names across a run)."""
        return {n: p / CLT_DIR for n, p in self.runs.items() if detect(p / CLT_DIR) is Kind.CLT}

    @property
    def clt(self) -> Path:
        """The one finished CLT (a single run); an unfinished run or one across checkpoints raises."""
        found = self.clts
        if self.across:
            raise RunError(
                f"{self.path} holds one CLT per checkpoint ({', '.join(found) or 'none yet'}): name one"
            )
        if not found:
            raise RunError(f"{self.path} is a CLT training run with no {CLT_DIR}/ yet: resume it")
        return found[CLT_DIR]

    def checkpoints(self, intact: bool = True) -> list[Checkpoint]:
        return _checkpoints(self.path, intact, (), need_optimizer=False)

    @property
    def log(self) -> list[dict[str, Any]]:
        return read_log(self.path)


@dataclass(frozen=True)
class SAEDir:
    """One SAE folder (SAELens' layout: cfg.json + sae_weights.safetensors); ``config`` its cfg.json (a foreign
    format: no kind). `interplab.sae.load_sae` reads the weights."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> SAEDir:
        path, _ = _expect(path, [Kind.SAE], "cfg.json + sae_weights.safetensors (`interplab sae train`)")
        return cls(path, read_json(path / SAE_CFG))

    @property
    def info(self) -> DictionaryInfo:
        return dictionary_info(self.path, Kind.SAE)


@dataclass(frozen=True)
class CrosscoderDir:
    """A crosscoder folder (`interplab.sae.crosscoder.Crosscoder.save`); ``config`` its cfg.json (kind
    crosscoder: sources, d_in, d_sae, k). `interplab.sae.crosscoder.load_crosscoder` reads the weights."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> CrosscoderDir:
        return cls(*_open_doc(path, Kind.CROSSCODER, CROSSCODER_CFG, "a folder written by Crosscoder.save"))

    @property
    def sources(self) -> list[str]:
        return [str(s) for s in self.config.get("sources", [])]

    @property
    def info(self) -> DictionaryInfo:
        return dictionary_info(self.path, Kind.CROSSCODER)


@dataclass(frozen=True)
class ModelDiffRun:
    """A model diff between two checkpoints (`interplab sae diff`, ``RUN/diffs/step_A-step_B``): ``data`` is
    its diff.json (counts, per latent its relative decoder norm and label, the formation link)."""

    path: Path
    data: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> ModelDiffRun:
        return cls(*_open_doc(path, Kind.MODEL_DIFF, DIFF_JSON, "a folder written by `interplab sae diff`"))

    @property
    def crosscoder(self) -> Path:
        """The diff's crosscoder folder; a diff whose crosscoder is missing raises, saying how to remake it."""
        p = self.path / CROSSCODER_DIR
        if detect(p) is not Kind.CROSSCODER:
            raise RunError(
                f"{self.path} is a model diff with no {CROSSCODER_DIR}/ (it is {describe(p)}): run the same "
                "`interplab sae diff` again to make it"
            )
        return p

    @property
    def database(self) -> Path | None:
        """The crosscoder's feature database (its latent pages), when it was built."""
        p = self.path / FEATURE_DB
        return p if p.is_file() else None

    @property
    def formation(self) -> dict[str, Any] | None:
        """The run's formation step and whether the diff brackets it (None: the run had no formation report)."""
        f = self.data.get("formation")
        return f if isinstance(f, dict) else None


def dictionary_folder(path: str | Path, name: str | None = None) -> tuple[Path, Kind]:
    """The dictionary folder ``path`` names and what it is (Kind.SAE, CROSSCODER or CLT): a dictionary folder
    is itself; a model diff gives its crosscoder; a CLT training run its CLT (one per checkpoint: ``name``
    picks one); an SAE training run, or a folder holding SAEs, its SAE (`pick_sae`: ``name`` picks among
    several). Anything else raises, saying what it is."""
    path = Path(path)
    kind = detect(path)
    if kind in (Kind.SAE, Kind.CROSSCODER, Kind.CLT):
        return path, kind
    if kind is Kind.MODEL_DIFF:
        return ModelDiffRun.open(path).crosscoder, Kind.CROSSCODER
    if kind is Kind.CLT_TRAIN:
        run = CLTTrainRun.open(path)
        if not run.across:
            return run.clt, Kind.CLT
        found = run.clts
        if name in found:
            return found[name], Kind.CLT
        raise RunError(
            f"{path} holds one CLT per checkpoint ({', '.join(found) or 'none yet'}): name one"
            + (f" (not {name!r})" if name is not None else "")
        )
    if sae_folders(path) or kind is Kind.SAE_TRAIN:
        return pick_sae(path, name), Kind.SAE
    raise RunError(
        f"{path} is {describe(path)}; expected a dictionary: an SAE, a crosscoder or a CLT folder, or a run "
        "holding one (an SAE training run, a model diff, a CLT training run)"
    )


def open_dictionary(path: str | Path, name: str | None = None) -> DictionaryInfo:
    """What the dictionary ``path`` names is (`dictionary_folder`), from its JSON: kind, architecture, the
    sites (of which models or checkpoints) it reads and writes, its size and how its training ended."""
    folder, kind = dictionary_folder(path, name)
    return dictionary_info(folder, kind)


@dataclass(frozen=True)
class PPORun(_LoggedRun):
    """A PPO training run (`interplab dt ppo`, `interplab.rl.ppo.train_ppo`). ``config``: its PPOConfig as a
    dict (without ``kind``); checkpoints are named by environment steps and hold the policy's weights
    (``model.safetensors``), the optimizer and the running episodes (``rollout.safetensors``)."""

    path: Path
    config: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path) -> PPORun:
        path, data = _open_doc(path, Kind.PPO, CONFIG, "a folder written by `interplab dt ppo`")
        return cls(path, {k: v for k, v in data.items() if k != "kind"})

    def checkpoints(self, intact: bool = True) -> list[Checkpoint]:
        """The run's checkpoints by environment step; ``intact``: only those whose files match their
        recorded checksums."""
        return _checkpoints(self.path, intact, (MODEL_WEIGHTS,), need_optimizer=False)

    def checkpoint(self, step: int) -> Checkpoint:
        """The intact checkpoint of ``step`` environment steps (an error lists the steps there are)."""
        found = self.checkpoints()
        for c in found:
            if c.step == step:
                return c
        raise RunError(
            f"{self.path} has no intact checkpoint of step {step}; it has {[c.step for c in found] or 'none'}"
        )

    @property
    def latest(self) -> Checkpoint:
        """The newest intact checkpoint (the trained policy once the run finished)."""
        found = self.checkpoints()
        if not found:
            raise RunError(f"{self.path} is a PPO run with no intact checkpoint yet: resume it")
        return found[-1]


Opened = (
    TrainRun
    | SAERun
    | CacheRun
    | ModelDir
    | Report
    | TrajectoriesDir
    | DTModelDir
    | DTTrainRun
    | DTEvalRun
    | GraphRun
    | CLTDir
    | CLTTrainRun
    | PPORun
    | SAEDir
    | CrosscoderDir
    | ModelDiffRun
)


def open_run(path: str | Path) -> Opened:
    """The typed view of any folder interplab wrote (dispatching on `detect`); `RunError` for anything else."""
    path = Path(path)
    kind = detect(path)
    opener = _OPENERS.get(kind) if kind is not None else None
    if opener is not None:
        return opener(path)
    if kind in (Kind.MODEL, Kind.CHECKPOINT, Kind.HF_MODEL):
        return ModelDir.open(path)
    if kind in REPORT_KINDS:
        return Report.open(path)
    raise RunError(f"{path} is {describe(path)}; expected a folder an interplab command wrote")


_OPENERS: dict[Kind, Callable[[Path], Opened]] = {
    Kind.TRAIN: TrainRun.open,
    Kind.SAE_TRAIN: SAERun.open,
    Kind.ACTIVATION_CACHE: CacheRun.open,
    Kind.TRAJECTORIES: TrajectoriesDir.open,
    Kind.DT_MODEL: DTModelDir.open,
    Kind.DT_TRAIN: DTTrainRun.open,
    Kind.DT_EVAL: DTEvalRun.open,
    Kind.PPO: PPORun.open,
    Kind.ATTRIBUTION_GRAPH: GraphRun.open,
    Kind.CLT: CLTDir.open,
    Kind.CLT_TRAIN: CLTTrainRun.open,
    Kind.SAE: SAEDir.open,
    Kind.CROSSCODER: CrosscoderDir.open,
    Kind.MODEL_DIFF: ModelDiffRun.open,
}
