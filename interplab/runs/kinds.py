"""What a folder or a JSON document is (`Kind`), the version each kind is written with, and the errors a
reader raises."""

from __future__ import annotations

from enum import Enum


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
    CLT = "clt"
    """a cross-layer (or per-layer) transcoder folder (`interplab.sae.clt.save_clt`: cfg.json + circuit-tracer's
    weight files)"""
    CLT_TRAIN = "clt_train"
    """a CLT training run (`interplab clt train`: config.json, log.jsonl, checkpoints/, clt/ or clts/NAME/)"""
    CLT_EVAL = "clt_eval"
    """a CLT evaluation (`interplab clt eval`: report.json, per-layer FVU, replacement CE/KL, error norms)"""
    CROSSCODER = "crosscoder"
    """a crosscoder folder (`interplab.sae.crosscoder.Crosscoder.save`: cfg.json {kind: crosscoder, sources,
    d_in, d_sae, k, meta} + crosscoder.safetensors): one dictionary reading several layers, models or
    checkpoints"""
    MODEL_DIFF = "model_diff"
    """a model diff between two checkpoints of a training run (`interplab sae diff`, ``RUN/diffs/step_A-step_B``):
    diff.json {kind: model_diff, before, after, counts, relative_norm, labels, formation, ...}, diff.md,
    relative_norm.html/png, crosscoder/ (Kind.CROSSCODER), train/ (its training checkpoints), features.db"""
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
    LLC = "llc"
    """the local learning coefficient along a run's checkpoints (`interplab llc`: report.json + pictures)"""
    LLC_CHECKPOINT = "llc_checkpoint"
    """one checkpoint's LLC estimates (total and per component, with loss traces), in an LLC folder's
    ``estimates/step_N.json``"""
    ROUTING = "routing"
    """a gradient-routing experiment (`interplab route`)"""
    SCRUB = "scrub"
    """a causal-scrubbing experiment (`interplab scrub`)"""
    CIRCUIT = "circuit"
    """a circuit (edges + faithfulness)"""
    DISCOVERY = "discovery"
    """circuit discovery (`interplab discover`)"""
    CIRCUIT_METRICS = "circuit_metrics"
    """MIB's faithfulness curves of one set of edge scores (CPR, CMD; ``metrics.json``)"""
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
    TRAJECTORIES = "trajectories"
    """gridworld trajectories (`interplab dt collect`): manifest.json + ``shard_00000.safetensors`` ... (the
    steps of whole episodes: observations, actions, rewards, dones, episode offsets, seeds)"""
    DT_MODEL = "dt_model"
    """a decision-transformer model folder (config.json with a DTConfig + model.safetensors: `rl.save_dt`)"""
    DT_TRAIN = "dt_train"
    """a decision-transformer training run (`interplab dt train`: config.json, log.jsonl, checkpoints/, final/
    (a dt_model folder), report.json)"""
    DT_TRAIN_REPORT = "dt_train_report"
    """the report.json of a decision-transformer training run"""
    DT_EVAL = "dt_eval"
    """a decision-transformer evaluation (`interplab dt eval`): the calibration curve, achieved vs target
    return-to-go, per target its episodes, mean return and 95% CI (``calibration.json``)"""
    ATTRIBUTION_GRAPH = "attribution_graph"
    """an attribution graph of one prompt (`interplab graph build`, `AttributionGraph.save`): report.json
    {kind: attribution_graph, ...}, graph.safetensors (the unpruned adjacency and nodes), graph.json
    (circuit-tracer / Neuronpedia's graph JSON of the pruned graph: a foreign format, no kind)"""
    GRAPH_ACROSS = "graph_across"
    """attribution graphs of one prompt at several checkpoints of a training run (`interplab graph across`,
    ``RUN/graphs/NAME/``): report.json {kind: graph_across, steps, per step its scores and the formation
    report's, the features and edges that appeared or vanished} + step_N/ (Kind.ATTRIBUTION_GRAPH each)"""
    DT_ANALYSIS = "dt_analysis"
    """an analysis of a decision transformer on trajectories (`interplab dt analyze`: probes, patching,
    attention from the decision token; ``report.json`` + pictures)"""
    DT_FEATURES = "dt_features"
    """the report.json of `interplab dt sae` in its SAE training run: the SAE's FVU and L0 on the cached rows,
    the best feature per environment variable (AUROC) and each player step's strongest features"""

    PPO = "ppo"
    """a PPO training run (`interplab dt ppo`, `interplab.rl.ppo.train_ppo`: config.json with a PPOConfig,
    log.jsonl, checkpoints/step_N/ named by environment steps, report.json)"""
    PPO_REPORT = "ppo_report"
    """the report.json of a PPO training run"""

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
    Kind.CLT: "a cross-layer transcoder folder",
    Kind.CLT_TRAIN: "a CLT training run",
    Kind.CLT_EVAL: "a CLT evaluation",
    Kind.CROSSCODER: "a crosscoder folder",
    Kind.MODEL_DIFF: "a model diff between two checkpoints",
    Kind.ACTIVATION_CACHE: "an activation cache",
    Kind.FEATURE_DB: "a feature database",
    Kind.CHECKSUMS: "a checksums record",
    Kind.FORMATION: "a formation report",
    Kind.ATTRIBUTION: "a training-data attribution",
    Kind.LLC: "an LLC estimate along a run",
    Kind.LLC_CHECKPOINT: "a checkpoint's LLC estimates",
    Kind.ROUTING: "a gradient-routing run",
    Kind.SCRUB: "a causal-scrubbing run",
    Kind.CIRCUIT: "a circuit",
    Kind.DISCOVERY: "a circuit-discovery run",
    Kind.CIRCUIT_METRICS: "a set of circuit faithfulness curves",
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
    Kind.TRAJECTORIES: "a trajectory data set",
    Kind.DT_MODEL: "a decision-transformer model folder",
    Kind.DT_TRAIN: "a decision-transformer training run",
    Kind.DT_TRAIN_REPORT: "a decision-transformer training report",
    Kind.DT_EVAL: "a decision-transformer evaluation",
    Kind.DT_ANALYSIS: "a decision-transformer analysis",
    Kind.DT_FEATURES: "a decision-transformer feature report",
    Kind.ATTRIBUTION_GRAPH: "an attribution graph",
    Kind.GRAPH_ACROSS: "a set of attribution graphs across checkpoints",
    Kind.PPO: "a PPO training run",
    Kind.PPO_REPORT: "a PPO training report",
}

VERSIONS: dict[Kind, int] = {k: 1 for k in Kind}
"""The schema version each kind is written with now; a reader accepts this version and older ones."""
VERSIONS[Kind.ACTIVATION_CACHE] = 2
VERSIONS[Kind.FEATURE_DB] = 4


def _as_kind(kind: Kind | str) -> Kind:
    try:
        return Kind(kind)
    except ValueError:
        raise ValueError(f"unknown run kind {kind!r}; valid: {', '.join(k.value for k in Kind)}") from None
