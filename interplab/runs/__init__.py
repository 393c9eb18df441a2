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
        llc/                            `interplab llc`: report.json {kind: llc, version, steps, components,
                                        llc, se, ...} + llc.html/png, estimates/step_000123.json (Kind.
                                        LLC_CHECKPOINT: one checkpoint's estimates with loss traces; the
                                        command skips the checkpoints already there with the same settings)
    model folder (Kind.MODEL)           config.json {kind: model, version, ...ModelConfig} + model.safetensors
                                        (+ tokenizer.json, checksums.json)
    SAE training run (Kind.SAE_TRAIN)   `interplab sae train`
        config.json                     {kind: sae_train, version, saes, train, data}
        log.jsonl, train_summary.json (Kind.SAE_TRAIN_SUMMARY), checkpoints/step_N/NAME/,
        eval/report.json, eval/NAME/report.json (Kind.SAE_EVAL: the set, and each SAE's)
        saes/NAME/                      each finished SAE (Kind.SAE): SAELens' layout, cfg.json +
                                        sae_weights.safetensors (a foreign format: cfg.json stays SAELens')
    crosscoder (Kind.CROSSCODER)        cfg.json {kind: crosscoder, version, d_in, d_sae, k, sources, model_name,
                                        meta} + crosscoder.safetensors (interplab's own: sae_lens has none)
    model diff (Kind.MODEL_DIFF)        `interplab sae diff`, in a training run's diffs/step_A-step_B/: diff.json
                                        {kind: model_diff, version, before, after, counts, relative_norm, labels,
                                        cosine, formation (the run's formation step, whether A < it <= B), ...},
                                        diff.md, relative_norm.html/png, crosscoder/ (Kind.CROSSCODER), train/
                                        (its training checkpoints), features.db (a page per latent)
    CLT folder (Kind.CLT)               cfg.json {kind: clt, version, ...CLTConfig} + circuit-tracer's weight files
    dictionaries                        an SAE, a crosscoder or a CLT folder: `open_dictionary` says what one is
                                        (kind, sites read, size, how its training ended: `DictionaryInfo`),
                                        `interplab.sae.load_dictionary` loads any of them
    activation cache (Kind.ACTIVATION_CACHE)   manifest.json {kind: activation_cache, version, ...} + shards
    feature database (Kind.FEATURE_DB)  features.db, SQLite; its ``meta`` table holds the kind and version
    trajectories (Kind.TRAJECTORIES)    `interplab dt collect`: manifest.json {kind: trajectories, version, env,
                                        shards, source, ...} + shard_00000.safetensors ... (whole episodes)
    DT training run (Kind.DT_TRAIN)     `interplab dt train`: config.json {kind: dt_train, version, model,
                                        train, data}, log.jsonl, checkpoints/step_N/, final/ (Kind.DT_MODEL:
                                        config.json {kind: dt_model, ...DTConfig} + model.safetensors),
                                        report.json {kind: dt_train_report}
    DT evaluation (Kind.DT_EVAL)        `interplab dt eval`: calibration.json {kind: dt_eval, version, env,
                                        targets: per target its episodes, mean return, 95% CI} + pictures,
                                        trajectories/ (Kind.TRAJECTORIES: the episodes it played)
    PPO run (Kind.PPO)                  `interplab dt ppo`: config.json {kind: ppo, version, ...PPOConfig}, log.jsonl,
                                        checkpoints/step_N/ (N env steps: model.safetensors, optimizer.safetensors,
                                        rollout.safetensors, state.json), report.json {kind: ppo_report}
    DT analysis (Kind.DT_ANALYSIS)      `interplab dt analyze`: report.json {kind: dt_analysis, ...} + pictures
    DT features                         `interplab dt sae`: an SAE training run (config.json's data holds
                                        ``dt``: model, trajectories, site, kinds) + features.db (meta ``dt``,
                                        table dt_rows) + report.json {kind: dt_features}
    attribution graph                   `interplab graph build`: report.json {kind: attribution_graph, version,
    (Kind.ATTRIBUTION_GRAPH)            scores, sizes, targets, model, clt}, graph.safetensors (the unpruned
                                        adjacency and nodes), graph.json (Neuronpedia's graph JSON, pruned)
    graphs across checkpoints           `interplab graph across`, in a training run's graphs/NAME/: report.json
    (Kind.GRAPH_ACROSS)                 {kind: graph_across, version, steps, per step scores + formation scores,
                                        changes}, across.html/.png, step_N/ (an attribution graph each); the
                                        run's CLTs per checkpoint in RUN/clt/clts/step_N/ (Kind.CLT_TRAIN)
    analysis reports                    config.json + report.json {kind: scrub|circuit|discovery|patch|heads|
                                        lens|formation|attribution|routing|sae_eval, version, ...} + pictures;
                                        a discovery run's metrics.json {kind: circuit_metrics} (MIB CPR/CMD)
    gradient recording (Kind.GRADIENTS) config.json {kind: gradients, version, record, projector, group_numel}
                                        + index.json {kind: gradient_index, version, entries} + step_N.safetensors
    JSON documents anywhere            a result's ``.save(x.json)`` {kind: result, version, type: its class, ...};
                                        Generation.save {kind: generation}; feature build/export/explanations/
                                        steering {kind: feature_build|feature_export|auto_interp|steering}; the
                                        token cache's ``<key>.json`` {kind: token_store}; a character
                                        ``tokenizer.json`` {kind: tokenizer}; ``checksums.json`` {kind: checksums}
    foreign formats (no kind)           SAELens' ``cfg.json``, a BPE ``tokenizer.json`` (the tokenizers library's),
                                        a Hugging Face ``config.json``: kept exactly as their tools write them

This package is the bottom layer: it imports only the standard library, `interplab.io` and
`interplab.integrity`, so configs are returned as plain dicts (``TrainConfig.from_dict(run.config)``). Its modules:
``names`` (every file and folder name), ``kinds`` (`Kind`, versions, errors), ``documents`` (JSON with kind and
version, older documents recognised), ``checkpoints`` (listing, verifying), ``dictionaries`` (what an SAE,
crosscoder or CLT folder is, from its JSON), ``folders`` (`detect`, `describe`, `check_out`, where the SAEs
are) and ``openers`` (the typed views).
"""

from interplab.runs.checkpoints import (
    MODEL_CHECKPOINT_FILES,
    RESUME_FILES,
    Checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from interplab.runs.dictionaries import DICTIONARY_KINDS, DictionaryInfo, dictionary_info
from interplab.runs.documents import detect_document, read_json, read_log, write_json, write_log
from interplab.runs.folders import (
    Reader,
    check_out,
    describe,
    detect,
    is_sqlite,
    not_an_sae,
    pick_sae,
    sae_folders,
)
from interplab.runs.kinds import VERSIONS, Kind, NotARunError, RunError
from interplab.runs.names import (
    _CKPT_DIGITS,
    _CKPT_PREFIX,
    _CKPT_RE,
    _SQLITE_MAGIC,
    ATTRIBUTION,
    CALIBRATION_HTML,
    CALIBRATION_JSON,
    CHECKPOINTS,
    CHECKSUMS,
    CONFIG,
    CROSSCODER_CFG,
    CROSSCODER_DIR,
    CROSSCODER_WEIGHTS,
    DIFF_JSON,
    DIFF_TABLE,
    DIFFS,
    EVAL,
    FEATURE_DB,
    FINAL,
    FORMATION,
    FORMATION_JSON,
    GRADIENT_INDEX,
    GRAPH_JSON,
    GRAPH_TENSORS,
    GRAPHS,
    LLC,
    LLC_ESTIMATES,
    LOG,
    MANIFEST,
    METRICS_JSON,
    MODEL_WEIGHTS,
    OPTIMIZER,
    PLOTLY_JS,
    REPORT,
    RNG,
    ROLLOUTS,
    RUN_CLTS,
    RUN_SHARED_CLT,
    SAE_CFG,
    SAE_DIR,
    SAE_SPARSITY,
    SAE_WEIGHTS,
    SAES,
    STATE,
    TOKENIZER,
    TRAIN_SUMMARY,
    checkpoint_name,
    checkpoint_step,
    shard_name,
)
from interplab.runs.openers import (
    REPORT_KINDS,
    CacheRun,
    CLTDir,
    CLTTrainRun,
    CrosscoderDir,
    DTEvalRun,
    DTModelDir,
    DTTrainRun,
    GraphRun,
    ModelDiffRun,
    ModelDir,
    PPORun,
    Report,
    SAEDir,
    SAERun,
    TrainRun,
    TrajectoriesDir,
    dictionary_folder,
    dt_model_folder,
    model_folder,
    open_dictionary,
    open_run,
)

__all__ = [
    "ATTRIBUTION",
    "CALIBRATION_HTML",
    "CALIBRATION_JSON",
    "CHECKPOINTS",
    "CHECKSUMS",
    "CONFIG",
    "CacheRun",
    "CLTDir",
    "CLTTrainRun",
    "CROSSCODER_CFG",
    "CROSSCODER_DIR",
    "CROSSCODER_WEIGHTS",
    "Checkpoint",
    "CrosscoderDir",
    "DICTIONARY_KINDS",
    "DIFF_TABLE",
    "DictionaryInfo",
    "ModelDiffRun",
    "SAEDir",
    "dictionary_folder",
    "dictionary_info",
    "not_an_sae",
    "open_dictionary",
    "DTEvalRun",
    "DTModelDir",
    "DTTrainRun",
    "EVAL",
    "FEATURE_DB",
    "FINAL",
    "DIFF_JSON",
    "DIFFS",
    "FORMATION",
    "FORMATION_JSON",
    "METRICS_JSON",
    "GRADIENT_INDEX",
    "GRAPH_JSON",
    "GRAPHS",
    "GRAPH_TENSORS",
    "GraphRun",
    "Kind",
    "LLC",
    "LLC_ESTIMATES",
    "LOG",
    "MANIFEST",
    "MODEL_CHECKPOINT_FILES",
    "MODEL_WEIGHTS",
    "ModelDir",
    "PPORun",
    "NotARunError",
    "OPTIMIZER",
    "PLOTLY_JS",
    "REPORT",
    "REPORT_KINDS",
    "RESUME_FILES",
    "RNG",
    "ROLLOUTS",
    "RUN_CLTS",
    "RUN_SHARED_CLT",
    "Reader",
    "Report",
    "RunError",
    "SAERun",
    "SAES",
    "SAE_CFG",
    "SAE_DIR",
    "SAE_SPARSITY",
    "SAE_WEIGHTS",
    "STATE",
    "TOKENIZER",
    "TRAIN_SUMMARY",
    "TrainRun",
    "TrajectoriesDir",
    "VERSIONS",
    "_CKPT_DIGITS",
    "_CKPT_PREFIX",
    "_CKPT_RE",
    "_SQLITE_MAGIC",
    "check_out",
    "checkpoint_name",
    "checkpoint_step",
    "describe",
    "detect",
    "detect_document",
    "dt_model_folder",
    "is_sqlite",
    "list_checkpoints",
    "model_folder",
    "open_run",
    "pick_sae",
    "read_json",
    "read_log",
    "sae_folders",
    "shard_name",
    "verify_checkpoint",
    "write_json",
    "write_log",
]
