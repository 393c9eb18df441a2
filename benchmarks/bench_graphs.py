"""Attribution graphs side by side with circuit-tracer 0.5.0 (PyPI ``circuit-tracer``, its own interpreter:
``bash scripts/peers.sh circuittracer``) on the same model, cross-layer transcoder and prompts: time and peak
memory of one graph, and the longest prompt whose graph fits in 8 GB.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_graphs.py [--out benchmarks/results/graphs.json]
        [--rounds 3] [--lengths 16,32:2,48:1] [--memory-lengths 16,32,48,64] [--circuit-tracer-python PY]
        [--memory-only]

``--lengths``: prompt lengths (tokens, BOS included), each optionally ``:rounds`` (circuit-tracer's time grows
about as the square of the length: 48 tokens take it minutes per graph on one thread). The memory points run
first, then the lengths; the JSON is rewritten after each (``complete`` false until the end).

Model and transcoder: a 4-layer, 8-head transformer (d_model 256, d_mlp 1024, LayerNorm, learned positions,
vocabulary 2,000; interplab's initialisation, seed 0) and a JumpReLU CLT with 2,048 latents per layer reading
``resid_mid``, random (seed 1) with its thresholds set so that about 24 latents per layer fire on each token
(L0 ~ 24 x 4 per token, as trained CLTs on small models); prompts are random tokens after a BOS (id 0). Both
libraries get the same weights (circuit-tracer: the model as a TransformerLens checkpoint, the CLT in its own
file layout through `save_clt`; tests/circuit_tracer_peer.py) and compute the same graph (checked here: the same
number of active features and nodes; tests/graphs/test_circuit_tracer_parity.py checks the edges): all active
features, the top-10 logits (cut at 0.95), each side's default batch (interplab 256 rows with its 8 GB budget,
circuit-tracer 512).

Time: interleaved rounds (the order alternates), each side in a fresh process computing one graph (``--repeats``
N > 1: a warm-up graph, then N timed); medians of the wall and CPU seconds of `attribute` alone (model loading and circuit-tracer's ~12 s of imports are not
counted), one thread. Memory: the peak resident memory of the process during the first `attribute` call minus
what it held before it (`tests.circuit_tracer_runner.PeakRSS`), so both sides count only the graph's own
memory. Ratios are circuit-tracer / interplab (CPU time and extra memory).

Longest prompt in 8 GB: interplab's `attribute(..., memory_gb=8)` refuses a prompt whose graph would need more
(`check_memory`, from `estimate_bytes`: the adjacency, pruning's copy of it, the batched backward, the decoder
vectors). At ``--memory-lengths`` the peak resident memory of `attribute` then `prune_graph` is measured in a fresh
process (``VmHWM`` after a warm-up graph; tests/graphs/memory_probe.py) and compared with that estimate (it must
bound it from above); the longest prompt the estimate accepts at this model's feature density is reported (found
by bisection on the estimate; measuring it would take 8 GB of a shared machine), and again with the estimate
scaled by the largest measured / estimated ratio should it be above 1. ``--memory-only``: only these points
(no circuit-tracer needed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interplab.graphs.attribution import attribute, check_memory, estimate_bytes  # noqa: E402
from interplab.model import ModelConfig, Transformer  # noqa: E402
from interplab.sae.clt import CLTConfig, CrossLayerTranscoder  # noqa: E402
from tests.circuit_tracer_peer import prepare, run_spec  # noqa: E402
from tests.circuit_tracer_runner import PeakRSS  # noqa: E402

BOS = 0
MODEL = ModelConfig(
    d_model=256,
    n_layers=4,
    n_heads=8,
    d_mlp=1024,
    d_vocab=2000,
    n_ctx=1024,
    act_fn="gelu",
    normalization="layernorm",
)
D_SAE, L0 = 2048, 24
BUDGET_GB = 8.0


def build() -> tuple[Transformer, CrossLayerTranscoder]:
    """The benchmark's model and CLT (deterministic: every process builds the same weights)."""
    torch.manual_seed(0)
    model = Transformer(MODEL).eval()
    n, d = MODEL.n_layers, MODEL.d_model
    clt = CrossLayerTranscoder(CLTConfig(n_layers=n, d_model=d, d_sae=D_SAE))
    names = [f"blocks.{layer}.hook_resid_mid" for layer in range(n)]
    names += [f"blocks.{layer}.hook_mlp_out" for layer in range(n)]
    calibration = prompt(256, seed=123)
    _, cache = model.run_with_cache(calibration[None], names=names)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in range(n):
            x = cache[names[layer]][0, 1:]
            clt.W_enc[layer].copy_(torch.randn(d, D_SAE, generator=g) / x.norm(dim=-1).mean())
            clt.b_enc[layer].zero_()
            pre = x @ clt.W_enc[layer]
            clt.threshold[layer].fill_(float(torch.quantile(pre.flatten()[:1_000_000], 1 - L0 / D_SAE)))
            out_norm = cache[names[n + layer]].norm(dim=-1).mean()
            dec = clt.W_dec[layer]
            dec.copy_(torch.randn(dec.shape, generator=g) * out_norm / (L0 * d) ** 0.5)
            clt.b_dec[layer].zero_()
    return model, clt


def prompt(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor([BOS]), torch.randint(1, MODEL.d_vocab, (length - 1,), generator=g)])


def child(spec_path: str) -> None:
    """One interplab measurement in a fresh process, as circuit-tracer's (tests/circuit_tracer_runner.py): the
    first graph is timed and measured when ``repeats`` is 1, else it is a warm-up before ``repeats`` timed ones."""
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    model, clt = build()
    tokens = torch.tensor(spec["tokens"])
    times, memory, graph = [], None, None
    repeats = max(1, spec["repeats"])
    for i in range(repeats + (repeats > 1)):
        wall, cpu = time.perf_counter(), time.process_time()
        with PeakRSS() as rss:
            graph = attribute(model, clt, tokens, memory_gb=BUDGET_GB)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        memory = memory or rss.as_dict()
        if repeats == 1 or i > 0:
            times.append({"wall_s": wall, "cpu_s": cpu})
    assert graph is not None
    n_features = sum(1 for node in graph.nodes if node.kind.value == "feature")
    out = {"times": times, "memory": memory, "n_nodes": len(graph.nodes), "n_features": n_features}
    Path(spec["out"]).write_text(json.dumps(out))


def run_interplab(work: Path, tokens: torch.Tensor, repeats: int) -> dict[str, Any]:
    spec = {"tokens": tokens.tolist(), "repeats": repeats, "out": str(work / "interplab.json")}
    (work / "interplab_spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, __file__, "--child", str(work / "interplab_spec.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"interplab measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads((work / "interplab.json").read_text())


def measure_memory(length: int) -> dict[str, Any]:
    """The peak of `attribute` then `prune_graph` on the benchmark's prompt of ``length`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(ROOT)}
    spec = json.dumps({"model": "bench", "length": length})
    cmd = [sys.executable, "-m", "tests.graphs.memory_probe", spec]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the memory measurement failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    times = [t for run in runs for t in run["times"]]
    return {
        "wall_s": statistics.median(t["wall_s"] for t in times),
        "cpu_s": statistics.median(t["cpu_s"] for t in times),
        "extra_mib": statistics.median(run["memory"]["extra_mib"] for run in runs),
        "n_nodes": runs[0]["n_nodes"],
        "n_features": runs[0].get("n_features", len(runs[0].get("active_features", []))),
    }


def longest_in_budget(features_per_token: float, batch: int = 256, factor: float = 1.0) -> int:
    """The longest prompt `check_memory` accepts in BUDGET_GB at ``features_per_token`` (bisection); with
    ``factor`` > 1, the longest whose estimate times ``factor`` (measured / estimated) fits in BUDGET_GB."""
    n, d = MODEL.n_layers, MODEL.d_model

    def fits(length: int) -> bool:
        f = int(features_per_token * (length - 1))
        try:
            used = check_memory(length, f, n, d, 10, batch, BUDGET_GB)
        except MemoryError:
            return False
        return factor * estimate_bytes(length, f, n, d, 10, used) <= BUDGET_GB * 2**30

    lo, hi = 2, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory_summary(memory: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The measured points, whether `check_memory`'s estimate bounds them, and the longest prompt in 8 GB: as
    interplab's budget check accepts it, and with the estimate scaled by the largest measured / estimated ratio."""
    per_token = statistics.median(v["n_features"] / (int(k) - 1) for k, v in memory.items())
    ratio = max(v["extra_mib"] / v["estimate_mib"] for v in memory.values())
    return {
        "measured": memory,
        "estimate_bounds_measured": all(v["estimate_mib"] >= v["extra_mib"] for v in memory.values()),
        "features_per_token": per_token,
        "measured_over_estimate_max": ratio,
        "estimate_over_measured": {k: v["estimate_mib"] / v["extra_mib"] for k, v in memory.items()},
        "longest_prompt_in_8gb_by_check_memory": longest_in_budget(per_token),
        "longest_prompt_in_8gb_by_measured_scale": longest_in_budget(per_token, factor=max(ratio, 1.0)),
    }


def save(results: dict[str, Any], out: Path, complete: bool = False) -> None:
    """Write the results so far (atomically: a long run that stops keeps what it measured; ``complete`` says
    whether it finished)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"complete": complete, **results}, indent=1) + "\n")
    tmp.replace(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "graphs.json"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=1, help="timed graphs per process (> 1: after a warm-up)"
    )
    parser.add_argument("--lengths", default="16,32:2,48:1", help="lengths, each optionally :rounds")
    parser.add_argument("--memory-lengths", default="16,32,48,64", help="interplab-only peak-memory points")
    parser.add_argument("--memory-only", action="store_true", help="only the peak-memory points")
    parser.add_argument("--circuit-tracer-python", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--resummarize", action="store_true", help="recompute --out's memory summary only")
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if args.resummarize:
        results = json.loads(Path(args.out).read_text())
        results["memory"] = memory_summary(results["memory"]["measured"])
        return save(
            {k: v for k, v in results.items() if k != "complete"}, Path(args.out), results["complete"]
        )
    python = args.circuit_tracer_python or os.environ.get("INTERPLAB_CIRCUITTRACER_PYTHON")
    python = python or str(ROOT / ".peers" / "circuittracer" / "bin" / "python")
    if not Path(python).exists() and not args.memory_only:
        sys.exit(f"no circuit-tracer interpreter at {python}: run `bash scripts/peers.sh circuittracer`")
    torch.set_num_threads(1)
    model, clt = build()
    results: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": 1,
            "load_average_at_start": list(os.getloadavg()),  # a shared machine: 1, 5, 15 minutes
        },
        "model": (
            f"{MODEL.n_layers} layers x {MODEL.n_heads} heads, d_model {MODEL.d_model}, d_mlp {MODEL.d_mlp}, "
            f"vocab {MODEL.d_vocab}, LayerNorm, learned positions (interplab init, seed 0)"
        ),
        "clt": f"JumpReLU CLT, {D_SAE} latents per layer, resid_mid -> mlp_out, ~{L0} active per layer and token",
        "rounds": args.rounds,
        "repeats": args.repeats,
        "batch": {"interplab": 256, "circuit_tracer": 512},
        "lengths": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        memory = {}
        for length in [int(x) for x in args.memory_lengths.split(",")]:
            run = measure_memory(length)
            memory[str(length)] = {
                "n_features": run["n_features"],
                "n_nodes": run["n_nodes"],
                "batch": run["batch"],
                "extra_mib": run["measured_bytes"] / 2**20,
                "estimate_mib": run["estimate_bytes"] / 2**20,
            }
            results["memory"] = {"measured": memory}
            if not args.memory_only:
                save(results, Path(args.out))
        results["memory"] = memory_summary(memory)
        if args.memory_only:  # the other results of --out stay as they were
            old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
            complete = old.pop("complete", True)
            save({**old, "memory": results["memory"]}, Path(args.out), complete)
            return print(json.dumps(results["memory"], indent=1))
        for item in args.lengths.split(","):
            length, _, rounds = item.partition(":")
            length, rounds = int(length), int(rounds or args.rounds)
            tokens = prompt(length, seed=length)
            job = {"tokens": tokens.tolist(), "dense": False, "repeats": args.repeats}
            spec = prepare(model, clt, work / f"ct{length}", [job], bos=BOS, kind=None)
            ours, theirs = [], []
            for r in range(rounds):
                for side in (
                    ("interplab", "circuit_tracer") if r % 2 == 0 else ("circuit_tracer", "interplab")
                ):
                    if side == "interplab":
                        ours.append(run_interplab(work, tokens, args.repeats))
                    else:
                        theirs.extend(run_spec(python, spec, timeout=3600))
            a, b = summary(ours), summary(theirs)
            if (a["n_features"], a["n_nodes"]) != (b["n_features"], b["n_nodes"]):
                raise RuntimeError(f"the graphs differ at length {length}: interplab {a}, circuit-tracer {b}")
            results["lengths"][str(length)] = {
                "rounds": rounds,
                "interplab": a,
                "circuit_tracer": b,
                "cpu_ratio": b["cpu_s"] / a["cpu_s"],
                "wall_ratio": b["wall_s"] / a["wall_s"],
                "memory_ratio": b["extra_mib"] / max(a["extra_mib"], 1e-9),
                "load_average_after": list(os.getloadavg()),
            }
            save(results, Path(args.out))
    save(results, Path(args.out), complete=True)
    print(json.dumps({k: v for k, v in results.items() if k in ("lengths", "memory")}, indent=1))


if __name__ == "__main__":
    main()
