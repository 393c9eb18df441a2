"""auto-circuit 1.0.1 beside interplab: the model and task handed over as files, the edge names mapped.

auto-circuit runs in its own interpreter (``bash scripts/peers.sh autocircuit`` builds ``.peers/autocircuit``;
`tests.peers.peer_python("autocircuit")` finds it) and reads what `prepare` writes: the interplab model
exported as a TransformerLens checkpoint (`export_transformer_lens`: interplab's weight names and shapes are
TransformerLens', so the export is the state dict plus a config) and the clean/corrupt token rows with the
answer and wrong answer of each row (safetensors). ``benchmarks/_autocircuit_peer.py`` computes its scores and
circuits and writes JSON. Used by tests/circuits/test_autocircuit_parity.py and benchmarks/bench_discovery.py.

The two graphs (research notes, docs/circuits.md "Compared with auto-circuit"): auto-circuit has one input node,
``Resid Start`` (``blocks.0.hook_resid_pre``: token plus positional embedding), where interplab has ``embed``
and ``pos_embed``; every other node and edge corresponds one to one (``a0.1->a1.2.k`` is ``A0.1->A1.2.K``,
``m0`` is ``MLP 0``, ``logits`` is ``Resid End``). An auto-circuit edge ``Resid Start->X`` is the pair
``embed->X`` + ``pos_embed->X``: its EAP score is the sum of theirs (the activation difference of a sum is the
sum of the differences, times the same gradient), and a circuit keeping it keeps both.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from interplab.circuits import ComponentGraph, DiscoveryTask, Edge, EdgeScores, NodeKind
from interplab.model.config import Activation, Norm, Positional
from interplab.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "_autocircuit_peer.py"
INPUT = "Resid Start"

_ACT = {
    Activation.RELU: "relu",
    Activation.GELU: "gelu",
    Activation.GELU_TANH: "gelu_new",
    Activation.GELU_NEW: "gelu_new",
    Activation.SILU: "silu",
}
_NORM = {Norm.LAYERNORM: "LN", Norm.RMSNORM: "RMS", Norm.NONE: None}


def export_transformer_lens(model: Transformer, folder: Path) -> Path:
    """Write ``model`` as a TransformerLens checkpoint (``model.pt`` + ``transformerlens_config.json``) into
    ``folder``. Covers the architectures the comparison uses (learned positions, LayerNorm/RMSNorm/none,
    sequential or parallel blocks, MLPs or attention-only) and refuses the rest by name."""
    cfg = model.cfg
    unsupported = {
        "positional": cfg.positional is not Positional.LEARNED,
        "gated_mlp": cfg.gated_mlp,
        "n_kv_heads": cfg.n_kv_heads != cfg.n_heads,
        "post_norms": cfg.post_norms,
        "smear_keys": cfg.smear_keys,
        "tie_embeddings": cfg.tie_embeddings,
        "embed_scale": cfg.embed_scale is not None,
        "softcaps": cfg.attn_softcap is not None or cfg.logit_softcap is not None,
        "sliding_window": cfg.sliding_window is not None,
        "act_fn": cfg.act_fn not in _ACT,
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"export_transformer_lens does not cover {', '.join(bad)} of {cfg}")
    tl_cfg: dict[str, Any] = {
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_head,
        "d_mlp": None if cfg.attn_only else cfg.d_mlp,
        "d_vocab": cfg.d_vocab,
        "d_vocab_out": cfg.d_vocab_out,
        "n_ctx": cfg.n_ctx,
        "act_fn": _ACT[cfg.act_fn],
        "normalization_type": _NORM[cfg.normalization],
        "eps": cfg.norm_eps,
        "attention_dir": "causal" if cfg.causal else "bidirectional",
        "positional_embedding_type": "standard",
        "attn_only": cfg.attn_only,
        "parallel_attn_mlp": cfg.parallel_attn_mlp,
        "use_attn_scale": True,
        "attn_scale": cfg.attn_scale,
        "init_weights": False,
    }
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if "unembed.b_U" not in state:
        state["unembed.b_U"] = torch.zeros(cfg.d_vocab_out)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "model.pt")
    (folder / "transformerlens_config.json").write_text(json.dumps(tl_cfg))
    return folder


def autocircuit_node(name: str) -> str:
    """auto-circuit's name of an interplab node or receiver slot (``a1.2.k`` -> ``A1.2.K``)."""
    if name in ("embed", "pos_embed"):
        return INPUT
    if name == "logits":
        return "Resid End"
    if name.startswith("m"):
        return f"MLP {name[1:]}"
    parts = name[1:].split(".")
    return "A" + ".".join(parts[:2]) + ("." + parts[2].upper() if len(parts) == 3 else "")


def autocircuit_edge(name: str) -> str:
    """``a0.1->a1.2.k`` -> ``A0.1->A1.2.K``; ``embed->m0`` and ``pos_embed->m0`` -> ``Resid Start->MLP 0``."""
    sender, receiver = name.split("->")
    return f"{autocircuit_node(sender)}->{autocircuit_node(receiver)}"


def merged_scores(scores: EdgeScores) -> dict[str, float]:
    """interplab's scores by auto-circuit edge: ``embed->X`` and ``pos_embed->X`` summed into ``Resid
    Start->X`` (see the module docstring), every other edge as it is."""
    out: dict[str, float] = {}
    for edge, value in zip(scores.edges, scores.scores.tolist(), strict=True):
        key = autocircuit_edge(edge.name)
        out[key] = out.get(key, 0.0) + value
    return out


def interplab_edges(graph: ComponentGraph, names: Iterable[str]) -> set[Edge]:
    """The interplab edges of a set of auto-circuit edges (``Resid Start->X``: both input edges of X)."""
    by_name: dict[str, list[Edge]] = {}
    for edge in graph.edges:
        by_name.setdefault(autocircuit_edge(edge.name), []).append(edge)
    return {e for n in names for e in by_name[n]}


def input_edges(graph: ComponentGraph) -> list[Edge]:
    return [e for e in graph.edges if e.sender.kind in (NodeKind.EMBED, NodeKind.POS_EMBED)]


def logit_diff_task(
    name: str, clean: Tensor, corrupt: Tensor, answers: Tensor, wrong: Tensor
) -> DiscoveryTask:
    """The task auto-circuit's loader describes: rows ``clean[i]`` with counterfactual ``corrupt[i]``, metric
    the logit of ``answers[i]`` minus that of ``wrong[i]`` at the last position (each [n, 1])."""
    n = len(clean)
    ans, wr = torch.cat([answers, answers])[:, 0], torch.cat([wrong, wrong])[:, 0]

    def metric(logits: Tensor, rows: Tensor) -> Tensor:
        last = logits[:, -1]
        return last.gather(-1, ans[rows, None])[:, 0] - last.gather(-1, wr[rows, None])[:, 0]

    return DiscoveryTask(
        name=name,
        tokens=torch.cat([clean, corrupt]),
        clean=torch.arange(n),
        corrupt=torch.arange(n, 2 * n),
        metric=metric,
        position=-1,
    )


def prepare(
    model: Transformer,
    data: dict[str, Tensor],
    workdir: Path,
    *,
    methods: list[dict[str, Any]],
    edge_counts: Iterable[int] = (),
    dtype: str = "float32",
    repeats: int = 0,
) -> Path:
    """Write ``model`` (once per ``workdir``), ``data`` (``clean``, ``corrupt``, ``answers``,
    ``wrong_answers``) and the spec of one auto-circuit job into ``workdir``; returns the spec's path."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "model" / "model.pt").exists():
        export_transformer_lens(model, workdir / "model")
    save_file({k: v.contiguous() for k, v in data.items()}, str(workdir / "data.safetensors"))
    spec = {
        "model": str(workdir / "model"),
        "data": str(workdir / "data.safetensors"),
        "dtype": dtype,
        "methods": methods,
        "edge_counts": [int(c) for c in edge_counts],
        "repeats": repeats,
        "out": str(workdir / "result.json"),
    }
    (workdir / "spec.json").write_text(json.dumps(spec))
    return workdir / "spec.json"


def run_specs(python: str, specs: list[Path], *, timeout: float = 900) -> list[dict[str, Any]]:
    """Run ``benchmarks/_autocircuit_peer.py`` under ``python`` on the jobs ``specs`` (from `prepare`) in one
    process; returns their JSON results (see that file's docstring)."""
    env = {
        **os.environ,
        "PYTHONPATH": "",
        "OMP_NUM_THREADS": "1",
        "OMP_WAIT_POLICY": "PASSIVE",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    proc = subprocess.run(
        [python, str(RUNNER), *map(str, specs)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=specs[0].parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"auto-circuit ({python}) failed:\n{proc.stderr[-4000:]}")
    return [json.loads(Path(json.loads(p.read_text())["out"]).read_text()) for p in specs]
