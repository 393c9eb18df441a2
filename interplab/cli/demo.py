"""``interplab demo``: the main job. Train ``induction-2l`` on the standard library's source code and watch
its induction heads form (about 5-10 minutes on a laptop CPU), then say where everything is."""

from __future__ import annotations

from pathlib import Path

import typer

from interplab.cli.common import console, fail, set_threads


def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="run directory"),
    steps: int = typer.Option(None, "--steps", help="optimizer steps (default: the preset's 1,500)"),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 is fastest for this small model)"),
    fresh: bool = typer.Option(
        False, "--fresh", help="start over instead of continuing a run found in --out"
    ),
) -> None:
    """Train a 2-layer attention-only model on python-stdlib and show its induction heads forming."""
    import shutil

    from interplab.cli.formation import print_formation, run_formation
    from interplab.cli.train import load_config, print_result, run_training

    set_threads(threads)
    cfg = load_config("induction-2l", None, [f"steps={steps}"] if steps else [])
    if fresh and out.exists():
        if not (out / "config.json").is_file():
            fail(f"{out} exists and is not a training run; not removing it")
        shutil.rmtree(out)
    console.rule("[bold]1/2 training induction-2l on the Python standard library")
    console.print(
        f"{cfg.steps:,} steps of {cfg.batch_size} x {cfg.data.seq_len} tokens; "
        f"checkpoints at {len(cfg.checkpoints.steps(cfg.steps))} steps (dense early) into {out}"
    )
    result = run_training(cfg, out, resume=True, stop_after=None, device="cpu")
    print_result(result)
    console.rule("[bold]2/2 scoring every checkpoint: do induction heads form?")
    formation, paths = run_formation(out, None, 8)
    print_formation(formation, paths, every=3)
    console.rule("[bold]outputs")
    console.print(f"run directory:   {out}/  (config.json, log.jsonl, checkpoints/, final/, report.json)")
    console.print(f"trained model:   {out}/final  (interplab.load_model('{out}/final'))")
    console.print(
        f"formation:       {paths['table']}, {paths['html']}" + (f", {paths['png']}" if paths["png"] else "")
    )
    console.print(f"next: interplab info {out}/final")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
