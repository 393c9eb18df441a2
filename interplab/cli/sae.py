"""``interplab sae cache|train|eval|bench``: cache activations, train SAEs (one or a sweep, from one pass),
evaluate, and compare SAEs (`interplab.sae.bench`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
import typer

from interplab.cli.common import (
    EVAL_BATCH_SEQS,
    JobProgress,
    batches_option,
    check_out_folder,
    check_seq_len,
    choice,
    command_hint,
    console,
    corpus_option,
    dtype_option,
    fail,
    load_model_arg,
    non_negative_float,
    non_negative_int,
    out_folder,
    positive_float,
    positive_int,
    print_command,
    seq_len_option,
    set_threads,
    split_option,
    threads_param,
)
from interplab.features.crosscoder_db import build_diff_db
from interplab.model import Transformer
from interplab.plots import save_figure
from interplab.runs import (
    CROSSCODER_DIR,
    DIFF_JSON,
    DIFF_TABLE,
    DIFFS,
    EVAL,
    FEATURE_DB,
    REPORT,
    SAE_CFG,
    SAES,
    Kind,
    RunError,
    SAERun,
    describe,
    detect,
    not_an_sae,
    sae_folders,
    write_json,
)
from interplab.sae import load_sae
from interplab.sae.activations import SAE_TASKS, TASK_PREFIX, corpus_token_batches
from interplab.sae.bench import BenchConfig, bench_saes, task_labellers, tokenizer_labellers
from interplab.sae.config import Architecture
from interplab.sae.crosscoder import CrosscoderTrainConfig
from interplab.sae.diffing import default_diff_folder, diff_checkpoints
from interplab.sae.disk_store import cache_activations
from interplab.sae.evaluate import evaluate_sae
from interplab.sae.plots import sparsity_frontier
from interplab.sae.sweep import (
    SAESweepConfig,
    cache_source,
    canonical_hooks,
    model_source,
    parse_sweep,
    plan_sweep,
    train_sweep,
)
from interplab.sae.train import SAETrainProgress
from interplab.tasks import get_task, list_tasks
from interplab.train.distributed import DistInfo, RankFailure, init_distributed, shutdown, world_size

app = typer.Typer(help="Sparse autoencoders: cache activations, train, evaluate.", no_args_is_help=True)


CACHE_DTYPES = ("float32", "float16", "bfloat16")
CORPUS_HELP = (
    f"python-stdlib, a file/folder/dataset path, or {TASK_PREFIX}NAME: examples of an interplab.tasks task "
    f"({', '.join(SAE_TASKS)}), for a model trained on it"
)


def _architecture(value: str) -> str:
    try:
        return Architecture.parse(value).value
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None


def _hooks_of(model: Transformer, hooks: list[str]) -> list[str]:
    """The canonical names of ``hooks``, each checked against the model before anything is written."""
    names = _canon(hooks)
    for name in names:
        if name not in model.hook_points:
            model.hook_registry.resolve(name)  # raises the model's own error (layer count, suggestions)
    return names


@app.command("cache")
def cache(
    model_path: Path = typer.Argument(
        ..., help="model folder (interplab, Hugging Face or TransformerLens), or a training run (its final/)"
    ),
    hooks: list[str] = typer.Option(
        ..., "--hook", help="site to cache, e.g. blocks.1.hook_resid_post (repeatable)"
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="cache folder (resumes an unfinished one)", callback=out_folder
    ),
    corpus: str = corpus_option(CORPUS_HELP),
    split: str = split_option("train"),
    seq_len: int = seq_len_option(),
    batch: int = typer.Option(16, "--batch", help="sequences per forward pass", callback=positive_int),
    tokens: int = typer.Option(
        1_000_000, "--tokens", help="stop after about this many activation rows", callback=positive_int
    ),
    dtype: str = typer.Option(
        "bfloat16",
        "--dtype",
        help="float32, float16 or bfloat16 on disk",
        callback=choice(CACHE_DTYPES),
    ),
    shard_rows: int = typer.Option(65536, "--shard-rows", callback=positive_int),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="delete an existing cache at --out and start again"
    ),
    model_dtype: str = dtype_option("--model-dtype"),
    threads: int = threads_param(),
) -> None:
    """Run the model over a corpus and write activations to a sharded cache (an interrupted one resumes when
    the model, data and settings are the same; anything different is refused). Under torchrun
    (torchrun --nproc_per_node N -m interplab sae cache ...) every process caches its share of the token
    batches, each once."""
    set_threads(threads)
    with _processes():
        _cache(
            model_path,
            hooks,
            out,
            corpus,
            split,
            seq_len,
            batch,
            tokens,
            dtype,
            shard_rows,
            overwrite,
            model_dtype,
        )


def _cache(
    model_path: Path,
    hooks: list[str],
    out: Path,
    corpus: str,
    split: str,
    seq_len: int | None,
    batch: int,
    tokens: int,
    dtype: str,
    shard_rows: int,
    overwrite: bool,
    model_dtype: str | None = None,
) -> None:
    model = load_model_arg(model_path, dtype=model_dtype)
    seq_len = check_seq_len(seq_len, model)
    hooks = _hooks_of(model, hooks)
    try:
        data = corpus_token_batches(model, corpus, split=split, seq_len=seq_len, batch_size=batch)
        with JobProgress("sae cache", total=tokens, unit="rows") as bar:
            res = cache_activations(
                model,
                data.batches,
                hooks,
                out,
                dtype=dtype,
                shard_rows=shard_rows,
                token_filter=data.token_filter,
                max_rows=tokens,
                source=data.source,
                model_name=str(model_path),
                overwrite=overwrite,
                progress=lambda n: bar.update(min(n, tokens)),
            )
    except (ValueError, KeyError, FileNotFoundError) as err:
        fail(str(err).strip("'\""))
        return
    ranks = f" (written by {world_size()} processes)" if world_size() > 1 else ""
    console.print(
        f"{res.rows:,} rows in {res.shards} shards{ranks}, {res.bytes_per_token:,.0f} bytes/token -> {out}"
    )


@contextlib.contextmanager
def _processes() -> Iterator[DistInfo]:
    """Under torchrun: join the process group (gloo: these commands compute on CPU) for the command, and
    print only on rank 0 (the others' console is quiet); one process: nothing to do."""
    try:
        info = init_distributed(torch.device("cpu"))
    except ValueError as err:
        fail(str(err))
    quiet = console.quiet
    console.quiet = quiet or not info.main
    try:
        yield info
    except RankFailure as err:
        fail(str(err), code=1)
    finally:
        console.quiet = quiet
        shutdown(info)


def _sweep_option(value: list[str]) -> list[str]:
    try:
        parse_sweep(value)  # refuse a bad sweep while the command line is read
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    return value


DEFAULTS = SAESweepConfig()  # the CLI's defaults are the library's


@app.command("train")
def train(
    out: Path = typer.Option(
        ..., "--out", "-o", help="run folder: config.json, log.jsonl, saes/NAME, report", callback=out_folder
    ),
    model_path: Path = typer.Option(None, "--model", help="stream activations from this model over --corpus"),
    cache_dir: Path = typer.Option(
        None, "--cache", help="read activations from this cache (interplab sae cache)"
    ),
    hooks: list[str] = typer.Option(..., "--hook", help="site(s) to train on; one SAE set per hook"),
    arch: str = typer.Option(
        DEFAULTS.architecture.value,
        "--arch",
        help="relu, topk, batchtopk, matryoshka (nested BatchTopK), jumprelu or gated",
        callback=_architecture,
    ),
    expansion: int = typer.Option(
        DEFAULTS.expansion,
        "--expansion",
        help="d_sae = expansion * d_in (unless swept)",
        callback=positive_int,
    ),
    k: int = typer.Option(DEFAULTS.k, "--k", help="active latents for topk/batchtopk", callback=positive_int),
    coefficient: float = typer.Option(
        DEFAULTS.coefficient,
        "--coefficient",
        help="L1 (relu, gated) or L0 (jumprelu) weight; default: the architecture's, scaled to the data",
        callback=non_negative_float,
    ),
    sweep: list[str] = typer.Option(
        [],
        "--sweep",
        help="e.g. coefficient=1,3,10 or k=16,32: several SAEs, one pass",
        callback=_sweep_option,
    ),
    steps: int = typer.Option(DEFAULTS.steps, "--steps", callback=positive_int),
    batch: int = typer.Option(
        DEFAULTS.batch_size, "--batch", help="activation rows per step", callback=positive_int
    ),
    lr: float = typer.Option(DEFAULTS.lr, "--lr", callback=positive_float),
    corpus: str = corpus_option(CORPUS_HELP),
    seq_len: int = seq_len_option(),
    autocast: bool = typer.Option(
        DEFAULTS.autocast, "--bf16/--fp32", help="bfloat16 matmuls with float32 master weights"
    ),
    seed: int = typer.Option(
        DEFAULTS.seed, "--seed", help="seed of the SAEs' initial weights, data order and resampling"
    ),
    checkpoint_every: int = typer.Option(
        DEFAULTS.checkpoint_every,
        "--checkpoint-every",
        help=f"steps between checkpoints (default: a tenth of --steps; the last {DEFAULTS.keep_checkpoints} kept)",
        callback=positive_int,
    ),
    stop_after: int = typer.Option(
        None, "--stop-after", help="stop after this step (run again to resume)", callback=positive_int
    ),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue the same run found in --out"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="replace a different run found in --out (its SAEs, log and checkpoints)"
    ),
    spread: bool = typer.Option(
        False,
        "--spread/--data-parallel",
        help="under torchrun: spread the sweep's SAEs over the processes (each trains its own on all the data) "
        "instead of training every SAE data-parallel (each process its share of every --batch)",
    ),
    dtype: str = dtype_option(),
    threads: int = threads_param(),
) -> None:
    """Train SAEs (several hooks and/or a sweep, all from one pass over the activations). An interrupted run
    resumes bit-exactly when started again with the same arguments; a different run into the same --out is
    refused unless --overwrite. Under torchrun (torchrun --nproc_per_node N -m interplab sae train ...) it
    trains data-parallel (--batch is the global batch), or spreads a sweep over the processes (--spread)."""
    set_threads(threads)
    if (model_path is None) == (cache_dir is None):
        fail("give exactly one of --model (stream) or --cache (read a cache)")
    with _processes():
        _train(**{k: v for k, v in locals().items() if k != "threads"})


def _train(
    out: Path,
    model_path: Path | None,
    cache_dir: Path | None,
    hooks: list[str],
    arch: str,
    expansion: int,
    k: int,
    coefficient: float | None,
    sweep: list[str],
    steps: int,
    batch: int,
    lr: float,
    corpus: str,
    seq_len: int | None,
    autocast: bool,
    seed: int,
    checkpoint_every: int | None,
    stop_after: int | None,
    resume: bool,
    overwrite: bool,
    spread: bool,
    dtype: str | None = None,
) -> None:
    try:
        cfg = SAESweepConfig(
            architecture=Architecture.parse(arch),
            expansion=expansion,
            k=k,
            coefficient=coefficient,
            lr=lr,
            steps=steps,
            batch_size=batch,
            autocast=autocast,
            seed=seed,
            checkpoint_every=checkpoint_every,
            sweep=parse_sweep(sweep),
        )
        if cache_dir is not None:
            source = cache_source(cache_dir, hooks, batch_size=batch, steps=steps, seed=seed, spread=spread)
        else:
            assert model_path is not None  # exactly one of --model / --cache (checked above)
            model = load_model_arg(model_path, dtype=dtype)
            seq_len = check_seq_len(seq_len, model)
            source = model_source(
                model,
                model_path,
                hooks,
                corpus=corpus,
                seq_len=seq_len,
                batch_size=batch,
                seed=seed,
                spread=spread,
            )
        plan = plan_sweep(source.widths, cfg, model_name=source.model_name)
    except (ValueError, KeyError, FileNotFoundError) as err:
        fail(str(err).strip("'\""))
    console.print(f"training {len(plan.saes)} SAE(s) for {steps:,} steps of {batch:,} rows -> {out}")
    with JobProgress("sae train", total=steps, unit="steps") as bar:

        def show(p: SAETrainProgress) -> None:
            first = next(iter(p.metrics.values()))
            bar.update(
                p.step,
                info=f"L0 {first['l0']:.1f}  MSE {first['mse']:.4g}  FVU {first['fvu']:.3f}  "
                f"dead {first['dead_fraction']:.1%}",
            )

        try:
            result = train_sweep(
                plan,
                source,
                cfg,
                out,
                progress=show,
                resume=resume,
                overwrite=overwrite,
                stop_after=stop_after,
                spread=spread,
            )
        except (ValueError, OSError) as err:
            fail(str(err))
    if result.resumed_from is not None:
        console.print(f"resumed from step {result.resumed_from:,}")
    if result.stopped:
        console.print(f"stopped after step {result.steps:,}; run the same command again to resume")
        return
    for name in plan.saes:
        f = result.final(name)
        console.print(
            f"{name}: L0 {f.get('l0', 0):.1f}, FVU {f.get('fvu', 0):.4f}, dead {f.get('dead_fraction', 0):.1%}"
        )
    if model_path is not None:  # the command to evaluate them, as it runs: the same model and corpus
        on = ["--corpus", corpus] if corpus != "python-stdlib" else []
        print_command(f"SAEs in {out / SAES}/ ; next: ", "sae", "eval", out, "--model", model_path, *on)
    else:
        console.print(
            f"SAEs in {out / SAES}/ ; next: {command_hint('sae', 'eval', out, '--model')} MODEL (the model the "
            "cache was read from)",
            markup=False,
            soft_wrap=True,
        )


@app.command("eval")
def evaluate(
    sae_path: Path = typer.Argument(
        ..., help="an SAE folder (cfg.json), an SAE training run (saes/*) or a folder holding one"
    ),
    model_path: Path = typer.Option(..., "--model", help="the model the SAE reads"),
    out: Path = typer.Option(
        None, "--out", "-o", help="report folder (default: SAE_PATH/eval)", callback=out_folder
    ),
    corpus: str = corpus_option(CORPUS_HELP),
    split: str = split_option("validation"),
    seq_len: int = seq_len_option(),
    batches: int = batches_option(),
    dtype: str = dtype_option(),
    threads: int = threads_param(),
) -> None:
    """L0, MSE, FVU, CE loss recovered (vs zero and mean ablation), KL, density: report.json + plots."""
    set_threads(threads)
    folders = _sae_folders(sae_path)
    if out is None:
        out = check_out_folder(sae_path / EVAL)
    model = load_model_arg(model_path, dtype=dtype)
    seq_len = check_seq_len(seq_len, model)
    saes = {
        name: load_sae(folder) for name, folder in folders.items()
    }  # a damaged SAE is named before any work
    try:
        data = corpus_token_batches(
            model, corpus, split=split, seq_len=seq_len, batch_size=EVAL_BATCH_SEQS, n_batches=batches
        )
        reports = {}
        for name, sae in saes.items():
            rep = evaluate_sae(model, sae, data.batches, token_filter=data.token_filter, targets=data.targets)
            rep.save(out / name)
            reports[name] = rep
            console.print(f"{name}: {rep!r}")
    except (ValueError, KeyError, FileNotFoundError) as err:
        fail(str(err).strip("'\""))
        return
    points = [{"name": n, **r.to_dict()} for n, r in reports.items()]
    write_json(out / REPORT, Kind.SAE_EVAL, {"saes": points})
    if len(points) > 1:
        save_figure(sparsity_frontier(points, "fvu"), out / "frontier_fvu.html")
        save_figure(sparsity_frontier(points, "ce_loss_recovered"), out / "frontier_ce.html")
    console.print(f"report: {out / REPORT}")


@app.command("bench")
def bench(
    sae_paths: list[Path] = typer.Argument(
        ...,
        help="SAE folders or SAE training runs; SAEs of the same name in several runs (trained with different "
        "--seed) are reseeds of one configuration, reported as mean, SD and CV",
    ),
    model_path: Path = typer.Option(..., "--model", help="the model the SAEs read"),
    out: Path = typer.Option(..., "--out", "-o", help="report folder", callback=out_folder),
    corpus: str = corpus_option(CORPUS_HELP),
    split: str = split_option("validation"),
    seq_len: int = seq_len_option(),
    batches: int = batches_option(),
    ks: str = typer.Option("1,2,5,10", "--ks", help="sizes of the k-sparse probes"),
    properties: str = typer.Option(
        None,
        "--properties",
        help="labelled token properties for probing and absorption, or none: first_letter, python_token on a "
        "corpus (both by default); a task's own variables on --corpus task:NAME (all by default; e.g. "
        "induction: repeat, seen_before)",
    ),
    autointerp: int = typer.Option(
        32,
        "--autointerp",
        help="features explained and scored per SAE for the autointerp metric (0: skip it); with an LLM "
        "configured (INTERPLAB_LLM_*) detection and fuzzing by the LLM, else the built-in baseline",
        callback=non_negative_int,
    ),
    saebench_core: bool = typer.Option(
        False,
        "--saebench-core",
        help="also SAEBench 0.6's core metrics by its own definitions (saebench_* columns, comparable with "
        "published SAEBench tables; interplab.sae.saebench)",
    ),
    dtype: str = dtype_option(),
    threads: int = threads_param(),
) -> None:
    """SAE-vs-SAE evaluation: core metrics, k-sparse probing, absorption and the autointerp score, each with
    its reseed noise; report.json, bench.md and frontier_*.html in --out (each SAE's autointerp feature
    database in --out/autointerp)."""
    set_threads(threads)
    try:
        probe_ks = tuple(int(k) for k in ks.split(","))
        cfg = BenchConfig(ks=probe_ks)
    except ValueError:
        fail(f"--ks {ks!r}: give positive integers separated by commas, e.g. 1,2,5,10")
    saes = {}
    for path in sae_paths:
        for name, folder in _sae_folders(path).items():
            label = f"{path.name}/{name}" if len(sae_paths) > 1 else name
            if label in saes:
                fail(f"{label} is given twice; pass each SAE folder or run once")
            saes[label] = (name, load_sae(folder))
    model = load_model_arg(model_path, dtype=dtype)
    seq_len = check_seq_len(seq_len, model)
    available, what = _bench_labellers(corpus, model)
    if properties is None:
        wanted = (
            list(available)
            if corpus.startswith(TASK_PREFIX)
            else [p for p in TOKEN_PROPERTIES if p in available]
        )
    else:
        wanted = [] if properties == "none" else [p.strip() for p in properties.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        fail(
            f"--properties: unknown {unknown} for {what}; valid: {', '.join(available) or 'none (no tokenizer)'}, none"
        )
    extra = {}
    try:
        data = corpus_token_batches(
            model, corpus, split=split, seq_len=seq_len, batch_size=EVAL_BATCH_SEQS, n_batches=batches
        )
        if saebench_core:
            from interplab.sae.saebench import saebench_ignore_tokens, saebench_metric

            extra["saebench"] = saebench_metric(model, data.batches, saebench_ignore_tokens(model.tokenizer))
        if autointerp:
            extra["autointerp"] = _autointerp_metric(model, data.batches, out / "autointerp", autointerp)
        result = bench_saes(
            model,
            saes,
            data.batches,
            token_filter=data.token_filter,
            labellers={p: available[p] for p in wanted},
            extra=extra,
            cfg=cfg,
            targets=data.targets,
        )
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as err:
        fail(str(err).strip("'\""))
        return
    result.save(out)
    console.print(result.markdown())
    console.print(f"report: {out / REPORT} ; table: {out / 'bench.md'}")


TOKEN_PROPERTIES = ("first_letter", "python_token")
"""`sae bench`'s default properties on a corpus"""


def _bench_labellers(corpus: str, model: Transformer) -> tuple[dict, str]:
    """The labelled properties `sae bench` can probe on ``corpus`` ({name: labeller}) and what they belong to
    (for the error message): a task's variables for ``task:NAME``, else the tokenizer's properties."""
    if not corpus.startswith(TASK_PREFIX):
        return (
            tokenizer_labellers(model.tokenizer) if model.tokenizer is not None else {}
        ), f"corpus {corpus}"
    name = corpus[len(TASK_PREFIX) :]
    if name not in list_tasks():
        fail(f"--corpus {corpus}: unknown task {name!r}; valid tasks: {', '.join(list_tasks())}")
    if name not in SAE_TASKS:
        fail(f"--corpus {corpus}: task {name!r} pads its examples (its model needs an attention mask, which SAE "
             f"activations are read without); tasks an SAE can read: {', '.join(SAE_TASKS)}")  # fmt: skip
    try:
        return task_labellers(get_task(name)), f"task {name}"
    except ValueError as err:
        fail(f"--corpus {corpus}: {err}")


def _autointerp_metric(model: Transformer, batches: list, workdir: Path, n_features: int):
    """The autointerp extra metric of `sae bench`, with the LLM the environment configures (else the
    baseline, and the console says so)."""
    from interplab.features.autointerp import AutointerpConfig, autointerp_metric
    from interplab.features.llm import LLMError, backend_from_config

    try:
        backend = backend_from_config()
    except (LLMError, ValueError) as err:
        fail(f"the LLM backend is misconfigured: {err}")
    if backend is None:
        console.print(
            f"autointerp: the built-in baseline (token-enrichment explainer, token-list simulation score) on "
            f"{n_features} features per SAE; no LLM configured (INTERPLAB_LLM_*)",
            markup=False,
        )
    else:
        console.print(f"autointerp: {backend.name} explains, detection and fuzzing score", markup=False)
    return autointerp_metric(
        model, batches, workdir=workdir, backend=backend, cfg=AutointerpConfig(n_features=n_features)
    )


@app.command("diff")
def diff(
    run_dir: Path = typer.Argument(..., help="a training run with checkpoints (interplab train)"),
    before: int = typer.Option(..., "--before", help="the earlier checkpoint's step"),
    after: int = typer.Option(..., "--after", help="the later checkpoint's step"),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="output folder (default RUN/diffs/step_BEFORE-step_AFTER, listed on the run's page beside its "
        "formation report)",
        callback=out_folder,
    ),
    hook: str = typer.Option(
        None,
        "--hook",
        help="the site both checkpoints are read at (default: the last layer's hook_resid_post)",
    ),  # fmt: skip
    expansion: int = typer.Option(
        8, "--expansion", help="crosscoder latents per model dimension", callback=positive_int
    ),
    k: int = typer.Option(16, "--k", help="active latents per token (BatchTopK)", callback=positive_int),
    tokens: int = typer.Option(32_768, "--tokens", help="tokens of the run's corpus", callback=positive_int),
    steps: int = typer.Option(1500, "--steps", help="crosscoder training steps", callback=positive_int),
    batch_size: int = typer.Option(
        1024, "--batch-size", help="tokens per training step", callback=positive_int
    ),
    checkpoint_every: int = typer.Option(
        250,
        "--checkpoint-every",
        help="save the crosscoder's training state every this many steps into --out/train (0: only at the "
        "end); a diff run again with the same settings resumes from it",
        callback=non_negative_int,
    ),
    features: bool = typer.Option(
        True,
        "--features/--no-features",
        help="build the crosscoder's feature database (--out/features.db: a page per latent with its top "
        "contexts and decoder-norm share per checkpoint; serve it with `interplab serve --db`)",
    ),
    feature_seqs: int = typer.Option(
        256,
        "--feature-seqs",
        help="sequences of the run's corpus the feature pages are built from",
        callback=positive_int,
    ),  # fmt: skip
    threads: int = threads_param(),
) -> None:
    """Model diffing: a crosscoder between two checkpoints of a run, its latents labelled new / lost / shared /
    partial by relative decoder norm, linked to the run's formation report; diff.json, diff.md and the
    relative-norm histogram in --out. Resumable: an interrupted diff continues from its last checkpoint."""
    set_threads(threads)
    out = out or default_diff_folder(run_dir, before, after)
    try:
        result = diff_checkpoints(
            run_dir,
            before,
            after,
            hook=hook,
            expansion=expansion,
            k=k,
            n_tokens=tokens,
            batch_size=batch_size,
            train=CrosscoderTrainConfig(steps=steps, checkpoint_every=checkpoint_every),
            out=out,
        )
    except (RunError, ValueError, KeyError, FileNotFoundError) as err:
        fail(str(err).strip("'\""))
        return
    console.print(result.summary(), markup=False, highlight=False)
    console.print(f"diff: {out / DIFF_JSON} ; table: {out / DIFF_TABLE} ; crosscoder: {out / CROSSCODER_DIR}")
    if features:
        try:
            build_diff_db(out, n_seqs=feature_seqs, overwrite=True)
        except (RunError, ValueError, KeyError, FileNotFoundError) as err:
            fail(f"the feature database of the diff: {str(err).strip(chr(39) + chr(34))}")
            return
        db = out / FEATURE_DB
        hint = command_hint("serve", "--db", db, "--runs", Path(run_dir).resolve().parent)
        console.print(f"latent pages: {db} ({hint})", markup=False, soft_wrap=True)
    if Path(out).resolve().parent == (Path(run_dir) / DIFFS).resolve():
        hint = command_hint("serve", "--runs", Path(run_dir).resolve().parent)
        console.print(f"on the run's page, beside its formation report: {hint}", markup=False, soft_wrap=True)


def _sae_folders(path: Path) -> dict[str, Path]:
    """The SAE folders, by name, of an SAE training run or of a folder holding SAEs (never empty); another
    dictionary (a crosscoder, a model diff, a CLT) is refused naming what it is and the commands that take it."""
    other = not_an_sae(path)
    if other is not None:
        fail(other)
    try:
        folders = SAERun.open(path).saes if detect(path) is Kind.SAE_TRAIN else sae_folders(path)
    except RunError as err:
        fail(str(err))
    if not folders:
        fail(
            f"{path} is {describe(path)}; expected an SAE folder ({SAE_CFG}) or an SAE training run "
            f"with {SAES}/*/{SAE_CFG}"
        )
    return folders


def _canon(hooks: list[str]) -> list[str]:
    try:
        return canonical_hooks(hooks)
    except ValueError as err:
        fail(str(err))


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="sae")
