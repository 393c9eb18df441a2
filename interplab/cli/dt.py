"""``interplab dt collect|train|eval|analyze``: decision transformers on MiniGrid, one run folder per step.

``collect`` writes a trajectory data set (Kind.TRAJECTORIES), which ``train`` reads to write a DT training run
(Kind.DT_TRAIN, its model in ``final/``), which ``eval`` plays in the environment against a range of target
returns (Kind.DT_EVAL: the calibration curve and the episodes played) and ``analyze`` reads with trajectories
(Kind.DT_ANALYSIS). Each command is a thin wrapper over `interplab.rl`; the environments need the ``rl``
extra (minigrid + gymnasium), imported only when a command runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

from interplab import runs
from interplab.cli.common import (
    JobProgress,
    claim_out,
    console,
    device_option,
    fail,
    non_negative_int,
    out_folder,
    positive_float,
    positive_int,
    set_threads,
    threads_option,
)
from interplab.runs import Kind, RunError

app = typer.Typer(
    help="Decision transformers on MiniGrid: collect trajectories, train, evaluate (calibration), analyse.",
    no_args_is_help=True,
)

_LIBRARY_ERRORS = (ValueError, RunError, FileNotFoundError, KeyError)


@contextmanager
def _library(what: str) -> Iterator[None]:
    """Errors the library raises for bad input, as one line after ``what``; its warnings (a target return
    outside the data's range ...) shown in yellow as they come."""

    def show(
        message: Any, category: Any, filename: Any, lineno: Any, file: Any = None, line: Any = None
    ) -> None:
        console.print(f"warning: {message}", style="yellow", markup=False, highlight=False, soft_wrap=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = show
        try:
            yield
        except ModuleNotFoundError as err:
            if err.name in ("minigrid", "gymnasium"):
                fail(
                    f"{what}: the environments need the rl extra: pip install 'interplab[rl]' ({err})", code=1
                )
            raise
        except _LIBRARY_ERRORS as err:
            text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            fail(f"{what}: {text}")


def _saved(path: Path) -> str:
    return f"[bold]{path}[/]"


def _figure(fig: Any, out: Path, name: str) -> list[Path]:
    """Save ``fig`` as ``out/name.html`` (and ``.png`` where a static renderer works)."""
    from interplab.plots import save_figure

    written = [save_figure(fig, out / f"{name}.html")]
    try:
        written.append(save_figure(fig, out / f"{name}.png"))
    except RuntimeError:  # no static renderer here: the interactive page is enough
        pass
    return written


# --- collect ---------------------------------------------------------------------------------------------------


@app.command("collect")
def collect_command(
    env: str = typer.Argument(..., help="environment, e.g. MiniGrid-MemoryS7-v0 (see --list)"),
    episodes: int = typer.Option(..., "--episodes", "-n", help="episodes to collect", callback=positive_int),
    out: Path = typer.Option(
        ..., "--out", "-o", help="trajectory folder (a killed collection resumes)", callback=out_folder
    ),
    epsilon: float = typer.Option(
        None, "--epsilon", help="probability of a random action per step (default: the library's)"
    ),
    seed: int = typer.Option(0, "--seed", help="first environment seed (episode e uses seed + e)"),
) -> None:
    """Collect trajectories of the scripted expert (epsilon-noise, mixed skill levels, so returns vary)."""
    if epsilon is not None and not 0.0 <= epsilon <= 1.0:
        raise typer.BadParameter(f"{epsilon!r} is not a probability in [0, 1]", param_hint="'--epsilon'")
    from interplab import rl

    with _library("cannot collect"):
        rl.env_spec(env)  # an unknown name: the supported ones, before any folder is made
        claim_out(out, Kind.TRAJECTORIES)
        kwargs: dict[str, Any] = {"seed": seed}
        if epsilon is not None:
            kwargs["epsilon"] = epsilon
        with JobProgress(f"collect {env}", total=episodes, unit="episodes") as bar:
            trajs = rl.collect(env, episodes, out, progress=bar, **kwargs)
        summary = trajs.summary()
        pictures = _figure(summary.plot(), out, "summary")
    returns = trajs.returns
    solved = float((returns > 0).mean()) if len(returns) else 0.0
    console.print(
        f"{trajs.n_episodes} episodes, {len(trajs.actions):,} steps ({trajs.source}); "
        f"mean return {float(returns.mean()):.3f}, solved {solved:.0%}"
    )
    console.print(f"trajectories: {_saved(out)} ({runs.MANIFEST} + shards); summary: {pictures[0]}")


# --- train -----------------------------------------------------------------------------------------------------


class _TrainProgress:
    """`train_dt`'s progress, whatever its shape (``fn(step, total)`` or event dicts), on one `JobProgress`."""

    def __init__(self, bar: JobProgress) -> None:
        self.bar = bar

    def __call__(self, event: Any, total: int | None = None) -> None:
        if isinstance(event, dict):
            step = event.get("step")
            loss = event.get("loss")
            info = f"loss {loss:.3f}" if isinstance(loss, (int, float)) else None
            self.bar.update(step if isinstance(step, int) else None, info=info)
        else:
            self.bar.update(event, total=total)


@app.command("train")
def train_command(
    data: Path = typer.Argument(..., help="a trajectory folder (`interplab dt collect`)"),
    preset: str = typer.Option("memory-dt-tiny", "--preset", "-p", help="model + training preset"),
    out: Path = typer.Option(
        ..., "--out", "-o", help="run folder (resumes a run found there)", callback=out_folder
    ),
    steps: int = typer.Option(
        None, "--steps", help="optimizer steps (default: the preset's)", callback=positive_int
    ),
    seed: int = typer.Option(
        None, "--seed", help="training seed (default: the preset's)", callback=non_negative_int
    ),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue a run found in --out"),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads", callback=threads_option),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda ... (default: cuda if available)", callback=device_option
    ),
) -> None:
    """Train a decision transformer on trajectories (interplab's trainer: dense early checkpoints, resumable)."""
    set_threads(threads)
    from interplab import rl

    with _library("cannot train"):
        model_cfg, train_cfg = rl.load_dt_preset(preset)
        trajs = rl.load_trajectories(data)
        if trajs.env != model_cfg.env:
            model_cfg = model_cfg.replace(env=trajs.env)
        changes = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
        if changes:
            train_cfg = train_cfg.replace(**changes)
        claim_out(out, Kind.DT_TRAIN)
        with JobProgress(f"train {preset}", total=train_cfg.steps, unit="steps") as bar:
            result = rl.train_dt(
                model_cfg, train_cfg, trajs, out, resume=resume, progress=_TrainProgress(bar), device=device
            )
    console.print(_train_line(result))
    console.print(
        f"run directory: {_saved(out)} ({runs.CONFIG}, {runs.LOG}, {runs.CHECKPOINTS}/, {runs.FINAL}/, "
        f"{runs.REPORT}); next: interplab dt eval {out} --out {out.parent / (out.name + '-eval')}",
        soft_wrap=True,
    )


def _train_line(result: Any) -> str:
    parts = [f"step {getattr(result, 'step', '?')}"]
    for name, label in (
        ("loss", "loss"),
        ("action_accuracy", "action accuracy"),
        ("tokens_per_s", "tokens/s"),
    ):
        value = getattr(result, name, None)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {value:,.3f}" if name != "tokens_per_s" else f"{value:,.0f} {label}")
    return ", ".join(parts)


# --- eval ------------------------------------------------------------------------------------------------------


def _targets(value: str | None) -> list[float] | None:
    if value is None:
        return None
    try:
        out = [float(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a list of numbers (e.g. 0,0.25,0.5,0.75,1)") from None
    if not out:
        raise typer.BadParameter(f"{value!r} names no target return")
    return out


@app.command("eval")
def eval_command(
    run: Path = typer.Argument(..., help="a DT training run (its final/) or a DT model folder"),
    targets: str = typer.Option(
        None,
        "--targets",
        help="target returns, e.g. 0,0.25,0.5,0.75,1 (default: 5 from 0 to the env's best return)",
        callback=_targets,
    ),
    episodes: int = typer.Option(16, "--episodes", "-n", help="episodes per target", callback=positive_int),
    out: Path = typer.Option(..., "--out", "-o", help="evaluation folder", callback=out_folder),
    data: Path = typer.Option(
        None, "--data", help="the training trajectories: a target outside their return range warns"
    ),
    seed: int = typer.Option(0, "--seed", help="episode k of each target uses env seed seed + k"),
    n_envs: int = typer.Option(16, "--n-envs", help="environments stepped together", callback=positive_int),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sample actions"),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads", callback=threads_option),
) -> None:
    """Play the model in its environment conditioned on each target return: the calibration curve."""
    if temperature < 0:
        raise typer.BadParameter(f"{temperature!r} is not >= 0", param_hint="'--temperature'")
    set_threads(threads)
    from interplab import rl

    with _library("cannot evaluate"):
        folder = runs.dt_model_folder(run)
        model = rl.load_dt(folder)
        if folder != run:
            console.print(f"loaded {folder}", markup=False, highlight=False)
        env = model.cfg.env
        trajs = rl.load_trajectories(data) if data is not None else None
        if targets is None:
            top = rl.env_spec(env).max_return
            targets = [round(top * i / 4, 4) for i in range(5)]
        claim_out(out, Kind.DT_EVAL)
        with JobProgress(f"eval {env}", total=len(targets) * episodes, unit="episodes") as bar:
            cal = rl.evaluate_dt(
                model, env, targets, episodes, data=trajs, seed=seed, n_envs=n_envs,
                temperature=temperature, progress=bar,
            )  # fmt: skip
        cal.save(out)
    console.print(_calibration_table(cal))
    try:
        s = cal.slope()
        console.print(
            f"slope of achieved on target return: {s.estimate:.3f} (95% CI {s.ci_low:.3f} to {s.ci_high:.3f})"
        )
    except ValueError as err:  # too few episodes or one target
        console.print(f"no slope: {err}", style="yellow")
    console.print(f"evaluation: {_saved(out)} ({runs.CALIBRATION_JSON}, calibration.html, {runs.ROLLOUTS}/)")


def _calibration_table(cal: Any) -> Any:
    from rich.table import Table

    table = Table("target", "episodes", "mean return", "95% CI")
    for t, n, m, lo, hi in zip(
        cal.targets, cal.counts, cal.mean_returns, cal.ci_low, cal.ci_high, strict=True
    ):
        ci = f"{lo:.3f} to {hi:.3f}" if lo == lo and hi == hi else "(one episode)"
        table.add_row(f"{t:g}", str(n), f"{m:.3f}", ci)
    return table


# --- analyze ---------------------------------------------------------------------------------------------------


@app.command("analyze")
def analyze_command(
    run: Path = typer.Argument(..., help="a DT training run (its final/) or a DT model folder"),
    data: Path = typer.Option(..., "--data", help="a trajectory folder of the model's environment"),
    out: Path = typer.Option(..., "--out", "-o", help="analysis folder", callback=out_folder),
    episodes: int = typer.Option(
        64, "--episodes", "-n", help="episodes of --data to analyse", callback=positive_int
    ),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads", callback=threads_option),
) -> None:
    """Probes, instruction patching and attention from the decision token on trajectories."""
    set_threads(threads)
    fail("interplab dt analyze: the analysis library (interplab.rl.analysis) has not landed yet", code=1)


_ = positive_float  # (kept for the options of analyze)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="dt")
