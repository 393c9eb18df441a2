"""``interplab train``: train a model from a preset or a YAML config into a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from interplab import runs
from interplab.cli.common import (
    JobProgress,
    check_out_folder,
    console,
    device_option,
    fail,
    out_folder,
    positive_int,
    set_threads,
    threads_param,
)

if TYPE_CHECKING:  # the training stack is imported when a command runs, not when the CLI starts
    from interplab.train import TrainConfig, TrainResult


RUNS_ROOT = Path("runs")
"""Where ``train`` writes when no ``--out`` is given: ``runs/<preset or config name>``."""


def run_contents(n_checkpoints: int | None = None) -> str:
    """What a training run folder holds, in `interplab.runs`' names (for the messages that point at one)."""
    ckpts = f"{runs.CHECKPOINTS}/" if n_checkpoints is None else f"{n_checkpoints} {runs.CHECKPOINTS}"
    return f"{runs.CONFIG}, {runs.LOG}, {ckpts}, {runs.FINAL}/, {runs.REPORT}"


def load_config(preset: str | None, config: Path | None, overrides: list[str]) -> TrainConfig:
    from interplab.train import TrainConfig, load_preset

    if (preset is None) == (config is None):
        fail("give exactly one of --preset NAME or --config FILE.yaml")
    try:  # every override goes through the config's own validation (steps=0 is refused, never ignored)
        cfg = load_preset(preset) if preset is not None else TrainConfig.from_file(config)  # type: ignore[arg-type]
        return cfg.override(overrides) if overrides else cfg
    except (ValueError, FileNotFoundError, TypeError) as err:
        fail(f"{config}: {err}" if config is not None and str(config) not in str(err) else str(err))


class TrainProgress:
    """The trainer's ``progress`` events shown by the shared :class:`JobProgress` (a bar, or log lines)."""

    def __init__(self, total: int, label: str) -> None:
        self.progress = JobProgress(label, total=total, unit="steps")
        self.progress.update(info="preparing data")
        self.val: str = ""

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "setup":
            stats = (
                f"tokenising: {event['tokens']:,} tokens" if "tokens" in event else event.get("message", "")
            )
            self.progress.update(info=stats)
        elif kind == "step":
            if "val_loss" in event:
                self.val = f" val {event['val_loss']:.3f}"
            stats = f"loss {event['loss']:.3f}{self.val}  {event['tokens_per_s']:,.0f} tok/s"
            self.progress.update(event["step"], info=stats)
        elif kind == "done":
            self.progress.update(event["step"])


def run_training(
    cfg: TrainConfig, out: Path, *, resume: bool, stop_after: int | None, device: str | None
) -> TrainResult:
    """Train with a progress bar; clear one-line errors for bad input."""
    from interplab.train import train

    try:
        with TrainProgress(cfg.steps, cfg.name or "train") as bar:
            return train(cfg, out, resume=resume, stop_after=stop_after, device=device, progress=bar)
    except (ValueError, FileNotFoundError, ImportError) as err:
        fail(str(err))


def train_command(
    preset: str = typer.Option(
        None, "--preset", "-p", help="a named preset: induction-2l, code-4l, parens ..."
    ),
    config: Path = typer.Option(None, "--config", "-c", help="a YAML (or JSON) training config"),
    out: Path = typer.Option(
        None, "--out", "-o", help="run directory (default runs/<preset or config name>)", callback=out_folder
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="override a setting: --set optim.lr=1e-3 --set steps=500"
    ),
    steps: int = typer.Option(
        None, "--steps", help="number of optimizer steps (shortcut for --set steps=N)", callback=positive_int
    ),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue a run found in --out"),
    stop_after: int = typer.Option(
        None, "--stop-after", help="stop after this step (resume later)", callback=positive_int
    ),
    threads: int = threads_param(help="torch CPU threads (1 is fastest on a busy machine)"),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)", callback=device_option
    ),
    list_presets: bool = typer.Option(False, "--list", help="list the presets and exit"),
) -> None:
    """Train a transformer on a corpus or an algorithmic task, with dense checkpoints.

    Under ``torchrun --nproc_per_node N -m interplab train ...`` it trains data-parallel."""
    from interplab.train import preset_names

    if list_presets:
        for name in preset_names():
            console.print(name)
        return
    set_threads(threads)
    cfg = load_config(preset, config, list(overrides) + ([f"steps={steps}"] if steps is not None else []))
    if out is None:
        out = check_out_folder(RUNS_ROOT / (cfg.name or (config.stem if config else "run")))
    result = run_training(cfg, out, resume=resume, stop_after=stop_after, device=device)
    print_result(result)


def print_result(result: TrainResult) -> None:
    for item in result.skipped_checkpoints:
        console.print(f"[yellow]skipped unusable checkpoint[/] {item}")
    if result.resumed_from is not None and result.resumed_from == result.step:
        console.print(f"already trained to step {result.step} (nothing to do; use another --out to retrain)")
    elif result.resumed_from is not None:
        console.print(f"resumed from step {result.resumed_from}")
    val = f", validation loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    console.print(
        f"step {result.step}: loss {result.loss:.3f}{val}; {result.tokens:,} tokens"
        + (f", {result.tokens_per_s:,.0f} tokens/s" if result.tokens_per_s > 0 else "")
    )
    console.print(f"run directory: [bold]{result.run_dir}[/] ({run_contents(len(result.checkpoints))})")


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
