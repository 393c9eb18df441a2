"""``interplab graph build|intervene``: the attribution graph of a prompt on a model with its (cross-layer)
transcoder, saved as a run folder the web app opens; interventions that check it."""

from __future__ import annotations

from pathlib import Path

import typer
from torch import Tensor

from interplab import runs
from interplab.analysis.formation import FormationResult
from interplab.cli.common import (
    JobProgress,
    claim_out,
    console,
    db_link,
    db_option,
    dtype_option,
    fail,
    load_model_arg,
    out_file,
    out_folder,
    positive_float,
    positive_int,
    print_command,
    set_threads,
    threads_param,
)
from interplab.graphs import (
    AttributionGraph,
    Intervention,
    attribute,
    graph_scores,
    graphs_across,
    intervene,
    prune_graph,
)
from interplab.model import Transformer
from interplab.runs.openers import CLTTrainRun
from interplab.sae.activations import corpus_token_batches
from interplab.sae.clt import CrossLayerTranscoder, load_clt

app = typer.Typer(
    help="Attribution graphs: build one for a prompt, check it with interventions.", no_args_is_help=True
)


def _load_clt(path: Path) -> CrossLayerTranscoder:
    """A CLT folder, or a CLT training run's finished CLT."""
    kind = runs.detect(path)
    if kind is runs.Kind.CLT_TRAIN:
        try:
            path = CLTTrainRun.open(path).clt
        except runs.RunError as err:
            fail(str(err))
    elif kind is not runs.Kind.CLT:
        fail(
            f"--clt {path} is {runs.describe(path)}; expected a CLT folder (`interplab clt train` writes one)"
        )
    return load_clt(path)


def _tokens(model: Transformer, prompt: str | None, tokens: str | None) -> list[int] | str:
    if (prompt is None) == (tokens is None):
        fail("give the prompt as --prompt TEXT or as --tokens ID,ID,... (one of the two)")
    if tokens is not None:
        try:
            return [int(t) for t in tokens.replace(" ", "").split(",") if t]
        except ValueError:
            fail(f"--tokens {tokens!r}: write token ids separated by commas, e.g. --tokens 0,12,7")
    assert prompt is not None
    if model.tokenizer is None:
        fail("the model has no tokenizer: give the prompt as --tokens ID,ID,...")
    return prompt


def _targets(text: str | None) -> object:
    """``--targets``: K (top K), ``ID,ID,...`` or ``logit_diff:A:B``."""
    if text is None:
        return None
    text = text.strip()
    try:
        if text.startswith("logit_diff:"):
            _, a, b = text.split(":")
            return ("logit_diff", int(a), int(b))
        if "," in text:
            return [int(t) for t in text.split(",") if t]
        return int(text)
    except ValueError:
        fail(f"--targets {text!r}: write K (the top K logits), ID,ID,... (token ids) or logit_diff:A:B")


def build(
    model: Path = typer.Option(..., "--model", help="a model folder or training run (its final/)"),
    clt: Path = typer.Option(..., "--clt", help="a CLT folder (or a CLT training run)"),
    out: Path = typer.Option(..., "--out", callback=out_folder, help="the graph's run folder"),
    prompt: str | None = typer.Option(None, "--prompt", help="the prompt as text"),
    tokens: str | None = typer.Option(None, "--tokens", help="the prompt as token ids, ID,ID,..."),
    targets: str | None = typer.Option(
        None,
        "--targets",
        help="K (top-K logits, default 10 up to p=0.95), token ids ID,ID (one id: ID,) or logit_diff:A:B",
    ),
    node_threshold: float = typer.Option(
        0.8, "--node-threshold", help="fraction of influence the kept nodes carry"
    ),
    edge_threshold: float = typer.Option(
        0.98, "--edge-threshold", help="fraction of influence the kept edges carry"
    ),
    max_feature_nodes: int | None = typer.Option(
        None, "--max-feature-nodes", callback=positive_int, help="keep only the most influential features"
    ),
    batch_size: int = typer.Option(256, "--batch-size", callback=positive_int, help="rows per backward"),
    memory_gb: float = typer.Option(8.0, "--memory-gb", callback=positive_float, help="memory budget"),
    feature_db: str | None = typer.Option(
        None,
        "--feature-db",
        help="the CLT's feature database (node links): a file, or a URL (postgresql://user@host/dbname)",
        callback=db_option,
    ),
    open_: bool = typer.Option(False, "--open", help="print only the command that opens the graph"),
    dtype: str = dtype_option(),
    threads: int | None = threads_param(help="CPU threads"),
) -> None:
    """Build the attribution graph of a prompt and save it (report.json, graph.safetensors, graph.json)."""
    set_threads(threads)
    for name, value in (("--node-threshold", node_threshold), ("--edge-threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            fail(f"{name} must be in [0, 1], got {value}")
    claim_out(out, runs.Kind.ATTRIBUTION_GRAPH)
    net = load_model_arg(model, "cannot load the model: ", dtype)
    transcoder = _load_clt(clt)
    meta = {
        "run": str(model.absolute()),
        "clt": str(clt.absolute()),
        "feature_db": db_link(feature_db) if feature_db is not None else None,
        "prompt": prompt,
        "model_dtype": dtype,
    }
    graph = attribute(
        net,
        transcoder,
        _tokens(net, prompt, tokens),
        _targets(targets),  # type: ignore[arg-type]
        max_feature_nodes=max_feature_nodes,
        batch_size=batch_size,
        memory_gb=memory_gb,
        meta=meta,
    )
    pruned = prune_graph(graph, node_threshold, edge_threshold)
    folder = graph.save(out, pruned)
    scores = graph_scores(graph)
    if not open_:
        console.print(
            f"{graph.n_pos} tokens, {graph.n_features} active features, {graph.n_logits} target{'s' * (graph.n_logits != 1)}: "
            f"pruned to {pruned.n_nodes} nodes and {pruned.n_edges} edges; replacement score "
            f"{scores['replacement']:.3f}, completeness {scores['completeness']:.3f}",
            markup=False,
        )
        console.print(
            f"wrote {folder / runs.REPORT}, {folder / runs.GRAPH_TENSORS}, {folder / runs.GRAPH_JSON}",
            markup=False,
        )
    print_command("open it: ", "serve", "--runs", folder.absolute().parent)


def intervene_command(
    model: Path = typer.Option(..., "--model", help="the model the graph was built on"),
    clt: Path = typer.Option(..., "--clt", help="its CLT folder"),
    graph: Path = typer.Option(..., "--graph", help="the graph's run folder (`interplab graph build`)"),
    set_: list[str] = typer.Option(
        ..., "--set", help="LAYER:POS:FEATURE=VALUE (clamp) or LAYER:POS:FEATURE*SCALE; repeatable"
    ),
    mode: str = typer.Option(
        "replacement", "--mode", help="replacement (the frozen replacement model) or model (the real model)"
    ),
    out: Path | None = typer.Option(
        None, "--out", callback=out_file, help="save the result (.json, .html, .png)"
    ),
    dtype: str = dtype_option(),
    threads: int | None = threads_param(help="CPU threads"),
) -> None:
    """Clamp or scale features of a graph's prompt and compare the target logits' change with the graph's."""
    set_threads(threads)
    if mode not in ("replacement", "model"):
        fail(f"--mode {mode!r}: choose replacement or model")
    saved = AttributionGraph.load(graph)
    net = load_model_arg(model, "cannot load the model: ", dtype)
    result = intervene(
        net,
        _load_clt(clt),
        saved.tokens,
        [Intervention.parse(s) for s in set_],
        mode="model" if mode == "model" else "replacement",
        graph=saved,
    )
    for label, before, actual, predicted in zip(
        result.labels, result.before.tolist(), result.actual.tolist(), result.predicted.tolist(), strict=True
    ):
        console.print(
            f"{label}: {before:+.4f} -> change {actual:+.4f} (graph predicts {predicted:+.4f})", markup=False
        )
    if out is not None:
        console.print(f"wrote {result.save(out)}", markup=False)


def across_command(
    model: Path = typer.Option(..., "--model", help="the training run"),
    clt: Path | None = typer.Option(
        None, "--clt", help="its CLTs per checkpoint (`interplab clt train --checkpoints`; default RUN/clt)"
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        callback=out_folder,
        help="the folder (default RUN/graphs/across): step_N/ + report.json",
    ),
    prompt: str | None = typer.Option(None, "--prompt", help="the prompt as text"),
    tokens: str | None = typer.Option(None, "--tokens", help="the prompt as token ids, ID,ID,..."),
    targets: str | None = typer.Option(
        None,
        "--targets",
        help="token ids ID,ID (one id: ID,) or logit_diff:A:B, the same at every step (default: the last "
        "checkpoint's most likely next token)",
    ),
    steps: str | None = typer.Option(None, "--steps", help="only these steps of the CLT run, A,B,..."),
    node_threshold: float = typer.Option(0.8, "--node-threshold"),
    edge_threshold: float = typer.Option(0.98, "--edge-threshold"),
    match_threshold: float = typer.Option(
        0.7, "--match-threshold", help="decoder cosine that makes two CLTs' latents one feature"
    ),
    qk: str | None = typer.Option(
        None,
        "--qk",
        help="also attribute this head's attention score at each step to query x key node pairs: LAYER.HEAD, "
        "or best (the formation report's best induction head)",
    ),
    qk_positions: str | None = typer.Option(
        None,
        "--qk-positions",
        help="the attention edge for --qk: QUERY,KEY positions (default: the last position against the one "
        "after its token's earlier occurrence, the induction edge)",
    ),
    shared_clt: bool = typer.Option(
        False,
        "--shared-clt",
        help="build every graph with ONE CLT shared by the checkpoints (`clt train --checkpoints ... --shared`; "
        "--clt default RUN/clt-shared): features keep their index; compared with RUN/clt's CLTs per "
        "checkpoint when it has them (FVU, KL, graph scores)",
    ),
    own_clt: Path | None = typer.Option(
        None, "--own-clt", help="with --shared-clt: the CLTs per checkpoint to compare with (default RUN/clt)"
    ),
    fit_batches: int = typer.Option(
        2, "--fit-batches", help="with --shared-clt: validation batches of 16 sequences for FVU and KL"
    ),
    threads: int | None = threads_param(help="CPU threads"),
) -> None:
    """The attribution graph of one prompt at each checkpoint that has a CLT, and what changed between them
    (features matched across CLTs by decoder cosine, or one shared CLT's features by index), beside the run's
    formation scores; with --qk, the QK attribution of one head's attention edge at each step too."""
    set_threads(threads)
    if own_clt is not None and not shared_clt:
        fail("--own-clt is what --shared-clt is compared with: give --shared-clt too")
    clt = clt if clt is not None else model / (runs.RUN_SHARED_CLT if shared_clt else runs.RUN_CLTS)
    own = own_clt if own_clt is not None else model / runs.RUN_CLTS
    compare = shared_clt and (own_clt is not None or runs.detect(own) is runs.Kind.CLT_TRAIN)
    out = out if out is not None else model / runs.GRAPHS / "across"
    chosen_targets = _targets(targets)
    if isinstance(chosen_targets, int):
        fail(f"--targets {targets!r}: across checkpoints give token ids (ID, for one) or logit_diff:A:B")
    if (prompt is None) == (tokens is None):
        fail("give the prompt as --prompt TEXT or as --tokens ID,ID,... (one of the two)")
    the_prompt: str | list[int] = prompt if prompt is not None else _tokens_of(tokens)
    try:
        chosen_steps = [int(s) for s in steps.split(",")] if steps else None
    except ValueError:
        fail(f"--steps {steps!r}: write step numbers separated by commas, e.g. --steps 200,400")
    head = _qk_head(qk, model) if qk is not None else None
    edge = None
    if qk_positions is not None:
        if head is None:
            fail("--qk-positions names the edge of --qk LAYER.HEAD: give --qk too")
        parts = _tokens_of(qk_positions) if qk_positions.replace(",", "").replace(" ", "").isdigit() else []
        if len(parts) != 2:
            fail(f"--qk-positions {qk_positions!r}: write QUERY,KEY (two positions, the key at or before)")
        edge = (parts[0], parts[1])
    try:
        fit_tokens = _fit_tokens(clt, model, fit_batches) if compare else None
        with JobProgress("graph across", total=None, unit="graphs") as bar:
            result = graphs_across(
                model,
                clt,
                the_prompt,
                chosen_targets,  # type: ignore[arg-type]
                steps=chosen_steps,
                out=out,
                node_threshold=node_threshold,
                edge_threshold=edge_threshold,
                match_threshold=match_threshold,
                qk=head,
                qk_positions=edge,
                clt="shared" if shared_clt else "per_checkpoint",
                own_clts=own if compare else None,
                fit_tokens=fit_tokens,
                progress=lambda s: bar.update(0, info=f"step {s}"),
            )
    except (ValueError, runs.RunError) as err:
        fail(str(err))
    console.print(result.markdown(), markup=False, soft_wrap=True)
    for g in result.graphs:
        if g.qk:
            pairs = "; ".join(f"{p['label']} {p['part']:+.3f}" for p in g.qk["top"][:3])
            console.print(
                f"step {g.step}: L{g.qk['layer']}H{g.qk['head']} score {g.qk['score']:+.3f} (through the previous "
                f"position {g.qk['through_previous']:+.3f}): {pairs}",
                markup=False,
                soft_wrap=True,
            )
    console.print(
        f"wrote {out / runs.REPORT}, {out}/across.md, {out}/across.html, step_N/ per step", markup=False
    )
    print_command("open it: ", "serve", "--runs", Path(model).absolute())


def _fit_tokens(clt: Path, run: Path, n_batches: int) -> list[Tensor]:
    """Validation token batches of the corpus the shared CLT was trained on (its run's config), for the fit."""
    data = CLTTrainRun.open(clt).config.get("data", {}) if runs.detect(clt) is runs.Kind.CLT_TRAIN else {}
    last = load_model_arg(runs.TrainRun.open(run).checkpoints()[-1].path)
    seq = min(int(data.get("seq_len", 128)), last.cfg.n_ctx)
    corpus = data.get("corpus", "python-stdlib")
    try:
        got = corpus_token_batches(
            last, corpus, split="validation", seq_len=seq, batch_size=16, n_batches=n_batches
        )
    except ValueError as err:  # a corpus too small to hold a validation split: its training text
        console.print(f"fit on the training split: {err}", markup=False)
        got = corpus_token_batches(
            last, corpus, split="train", seq_len=seq, batch_size=16, n_batches=n_batches
        )
    return got.batches


def _qk_head(text: str, run: Path) -> tuple[int, int]:
    """--qk LAYER.HEAD, or best: the formation report's best induction head at the last checkpoint."""
    if text == "best":
        path = run / runs.FORMATION / runs.FORMATION_JSON
        if not path.is_file():
            fail(
                f"--qk best reads the run's formation report, and {run} has none: run `interplab formation {run}`"
            )
        return FormationResult.from_dict(runs.read_json(path, runs.Kind.FORMATION)).best_head()
    layer, _, head = text.partition(".")
    if not (layer.isdigit() and head.isdigit()):
        fail(f"--qk {text!r}: write LAYER.HEAD (e.g. --qk 0.2 for layer 0's head 2) or best")
    return int(layer), int(head)


def _tokens_of(text: str | None) -> list[int]:
    try:
        return [int(t) for t in (text or "").replace(" ", "").split(",") if t]
    except ValueError:
        fail(f"--tokens {text!r}: write token ids separated by commas, e.g. --tokens 0,12,7")


def register(main: typer.Typer) -> None:
    app.command("build")(build)
    app.command("across")(across_command)
    app.command("intervene")(intervene_command)
    main.add_typer(app, name="graph")
