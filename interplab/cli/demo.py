"""``interplab demo``: the main job. Train ``induction-2l`` on the standard library's source code, watch its
induction heads form, train a sparse autoencoder on it and build the feature database, then say where everything is."""

from __future__ import annotations

from pathlib import Path

import typer

from interplab.cli.common import console, fail, out_folder, positive_int, set_threads


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory", callback=out_folder),
    steps: int = typer.Option(
        None, "--steps", help="optimizer steps (default: the preset's 1,500)", callback=positive_int
    ),
    threads: int = typer.Option(
        1,
        "--threads",
        help="torch CPU threads (1 is fastest for this small model)",
        callback=positive_int,
    ),
    fresh: bool = typer.Option(
        False, "--fresh", help="start over instead of continuing a run found in --out"
    ),
    sae_steps: int = typer.Option(
        600, "--sae-steps", help="SAE training steps (stage 3)", callback=positive_int
    ),
    features: bool = typer.Option(
        True, "--features/--no-features", help="stages 3-4: SAE and feature database"
    ),
) -> None:
    """Train a 2-layer attention-only model on python-stdlib, show its induction heads forming, then train a
    sparse autoencoder on it and build the feature database for the browser."""
    import shutil

    from interplab.cli.formation import print_formation, run_formation
    from interplab.cli.train import load_config, print_result, run_training

    set_threads(threads)
    cfg = load_config("induction-2l", None, [f"steps={steps}"] if steps is not None else [])
    if fresh and out.exists():
        if not (out / "config.json").is_file():
            fail(f"{out} exists and is not a training run; not removing it")
        shutil.rmtree(out)
    n = 4 if features else 2
    console.rule(f"[bold]1/{n} training induction-2l on the Python standard library")
    console.print(
        f"{cfg.steps:,} steps of {cfg.batch_size} x {cfg.data.seq_len} tokens; "
        f"checkpoints at {len(cfg.checkpoints.steps(cfg.steps))} steps (dense early) into {out}"
    )
    result = run_training(cfg, out, resume=True, stop_after=None, device="cpu")
    print_result(result)
    console.rule(f"[bold]2/{n} scoring every checkpoint: do induction heads form?")
    formation, paths = run_formation(out, None, 8)
    print_formation(formation, paths, every=3)
    if features:
        _sae_and_features(out, sae_steps, threads, n)
    console.rule("[bold]outputs")
    console.print(f"run directory:   {out}/  (config.json, log.jsonl, checkpoints/, final/, report.json)")
    console.print(f"trained model:   {out}/final  (interplab.load_model('{out}/final'))")
    console.print(
        f"formation:       {paths['table']}, {paths['html']}" + (f", {paths['png']}" if paths["png"] else "")
    )
    if features:
        console.print(f"sparse autoencoder: {out}/sae/saes/  (evaluation: {out}/sae/eval/)")
        console.print(f"feature database:   {out}/features.db")
        console.print(
            f"[bold]browse the features:[/] interplab serve --db {out}/features.db --runs {out.parent} "
            f"--model {out}/final --sae {_sae_dir(out)}"
        )
    console.print(f"next: interplab attribute {out}  (which training sequences built the induction head)")


SAE_HOOK = "blocks.0.hook_resid_post"


def _sae_dir(out: Path) -> Path:
    return out / "sae" / "saes" / SAE_HOOK.replace(".", "_")


def _sae_and_features(out: Path, sae_steps: int, threads: int, n: int) -> None:
    """Stages 3 and 4 run the same commands a user would type (shown), each resumable or skipped when done."""
    import subprocess
    import sys

    def run(args: list[str]) -> None:
        console.print("[dim]$ interplab " + " ".join(args) + "[/]")
        done = subprocess.run([sys.executable, "-m", "interplab", *args], check=False)
        if done.returncode != 0:
            fail(f"'interplab {args[0]} {args[1]}' failed (exit {done.returncode}); see its message above")

    model = str(out / "final")
    console.rule(f"[bold]3/{n} a TopK sparse autoencoder on {SAE_HOOK}")
    if not (_sae_dir(out) / "cfg.json").is_file():
        run(
            [
                "sae",
                "train",
                "--model",
                model,
                "--hook",
                SAE_HOOK,
                "--arch",
                "topk",
                "--expansion",
                "8",
                "--k",
                "16",
                "--steps",
                str(sae_steps),
                "--batch",
                "1024",
                "--out",
                str(out / "sae"),
                "--threads",
                str(threads),
            ]
        )
    else:
        console.print(f"already trained: {_sae_dir(out)}")
    run(["sae", "eval", str(out / "sae"), "--model", model, "--threads", str(threads)])
    console.rule(f"[bold]4/{n} the feature database (one streaming pass over held-out code)")
    run(
        [
            "features",
            "build",
            "--model",
            model,
            "--sae",
            str(_sae_dir(out)),
            "--out",
            str(out / "features.db"),
            "--corpus",
            "python-stdlib",
            "--n-seqs",
            "256",
            "--seq-len",
            "128",
            "--threads",
            str(threads),
        ]
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
