"""``interplab features``: build a feature database for an SAE, export it as static pages, explain, score the
explanations, steer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import typer
from jaxtyping import Int
from torch import Tensor

from interplab.cli.common import (
    DB_ERRORS,
    SPLITS,
    JobProgress,
    check_seq_len,
    choice,
    command_hint,
    console,
    db_option,
    db_out_option,
    dtype_option,
    fail,
    finite_float,
    load_model_arg,
    non_negative_int,
    out_folder,
    positive_int,
    print_command,
    seq_len_option,
    set_threads,
    threads_param,
)
from interplab.data import build_token_store, open_corpus
from interplab.features.config import FeatureBuildConfig
from interplab.features.explain import TokenEnrichmentExplainer
from interplab.features.steer import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STRENGTH,
    SteerMode,
    prompt_tokens,
    steer_generate,
)
from interplab.io import load_tensors
from interplab.model import Transformer
from interplab.runs import FEATURE_DB, RunError, not_an_sae, pick_sae, sae_folders
from interplab.sae import SAE, load_sae

# the SQLAlchemy-backed modules (features.build, .reader, .writer) and the web export (fastapi) are imported
# by the commands that use them: every `interplab` command imports this module

DEFAULTS = FeatureBuildConfig()
"""the build settings the options default to (one source of truth: `FeatureBuildConfig`)"""
CHECKPOINT_EVERY = 20
"""the command checkpoints its streaming state by default, so an interrupted build resumes (the library's
`FeatureBuildConfig.checkpoint_every` defaults to never)"""

features_app = typer.Typer(
    help="Feature dashboards: build the feature database, export, explain, steer.", no_args_is_help=True
)


def load_tokens_file(path: Path) -> Int[Tensor, "n_seq pos"]:
    """A [n_seq pos] token tensor from a safetensors file (key ``tokens``, or its only tensor)."""
    if not path.is_file():
        fail(f"no token file at {path}")
    tensors = load_tensors(path)
    if "tokens" in tensors:
        return tensors["tokens"].long()
    if len(tensors) != 1:
        fail(f"{path} holds {sorted(tensors)}: name the token tensor 'tokens'")
    return next(iter(tensors.values())).long()


def corpus_tokens(
    name: str, model: Transformer, split: str, n_seqs: int, seq_len: int | None
) -> Int[Tensor, "n_seq pos"]:
    if model.tokenizer is None:
        fail(
            "--corpus needs a model with a tokenizer (tokenizer.json in the model folder); use --tokens FILE"
        )
    seq_len = check_seq_len(seq_len, model)
    store = build_token_store(open_corpus(name), model.tokenizer, split)
    n = min(n_seqs, store.n_sequences(seq_len))
    if n == 0:
        fail(
            f"corpus {name!r} ({split}) has {store.n_tokens:,} tokens, fewer than one sequence of --seq-len "
            f"{seq_len}"
        )
    return store.sequences(torch.arange(n), seq_len)


def sae_folder(path: Path, name: str | None) -> Path:
    """The SAE folder ``--sae PATH [--name NAME]`` means: an SAE folder, or the SAE inside an SAE training run
    or a training run (`interplab.runs.sae_folders`); with several, ``--name`` picks one."""
    found = sae_folders(path)
    if name is None and len(found) > 1:
        first = next(iter(found))
        fail(
            f"{path} holds {len(found)} SAEs ({', '.join(found)}): pick one with --sae {path} --name NAME "
            f"(e.g. --name {first}) or give its folder (e.g. --sae {found[first]})"
        )
    try:
        return pick_sae(path, name)
    except RunError as err:
        fail(str(err))


def load_model_and_sae(model_dir: Path, sae_dir: Path, dtype: str | None = None) -> tuple[Transformer, SAE]:
    """The model (a model folder, or a training run: its final/; in ``dtype``) and the SAE (an SAE folder)."""
    other = not_an_sae(sae_dir)
    if other is not None:
        fail(f"cannot use it as the SAE: {other}")
    model = load_model_arg(model_dir, "cannot load the model: ", dtype)
    try:
        sae = load_sae(sae_dir)
    except (FileNotFoundError, KeyError, ValueError) as err:
        fail(f"cannot load the SAE: {err}")
    return model, sae


MODEL_HELP = "model folder, or a training run (its final/)"
SAE_HELP = (
    "SAE folder (cfg.json + sae_weights.safetensors), or a run holding SAEs (an SAE training run, or a "
    "training run with its sae/): with several, --name picks one"
)


_steer_mode = choice(tuple(m.value for m in SteerMode))


@features_app.command("build")
def build(
    model_dir: Path = typer.Option(..., "--model", help=MODEL_HELP),
    sae_dir: Path = typer.Option(..., "--sae", help=SAE_HELP),
    sae_name: str = typer.Option(None, "--name", help="which SAE of the --sae run (its folder name)"),
    out: str = typer.Option(
        FEATURE_DB,
        "--out",
        "--db",
        help="feature database file, or a URL (postgresql://user@host/dbname)",
        callback=db_out_option,
    ),
    tokens: Path = typer.Option(None, "--tokens", help="safetensors file with a [n_seq pos] 'tokens' tensor"),
    corpus: str = typer.Option(None, "--corpus", help="corpus name or folder (e.g. python-stdlib)"),
    split: str = typer.Option("validation", help="corpus split", callback=choice(SPLITS)),
    n_seqs: int = typer.Option(
        1024, "--n-seqs", help="sequences taken from the corpus", callback=positive_int
    ),
    seq_len: int = seq_len_option(),
    top_k: int = typer.Option(
        DEFAULTS.top_k, "--top-k", help="top activating contexts per feature", callback=positive_int
    ),
    window: str = typer.Option(
        f"{DEFAULTS.window_left},{DEFAULTS.window_right}",
        "--window",
        help="tokens of context kept before and after each activating token, LEFT,RIGHT (pages show the "
        "nearest few and expand to the rest on a click; longer windows make the database larger)",
    ),
    batch_size: int = typer.Option(
        DEFAULTS.batch_size, "--batch-size", help="sequences per forward pass", callback=positive_int
    ),
    features_per_pass: int = typer.Option(
        DEFAULTS.features_per_pass,
        "--features-per-pass",
        help="0: all features in one pass",
        callback=non_negative_int,
    ),
    checkpoint_every: int = typer.Option(
        CHECKPOINT_EVERY,
        "--checkpoint-every",
        help="batches between resumable checkpoints",
        callback=positive_int,
    ),
    loss_effect: bool = typer.Option(
        DEFAULTS.loss_effect, "--loss-effect/--no-loss-effect", help="estimate effects on the loss"
    ),
    cooccurrence: bool = typer.Option(DEFAULTS.cooccurrence, "--cooccurrence/--no-cooccurrence"),
    overwrite: bool = typer.Option(False, "--overwrite", help="rebuild from scratch if the database exists"),
    dtype: str = dtype_option(),
    threads: int = threads_param(0, "torch threads (0: torch's default)"),
) -> None:
    """Collect every feature's statistics in one streaming pass and write the feature database (resumable:
    run the same command again after an interruption)."""
    from interplab.features.build import build_feature_db
    from interplab.features.database import ReadOnlyDatabase

    set_threads(threads)
    if (tokens is None) == (corpus is None):
        fail("give exactly one of --tokens FILE or --corpus NAME")
    left, right = parse_window(window)
    sae_dir = sae_folder(sae_dir, sae_name)
    model, sae = load_model_and_sae(model_dir, sae_dir, dtype)
    toks = (
        load_tokens_file(tokens)
        if tokens is not None
        else corpus_tokens(corpus, model, split, n_seqs, seq_len)
    )
    try:
        cfg = FeatureBuildConfig(
            top_k=top_k,
            window_left=left,
            window_right=right,
            batch_size=batch_size,
            features_per_pass=features_per_pass,
            checkpoint_every=checkpoint_every,
            loss_effect=loss_effect,
            cooccurrence=cooccurrence,
        )
        with JobProgress("features build", unit="batches") as bar:
            report = build_feature_db(
                out,
                model,
                sae,
                toks,
                cfg,
                model_path=model_dir,
                sae_path=sae_dir,
                overwrite=overwrite,
                progress=lambda stage, done, total: bar.update(done, total=total, stage=stage),
            )
    except (*DB_ERRORS, ReadOnlyDatabase) as err:
        fail(str(err))
        return
    from interplab.features.dialect import display_url

    shown = display_url(out) if isinstance(out, str) else out
    console.print(
        f"[green]feature database[/] {shown}: {report.n_features} features over {report.n_tokens:,} tokens"
    )
    console.print(f"browse it with:  {command_hint('serve', '--db', shown)}")


@features_app.command("copy")
def copy(
    source: str = typer.Argument(..., help="the feature database to copy: file or URL", callback=db_option),
    target: str = typer.Argument(
        ..., help="where to: a new file, or a URL (postgresql://user@host/dbname)", callback=db_out_option
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace what the target holds"),
) -> None:
    """Copy a feature database into another, on any backend: e.g. a SQLite file into the lab's PostgreSQL
    database (every table, labels, explanations and lists included; its search index rebuilt)."""
    from interplab.features.database import ReadOnlyDatabase
    from interplab.features.dialect import display_url
    from interplab.features.writer import copy_database

    try:
        counts = copy_database(source, target, overwrite=overwrite)
    except (*DB_ERRORS, ReadOnlyDatabase) as err:
        fail(str(err))
        return
    shown = display_url(target) if isinstance(target, str) else target
    console.print(
        f"[green]copied[/] {counts.get('features', 0)} features ({sum(counts.values()):,} rows) into {shown}"
    )
    console.print(f"browse it with:  {command_hint('serve', '--db', shown)}")


@features_app.command("export")
def export(
    db: str = typer.Option(..., "--db", help="feature database (file or URL)", callback=db_option),
    html: Path = typer.Option(..., "--html", help="output folder for the static site", callback=out_folder),
) -> None:
    """Write a self-contained folder of HTML pages (index + one page per feature) to share or publish."""
    from interplab.web.export import export_html

    try:
        with JobProgress("features export", unit="pages") as bar:
            report = export_html(db, html, progress=bar)
    except DB_ERRORS as err:
        fail(str(err))
        return
    console.print(f"wrote {report.n_pages} pages ({report.n_bytes / 1e6:.1f} MB) to {html}/index.html")


EXPLAIN_BACKENDS = ("baseline", "openai", "local")


def parse_window(value: str) -> tuple[int, int]:
    """``--window LEFT,RIGHT`` as two non-negative ints (a clear error otherwise)."""
    parts = [p.strip() for p in value.split(",")]
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        fail(f"--window {value!r}: give LEFT,RIGHT, the tokens kept before and after the peak, e.g. 24,8")
    return int(parts[0]), int(parts[1])


def parse_features(value: str | None) -> list[int] | None:
    """``--features``: comma-separated indices and ranges (``0-99,120``); None: every feature."""
    if value is None:
        return None
    out: list[int] = []
    try:
        for part in value.replace(" ", "").split(","):
            lo, _, hi = part.partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 0 or last < first:
                raise ValueError(part)
            out += range(first, last + 1)
    except ValueError:
        raise typer.BadParameter(
            f"--features {value!r}: give feature indices and ranges such as 0-99,120"
        ) from None
    return out


@features_app.command("explain")
def explain(
    db_arg: str = typer.Argument(
        None, metavar="DB", help="feature database: file or URL (or --db)", callback=db_option
    ),
    db: str = typer.Option(None, "--db", help="feature database (file or URL)", callback=db_option),
    backend: str = typer.Option(
        None,
        "--backend",
        help="baseline (built in, offline), openai (an OpenAI-compatible endpoint) or local (a Hugging Face "
        "model folder); default: what INTERPLAB_LLM_* configure, else baseline",
        callback=choice(EXPLAIN_BACKENDS),
    ),
    model: str = typer.Option(None, "--model", help="the endpoint's model (default $INTERPLAB_LLM_MODEL)"),
    base_url: str = typer.Option(
        None, "--base-url", help="e.g. https://api.openai.com/v1 ($INTERPLAB_LLM_BASE_URL)"
    ),
    api_key_env: str = typer.Option(
        None, "--api-key-env", help="the environment variable holding the key (default INTERPLAB_LLM_API_KEY)"
    ),
    local: Path = typer.Option(
        None, "--local", help="a Hugging Face causal LM folder ($INTERPLAB_LLM_LOCAL)"
    ),
    features: str = typer.Option(None, "--features", help="indices and ranges, e.g. 0-99,120 (default: all)"),
    contrastive: bool = typer.Option(False, "--contrastive", help="LLM prompt with non-activating text too"),
    rpm: float = typer.Option(None, "--requests-per-minute", help="rate limit of the openai backend"),
    k: int = typer.Option(
        TokenEnrichmentExplainer.k, help="tokens named per baseline explanation", callback=positive_int
    ),
    overwrite_human: bool = typer.Option(False, "--overwrite-human", help="replace human labels too"),
) -> None:
    """Explain features and store the explanations in the database (table explanations; the label of each
    feature too). With no LLM configured the built-in baseline explainer runs (most enriched peak tokens),
    its labels scored on held-out contexts. Resumable: features already explained the same way are skipped."""
    from interplab.features.database import ReadOnlyDatabase
    from interplab.features.explain import (
        Explainer,
        LLMExplainer,
        TokenListSimulator,
        explain_features,
        explainer_name,
    )
    from interplab.features.llm import CachedBackend, LLMError, backend_from_config
    from interplab.features.writer import FeatureWriter

    path = db_arg or db
    if path is None:
        fail("give the feature database: interplab features explain DB (or --db DB)")
        return
    wanted = parse_features(features)
    try:
        writer = FeatureWriter(path)
    except (*DB_ERRORS, ReadOnlyDatabase) as err:
        fail(str(err))
        return
    with writer:
        try:
            options: dict[str, Any] = (
                {"requests_per_minute": rpm} if rpm is not None and backend != "local" else {}
            )
            llm = backend_from_config(
                backend, model=model, base_url=base_url, local=local, api_key_env=api_key_env, **options
            )
        except (LLMError, ValueError) as err:
            fail(str(err))
            return
        cached = CachedBackend(llm, writer) if llm is not None else None
        explainer: Explainer = (
            LLMExplainer(cached, contrastive=contrastive)
            if cached is not None
            else TokenEnrichmentExplainer(k=k)
        )
        name = explainer_name(explainer)
        ran = (
            cached.name if cached is not None else "none (the built-in baseline explainer; no LLM configured)"
        )
        console.print(f"explainer {name}, backend {ran}", markup=False, highlight=False, soft_wrap=True)
        try:
            with JobProgress("features explain", unit="features") as bar:
                ids = explain_features(
                    writer,
                    explainer,
                    features=wanted,
                    progress=bar,
                    overwrite_human=overwrite_human,
                    simulator=TokenListSimulator() if cached is None else None,
                )
        except LLMError as err:
            fail(f"{err} (the explanations stored before this error are kept; rerun to resume)", code=1)
            return
        except ValueError as err:  # --features naming features the database does not hold
            fail(str(err))
            return
        with writer.reader() as store:
            labels = store.labels(source=f"auto:{name}")
    scores = [labels[f]["score"] for f in ids if f in labels and labels[f]["score"] is not None]
    mean = f" (mean score {sum(scores) / len(scores):.3f})" if scores else ""
    console.print(
        f"explained {len(ids)} features{mean}; stored in {path} (tables explanations and labels, "
        f"label source auto:{name})",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if cached is not None:
        console.print(
            f"LLM calls: {cached.misses} made ({cached.prompt_tokens} prompt + {cached.completion_tokens} "
            f"completion tokens), {cached.hits} answered from the cache (table llm_cache)",
            markup=False,
            soft_wrap=True,
        )
    if any(c.name == "score" for c in features_app.registered_commands):
        print_command("score them: ", "features", "score", path)


SCORE_DEFAULT_LLM = "detection,fuzzing,embedding,baseline"
SCORE_DEFAULT_OFFLINE = "embedding,baseline"


@features_app.command("score")
def score(
    db: str = typer.Argument(
        ..., help="feature database (file or URL) with stored explanations", callback=db_option
    ),
    scorers: str = typer.Option(
        None,
        "--scorers",
        help=f"comma-separated, of detection, fuzzing, intruder, embedding, simulation, baseline (default: "
        f"{SCORE_DEFAULT_LLM} with an LLM backend configured, {SCORE_DEFAULT_OFFLINE} without)",
    ),
    seed: int = typer.Option(
        0, "--seed", help="seed of the contexts each scorer samples", callback=non_negative_int
    ),
    features: str = typer.Option(
        None, "--features", help="indices and ranges, e.g. 0-99,120 (default: all explained)"
    ),
) -> None:
    """Score every stored explanation (resumable: scores already stored for the same scorer, backend, prompt
    and seed are kept and skipped, so run it again after a failure)."""
    from interplab.features.database import ReadOnlyDatabase
    from interplab.features.llm import CachedBackend
    from interplab.features.scorers import ScorerError, make_scorers, score_features
    from interplab.features.writer import FeatureWriter

    backend = _configured_backend()
    names = [
        n.strip() for n in (scorers or (SCORE_DEFAULT_LLM if backend else SCORE_DEFAULT_OFFLINE)).split(",")
    ]
    feats = parse_features(features)
    try:
        writer = FeatureWriter(db)
        # the judge's replies are cached in the database too: a rerun after a failure pays for no call twice
        made = make_scorers([n for n in names if n], CachedBackend(backend, writer) if backend else None)
    except (*DB_ERRORS, ReadOnlyDatabase, ScorerError) as err:
        fail(str(err))
    with writer, JobProgress("features score", unit="features") as bar:
        try:
            got = score_features(writer, made, features=feats, seed=seed, progress=bar)
        except ScorerError as err:
            fail(f"{err} (the scores computed so far are stored; rerun to resume)", code=1)
        except ValueError as err:  # --features naming features the database does not hold
            fail(str(err))
        except RuntimeError as err:  # a backend that fails mid-way: what was scored stays stored
            fail(f"scoring stopped: {err} (the scores computed so far are stored; rerun to resume)", code=1)
    by: dict[str, list[float]] = {}
    for (_, name), res in got.items():
        by.setdefault(name, []).append(res.value)
    console.print(f"scored {len(got)} (explanation, scorer) pairs; means: {score_means(by) or 'nothing new'}")
    if not got:
        print_command(
            "(every stored explanation already has these scores, or there is none yet: explain first with ",
            "features",
            "explain",
            db,
            note=")",
        )


def score_means(by_scorer: dict[str, list[float]]) -> str:
    """``name mean`` per scorer over its defined (non-NaN) scores; a scorer whose scores are all undefined
    reads ``n/a`` (not 0), and the count of undefined ones is said (e.g. an embedding score where no
    non-activating context could be found)."""
    parts = []
    for name, values in by_scorer.items():
        defined = [v for v in values if v == v]
        mean = f"{sum(defined) / len(defined):.3f}" if defined else "n/a"
        undefined = len(values) - len(defined)
        parts.append(f"{name} {mean}" + (f" ({undefined} of {len(values)} undefined)" if undefined else ""))
    return ", ".join(parts)


def _configured_backend():
    """The LLM backend the environment configures (`interplab.features.llm.backend_from_config`), if any."""
    try:
        from interplab.features.llm import backend_from_config
    except ImportError:  # no LLM backends in this interplab
        return None
    try:
        return backend_from_config()
    except (ValueError, RuntimeError) as err:
        fail(f"the LLM backend is misconfigured: {err}")


@features_app.command("loss-effects")
def loss_effects(
    db: str = typer.Argument(..., help="feature database (file or URL)", callback=db_option),
    model_dir: Path | None = typer.Option(
        None, "--model", help=MODEL_HELP + " (default: the one it was built from)"
    ),
    sae_dir: Path | None = typer.Option(
        None, "--sae", help="SAE folder (default: the one it was built from)"
    ),
    samples: bool = typer.Option(False, "--samples", help="also the sampled contexts, not only the top ones"),
    overwrite: bool = typer.Option(False, "--overwrite", help="recompute contexts that have them"),
) -> None:
    """Per-token loss effects of each feature over its stored contexts (the feature's decoder contribution
    removed), shown on hover in the browser. A post-pass: the build never runs it; resumable."""
    from interplab.features.database import ReadOnlyDatabase
    from interplab.features.loss_effects import compute_loss_effects
    from interplab.features.reader import FeatureReader

    try:
        with FeatureReader(db) as store:
            meta = store.meta()
    except (*DB_ERRORS, ReadOnlyDatabase) as err:
        fail(str(err))
        return
    model_dir = model_dir or (Path(meta["model_path"]) if meta.get("model_path") else None)
    sae_dir = sae_dir or (Path(meta["sae_path"]) if meta.get("sae_path") else None)
    if model_dir is None or sae_dir is None:
        fail(f"{db} records no model or SAE folder: pass --model DIR --sae DIR")
        return
    model, sae = load_model_and_sae(model_dir, sae_dir)
    try:
        with JobProgress("features loss-effects", unit="contexts") as bar:
            n = compute_loss_effects(
                db,
                model,
                sae,
                kinds=(0, 1) if samples else (0,),
                overwrite=overwrite,
                progress=lambda done, total: bar.update(done, total=total),
            )
    except (*DB_ERRORS, ReadOnlyDatabase) as err:
        fail(str(err))
        return
    console.print(f"loss effects of {n} contexts written to {db}")


@features_app.command("steer")
def steer(
    model_dir: Path = typer.Option(..., "--model", help=MODEL_HELP),
    sae_dir: Path = typer.Option(..., "--sae", help=SAE_HELP),
    sae_name: str = typer.Option(None, "--name", help="which SAE of the --sae run (its folder name)"),
    feature: int = typer.Option(..., "--feature", callback=non_negative_int),
    strength: float = typer.Option(
        None,
        "--strength",
        help=f"a multiple of the feature's max activation (from --db); default {DEFAULT_STRENGTH:g}",
        callback=finite_float,
    ),
    db: str = typer.Option(
        None,
        "--db",
        help="the feature database, file or URL (it records the max activation)",
        callback=db_option,
    ),
    value: float = typer.Option(
        None, "--value", help="an absolute activation instead of --strength", callback=finite_float
    ),
    mode: str = typer.Option(SteerMode.ADD.value, "--mode", help="add or clamp", callback=_steer_mode),
    prompt: str = typer.Option(..., "--prompt", help="text (or token ids if the model has no tokenizer)"),
    max_new_tokens: int = typer.Option(DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens", callback=positive_int),
) -> None:
    """Generate greedily with and without steering a feature; print both continuations."""
    from interplab.features.reader import FeatureNotFound, FeatureReader

    max_act = None
    if value is None:
        if db is None:
            fail(
                "give --db FEATURES.DB (the strength is a multiple of the feature's max activation recorded "
                "there) or an absolute --value"
            )
        try:
            with FeatureReader(db) as store:
                if isinstance(store.meta().get("dt"), dict):  # `interplab dt sae`'s: no prompt to steer
                    fail(
                        f"--db {db} holds a decision transformer's features: steering by prompt needs a language "
                        "model's feature database (steer a DT with interplab.rl.analysis.steer)"
                    )
                max_act = store.feature(feature)["max_act"]
        except FeatureNotFound:
            fail(f"feature {feature} is not in the feature database {db}")
            return
        except DB_ERRORS as err:
            fail(f"--db {db}: {err}")
            return
    model, sae = load_model_and_sae(model_dir, sae_folder(sae_dir, sae_name))
    try:
        result = steer_generate(
            model,
            sae,
            prompt_tokens(model, prompt),
            feature,
            DEFAULT_STRENGTH if strength is None else strength,
            SteerMode(mode),
            max_act=max_act,
            value=value,
            max_new_tokens=max_new_tokens,
        )
    except ValueError as err:
        fail(str(err))
        return
    console.print(f"[bold]baseline:[/] {result.baseline_text}", markup=True, highlight=False)
    console.print(f"[bold]{result.describe()}:[/] {result.steered_text}", markup=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.add_typer(features_app, name="features")
