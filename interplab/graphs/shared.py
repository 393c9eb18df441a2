"""Graphs across checkpoints with one shared CLT (`interplab.sae.clt_shared.train_clt_shared`): finding it,
and measuring what sharing costs at each checkpoint against the checkpoint's own CLT.

A shared dictionary fits each checkpoint worse than a CLT trained on that checkpoint alone (the same width
has to cover every checkpoint's features; the error nodes hold the rest). `fit_row` puts the two side by side
at one checkpoint: FVU of the MLP outputs and the replacement model's KL (`evaluate_clt`, on the same tokens),
and the graph's replacement and completeness scores (`graph_scores`, the same prompt and targets).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from interplab import runs
from interplab.graphs.prune import graph_scores
from interplab.runs.openers import CLTTrainRun
from interplab.sae.clt_train import evaluate_clt

if TYPE_CHECKING:
    from interplab.graphs.attribution import AttributionGraph
    from interplab.model import Transformer
    from interplab.sae.clt import CrossLayerTranscoder

FIT_KEYS = ("fvu", "kl", "replacement", "completeness")
"""what `fit_row` compares, each as ``{key}_shared`` and ``{key}_own``"""


def shared_clt(clts: str | Path, steps: Sequence[int] | None) -> tuple[Path, list[int]]:
    """The CLT folder of a shared CLT run (`train_clt_shared`, `interplab clt train --checkpoints ...
    --shared`) or a CLT folder itself, and the steps to build graphs at: ``steps``, else the checkpoints the
    run pooled (a bare CLT folder needs ``steps``)."""
    kind = runs.detect(clts)
    if kind is runs.Kind.CLT:
        if not steps:
            raise ValueError(
                f"{clts} is a CLT folder, which does not say which checkpoints it was trained on: name the steps"
            )
        return Path(clts), sorted(set(steps))
    run = CLTTrainRun.open(clts)
    if run.across or run.shared is None:
        what = "one CLT per checkpoint" if run.across else "a CLT trained on one model"
        raise ValueError(
            f"{clts} holds {what}, not one CLT shared by the checkpoints: train one with `interplab clt train "
            "--model RUN --checkpoints A,B,... --shared` (`train_clt_shared`), or drop clt='shared' / --shared-clt"
        )
    pooled = [runs.checkpoint_step(str(n)) for n in run.shared.get("checkpoints", [])]
    chosen = sorted(set(steps)) if steps else sorted(s for s in pooled if s is not None)
    if not chosen:
        raise ValueError(f"{clts} names no checkpoints it pooled: name the steps")
    return run.clt, chosen


def fit_row(
    step: int,
    model: Transformer,
    shared: CrossLayerTranscoder,
    own: CrossLayerTranscoder,
    graph_shared: AttributionGraph,
    graph_own: AttributionGraph,
    tokens: Tensor | Sequence[Tensor],
) -> dict[str, Any]:
    """At one checkpoint: FVU (all layers) and KL of the replacement model on ``tokens`` ([batch, pos] or
    batches), and the graphs' replacement and completeness scores, of the shared CLT and of its own."""
    batches = [tokens] if isinstance(tokens, Tensor) else list(tokens)
    row: dict[str, Any] = {"step": step}
    for which, clt, graph in (("shared", shared, graph_shared), ("own", own, graph_own)):
        ev = evaluate_clt(model, clt, batches)
        scores = graph_scores(graph)
        row[f"fvu_{which}"] = ev.fvu_total
        row[f"kl_{which}"] = ev.kl_div
        row[f"replacement_{which}"] = scores["replacement"]
        row[f"completeness_{which}"] = scores["completeness"]
    return row


def fit_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The shared CLT's fit beside each checkpoint's own CLT, one row per step."""
    head = ["step"] + [f"{k} {w}" for k in FIT_KEYS for w in ("shared", "own")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for r in rows:
        cells = [str(r["step"])] + [f"{r[f'{k}_{w}']:.4f}" for k in FIT_KEYS for w in ("shared", "own")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["FIT_KEYS", "fit_markdown", "fit_row", "shared_clt"]
