"""``interplab patch``, ``interplab heads``, ``interplab lens``: the analysis toolkit on a model folder.

Inputs come from a task (``--task ioi``: clean, corrupted and answer tokens) or a JSONL prompt file, one
example per line: ``{"clean": "...", "corrupted": "...", "answer": " Mary", "wrong": " John"}`` (strings
need the model's tokenizer; lists of token ids and integer ids work with any model; every example must
have the same length). Each command writes a run folder once everything is computed: the results as JSON,
pictures (``*.html``, and ``*.png`` with ``--png``), ``log.jsonl``, ``config.json`` (the options) and
``report.json``, both of the command's `interplab.runs.Kind`. The reports:

- patch (`Kind.PATCH`): ``result`` (repr), ``seconds``, ``clean_metric``, ``corrupted_metric``, ``files``,
  ``top_effects`` [{index, effect}], with ``--attribution`` also ``attribution`` {correlation, max_abs_error,
  files};
- heads (`Kind.HEADS`): ``top`` {score name: [[layer, head, value]]}, ``files``;
- lens (`Kind.LENS`): ``files``, ``final_logprob_next``, with answer and wrong tokens also ``dla`` {total,
  sum_of_components, top_neurons}.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
import typer

from interplab import analysis as A
from interplab.analysis.heads import repeated_random_tokens
from interplab.cli.common import (
    JobProgress,
    claim_out,
    console,
    dtype_option,
    fail,
    library_default,
    load_model_arg,
    out_folder,
    positive_int,
    set_threads,
    threads_param,
)
from interplab.model.transformer import Transformer
from interplab.runs import CONFIG, REPORT, Kind, write_json, write_log
from interplab.tasks import get_task

TARGETS = "resid_pre, resid_mid, resid_post, attn_out, mlp_out, z, q, k, v, pattern, mlp_post"
METRICS = ("logit_diff", "normalized_logit_diff", "prob", "loss")
N_EXAMPLES = 16
"""examples drawn from a --task"""
MODEL_HELP = "model folder (interplab, Hugging Face or TransformerLens) or a training run folder (its final/)"


class _Run:
    """A run folder of ``kind`` (patch, heads or lens), written only once everything is computed: the results
    (JSON + pictures), then ``log.jsonl`` and ``config.json`` (the command's options), and ``report.json``
    last (a folder with a report is complete). A command that fails before `finish` leaves nothing behind."""

    def __init__(self, out: Path, kind: Kind, config: dict[str, Any], png: bool) -> None:
        self.out, self.kind, self.config, self.png, self.t0 = out, kind, config, png, time.time()
        self.events: list[dict[str, Any]] = []
        self.results: list[tuple[Any, str]] = []
        self.log("start")

    def log(self, event: str, **fields: Any) -> None:
        self.events.append({"event": event, "time_s": round(time.time() - self.t0, 3), **fields})

    def files(self, name: str) -> list[str]:
        """The files a result called ``name`` is written as: ``name.json``, ``name.html`` (and ``name.png``)."""
        return [f"{name}{suffix}" for suffix in (".json", ".html", ".png")[: 3 if self.png else 2]]

    def add(self, result: Any, name: str) -> list[str]:
        """Keep ``result`` to be written by `finish`; the names of its files."""
        self.results.append((result, name))
        return self.files(name)

    def finish(self, report: dict[str, Any]) -> None:
        for result, name in self.results:
            for file in self.files(name):
                result.save(self.out / file)
            self.log("saved", result=name)
        self.log("done")
        write_log(self.out, self.events)
        write_json(self.out / CONFIG, self.kind, self.config)
        write_json(self.out / REPORT, self.kind, report)
        console.print(f"wrote [bold]{self.out}[/]: " + ", ".join(sorted(p.name for p in self.out.iterdir())))


def _ids(model: Transformer, value: Any, what: str) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) for v in value):
        return value
    if isinstance(value, str):
        if model.tokenizer is None:
            fail(f"{what} is text but the model has no tokenizer: give token ids instead")
        return list(model.tokenizer.encode(value))
    fail(f"{what} must be text, a token id or a list of token ids, got {value!r}")
    return []


def _single(model: Transformer, value: Any, what: str) -> int:
    ids = _ids(model, value, what)
    if len(ids) != 1:
        fail(f"{what} {value!r} is {len(ids)} tokens; answers must be single tokens")
    return ids[0]


def _examples(
    model: Transformer, prompts: Path | None, task: str | None, n: int, seed: int, need_corrupted: bool
) -> dict[str, Any]:
    """tokens, corrupted, answer, wrong, positions (None where unknown)."""
    if (prompts is None) == (task is None):
        fail("give exactly one of --prompts FILE or --task NAME")
    if task is not None:
        try:
            batch = get_task(task).generate(n, seed=seed)
        except (KeyError, TypeError, ValueError) as err:
            fail(str(err).strip("'\""))
        meta = batch.meta
        read = meta.get("end_pos")
        if read is None:
            read = torch.tensor([int(row.nonzero().max()) if row.any() else -1 for row in batch.loss_mask])
        rows = torch.arange(len(batch))
        if need_corrupted and "corrupted_tokens" not in meta:
            fail(f"task {task!r} has no corrupted inputs; give a --prompts file with clean/corrupted pairs")
        return {
            "tokens": batch.tokens,
            "corrupted": meta.get("corrupted_tokens"),
            "positions": read,
            "answer": meta.get("io_token", batch.targets[rows, read]),
            "wrong": meta.get("s_token"),
            "attention_mask": batch.attention_mask,
        }
    assert prompts is not None  # exactly one of --prompts and --task (checked above)
    if not prompts.is_file():
        fail(f"no prompt file at {prompts}")
    lines = [json.loads(line) for line in prompts.read_text().splitlines() if line.strip()]
    if not lines:
        fail(f"{prompts} has no examples")
    key = "clean" if "clean" in lines[0] else "prompt"
    tokens = [_ids(model, ex.get(key), f"line {i + 1} {key}") for i, ex in enumerate(lines)]
    out: dict[str, Any] = {
        "positions": None,
        "attention_mask": None,
        "corrupted": None,
        "wrong": None,
        "answer": None,
    }
    if len({len(t) for t in tokens}) != 1:
        fail(f"examples have different lengths {sorted({len(t) for t in tokens})}; pad them to one length")
    out["tokens"] = torch.tensor(tokens)
    if "corrupted" in lines[0]:
        corrupted = [
            _ids(model, ex.get("corrupted"), f"line {i + 1} corrupted") for i, ex in enumerate(lines)
        ]
        if len({len(t) for t in corrupted} | {len(tokens[0])}) != 1:
            fail("corrupted prompts must have the same number of tokens as the clean ones")
        out["corrupted"] = torch.tensor(corrupted)
    elif need_corrupted:
        fail(f"{prompts} has no 'corrupted' field: patching needs clean/corrupted pairs")
    for field in ("answer", "wrong"):
        if field in lines[0]:
            out[field] = torch.tensor(
                [_single(model, ex[field], f"line {i + 1} {field}") for i, ex in enumerate(lines)]
            )
    return out


def patch(
    model_path: Path = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder", callback=out_folder),
    prompts: Path = typer.Option(
        None, "--prompts", help="JSONL file of clean/corrupted/answer/wrong examples"
    ),
    task: str = typer.Option(None, "--task", help="a task with corrupted inputs (e.g. ioi)"),
    target: str = typer.Option("resid_pre", "--target", help=f"what to patch: {TARGETS}"),
    by_position: bool = typer.Option(False, "--by-position", help="patch heads/neurons position by position"),
    direction: str = typer.Option(
        library_default(A.activation_patch, "direction").value, "--direction", help="denoise or noise"
    ),
    metric_name: str = typer.Option("logit_diff", "--metric", help=", ".join(METRICS)),
    attribution: bool = typer.Option(
        False, "--attribution", help="also run attribution patching and compare"
    ),
    n: int = typer.Option(N_EXAMPLES, "--n", help="examples drawn from --task", callback=positive_int),
    seed: int = typer.Option(0, "--seed"),
    png: bool = typer.Option(False, "--png", help="also write PNG pictures"),
    dtype: str = dtype_option(),
    threads: int = threads_param(help="torch CPU threads"),
) -> None:
    """Activation patching (batched) of one target over every layer, position and head/neuron."""
    set_threads(threads)
    claim_out(out, Kind.PATCH)
    model = load_model_arg(model_path, dtype=dtype)
    ex = _examples(model, prompts, task, n, seed, need_corrupted=True)
    if metric_name not in METRICS:
        fail(f"unknown metric {metric_name!r}; valid: {', '.join(METRICS)}")
    if ex["answer"] is None:
        fail("patching needs an 'answer' token per example")
    if metric_name in ("logit_diff", "normalized_logit_diff") and ex["wrong"] is None:
        fail(f"--metric {metric_name} needs a 'wrong' token per example (or use --metric prob)")
    metric: Any
    if metric_name == "prob":
        metric = A.CorrectProb(answer=ex["answer"], positions=ex["positions"])
    elif metric_name == "loss":
        metric = A.AnswerLoss(answer=ex["answer"], positions=ex["positions"])
    else:
        metric = A.LogitDiff(answer=ex["answer"], wrong=ex["wrong"], positions=ex["positions"])
        if metric_name == "normalized_logit_diff":
            mask = ex["attention_mask"]
            metric = A.NormalizedLogitDiff.calibrate(
                metric, model(ex["tokens"], attention_mask=mask), model(ex["corrupted"], attention_mask=mask)
            )
    run = _Run(
        out,
        Kind.PATCH,
        {
            "model": str(model_path),
            "prompts": str(prompts) if prompts else None,
            "task": task,
            "target": target,
            "by_position": by_position,
            "direction": direction,
            "metric": metric_name,
            "n": n,
            "seed": seed,
        },
        png,
    )
    kwargs = dict(by_position=by_position or None, direction=direction, attention_mask=ex["attention_mask"])
    try:
        with JobProgress(f"patch {target}", unit="patches") as bar:
            t0 = time.perf_counter()
            result = A.activation_patch(
                model,
                ex["tokens"],
                ex["corrupted"],
                metric,
                target,
                **kwargs,
                progress=bar,
            )
            seconds = time.perf_counter() - t0
    except (ValueError, TypeError) as err:
        fail(str(err))
    report: dict[str, Any] = {
        "result": repr(result),
        "seconds": seconds,
        "clean_metric": result.clean_metric,
        "corrupted_metric": result.corrupted_metric,
        "files": run.add(result, f"patch_{target}"),
    }
    base = result.corrupted_metric if result.direction is A.Direction.DENOISE else result.clean_metric
    flat = (result.values - base).reshape(-1)
    top = flat.abs().argsort(descending=True)[:10]
    report["top_effects"] = [
        {"index": [int(i) for i in _unravel(int(t), result.values.shape)], "effect": float(flat[t])}
        for t in top
    ]
    if attribution:
        approx = A.attribution_patch(model, ex["tokens"], ex["corrupted"], metric, target, **kwargs)
        comparison = A.compare_patching(result, approx)
        report["attribution"] = {
            "correlation": comparison.correlation,
            "max_abs_error": comparison.max_abs_error,
            "files": run.add(approx, f"attribution_{target}") + run.add(comparison, "comparison"),
        }
    run.finish(report)


def _unravel(i: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(i % size)
        i //= size
    return out[::-1]


def heads(
    model_path: Path = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder", callback=out_folder),
    prompts: Path = typer.Option(
        None, "--prompts", help="JSONL prompts to score on (default: repeated random tokens)"
    ),
    seq_len: int = typer.Option(
        None, "--seq-len", help="length of each random half of the probe input", callback=positive_int
    ),
    batch: int = typer.Option(
        library_default(A.head_scores, "batch"), "--batch", help="probe sequences", callback=positive_int
    ),
    seed: int = typer.Option(library_default(A.head_scores, "seed"), "--seed"),
    png: bool = typer.Option(False, "--png", help="also write PNG pictures"),
    dtype: str = dtype_option(),
    threads: int = threads_param(help="torch CPU threads"),
) -> None:
    """Previous-token, induction, duplicate-token and copying scores of every head, and attention views."""
    set_threads(threads)
    claim_out(out, Kind.HEADS)
    model = load_model_arg(model_path, dtype=dtype)
    tokens = _examples(model, prompts, None, 0, seed, need_corrupted=False)["tokens"] if prompts else None
    run = _Run(
        out,
        Kind.HEADS,
        {
            "model": str(model_path),
            "prompts": str(prompts) if prompts else None,
            "seq_len": seq_len,
            "batch": batch,
            "seed": seed,
        },
        png,
    )
    try:
        scores = A.head_scores(model, tokens, seq_len=seq_len, batch=batch, seed=seed)
    except ValueError as err:
        fail(str(err))
    report: dict[str, Any] = {
        "top": {
            name: scores.top(name, 5)
            for name in ("previous_token", "induction", "duplicate_token", "copying")
        },
        "files": run.add(scores, "heads"),
    }
    if tokens is None:
        half = (
            seq_len
            if seq_len is not None
            else min(library_default(repeated_random_tokens, "half"), model.cfg.n_ctx // 2)
        )
        tokens = repeated_random_tokens(model.cfg.d_vocab, half, 1, seed=seed)
    for layer in range(model.cfg.n_layers):
        report["files"] += run.add(A.attention_patterns(model, tokens[:1], layer), f"attention_L{layer}")
    for name, top in report["top"].items():
        console.print(f"{name}: " + ", ".join(f"L{lay}H{h} {v:.2f}" for lay, h, v in top[:3]))
    run.finish(report)


def lens(
    model_path: Path = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder", callback=out_folder),
    prompts: Path = typer.Option(None, "--prompts", help="JSONL prompts (answer/wrong enable DLA)"),
    task: str = typer.Option(None, "--task", help="a task to draw examples from"),
    n: int = typer.Option(N_EXAMPLES, "--n", help="examples drawn from --task", callback=positive_int),
    seed: int = typer.Option(0, "--seed"),
    png: bool = typer.Option(False, "--png", help="also write PNG pictures"),
    dtype: str = dtype_option(),
    threads: int = threads_param(help="torch CPU threads"),
) -> None:
    """Logit lens at every layer; with answer and wrong tokens also direct logit attribution and the
    residual-stream decomposition."""
    set_threads(threads)
    claim_out(out, Kind.LENS)
    model = load_model_arg(model_path, dtype=dtype)
    ex = _examples(model, prompts, task, n, seed, need_corrupted=False)
    run = _Run(
        out,
        Kind.LENS,
        {
            "model": str(model_path),
            "prompts": str(prompts) if prompts else None,
            "task": task,
            "n": n,
            "seed": seed,
        },
        png,
    )
    result = A.logit_lens(model, ex["tokens"], attention_mask=ex["attention_mask"])
    report: dict[str, Any] = {
        "files": run.add(result, "logit_lens"),
        "final_logprob_next": result.logprob_next[-1].mean().item(),
    }
    if ex["answer"] is not None and ex["wrong"] is not None:
        dla = A.direct_logit_attribution(
            model, ex["tokens"], ex["answer"], ex["wrong"], positions=ex["positions"]
        )
        decomposition = A.residual_decomposition(
            model, ex["tokens"], ex["answer"], ex["wrong"], positions=ex["positions"]
        )
        report["dla"] = {
            "total": dla.total,
            "sum_of_components": dla.sum_of_components(),
            "top_neurons": dla.top_neurons(5),
        }
        report["files"] += run.add(dla, "dla") + run.add(decomposition, "residual_decomposition")
        console.print(f"logit difference {dla.total:.4f} = sum of components {dla.sum_of_components():.4f}")
    run.finish(report)


def register(app: typer.Typer) -> None:
    app.command("patch")(patch)
    app.command("heads")(heads)
    app.command("lens")(lens)
