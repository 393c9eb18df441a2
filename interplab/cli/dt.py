"""``interplab dt collect|train|eval|analyze``: decision transformers on MiniGrid, one run folder per step.

``collect`` writes a trajectory data set (Kind.TRAJECTORIES), which ``train`` reads to write a DT training run
(Kind.DT_TRAIN, its model in ``final/``), which ``eval`` plays in the environment against a range of target
returns (Kind.DT_EVAL: the calibration curve and the episodes played) and ``analyze`` reads with trajectories
(Kind.DT_ANALYSIS). Each command is a thin wrapper over `interplab.rl`; the environments need the ``rl``
extra (minigrid + gymnasium), imported only when a command runs.
"""

from __future__ import annotations

import math
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
    positive_int,
    set_threads,
    threads_param,
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


def _figure(fig: Any, out: Path, name: str, png: bool) -> list[Path]:
    """Save ``fig`` as ``out/name.html`` (and ``.png`` with ``--png``, where a static renderer works)."""
    from interplab.plots import save_figure

    written = [save_figure(fig, out / f"{name}.html")]
    if png:
        try:
            written.append(save_figure(fig, out / f"{name}.png"))
        except RuntimeError:  # no static renderer here: the interactive page is enough
            pass
    return written


PNG = typer.Option(False, "--png", help="also write PNG pictures")


# --- collect ---------------------------------------------------------------------------------------------------


def _numbers(value: str | None) -> list[float] | None:
    """A comma- (or space-) separated list of numbers (``0,0.25,0.5``), checked while the line is parsed."""
    if value is None:
        return None
    try:
        out = [float(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a list of numbers (e.g. 0,0.25,0.5)") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise typer.BadParameter(f"{value!r} is not a list of finite numbers")
    return out


def _probability(value: float | None) -> float | None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"{value!r} is not a probability in [0, 1]")
    return value


@app.command("collect")
def collect_command(
    env: str = typer.Argument(..., help="environment, e.g. MiniGrid-MemoryS7-v0"),
    episodes: int = typer.Option(..., "--episodes", "-n", help="episodes to collect", callback=positive_int),
    out: Path = typer.Option(
        ..., "--out", "-o", help="trajectory folder (a killed collection resumes)", callback=out_folder
    ),
    epsilon: float = typer.Option(
        None,
        "--epsilon",
        help="probability of a random action at each step (default 0)",
        callback=_probability,
    ),
    skill_mix: str = typer.Option(
        None,
        "--skill-mix",
        help="instead of --epsilon: each episode's epsilon drawn from these, e.g. 0,0.2,0.5",
        callback=_numbers,
    ),
    wrong_object: float = typer.Option(
        None,
        "--wrong-object",
        help="MemoryS7: the fraction of episodes that go to the wrong object",
        callback=_probability,
    ),
    seed: int = typer.Option(0, "--seed", help="first environment seed (episode e uses seed + e)"),
    policy: Path = typer.Option(
        None, "--policy", help="instead of the expert: a PPO run (`interplab dt ppo`) whose agent plays"
    ),
    checkpoints: str = typer.Option(
        None,
        "--checkpoints",
        help="with --policy: the checkpoints (env steps) that play, mixed, e.g. 4096,65536 (default: newest)",
        callback=_numbers,
    ),
    greedy: bool = typer.Option(False, "--greedy", help="with --policy: its most likely action, not sampled"),
    png: bool = PNG,
) -> None:
    """Collect trajectories of the scripted expert (noise and mixed skill, so that returns vary), or of a
    trained PPO agent (--policy; mixed --checkpoints give varied returns)."""
    from interplab import rl

    with _library("cannot collect"):
        rl.env_spec(env)  # an unknown name: the supported ones, before any folder is made
        if policy is None and (checkpoints is not None or greedy):
            fail("cannot collect: --checkpoints and --greedy are for a PPO agent (--policy PPO_RUN)")
        if policy is not None and (skill_mix is not None or wrong_object is not None):
            fail("cannot collect: --skill-mix and --wrong-object are the scripted expert's; with --policy "
                 "mix --checkpoints (and --epsilon) instead")  # fmt: skip
        claim_out(out, Kind.TRAJECTORIES)
        given = {"epsilon": epsilon, "skill_mix": skill_mix, "wrong_object": wrong_object}
        kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        with JobProgress(f"collect {env}", total=episodes, unit="episodes") as bar:
            if policy is None:
                trajs = rl.collect(env, episodes, out, seed=seed, progress=bar, **kwargs)
            else:
                if checkpoints is not None and any(c != int(c) or c < 0 for c in checkpoints):
                    fail(f"cannot collect: --checkpoints are env steps (integers >= 0), got {checkpoints}")
                steps = [int(c) for c in checkpoints] if checkpoints is not None else None
                trajs = rl.collect_ppo(
                    policy, env, episodes, out, checkpoints=steps, greedy=greedy, seed=seed, progress=bar,
                    **kwargs,
                )  # fmt: skip
        summary = trajs.summary()
        pictures = _figure(summary.plot(), out, "summary", png)
    lo, hi = summary.return_range
    console.print(
        f"{trajs.n_episodes} episodes, {trajs.n_steps:,} steps ({trajs.source}); returns {lo:.3f} to {hi:.3f}, "
        f"mean {float(trajs.returns.mean()):.3f}; solved {summary.success_rate:.0%}"
    )
    console.print(
        f"trajectories: {_saved(out)} ({runs.MANIFEST} + shards); summary: {pictures[0]}", soft_wrap=True
    )


# --- ppo -------------------------------------------------------------------------------------------------------


@app.command("ppo")
def ppo_command(
    env: str = typer.Argument(..., help="environment, e.g. MiniGrid-Empty-5x5-v0"),
    steps: int = typer.Option(
        None,
        "--steps",
        help="environment steps to train for (required without --preset)",
        callback=positive_int,
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", help="PPO run folder (resumes a run found there)", callback=out_folder
    ),
    preset: str = typer.Option(
        None,
        "--preset",
        help="a named config (interplab.rl.ppo.PPO_PRESETS, e.g. doorkey-ppo); flags override it",
    ),
    memory: str = typer.Option(None, "--memory", help="the policy's memory: gru (default) or none"),
    n_envs: int = typer.Option(
        None, "--n-envs", help="environments stepped together (default 8)", callback=positive_int
    ),
    seed: int = typer.Option(0, "--seed", help="training seed", callback=non_negative_int),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue a run found in --out"),
    stop_after: int = typer.Option(
        None, "--stop-after", help="stop after this many env steps (resume later)", callback=positive_int
    ),
    threads: int = threads_param(help="torch CPU threads"),
) -> None:
    """Train a PPO agent (`interplab.rl.ppo`) whose checkpoints `dt collect --policy` plays."""
    set_threads(threads)
    from interplab.rl.ppo import PPOConfig, ppo_config, train_ppo

    with _library("cannot train PPO"):
        cfg: PPOConfig = ppo_config(env, preset=preset, steps=steps, memory=memory, n_envs=n_envs, seed=seed)
        claim_out(out, Kind.PPO)
        with JobProgress(f"ppo {env}", total=cfg.updates * cfg.batch, unit="env steps") as bar:

            def progress(event: dict[str, Any]) -> None:
                ret = event.get("return_mean")
                bar.update(event["step"], info=f"return {ret:.3f}" if ret is not None else None)

            result = train_ppo(cfg, out, resume=resume, stop_after=stop_after, progress=progress)
    if result.resumed_from is not None:
        console.print(f"resumed from step {result.resumed_from}")
    ret = "no episode ended in the last update"
    if result.return_mean is not None:
        ret = f"mean return {result.return_mean:.3f}, solved {result.success_rate:.0%} (last update)"
    console.print(f"step {result.step:,}: {ret}; {result.steps_per_s:,.0f} env steps/s")
    console.print(
        f"PPO run: {_saved(out)} ({runs.CONFIG}, {runs.LOG}, {runs.CHECKPOINTS}/ {list(result.checkpoints)}, "
        f"{runs.REPORT}); collect with: interplab dt collect {env} --policy {out} --episodes N --out DIR",
        soft_wrap=True,
    )


# --- train -----------------------------------------------------------------------------------------------------


class _TrainProgress:
    """`train_dt`'s progress events (``{"event": "setup" | "step" | "checkpoint" | "done", ...}``) on a
    `JobProgress`."""

    def __init__(self, bar: JobProgress) -> None:
        self.bar = bar
        self.val = ""

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "setup":
            self.bar.update(info=f"{event.get('episodes')} episodes, {event.get('steps')} steps of data")
        elif kind == "step":
            if isinstance(event.get("val_loss"), (int, float)):
                self.val = f" val {event['val_loss']:.3f}"
            loss = event.get("loss")
            info = f"loss {loss:.3f}{self.val}" if isinstance(loss, (int, float)) else None
            self.bar.update(event.get("step"), info=info)
        elif kind == "done":
            self.bar.update(event.get("step"))


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
    stop_after: int = typer.Option(
        None, "--stop-after", help="stop after this step (resume later)", callback=positive_int
    ),
    threads: int = threads_param(help="torch CPU threads"),
    device: str = typer.Option(
        None, "--device", help="cpu, cuda ... (default: cuda if available)", callback=device_option
    ),
) -> None:
    """Train a decision transformer on trajectories (dense early checkpoints, resumable).

    Under torchrun (torchrun --nproc_per_node N -m interplab dt train ...) it trains data-parallel."""
    set_threads(threads)
    from interplab import rl
    from interplab.rl.train import dt_preset

    with _library("cannot train"):
        model_cfg, train_cfg = dt_preset(preset)
        trajs = rl.load_trajectories(data)
        if trajs.env != model_cfg.env:  # the preset's architecture, for the data's environment
            model_cfg = model_cfg.replace(env=trajs.env, max_timestep=rl.env_spec(trajs.env).max_steps)
        changes = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
        if changes:
            train_cfg = train_cfg.replace(**changes)
        claim_out(out, Kind.DT_TRAIN)
        with JobProgress(f"train {preset}", total=train_cfg.steps, unit="steps") as bar:
            result = rl.train_dt(
                model_cfg, train_cfg, trajs, out, resume=resume, stop_after=stop_after, device=device,
                progress=_TrainProgress(bar),
            )  # fmt: skip
    if result.resumed_from is not None:
        console.print(f"resumed from step {result.resumed_from}")
    val = ""
    if result.val_loss is not None:
        val = f", validation loss {result.val_loss:.3f}, action accuracy {result.val_accuracy:.1%}"
    console.print(f"step {result.step}: loss {result.loss:.3f}{val}; {result.tokens_per_s:,.0f} tokens/s")
    console.print(
        f"run directory: {_saved(out)} ({runs.CONFIG}, {runs.LOG}, {runs.CHECKPOINTS}/, {runs.FINAL}/, "
        f"{runs.REPORT})",
        soft_wrap=True,
    )


# --- eval ------------------------------------------------------------------------------------------------------


@app.command("eval")
def eval_command(
    run: Path = typer.Argument(..., help="a DT training run (its final/) or a DT model folder"),
    targets: str = typer.Option(
        None,
        "--targets",
        help="target returns, e.g. 0,0.25,0.5,0.75,1 (default: 5 from 0 to the env's best return)",
        callback=_numbers,
    ),
    episodes: int = typer.Option(16, "--episodes", "-n", help="episodes per target", callback=positive_int),
    out: Path = typer.Option(..., "--out", "-o", help="evaluation folder", callback=out_folder),
    data: Path = typer.Option(
        None,
        "--data",
        help="the training trajectories (default: the range a training run recorded): a target outside "
        "their return range warns",
    ),
    seed: int = typer.Option(0, "--seed", help="episode k of each target uses env seed seed + k"),
    n_envs: int = typer.Option(16, "--n-envs", help="environments stepped together", callback=positive_int),
    temperature: float = typer.Option(0.0, "--temperature", help="0: greedy; > 0: sample actions"),
    threads: int = threads_param(help="torch CPU threads"),
    device: str = typer.Option(
        "cpu", "--device", help="where the model runs: cpu, cuda ...", callback=device_option
    ),
) -> None:
    """Play the model in its environment conditioned on each target return: the calibration curve."""
    if temperature < 0:
        raise typer.BadParameter(f"{temperature!r} is not >= 0", param_hint="'--temperature'")
    set_threads(threads)
    from interplab import rl

    with _library("cannot evaluate"):
        folder = runs.dt_model_folder(run)
        model = rl.load_dt(folder, device=device)
        if folder != run:
            console.print(f"loaded {folder}", markup=False, highlight=False)
        env = model.cfg.env
        trajs = rl.load_trajectories(data, env=env) if data is not None else _data_range(run)
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
    console.print(
        f"evaluation: {_saved(out)} ({runs.CALIBRATION_JSON}, {runs.CALIBRATION_HTML}, {runs.ROLLOUTS}/)"
    )


def _data_range(run: Path) -> tuple[float, float] | None:
    """The return range of a DT training run's data (its config.json records it), else None."""
    if runs.detect(run) is not Kind.DT_TRAIN:
        return None
    data = runs.DTTrainRun.open(run).config.get("data")
    lo, hi = (data.get("return_min"), data.get("return_max")) if isinstance(data, dict) else (None, None)
    return (float(lo), float(hi)) if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) else None


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


ATTENTION_EPISODES = 10
"""episodes whose decision-token attention `analyze` records for the web page's trajectory player"""


@app.command("analyze")
def analyze_command(
    run: Path = typer.Argument(..., help="a DT training run (its final/) or a DT model folder"),
    data: Path = typer.Option(..., "--data", help="a trajectory folder of the model's environment"),
    out: Path = typer.Option(..., "--out", "-o", help="analysis folder", callback=out_folder),
    episodes: int = typer.Option(
        64, "--episodes", "-n", help="the first N episodes of --data are analysed", callback=positive_int
    ),
    seed: int = typer.Option(0, "--seed", help="which episodes the probes hold out"),
    png: bool = PNG,
    threads: int = threads_param(help="torch CPU threads"),
    device: str = typer.Option(
        "cpu", "--device", help="where the model runs: cpu, cuda ...", callback=device_option
    ),
) -> None:
    """Probes, instruction patching, action DLA and the decision token's attention on trajectories.

    Probes for the instruction object, the agent's direction and a key in view on the residual stream (episodes
    held out), activation patching between instruction-swapped windows at the decision (MemoryS7), direct logit
    attribution onto the action logits and the attention of each step's decision token; report.json and
    pictures."""
    set_threads(threads)
    from interplab import rl
    from interplab.rl import analysis as an

    with _library("cannot analyze"):
        folder = runs.dt_model_folder(run)
        model = rl.load_dt(folder, device=device)
        full = rl.load_trajectories(data, env=model.cfg.env)  # data of another env: an error naming both
        n = min(episodes, full.n_episodes)
        trajs = full if n == full.n_episodes else full.select(list(range(n)))
        claim_out(out, Kind.DT_ANALYSIS)
        report = _analyze(model, trajs, an, out, seed, png)
        report.update(model=str(folder), data=str(Path(data).absolute()), env=trajs.env, episodes=n)
        for name, p in report["probes"].items():  # headline numbers (the web page's table)
            report[f"{name} probe: best held-out accuracy"] = max(p["test_scores"])
            report[f"{name} probe: chance"] = p["chance"]
        runs.write_json(out / runs.REPORT, Kind.DT_ANALYSIS, report)
    for name, p in report["probes"].items():
        best = max(range(len(p["sites"])), key=lambda i: p["test_scores"][i])
        console.print(
            f"probe {name}: best {p['sites'][best]} {p['test_scores'][best]:.3f} held-out accuracy "
            f"(chance {p['chance']:.3f})"
        )
    if report.get("patching"):
        pt = report["patching"]
        top = f"; most restoring: {pt['top']}" if not pt["note"] else ""
        console.print(
            f"instruction patching at the decision ({pt['n_pairs']} pairs): logit difference clean "
            f"{pt['clean_metric']:.3f}, corrupt {pt['corrupt_metric']:.3f}{top}"
        )
        if pt["note"]:
            console.print(f"warning: {pt['note']}", style="yellow", markup=False, highlight=False)
    if report.get("memorydt"):
        rows = report["memorydt"]["rows"]
        console.print(
            "MemoryDT reproduction: " + ", ".join(f"{k} {v:.3f}" for k, v in rows.items()), soft_wrap=True
        )
    console.print(f"analysis: {_saved(out)} ({runs.REPORT}, {', '.join(report['pictures'])})")


def _analyze(model: Any, trajs: Any, an: Any, out: Path, seed: int, png: bool) -> dict[str, Any]:
    """Run the analyses of `analyze_command` and write their pictures into ``out``; the report's numbers."""
    import torch

    n_layers = model.cfg.n_layers
    sites = [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [
        f"blocks.{n_layers - 1}.hook_resid_post"
    ]
    out.mkdir(parents=True, exist_ok=True)
    pictures: list[str] = []
    with JobProgress("analyze", total=4, unit="analyses") as bar:
        bar.update(0, info="caching the residual stream")
        cache = an.cache_trajectories(model, trajs, sites, kinds=("state",))
        labels = an.env_labels(trajs)
        probes = {}
        sweeps: dict[str, Any] = {}
        wanted = {
            "instruction": labels.instruction,
            "direction": labels.direction,
            "key_in_view": labels.key_in_view,
        }
        for name, y in wanted.items():
            if y is None or len(torch.unique(y)) < 2:
                continue
            sweep = an.probe(cache, y.long(), kind="state", label=name, seed=seed)
            probes[name] = sweep.to_dict()
            sweeps[name] = (sweep, y.long())
            pictures += [p.name for p in _figure(sweep.plot(), out, f"probe_{name}", png)]
        bar.update(1, info="instruction patching")
        patching = None
        win = None
        if trajs.env.startswith("MiniGrid-Memory"):
            ends = an.decision_steps(trajs)
            ends = ends[ends >= 0]
            if len(ends):
                pair = an.instruction_pair(trajs, ends, model.cfg.context)
                result = an.patch_instruction(
                    model, pair.clean, pair.corrupt, answer=pair.answer, wrong=pair.wrong
                )
                pictures += [p.name for p in _figure(result.plot(), out, "patching", png)]
                patching = _patching_summary(result, len(ends))
                win = pair.clean
        bar.update(2, info="direct logit attribution")
        if win is None:
            win = an.windows(trajs, model.cfg.context, ends=trajs.episode_starts[1:] - 1)
        dla = an.action_dla(model, win)
        pictures += [p.name for p in _figure(dla.plot(), out, "dla", png)]
        memory = None
        if trajs.env.startswith("MiniGrid-Memory"):
            bar.update(info="the MemoryDT reproduction")
            from interplab.rl.memorydt import memorydt

            table = memorydt(model, trajs, seed=seed)
            pictures += [p.name for p in _figure(table.plot(), out, "memorydt", png)]
            memory = table.to_dict()
        bar.update(3, info="attention")
        layer = n_layers - 1
        pictures += [
            p.name for p in _figure(an.attention_figure(model, win, layer, 0), out, "attention", png)
        ]
        n_player = min(ATTENTION_EPISODES, trajs.n_episodes)
        attention = decision_attention(model, trajs, an, layer, n_player)
        bar.update(4)
    probe_steps = _probe_steps(cache, sweeps, n_player)
    return {
        "probes": probes,
        "patching": patching,
        "dla": dla.to_dict(),
        "memorydt": memory,
        "attention": attention,
        "probe_steps": probe_steps,
        "pictures": pictures,
    }


PROBE_CLASSES = {
    "instruction": ("key", "ball"),
    "direction": ("east", "south", "west", "north"),
    "key_in_view": ("no", "yes"),
}
"""the class names of the probes `analyze` fits (the web player shows them per step)"""


def _probe_steps(cache: Any, sweeps: dict[str, Any], n_episodes: int) -> dict[str, Any]:
    """For each step of the first ``n_episodes``: each probe's prediction at its best site (the class, its
    probability) and the true class, for the web page's trajectory player."""
    labels: dict[str, Any] = {}
    episodes: dict[str, dict[str, list[list[float]]]] = {str(e): {} for e in range(n_episodes)}
    rows = cache.rows("state")
    keep = rows[cache.episode[rows] < n_episodes]  # in flat-step order: episode by episode, step by step
    for name, (sweep, y) in sweeps.items():
        best = int(sweep.test_scores.argmax())
        probe, site = sweep.probes[best], sweep.sites[best]
        probs = (cache[site][keep].float() @ probe.weight.T + probe.bias).softmax(-1)
        p, pred = probs.max(-1)
        truth = y[cache.flat_step[keep]]
        classes = PROBE_CLASSES.get(name, tuple(str(c) for c in range(probs.shape[1])))
        labels[name] = {
            "site": site,
            "classes": list(classes),
            "held_out_accuracy": float(sweep.test_scores[best]),
        }
        for e, pr, pp, t in zip(
            cache.episode[keep].tolist(), pred.tolist(), p.tolist(), truth.tolist(), strict=True
        ):
            episodes[str(e)].setdefault(name, []).append([int(pr), round(float(pp), 3), int(t)])
    return {"labels": labels, "episodes": episodes, "note": "fitted on the training episodes' state tokens"}


def _patching_summary(result: Any, n_pairs: int) -> dict[str, Any]:
    """The patching numbers and, per component, the patch that restores most of the clean answer."""
    import torch

    top = []
    for comp, r in result.results.items():
        norm = torch.nan_to_num(result.normalized(comp), nan=float("-inf"))
        flat = int(norm.flatten().argmax())
        idx = [int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(norm.shape))]
        where = ", ".join(
            f"{d} {r.labels[d][i].replace(chr(0x200B), '')}" for d, i in zip(r.dims, idx, strict=True)
        )
        value = float(norm.flatten()[flat])
        top.append((value, f"{comp} ({where}) {value:.2f}"))
    top.sort(reverse=True)
    gap = abs(result.clean_metric - result.corrupt_metric)
    note = None
    if gap < 0.1:  # the normalised values divide by this gap: noise when the model ignores the instruction
        note = (
            f"clean and corrupt logit differences are {gap:.3f} apart: the model hardly tells the two "
            "instructions apart at the decision, so the normalised patching values are not meaningful"
        )
    return {**result.to_dict(), "n_pairs": n_pairs, "top": "; ".join(t for _, t in top[:3]), "note": note}


def decision_attention(model: Any, trajs: Any, an: Any, layer: int, n_episodes: int) -> dict[str, Any]:
    """For each step of the first ``n_episodes``: the attention of the decision token (the state token of the
    step, whose output predicts the action) over the window's tokens, averaged over ``layer``'s heads. Token
    labels are relative to the step (``R-1``, ``s-1``, ``a-1``, ..., ``R0``, ``s0``, ``a0``); pad tokens 0."""
    import torch

    from interplab.hooks.site import Site, SiteKind

    k = model.cfg.context
    site = Site(SiteKind.PATTERN, layer).name
    query = an.token_position(k - 1, "state")
    episodes: dict[str, list[list[float]]] = {}
    for e in range(n_episodes):
        lo, hi = int(trajs.episode_starts[e]), int(trajs.episode_starts[e + 1])
        win = an.windows(trajs, k, ends=torch.arange(lo, hi))
        store: dict[str, torch.Tensor] = {}

        def save(act: torch.Tensor, s: Any, store: dict[str, torch.Tensor] = store) -> None:
            store["p"] = act[:, :, query].mean(1).detach().float().cpu()

        with torch.no_grad(), model.transformer.hooks(read_hooks=[(site, save)]):
            model(*win.inputs(model.transformer.W_E.device))
        episodes[str(e)] = [[round(float(x), 4) for x in row] for row in store["p"]]
    tokens = [
        f"{kind[0].upper() if kind == 'rtg' else kind[0]}{i - k + 1}"
        for i in range(k)
        for kind in an.TOKEN_KINDS
    ]
    return {
        "site": site,
        "query": "the state token of the step (the decision)",
        "tokens": tokens,
        "episodes": episodes,
    }


# --- sae ---------------------------------------------------------------------------------------------------------


PLAYER_STEPS_EPISODES = 50
"""episodes whose steps' strongest features `sae` records for the web page's trajectory player"""
DT_PLAYER_JSON = "player.json"
"""`sae`'s record of each player step's strongest features ({kind: dt_features, db, steps}), in its run"""


@app.command("sae")
def sae_command(
    run: Path = typer.Argument(..., help="a DT training run (its final/) or a DT model folder"),
    data: Path = typer.Option(..., "--data", help="a trajectory folder of the model's environment"),
    out: Path = typer.Option(..., "--out", "-o", help="SAE run folder (+ features.db)", callback=out_folder),
    layer: int = typer.Option(
        None,
        "--layer",
        help="the block whose hook_resid_post the SAE reads (default: the last)",
        callback=non_negative_int,
    ),
    d_sae: int = typer.Option(256, "--d-sae", help="SAE latents", callback=positive_int),
    k: int = typer.Option(8, "--k", help="TopK: latents active per row", callback=positive_int),
    steps: int = typer.Option(2000, "--steps", help="SAE training steps", callback=positive_int),
    episodes: int = typer.Option(
        None, "--episodes", "-n", help="the first N episodes of --data (default: all)", callback=positive_int
    ),
    seed: int = typer.Option(
        0, "--seed", help="SAE initialisation and batch order", callback=non_negative_int
    ),
    threads: int = threads_param(help="torch CPU threads"),
    device: str = typer.Option(
        "cpu", "--device", help="where the model runs: cpu, cuda ...", callback=device_option
    ),
) -> None:
    """Train a TopK SAE on the state tokens' residual stream and build its feature database.

    One SAE training run folder (saes/sae/, log.jsonl) with features.db (its contexts are DT windows: the web
    page draws each top state as a grid) and report.json (FVU, L0, the best feature per environment variable
    by AUROC, each player step's strongest features)."""
    set_threads(threads)
    from interplab import rl
    from interplab.rl import features as ft

    with _library("cannot train the SAE"):
        folder = runs.dt_model_folder(run)
        model = rl.load_dt(folder, device=device)
        full = rl.load_trajectories(data, env=model.cfg.env)
        n = min(episodes or full.n_episodes, full.n_episodes)
        trajs = full if n == full.n_episodes else full.select(list(range(n)))
        site = ft.default_site(model, layer)
        claim_out(out, Kind.SAE_TRAIN)
        with JobProgress("cache", total=1, unit="") as bar:
            bar.update(0, info=f"{site} at {trajs.n_steps:,} state tokens")
            acts = ft.dt_activations(model, trajs, site, loss_grad=True)
            bar.update(1)
        record = {
            "model": str(folder.resolve()), "trajectories": str(Path(data).resolve()), "env": trajs.env,
            "site": site, "kinds": list(acts.kinds), "episodes": n, "rows": acts.n_rows,
        }  # fmt: skip
        with JobProgress("train SAE", total=steps, unit="steps") as bar:

            def shown(p: Any) -> None:
                m = p.metrics.get("sae", {})
                info = f"fvu {m['fvu']:.3f} l0 {m['l0']:.1f}" if "fvu" in m and "l0" in m else None
                bar.update(p.step, info=info)

            result = ft.train_dt_sae(
                acts,
                d_sae=d_sae,
                k=k,
                steps=steps,
                seed=seed,
                run_dir=out,
                data={"dt": record},
                progress=shown,
            )
        sae = result.saes["sae"]
        db = out / runs.FEATURE_DB
        with JobProgress("feature database", total=n, unit="episodes") as bar:
            ft.build_dt_feature_db(
                db, model, sae, acts, trajs, data_path=data, model_path=folder, sae_path=out / runs.SAES / "sae",
                overwrite=True, progress=lambda _s, i, total: bar.update(i, total=total),
            )  # fmt: skip
        report, per_step = _sae_report(sae, acts, trajs, ft, record)
        runs.write_json(out / runs.REPORT, Kind.DT_FEATURES, report)
        runs.write_json(out / DT_PLAYER_JSON, Kind.DT_FEATURES, {"db": runs.FEATURE_DB, "steps": per_step})
    console.print(
        f"SAE {site} (d_sae {d_sae}, k {k}, {result.steps} steps) on {acts.n_rows:,} state tokens of {n} "
        f"episodes: FVU {report['fvu']:.3f}, L0 {report['l0']:.2f}, {report['alive']} of {d_sae} features fire"
    )
    if report["labels"]:
        from rich.table import Table

        table = Table("environment variable", "share of steps", "best feature", "AUROC", "its density")
        for s in report["labels"]:
            table.add_row(
                s["label"],
                f"{s['positives']:.3f}",
                str(s["feature"]),
                f"{s['auroc']:.4f}",
                f"{s['density']:.3f}",
            )
        console.print(table)
        console.print(
            f"{len(report['interpretable'])} features detect an environment variable with AUROC >= "
            f"{report['auroc_threshold']}: {report['interpretable']}"
        )
    elif report.get("labels_note"):
        console.print(f"no environment variables: {report['labels_note']}", style="yellow", markup=False)
    console.print(
        f"SAE run: {_saved(out)} ({runs.CONFIG}, {runs.LOG}, {runs.SAES}/sae/, {runs.REPORT}); features: "
        f"{_saved(db)}",
        soft_wrap=True,
    )
    console.print(f"browse: {_serve_command(db, [out, Path(data), folder])}", markup=False, soft_wrap=True)


def _sae_report(
    sae: Any, acts: Any, trajs: Any, ft: Any, record: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The numbers `sae_command` reports (FVU and L0 on every cached row, the best feature per environment
    variable by AUROC: needs minigrid to replay the episodes) and each player step's strongest features."""
    from interplab.sae.train import evaluate_returned

    fit = evaluate_returned(sae, acts.x)
    fa = ft.encode_rows(sae, acts.x)
    scores, note = [], None
    try:
        from interplab.rl.labels import env_labels

        scores = [s.to_dict() for s in ft.label_scores(fa, acts, ft.env_variables(env_labels(trajs)))]
    except ImportError as err:
        note = f"replaying the episodes needs the rl extra (minigrid + gymnasium): {err}"
    threshold = 0.9
    return {  # the headline numbers first (the web app's home page shows the first few)
        "fvu": fit["fvu"],
        "l0": fit["l0"],
        "alive": int((fa > 0).any(0).sum()),
        "d_sae": int(sae.cfg.d_sae),
        **record,
        "labels": scores,
        "labels_note": note,
        "auroc_threshold": threshold,
        "interpretable": sorted({s["feature"] for s in scores if s["auroc"] >= threshold}),
        "db": runs.FEATURE_DB,
    }, ft.step_features(fa, acts, range(min(PLAYER_STEPS_EPISODES, acts.n_episodes)))


def _serve_command(db: Path, inside: list[Path]) -> str:
    """``interplab serve --runs ROOT --db DB``: ROOT the folder holding the run, the data and the model (the
    web app reads files only inside its --runs folders), paths relative to here when they lie below it."""
    import os
    import shlex

    resolved = [p.resolve() for p in inside]
    try:
        root = Path(os.path.commonpath(resolved))
    except ValueError:
        root = resolved[0].parent
    if root == Path(root.anchor):  # nothing shared but / : serve each folder's parent
        roots = sorted({p.parent for p in resolved})
    else:
        roots = [root]

    def shown(p: Path) -> str:
        try:
            rel = p.resolve().relative_to(Path.cwd())
            return shlex.quote(str(rel) if str(rel) != "." else ".")
        except ValueError:
            return shlex.quote(str(p.resolve()))

    return "interplab serve " + " ".join(f"--runs {shown(r)}" for r in roots) + f" --db {shown(db)}"


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="dt")
