"""``interplab clt train|eval``: cross-layer transcoders on every layer of a model (one per checkpoint of a
training run with ``--checkpoints``), and their evaluation in the model (per-layer FVU, the replacement
model's CE loss and KL, error-node norms)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from interplab.analysis.formation import FormationResult
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
    fail,
    load_model_arg,
    non_negative_float,
    out_folder,
    positive_float,
    positive_int,
    print_command,
    seq_len_option,
    set_threads,
    split_option,
    threads_param,
)
from interplab.model import Transformer
from interplab.runs import (
    EVAL,
    FORMATION,
    FORMATION_JSON,
    REPORT,
    RUN_CLTS,
    RUN_SHARED_CLT,
    Kind,
    RunError,
    TrainRun,
    describe,
    detect,
    read_json,
    write_json,
)
from interplab.runs.names import checkpoint_name, checkpoint_step
from interplab.runs.openers import CLTTrainRun
from interplab.sae.activations import corpus_token_batches
from interplab.sae.clt import CLTActivation, CLTConfig, load_clt
from interplab.sae.clt_shared import train_clt_shared
from interplab.sae.clt_train import (
    CLTTrainConfig,
    CLTTrainProgress,
    CLTTrainResult,
    evaluate_clt,
    train_clt,
    train_clt_across,
)

app = typer.Typer(
    help="Cross-layer transcoders: train on every layer in one pass, evaluate.", no_args_is_help=True
)

HOOKS_IN = ("resid_mid", "ln2", "mlp_in")
_HOOK_SITES = {"resid_mid": "hook_resid_mid", "ln2": "ln2.hook_normalized", "mlp_in": "hook_mlp_in"}


def rise_checkpoints(run: Path) -> list[str]:
    """``--checkpoints window``: the checkpoints along the rise of the run's induction score (its formation
    report, `FormationResult.rise_steps`: before the rise, the formation step, near the top, the last)."""
    report = run / FORMATION / FORMATION_JSON
    if not report.is_file():
        fail(f"--checkpoints window reads {report}: run `interplab formation {run}` first, or name the steps")
    try:
        return [str(s) for s in FormationResult.from_dict(read_json(report, Kind.FORMATION)).rise_steps()]
    except ValueError as err:
        fail(str(err))


def _steps(run: Path, names: list[str]) -> dict[str, Path]:
    """Checkpoint names (``step_000100``, or a step number) of training run ``run`` -> their folders
    (``["window"]``: `rise_checkpoints`)."""
    train = TrainRun.open(run)
    if [n.strip() for n in names] == ["window"]:
        names = rise_checkpoints(train.path)
    out = {}
    for raw in names:
        raw = raw.strip()
        step = checkpoint_step(raw) if raw.startswith("step_") else (int(raw) if raw.isdigit() else None)
        if step is None:
            fail(f"--checkpoint {raw!r} is neither a checkpoint name (step_000100) nor a step number")
        try:
            out[checkpoint_name(step)] = train.checkpoint(step).path
        except RunError as err:
            fail(str(err))
    return out


def _loader(model: Transformer | Path) -> Callable[[], Transformer]:
    """A checkpoint's model, loaded when its CLT is trained (the first one is loaded already)."""
    return (lambda: model) if isinstance(model, Transformer) else (lambda: load_model_arg(model))


def _show(bar: JobProgress, prefix: str = "") -> Any:
    def show(p: CLTTrainProgress) -> None:
        m = p.metrics
        bar.update(
            p.step,
            info=f"{prefix}FVU {m.get('fvu', 0):.3f}  L0 {m.get('l0', 0):.1f}  dead {m.get('dead_fraction', 0):.1%}",
        )

    return show


def _summary(name: str, result: CLTTrainResult) -> None:
    f = result.final
    fvu = ", ".join(f"{v:.3f}" for v in f.get("fvu_per_layer", []))
    l0 = ", ".join(f"{v:.1f}" for v in f.get("l0_per_layer", []))
    console.print(f"{name}: FVU per layer [{fvu}], L0 per layer [{l0}], dead {f.get('dead_fraction', 0):.1%}")


@app.command("train")
def train(
    model_path: Path = typer.Option(
        ..., "--model", help="model folder, or a training run (its final/, or --checkpoint(s) of it)"
    ),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="run folder: config.json, log.jsonl, clt/ (or clts/NAME/); with --checkpoints: default RUN/clt",
        callback=out_folder,
    ),
    corpus: str = typer.Option(
        "python-stdlib", "--corpus", help="python-stdlib or a file/folder/dataset path"
    ),
    d_sae: int = typer.Option(..., "--d-sae", help="latents per layer", callback=positive_int),
    activation: str = typer.Option(
        "jumprelu", "--activation", help="jumprelu or topk", callback=choice(("jumprelu", "topk", "relu"))
    ),
    k: int = typer.Option(
        None, "--k", help="active latents per layer and token (topk)", callback=positive_int
    ),
    steps: int = typer.Option(1000, "--steps", callback=positive_int),
    batch: int = typer.Option(
        1024, "--batch", help="activation rows (tokens) per step", callback=positive_int
    ),
    lr: float = typer.Option(1e-3, "--lr", callback=positive_float),
    coefficient: float = typer.Option(
        1.0,
        "--coefficient",
        help="sparsity coefficient (jumprelu: tanh penalty)",
        callback=non_negative_float,
    ),
    cross_layer: bool = typer.Option(
        True, "--cross-layer/--per-layer", help="decoders into every later layer, or per-layer transcoders"
    ),
    hook_in: str = typer.Option(
        "resid_mid",
        "--hook-in",
        help="what each encoder reads: resid_mid, ln2 or mlp_in",
        callback=choice(HOOKS_IN),
    ),
    checkpoint: str = typer.Option(None, "--checkpoint", help="train on this checkpoint of --model (step_N)"),
    checkpoints: str = typer.Option(
        None,
        "--checkpoints",
        help="one CLT per checkpoint of --model: step_a,step_b,... or window (along its formation report's rise)",
    ),
    shared: bool = typer.Option(
        False,
        "--shared",
        help="with --checkpoints: ONE CLT on activations pooled from them, balanced per checkpoint (default "
        "--out RUN/clt-shared); `graph across --shared-clt` builds every checkpoint's graph with it",
    ),
    seq_len: int = typer.Option(
        None,
        "--seq-len",
        help="tokens per sequence (default 128, or the model's n_ctx)",
        callback=positive_int,
    ),
    autocast: bool = typer.Option(
        False, "--bf16/--fp32", help="bfloat16 matmuls with float32 master weights"
    ),
    seed: int = typer.Option(0, "--seed", help="seed of the initial weights and the data order"),
    checkpoint_every: int = typer.Option(
        None,
        "--checkpoint-every",
        help="steps between checkpoints (default: a tenth of --steps)",
        callback=positive_int,
    ),
    stop_after: int = typer.Option(None, "--stop-after", help="stop after this step (run again to resume)"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="continue the same run found in --out"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a different run found in --out"),
    threads: int = threads_param(),
) -> None:
    """Train a cross-layer transcoder on every layer of the model at once (one forward per batch reads all
    layers). An interrupted run resumes bit-exactly when started again with the same arguments."""
    set_threads(threads)
    if checkpoint and checkpoints:
        fail("give --checkpoint or --checkpoints, not both")
    if activation == "topk" and k is None:
        fail("--activation topk needs --k (active latents per layer and token)")
    if shared and not checkpoints:
        fail("--shared pools the activations of several checkpoints: give --checkpoints A,B,... (or window)")
    across = _steps(model_path, checkpoints.split(",")) if checkpoints else None
    if out is None:
        if across is None:
            fail("give --out (the CLT run's folder); only --checkpoints has a default (RUN/clt)")
        out = check_out_folder(model_path / (RUN_SHARED_CLT if shared else RUN_CLTS))
    assert out is not None
    if checkpoint:
        model_path = next(iter(_steps(model_path, [checkpoint]).values()))
    first = load_model_arg(next(iter(across.values())) if across else model_path)
    seq_len = check_seq_len(seq_len, first)
    try:
        cfg = CLTTrainConfig(
            clt=CLTConfig(
                n_layers=first.cfg.n_layers,
                d_model=first.cfg.d_model,
                d_sae=d_sae,
                activation=CLTActivation(activation),
                k=k if activation == "topk" else None,
                cross_layer=cross_layer,
                hook_in="blocks.{layer}." + _HOOK_SITES[hook_in],
            ),
            total_steps=steps,
            batch_size=batch,
            lr=lr,
            coefficient=coefficient,
            seq_len=seq_len,
            autocast=autocast,
            seed=seed,
            log_every=max(1, min(50, steps // 20)),
            checkpoint_every=checkpoint_every or max(1, steps // 10),
        )
    except ValueError as err:
        fail(str(err))
    where = f"{len(across)} checkpoints" if across else str(model_path)
    console.print(
        f"training a {cfg.clt.activation.value} {'CLT' if cross_layer else 'per-layer transcoder set'} "
        f"({cfg.clt.n_layers} layers x {d_sae} latents) on {where} for {steps:,} steps of {batch:,} rows -> {out}"
    )
    try:
        if across and shared:
            pooled = {
                name: first if i == 0 else load_model_arg(p) for i, (name, p) in enumerate(across.items())
            }
            with JobProgress("clt train", total=steps, unit="steps") as bar:
                result = train_clt_shared(
                    pooled,
                    corpus,
                    cfg,
                    out,
                    source={"run": str(model_path)},
                    progress=_show(bar),
                    resume=resume,
                    overwrite=overwrite,
                    stop_after=stop_after,
                )
            if result.stopped:
                console.print(f"stopped after step {result.steps:,}; run the same command again to resume")
                return
            _summary(f"shared by {', '.join(across)}", result)
            console.print(f"CLT in {out / 'clt'}/", markup=False)
            print_command(
                "next: ",
                "clt",
                "eval",
                out,
                note=" ; then `graph across --shared-clt` with your prompt builds every checkpoint's graph with it",
            )
            return
        if across:
            models = {name: _loader(first if i == 0 else p) for i, (name, p) in enumerate(across.items())}
            with JobProgress("clt train", total=steps * len(across), unit="steps") as bar:
                done = {name: i * steps for i, name in enumerate(across)}

                def show(name: str, p: CLTTrainProgress) -> None:
                    m = p.metrics
                    bar.update(
                        done[name] + p.step, info=f"{name} FVU {m.get('fvu', 0):.3f} L0 {m.get('l0', 0):.1f}"
                    )

                results = train_clt_across(
                    models,
                    corpus,
                    cfg,
                    out,
                    source={"run": str(model_path)},
                    progress=show,
                    resume=resume,
                    overwrite=overwrite,
                )
            for name, result in results.items():
                _summary(name, result)
            console.print(f"CLTs in {out}/clts/ ; next: {command_hint('clt', 'eval', out)}")
            return
        with JobProgress("clt train", total=steps, unit="steps") as bar:
            result = train_clt(
                first,
                corpus,
                cfg,
                out,
                progress=_show(bar),
                resume=resume,
                overwrite=overwrite,
                stop_after=stop_after,
                model_name=str(model_path),
            )
    except (ValueError, KeyError, OSError) as err:
        fail(str(err).strip("'\""))
    if result.resumed_from is not None:
        console.print(f"resumed from step {result.resumed_from:,}")
    if result.stopped:
        console.print(f"stopped after step {result.steps:,}; run the same command again to resume")
        return
    _summary("clt", result)
    console.print(f"CLT in {out / 'clt'}/ ; next: {command_hint('clt', 'eval', out)}")


def _model_of(run: CLTTrainRun, name: str, given: Path | None) -> Transformer:
    if given is not None:
        return load_model_arg(given)
    if run.across or run.shared is not None:
        source = (run.shared or run.config.get("across") or {}).get("run")
        if not source:
            fail(f"{run.path} does not say which run it was trained on: pass --model")
        return load_model_arg(TrainRun.open(source).checkpoint(int(checkpoint_step(name) or 0)).path)
    data = run.config.get("data", {})
    if not data.get("model"):
        fail(f"{run.path} does not say which model it was trained on: pass --model")
    return load_model_arg(Path(data["model"]))


@app.command("eval")
def evaluate(
    path: Path = typer.Argument(..., help="a CLT training run (interplab clt train --out), or a CLT folder"),
    model_path: Path = typer.Option(
        None, "--model", help="the model (default: the one the run was trained on)"
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="report folder (default: PATH/eval)", callback=out_folder
    ),
    corpus: str = corpus_option(),
    split: str = split_option("validation"),
    seq_len: int = seq_len_option(help=None),
    batches: int = batches_option(),
    threads: int = threads_param(),
) -> None:
    """Per-layer FVU of the MLP outputs, the replacement model's CE loss and KL vs the original (every MLP
    replaced in one forward), error-node norms, L0 and dead latents: report.json + a plot per CLT."""
    set_threads(threads)
    kind = detect(path)
    if kind is Kind.CLT:
        if model_path is None:
            fail(f"{path} is a CLT folder: pass --model (the model it was trained on)")
        targets = {"clt": (path, load_model_arg(model_path))}
    elif kind is Kind.CLT_TRAIN:
        run = CLTTrainRun.open(path)
        if not run.clts:
            fail(f"{path} is a CLT training run with no finished CLT yet: resume it")
        targets = {name: (p, None) for name, p in run.clts.items()}  # type: ignore[misc]
        if run.shared is not None:  # one CLT, evaluated at every checkpoint it pooled
            targets = {str(n): (run.clt, None) for n in run.shared.get("checkpoints", [])}  # type: ignore[misc]
    else:
        fail(f"{path} is {describe(path)}; expected a CLT training run or a CLT folder")
    if out is None:
        out = check_out_folder(path / EVAL)
    assert out is not None
    reports = {}
    for name, (folder, model) in targets.items():
        clt = load_clt(folder)
        if model is None:
            model = _model_of(CLTTrainRun.open(path), name, model_path)
        sl = check_seq_len(seq_len, model)
        try:
            data = corpus_token_batches(
                model, corpus, split=split, seq_len=sl, batch_size=EVAL_BATCH_SEQS, n_batches=batches
            )
            rep = evaluate_clt(model, clt, data.batches, token_filter=data.token_filter, targets=data.targets)
        except (ValueError, KeyError, FileNotFoundError) as err:
            fail(str(err).strip("'\""))
        rep.save(out / name if len(targets) > 1 else out)
        reports[name] = rep.to_dict()
        console.print(f"{name}: {rep!r}", markup=False, highlight=False, soft_wrap=True)
    if len(targets) > 1:
        write_json(out / REPORT, Kind.CLT_EVAL, {"clts": reports})
    console.print(f"report: {out / REPORT}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="clt")
