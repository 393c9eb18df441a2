"""``interplab demo``: the main job. Train ``induction-2l`` on the standard library's source code, watch its
induction heads form, train a sparse autoencoder on it and build the feature database, then say where everything is.

Where it writes is defined once, by :class:`DemoOutputs`: the README, the docs, the examples and the tests use
these names (``runs/demo``, ``runs/demo/final``, ``runs/demo/features.db``, ...)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import typer

from interplab import runs
from interplab.cli.common import (
    activation_hint,
    command_hint,
    console,
    fail,
    out_folder,
    positive_int,
    print_command,
    set_threads,
    threads_param,
)
from interplab.cli.formation import print_formation, run_formation
from interplab.cli.train import load_config, print_result, run_contents, run_training
from interplab.features.llm import ENV_BASE_URL, ENV_LOCAL
from interplab.sae.sweep import sae_name

DEMO_PRESET = "induction-2l"
"""The training preset the demo runs (`interplab.train.load_preset`)."""
DEMO_RUN = Path("runs/demo")
"""The demo's default run folder (``--out``)."""
SAE_HOOK = "blocks.0.hook_resid_post"
"""The site the demo's sparse autoencoder reads."""
SAE_STEPS = 600
"""Training steps of the demo's sparse autoencoder (``--sae-steps``)."""


@dataclass(frozen=True)
class DemoOutputs:
    """Every path the demo writes, from its run folder: the one definition of the demo's output names, each
    built from `interplab.runs`' names (the demo's run folder is a training run; the SAE run sits in it)."""

    run: Path = DEMO_RUN

    @property
    def final(self) -> Path:
        """the trained model (``interplab.load_model``)"""
        return self.run / runs.FINAL

    @property
    def formation(self) -> Path:
        """formation.md / .json / .html / .png"""
        return self.run / runs.FORMATION

    @property
    def sae_run(self) -> Path:
        """the ``sae train`` run folder (config.json, log.jsonl, saes/, eval/)"""
        return self.run / runs.SAE_DIR

    @property
    def sae(self) -> Path:
        """the trained SAE (``interplab.sae.load_sae``)"""
        return self.sae_run / runs.SAES / sae_name(SAE_HOOK)

    @property
    def sae_eval(self) -> Path:
        return self.sae_run / runs.EVAL

    @property
    def features_db(self) -> Path:
        """the feature database the browser serves"""
        return self.run / runs.FEATURE_DB


QUICK = {"steps": 60, "sae_steps": 40, "formation_seqs": 4}
"""``--quick``: a short run to try every stage in a minute or two (no induction head forms this early). The
feature database is built as in the full demo, so the README's ``features build`` command resumes it as is."""
FEATURE_SEQS = 256
"""held-out sequences of 128 tokens in the demo's feature database"""


def demo(
    out: Path = typer.Option(DEMO_RUN, "--out", "-o", help="run directory", callback=out_folder),
    steps: int = typer.Option(
        None, "--steps", help=f"optimizer steps (default: the {DEMO_PRESET} preset's)", callback=positive_int
    ),
    threads: int = threads_param(1, "torch CPU threads (1 is fastest for this small model)"),
    fresh: bool = typer.Option(
        False, "--fresh", help="start over instead of continuing a run found in --out"
    ),
    sae_steps: int = typer.Option(
        SAE_STEPS, "--sae-steps", help="SAE training steps (stage 3)", callback=positive_int
    ),
    features: bool = typer.Option(
        True, "--features/--no-features", help="stages 3-4: SAE and feature database"
    ),
    quick: bool = typer.Option(
        False, "--quick", help="a short run (60 steps, a 40-step SAE) to try every stage in a minute or two"
    ),
) -> None:
    """Train a 2-layer attention-only model on python-stdlib, show its induction heads forming, then train a
    sparse autoencoder on it and build the feature database for the browser."""
    set_threads(threads)
    if quick:
        steps, sae_steps = steps or QUICK["steps"], min(sae_steps, QUICK["sae_steps"])
    paths = DemoOutputs(out)
    cfg = load_config(DEMO_PRESET, None, [f"steps={steps}"] if steps is not None else [])
    if fresh and out.exists():
        if runs.detect(out) is not runs.Kind.TRAIN:
            fail(f"{out} is {runs.describe(out)}, not a training run; not removing it")
        shutil.rmtree(out)
    n = 4 if features else 2
    console.rule(f"[bold]1/{n} training {DEMO_PRESET} on the Python standard library")
    console.print(
        f"{cfg.steps:,} steps of {cfg.batch_size} x {cfg.data.seq_len} tokens; "
        f"checkpoints at {len(cfg.checkpoints.steps(cfg.steps))} steps (dense early) into {out}",
        markup=False,
    )
    result = run_training(cfg, out, resume=True, stop_after=None, device="cpu")
    print_result(result)
    console.rule(f"[bold]2/{n} scoring every checkpoint: do induction heads form?")
    formation, pictures = run_formation(out, None, QUICK["formation_seqs"] if quick else 8)
    print_formation(formation, pictures, every=3)
    if features:
        _sae_and_features(paths, sae_steps, threads, n)
    console.rule("[bold]outputs")
    say = lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"run directory:   {out}/  ({run_contents()})")
    say(f"trained model:   {paths.final}  (interplab.load_model({str(paths.final)!r}))")
    say(
        f"formation:       {pictures['table']}, {pictures['html']}"
        + (f", {pictures['png']}" if pictures["png"] else "")
    )
    if features:
        say(f"sparse autoencoder: {paths.sae}  (evaluation: {paths.sae_eval}/)")
        say(f"feature database:   {paths.features_db}")
        print_command(
            "browse the features: ",
            "serve",
            "--db",
            paths.features_db,
            "--runs",
            out.parent,
            "--model",
            paths.final,
            "--sae",
            paths.sae,
        )
    print_command("next: ", "attribute", out, note="  (which training sequences built the induction head)")
    hint = activation_hint()
    if hint:
        say(hint)


def _sae_and_features(paths: DemoOutputs, sae_steps: int, threads: int, n: int) -> None:
    """Stages 3 and 4 run the same commands a user would type (shown), each resumable or skipped when done;
    stage 4 ends by explaining and scoring every feature (`features explain`, `features score`)."""

    def run(args: list[str]) -> None:
        print_command("$ ", *args, style="dim")
        done = subprocess.run([sys.executable, "-m", "interplab", *args], check=False)
        if done.returncode != 0:
            fail(f"'{command_hint(*args[:2])}' failed (exit {done.returncode}); see its message above")

    model = str(paths.final)
    console.rule(f"[bold]3/{n} a TopK sparse autoencoder on {SAE_HOOK}")
    if runs.detect(paths.sae) is not runs.Kind.SAE:
        run(sae_train_command(paths, sae_steps, threads))
    else:
        console.print(f"already trained: {paths.sae}", markup=False)
    run(["sae", "eval", str(paths.sae_run), "--model", model, "--threads", str(threads)])
    console.rule(f"[bold]4/{n} the feature database (one streaming pass over held-out code)")
    run(
        [
            "features",
            "build",
            "--model",
            model,
            "--sae",
            str(paths.sae),
            "--out",
            str(paths.features_db),
            "--corpus",
            "python-stdlib",
            "--n-seqs",
            str(FEATURE_SEQS),
            "--seq-len",
            "128",
            "--threads",
            str(threads),
        ]  # fmt: skip
    )
    for args in explain_and_score_commands(paths.features_db, os.environ):
        run(args)


def sae_train_command(paths: DemoOutputs, sae_steps: int, threads: int) -> list[str]:
    """Stage 3's command (after ``interplab``): the demo's TopK SAE (expansion 8, k 16, batches of 1,024
    activations) on `SAE_HOOK` of its trained model, into its SAE run (``benchmarks/bench_sae_eval.py --demo-run``
    trains the reseeds of the suite's noise with it)."""
    return [
        "sae", "train", "--model", str(paths.final), "--hook", SAE_HOOK, "--arch", "topk", "--expansion", "8",
        "--k", "16", "--steps", str(sae_steps), "--batch", "1024", "--out", str(paths.sae_run),
        "--threads", str(threads),
    ]  # fmt: skip


def explain_and_score_commands(db: Path, env: Mapping[str, str]) -> list[list[str]]:
    """The commands stage 4 ends with, so that every feature that fires gets an explanation with a score: the
    built-in baseline offline (both resumable, so a rerun of the demo skips what is done); an LLM when
    INTERPLAB_LLM_* configure one, which then judges them too (`demo_scorers`)."""
    return [["features", "explain", str(db)], ["features", "score", str(db), "--scorers", demo_scorers(env)]]


def demo_scorers(env: Mapping[str, str]) -> str:
    """The scorers the demo's `features score` runs: the built-in baseline offline; with an LLM configured
    (``INTERPLAB_LLM_LOCAL``, or ``INTERPLAB_LLM_BASE_URL``: what `backend_from_config` reads) the LLM judges
    detection and fuzzing too, since the baseline's token-list simulation reads only quoted tokens and scores an
    LLM's wording near 0. Decided from the environment alone (a local model is not loaded to decide)."""
    return "detection,fuzzing,baseline" if env.get(ENV_LOCAL) or env.get(ENV_BASE_URL) else "baseline"


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
