"""circuit-tracer 0.5.0 beside interplab: the model and the (cross-layer) transcoders handed over as files.

circuit-tracer runs in its own interpreter (``bash scripts/peers.sh circuittracer`` builds
``.peers/circuittracer``; `tests.peers.peer_python("circuittracer")` finds it, or
``INTERPLAB_CIRCUITTRACER_PYTHON``) and reads what `prepare` writes: the interplab model as a TransformerLens
checkpoint (`tests.autocircuit_peer.export_transformer_lens`) and the transcoders in circuit-tracer's own layout
(`export_transcoders`). ``tests/circuit_tracer_runner.py`` builds its replacement model from them, computes the
graph and writes JSON. Used by tests/graphs/test_circuit_tracer_parity.py and benchmarks/bench_graphs.py.

The transcoders are anything with interplab's CLT attributes (GRAPHS.md: ``W_enc [n_layers, d_model, d_sae]``,
``b_enc``, ``b_dec``, ``threshold`` for JumpReLU, ``W_dec[l]`` ``[d_sae, n_layers - l, d_model]``, or
``[d_sae, 1, d_model]`` for per-layer transcoders, and a ``cfg`` with ``hook_in``, ``hook_out``, ``activation``,
``k``). circuit-tracer's files store ``W_enc`` transposed (``[d_sae, d_model]`` per layer) and read the hooks
relative to a block (``hook_resid_mid``). `export_transcoders` checks on random inputs that circuit-tracer's
encoder (``x @ W_enc.T + b_enc``, then the activation) gives the CLT's own pre-activations, so an input transform
the layout cannot hold (a normalisation scale, a subtracted decoder bias) fails loudly instead of silently
differing.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from interplab.model.transformer import Transformer
from tests.autocircuit_peer import export_transformer_lens
from tests.peers import peer_env

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "tests" / "circuit_tracer_runner.py"
KINDS = ("cross_layer_transcoder", "transcoder_set")


def block_hook(template: str) -> str:
    """circuit-tracer's hook name (relative to a block) of an interplab per-layer hook template:
    ``blocks.{layer}.hook_resid_mid`` -> ``hook_resid_mid``, ``blocks.{layer}.ln2.hook_normalized`` ->
    ``ln2.hook_normalized``."""
    prefix = "blocks.{layer}."
    if not template.startswith(prefix):
        raise ValueError(f"hook {template!r} is not a per-layer template 'blocks.{{layer}}.<name>'")
    return template[len(prefix) :]


def _activation(clt: Any) -> str:
    activation = getattr(clt.cfg, "activation", "jumprelu")  # a hand-set CLT without one is JumpReLU
    name = getattr(activation, "name", str(activation)).lower()
    if name not in ("jumprelu", "topk", "relu"):
        raise ValueError(
            f"circuit-tracer has no {name!r} transcoder; it loads jumprelu and relu (topk in code)"
        )
    return name


def export_transcoders(clt: Any, folder: Path, kind: str = "cross_layer_transcoder") -> dict[str, Any]:
    """Write ``clt`` into ``folder`` in circuit-tracer's layout ``kind``: ``cross_layer_transcoder``
    (``W_enc_{l}.safetensors`` with ``W_enc_{l}`` [d_sae, d_model], ``b_enc_{l}``, ``b_dec_{l}``, ``threshold_{l}``;
    ``W_dec_{l}.safetensors`` with ``W_dec_{l}`` [d_sae, n_layers - l, d_model]; per-layer decoders padded with
    zeros) or ``transcoder_set`` (``layer_{l}.safetensors``: ``W_enc``, ``W_dec`` [d_sae, d_model], ``b_enc``,
    ``b_dec``, ``activation_function.threshold``; only for per-layer transcoders). Returns the runner's
    ``transcoders`` spec."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}; valid: {', '.join(KINDS)}")
    activation = _activation(clt)
    W_enc = clt.W_enc.detach().float()
    n_layers, d_model, d_sae = W_enc.shape
    b_enc, b_dec = clt.b_enc.detach().float(), clt.b_dec.detach().float()
    threshold = clt.threshold.detach().float() if activation == "jumprelu" else None
    if threshold is not None and bool((threshold < 0).any()):
        raise ValueError(
            "a negative JumpReLU threshold: circuit-tracer's pre * (pre > t) differs from relu there"
        )
    decoders = [clt.W_dec[layer].detach().float() for layer in range(n_layers)]
    per_layer = all(d.shape[1] == 1 for d in decoders)
    if kind == "transcoder_set" and not per_layer:
        raise ValueError("a cross-layer transcoder cannot be written as a transcoder_set (per-layer files)")
    x = torch.randn(4, n_layers, d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = clt.pre_acts(x.to(clt.W_enc.dtype)).float()
    theirs = torch.einsum("bld,ldf->blf", x, W_enc) + b_enc
    torch.testing.assert_close(
        theirs, ours, rtol=1e-4, atol=1e-4, msg="the CLT's encoder is not x @ W_enc + b_enc"
    )
    folder.mkdir(parents=True, exist_ok=True)
    for layer in range(n_layers):
        enc, dec = W_enc[layer].T.contiguous(), decoders[layer]
        if kind == "transcoder_set":
            tensors = {
                "W_enc": enc,
                "W_dec": dec[:, 0].contiguous(),
                "b_enc": b_enc[layer],
                "b_dec": b_dec[layer],
            }
            if threshold is not None:
                tensors["activation_function.threshold"] = threshold[layer]
            save_file(
                {k: v.contiguous() for k, v in tensors.items()}, str(folder / f"layer_{layer}.safetensors")
            )
            continue
        if dec.shape[1] == 1 and n_layers - layer > 1:
            dec = torch.cat([dec, dec.new_zeros(d_sae, n_layers - layer - 1, d_model)], dim=1)
        tensors = {f"W_enc_{layer}": enc, f"b_enc_{layer}": b_enc[layer], f"b_dec_{layer}": b_dec[layer]}
        if threshold is not None:
            tensors[f"threshold_{layer}"] = threshold[layer]
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"W_enc_{layer}.safetensors"))
        save_file({f"W_dec_{layer}": dec.contiguous()}, str(folder / f"W_dec_{layer}.safetensors"))
    return {
        "path": str(folder),
        "kind": kind,
        "feature_input_hook": block_hook(clt.cfg.hook_in),
        "feature_output_hook": block_hook(clt.cfg.hook_out),
        "topk": clt.cfg.k if activation == "topk" else None,
    }


def _saved(clt: Any, folder: Path) -> dict[str, Any]:
    from interplab.sae.clt import save_clt

    doc = json.loads((save_clt(clt, folder) / "cfg.json").read_text())
    return {
        "path": str(folder),
        "kind": doc["model_kind"],
        "feature_input_hook": doc["feature_input_hook"],
        "feature_output_hook": doc["feature_output_hook"],
        "topk": clt.cfg.k if _activation(clt) == "topk" else None,
    }


def prepare(
    model: Transformer,
    clt: Any,
    workdir: Path,
    jobs: list[dict[str, Any]],
    *,
    bos: int,
    kind: str | None = "cross_layer_transcoder",
) -> Path:
    """Write ``model``, ``clt`` and the runner's spec with ``jobs`` (see tests/circuit_tracer_runner.py; each
    job's ``out`` defaults to ``workdir/result{i}.json``) into ``workdir``; returns the spec's path. ``clt`` is
    written by `export_transcoders` in layout ``kind``, or, with ``kind=None``, by interplab's own `save_clt`
    (which writes circuit-tracer's layout too: the runner then checks that writer against circuit-tracer's
    loader)."""
    workdir.mkdir(parents=True, exist_ok=True)
    export_transformer_lens(model, workdir / "model")
    if kind is None:
        transcoders = _saved(clt, workdir / "clt")
    else:
        transcoders = export_transcoders(clt, workdir / "transcoders", kind)
    jobs = [{"out": str(workdir / f"result{i}.json"), **job} for i, job in enumerate(jobs)]
    spec = {"model": str(workdir / "model"), "transcoders": transcoders, "bos": bos, "jobs": jobs}
    (workdir / "spec.json").write_text(json.dumps(spec))
    return workdir / "spec.json"


def run_spec(python: str, spec: Path, *, timeout: float = 900) -> list[dict[str, Any]]:
    """Run the runner under ``python`` on ``spec`` (from `prepare`); returns each job's JSON result."""
    proc = subprocess.run(
        [python, str(RUNNER), str(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**peer_env(), "PYTHONPATH": ""},
        cwd=spec.parent,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"circuit-tracer ({python}) failed:\n{proc.stderr[-4000:]}")
    jobs = json.loads(spec.read_text())["jobs"]
    return [json.loads(Path(job["out"]).read_text()) for job in jobs]


def run_circuit_tracer(python: str, *args: Any, timeout: float = 900, **kwargs: Any) -> list[dict[str, Any]]:
    """`prepare` (``model, clt, workdir, jobs, bos=..., kind=...``) then `run_spec` under ``python``:
    circuit-tracer's graphs of the jobs."""
    return run_spec(python, prepare(*args, **kwargs), timeout=timeout)
