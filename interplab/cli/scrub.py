"""``interplab scrub HYPOTHESIS.py --model DIR --task NAME``: causal scrubbing, written to a run folder.

HYPOTHESIS.py is a Python file that defines ``hypothesis`` (a `Hypothesis`), ``hypotheses`` (a list of them),
or ``def hypothesis(model): ...`` returning either. Each is scrubbed; the run folder gets ``config.json``,
``log.jsonl`` and one ``report.json`` + ``report.html`` per hypothesis (in a subfolder named after it:
`hypothesis_folders`); the reports share one ``plotly.min.js`` in the run folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import typer

from interplab.circuits.planted import planted_induction
from interplab.cli.common import (
    JobProgress,
    claim_out,
    console,
    fail,
    library_default,
    load_model_arg,
    out_folder,
    positive_int,
    set_threads,
    threads_param,
)
from interplab.model.transformer import Transformer
from interplab.runs import CONFIG, LOG, PLOTLY_JS, Kind, write_json, write_log
from interplab.scrub import Hypothesis, ScrubConfig, ScrubError, ScrubResult, scrub
from interplab.scrub.parens import load_paren_model
from interplab.scrub.tasks import build_task

MODEL_HELP = "model folder, training run folder (its final/) or file ('planted-induction': the built-in)"


def load_hypotheses(path: Path, model: Transformer) -> list[Hypothesis]:
    """The hypotheses a HYPOTHESIS.py file defines (see the module docstring)."""
    if not path.is_file():
        raise FileNotFoundError(f"no hypothesis file {path}")
    spec = importlib.util.spec_from_file_location(f"_interplab_hypothesis_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    found = getattr(module, "hypotheses", None) or getattr(module, "hypothesis", None)
    if callable(found) and not isinstance(found, Hypothesis):
        found = found(model)
    if isinstance(found, Hypothesis):
        found = [found]
    if not found or not all(isinstance(h, Hypothesis) for h in found):
        raise ValueError(
            f"{path} must define `hypothesis` (a Hypothesis), `hypotheses` (a list of them) "
            "or `def hypothesis(model)` returning either"
        )
    return list(found)


def load_any_model(model_path: Path | None, task: str, data: Path | None) -> Transformer:
    """The model ``--model`` names for ``--task`` (the parens task's published model from its ``--data``)."""
    if task == "parens" and model_path is None and data is not None:
        return load_paren_model(data)
    if model_path is None:
        raise ValueError("give --model DIR (or, for --task parens, --data with the fixture folder)")
    if task == "parens" and model_path.is_dir() and (model_path / "brackets_model_state_dict.pt").is_file():
        return load_paren_model(model_path)
    if str(model_path) in ("planted-induction", "builtin:planted-induction"):
        return planted_induction()
    return load_model_arg(model_path)


def hypothesis_folders(names: Sequence[str]) -> list[str]:
    """The report folder of each hypothesis in a run: distinct, also on file systems that ignore case, and
    stable (a folder depends only on its hypothesis' name). A name that is a plain folder name (letters,
    digits, ``_ . -``; not hidden, at most 60 characters, none of the run's own files) is its folder; any
    other name, and names whose folders would differ only in case, get their plain characters plus the first 8
    hex digits of the name's SHA-256 (``1a (count)`` -> ``1a-count-5c0e12ab``). Two hypotheses with the same
    name are an error: the name is how the log and the web page tell them apart."""
    counts = Counter(names)
    same = [n for n, c in counts.items() if c > 1]
    if same:
        raise ValueError(
            f"{counts[same[0]]} hypotheses are named {same[0]!r}: give each its own name "
            "(Hypothesis(..., name=...)); it names its report folder"
        )

    def folder(name: str, hashed: bool) -> str:
        plain = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:60].rstrip("-.") or "hypothesis"
        if hashed or plain != name or plain.casefold() in _RUN_FILES:
            return f"{plain}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
        return plain

    folders = [folder(n, False) for n in names]
    folded = Counter(f.casefold() for f in folders)
    folders = [
        folder(n, True) if folded[f.casefold()] > 1 else f for n, f in zip(names, folders, strict=True)
    ]
    clash = [f for f, c in Counter(f.casefold() for f in folders).items() if c > 1]
    if clash:  # only a name spelled like another's hashed folder gets here
        raise ValueError(f"two hypotheses would write to report folder {clash[0]!r}: rename one of them")
    return folders


_RUN_FILES = {n.casefold() for n in (CONFIG, LOG, PLOTLY_JS)}


def scrub_command(
    hypothesis_file: Path = typer.Argument(..., help="Python file defining `hypothesis` or `hypotheses`"),
    model_path: Path = typer.Option(None, "--model", help=MODEL_HELP),
    task: str = typer.Option(..., "--task", help="task name: parens or induction"),
    data: Path = typer.Option(None, "--data", help="task data (parens: the paren_balancer fixture folder)"),
    out: Path = typer.Option(Path("runs/scrub"), "--out", help="run folder to write", callback=out_folder),
    n_examples: int = typer.Option(
        ScrubConfig.n_examples, "--n-examples", help="reference examples", callback=positive_int
    ),
    seeds: int = typer.Option(ScrubConfig.n_seeds, "--seeds", help="resampling seeds", callback=positive_int),
    per_claim: bool = typer.Option(
        ScrubConfig.per_claim, "--per-claim/--no-per-claim", help="scrub each claim alone too"
    ),
    threads: int = threads_param(1, "torch threads"),
) -> None:
    """Causal scrubbing of the hypotheses in HYPOTHESIS.py; prints the recovered-loss table."""
    set_threads(threads)
    claim_out(out, Kind.SCRUB)
    try:
        model = load_any_model(model_path, task, data)
        n_rows = max(n_examples * 2, library_default(build_task, "n_rows"))
        scrub_task = build_task(task, model, data=data, n_rows=n_rows)
        hyps = load_hypotheses(hypothesis_file, model)
        folders = hypothesis_folders([h.name for h in hyps])
        config = ScrubConfig(
            n_examples=min(n_examples, scrub_task.tokens.shape[0]), n_seeds=seeds, per_claim=per_claim
        )
    except (FileNotFoundError, ValueError, KeyError) as err:
        fail(str(err))
    results: list[ScrubResult] = []
    for hyp in hyps:
        with JobProgress(f"scrub {hyp.name}", unit="batches") as bar:
            try:
                results.append(scrub(model, scrub_task, hyp, config, progress=bar))
            except ScrubError as err:
                fail(str(err))
        console.print(results[-1].table(), markup=False, highlight=False)  # one reference's samples
    # everything is computed: only now is the run folder written (a failed scrub leaves nothing behind)
    log = []
    for hyp, result, folder in zip(hyps, results, folders, strict=True):
        result.save(out / folder, assets=out)  # the reports share the run folder's plotly.min.js
        log.append(
            {
                "event": "scrubbed",
                "hypothesis": hyp.name,
                "recovered": result.recovered.mean,
                "loss": result.loss_scrubbed.mean,
                "folder": folder,
            }
        )
    write_log(out, log)
    write_json(
        out / CONFIG,
        Kind.SCRUB,
        {
            "hypothesis_file": str(hypothesis_file),
            "model": str(model_path),
            "task": task,
            "data": str(data),
            "n_examples": config.n_examples,
            "n_seeds": seeds,
        },
    )
    console.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    app.command("scrub")(scrub_command)
