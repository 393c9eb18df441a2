"""Circuit discovery side by side with auto-circuit 1.0.1 (Miller, Chughtai & Saunders 2024, PyPI
``auto-circuit``) on the same model and task: edges found, faithfulness, time.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_discovery.py [--out benchmarks/results/discovery.json]
        [--rounds 3] [--n 64] [--autocircuit-python .peers/autocircuit/bin/python]

Model and task: a 4-layer, 8-head transformer (d_model 128, MLPs, LayerNorm, learned positions) trained here on
interplab's IOI task with one template ("When A and B went to the PLACE , S gave a OBJECT to" -> IO), 16 tokens
(no padding: auto-circuit passes no attention mask and reads the last position); the trained weights are cached
in ``runs/bench_discovery/`` (seeded, one thread: retraining gives the same model). Clean rows are held-out
examples, each corrupted by its ABC counterfactual (three fresh names); the metric is the logit difference IO
minus S at the last position, as auto-circuit's ``answer_function="avg_diff"``. auto-circuit gets the same
weights (exported as a TransformerLens checkpoint) and rows (tests/autocircuit_peer.py) and runs in its own
interpreter (``benchmarks/_autocircuit_peer.py``, ``bash scripts/peers.sh autocircuit``).

Methods, each side's own:
- interplab ``eap`` = auto-circuit ``eap`` (``mask_gradient_prune_scores(mask_val=0)``): the same quantity (the
  parity test checks it to float32 rounding), so their circuits coincide.
- interplab ``eap-ig`` (MIB's EAP-IG-inputs, 5 steps: the token embedding interpolated) and auto-circuit's
  integrated mask gradients (``integrated_grad_samples`` 5 and 50: every edge's mask moved together from clean
  to corrupt, N + 1 points): both integrated gradients, along different paths, so different scores.
Edges found: the overlap of each pair's top-k sets (edges ranked by |score|; interplab's ``embed`` and
``pos_embed`` scores summed into auto-circuit's single input node ``Resid Start``, so both rank the same
1,519 edges; interplab's own graph has 1,620). Faithfulness of each top-k circuit, computed by each library
for its own circuits: (m(circuit) - m(empty)) / (m(full) - m(empty)) with every edge outside the circuit
carrying the corrupt run's value (interplab's patched engine; auto-circuit's ``run_circuits`` TREE_PATCH).

Time: interleaved rounds (the order alternates), medians of wall and CPU seconds on one thread; auto-circuit's
are measured inside its process (after one warm-up call; its import, ~15 s, is not counted).
Ratios are auto-circuit / interplab CPU time (CPU time is the fair measure on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interplab.circuits import DiscoveryTask, EdgeEngine, eap, eap_ig  # noqa: E402
from interplab.circuits.circuit import circuit_spec  # noqa: E402
from interplab.model import ModelConfig, Transformer  # noqa: E402
from interplab.tasks.ioi import IOITask  # noqa: E402
from tests.autocircuit_peer import interplab_edges, logit_diff_task, merged_scores, prepare, run_specs  # noqa: E402

SIZES = (10, 20, 50, 100, 200, 500)
TRAIN_STEPS, TRAIN_BATCH, TRAIN_ROWS = 500, 64, 4000
PEER_METHODS = [
    {"name": "eap"},
    {"name": "ig5", "integrated_grad_samples": 5},
    {"name": "ig50", "integrated_grad_samples": 50},
]
PAIRS = (("eap", "eap"), ("eap-ig", "ig5"), ("eap-ig", "ig50"), ("eap", "ig5"))


def timed(fn: Callable):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def ioi_rows(n: int, seed: int) -> dict[str, torch.Tensor]:
    """``n`` one-template IOI examples cut at the answer position: clean, ABC corrupt, IO and S tokens."""
    batch = IOITask(n_templates=1).generate(n, seed=seed)
    end = int(batch.meta["end_pos"][0])
    if not bool((batch.meta["end_pos"] == end).all()):
        raise RuntimeError("one-template IOI examples should all end at the same position")
    return {
        "clean": batch.tokens[:, : end + 1],
        "corrupt": batch.meta["corrupted_tokens"][:, : end + 1],
        "answers": batch.meta["io_token"][:, None],
        "wrong_answers": batch.meta["s_token"][:, None],
    }


def trained_model(cache: Path) -> tuple[Transformer, dict]:
    """The 4x8 IOI model (trained once, then read from ``cache``) and its training summary."""
    data = ioi_rows(TRAIN_ROWS, seed=0)
    cfg = ModelConfig(
        d_model=128,
        n_layers=4,
        n_heads=8,
        d_vocab=IOITask().d_vocab,
        n_ctx=data["clean"].shape[1],
        name="ioi-4x8",
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    weights, summary_file = cache / "ioi_4x8.pt", cache / "ioi_4x8.json"
    if weights.exists() and summary_file.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval(), json.loads(summary_file.read_text())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    start = time.process_time()
    for _ in range(TRAIN_STEPS):
        idx = torch.randint(0, TRAIN_ROWS, (TRAIN_BATCH,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(data["clean"][idx])[:, -1], data["answers"][idx, 0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    held = ioi_rows(512, seed=2)
    with torch.no_grad():
        last = model.eval()(held["clean"])[:, -1]
    diff = last.gather(1, held["answers"])[:, 0] - last.gather(1, held["wrong_answers"])[:, 0]
    summary = {
        "steps": TRAIN_STEPS,
        "batch": TRAIN_BATCH,
        "final_batch_loss": float(loss.detach()),
        "held_out_logit_diff": float(diff.mean()),
        "held_out_io_over_s": float((diff > 0).float().mean()),
        "cpu_s": time.process_time() - start,
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), weights)
    summary_file.write_text(json.dumps(summary))
    return model.eval(), summary


def ranked(scores: dict[str, float]) -> list[str]:
    return [n for n, _ in sorted(scores.items(), key=lambda kv: -abs(kv[1]))]


def sweep(engine: EdgeEngine, task: DiscoveryTask, order: list[str]) -> dict[str, float]:
    """interplab's faithfulness of the top-k circuits of ``order`` (auto-circuit edge names) for every size."""
    metric = lambda keep: float(task.metric(engine.run(circuit_spec(engine, task, keep)), task.clean).mean())  # noqa: E731
    full, empty = metric(set(engine.graph.edges)), metric(set())
    return {
        str(k): (metric(interplab_edges(engine.graph, order[:k])) - empty) / (full - empty) for k in SIZES
    }


def peer_faithfulness(result: dict, method: str) -> dict[str, float]:
    circuits = result["methods"][method]["circuits"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    empty, full = mean(circuits["0"]["logit_diff"]), mean(result["full"])
    return {str(k): (mean(circuits[str(k)]["logit_diff"]) - empty) / (full - empty) for k in SIZES}


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "discovery.json"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=64, help="clean/corrupt pairs (one batch)")
    parser.add_argument(
        "--autocircuit-python",
        default=os.environ.get(
            "INTERPLAB_AUTOCIRCUIT_PYTHON", str(ROOT / ".peers" / "autocircuit" / "bin" / "python")
        ),
        help="the auto-circuit peer (bash scripts/peers.sh autocircuit)",
    )
    parser.add_argument("--cache", default=str(ROOT / "runs" / "bench_discovery"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, training = trained_model(Path(args.cache))
    data = ioi_rows(args.n, seed=1)
    task = logit_diff_task(
        "ioi-1-template", data["clean"], data["corrupt"], data["answers"], data["wrong_answers"]
    )
    engine = EdgeEngine(model, task.tokens)
    ours_methods: dict[str, Callable] = {
        "eap": lambda: eap(model, task, engine=engine),
        "eap-ig": lambda: eap_ig(model, task, 5, engine=engine),
    }
    for fn in ours_methods.values():
        fn()  # warm-up (and the engine's clean cache)

    peer_ok = Path(args.autocircuit_python).exists()
    times: dict[str, dict[str, list[float]]] = {}
    ours_scores: dict[str, dict[str, float]] = {}
    ours_faith: dict[str, dict[str, float]] = {}
    peer: dict | None = None
    with tempfile.TemporaryDirectory() as tmp:
        spec = prepare(
            model, data, Path(tmp), methods=PEER_METHODS, edge_counts=(0, *SIZES), dtype="float32", repeats=1
        )
        for r in range(args.rounds):
            sides = ["ours", "peer"] if r % 2 == 0 else ["peer", "ours"]
            for side in sides:
                if side == "ours":
                    for name, fn in ours_methods.items():
                        scores, wall, cpu = timed(fn)
                        ours_scores[name] = merged_scores(scores)
                        times.setdefault(f"interplab {name}", {"wall": [], "cpu": []})
                        times[f"interplab {name}"]["wall"].append(wall)
                        times[f"interplab {name}"]["cpu"].append(cpu)
                        faith, wall, cpu = timed(lambda n=name: sweep(engine, task, ranked(ours_scores[n])))
                        ours_faith[name] = faith
                        key = f"interplab {name} faithfulness sweep"
                        times.setdefault(key, {"wall": [], "cpu": []})
                        times[key]["wall"].append(wall)
                        times[key]["cpu"].append(cpu)
                elif peer_ok:
                    (peer,) = run_specs(args.autocircuit_python, [spec], timeout=1800)
                    for m in PEER_METHODS:
                        res = peer["methods"][m["name"]]
                        for key, wall, cpu in (
                            (f"auto-circuit {m['name']}", res["wall_s"], res["cpu_s"]),
                            (
                                f"auto-circuit {m['name']} faithfulness sweep",
                                [res["circuit_wall_s"]],
                                [res["circuit_cpu_s"]],
                            ),
                        ):
                            times.setdefault(key, {"wall": [], "cpu": []})
                            times[key]["wall"] += wall
                            times[key]["cpu"] += cpu

    methods: dict[str, dict] = {}
    for name in ours_methods:
        methods[f"interplab {name}"] = {"faithfulness": ours_faith[name]}
    if peer is not None:
        for m in PEER_METHODS:
            methods[f"auto-circuit {m['name']}"] = {"faithfulness": peer_faithfulness(peer, m["name"])}
    for key, t in times.items():
        base = key.split(" faithfulness")[0]
        field = "sweep" if "faithfulness" in key else "score"
        methods.setdefault(base, {})[f"{field}_wall_s_median"] = median(t["wall"])
        methods[base][f"{field}_cpu_s_median"] = median(t["cpu"])
    overlap: dict[str, dict[str, float]] = {}
    ratios: dict[str, float] = {}
    if peer is not None:
        theirs = {m["name"]: ranked(peer["methods"][m["name"]]["scores"]) for m in PEER_METHODS}
        for a, b in PAIRS:
            if a in ours_scores:
                ours = ranked(ours_scores[a])
                overlap[f"interplab {a} vs auto-circuit {b}"] = {
                    str(k): len(set(ours[:k]) & set(theirs[b][:k])) / k for k in SIZES
                }
                sa, sb = methods[f"interplab {a}"], methods[f"auto-circuit {b}"]
                ratios[f"score cpu: auto-circuit {b} / interplab {a}"] = (
                    sb["score_cpu_s_median"] / sa["score_cpu_s_median"]
                )
                ratios[f"faithfulness sweep cpu: auto-circuit {b} / interplab {a}"] = (
                    sb["sweep_cpu_s_median"] / sa["sweep_cpu_s_median"]
                )
        eap_ours = torch.tensor([ours_scores["eap"][n] for n in peer["edges"]])
        eap_theirs = -torch.tensor([peer["methods"]["eap"]["scores"][n] for n in peer["edges"]])
        eap_max_diff = float((eap_ours - eap_theirs).abs().max() / eap_ours.abs().max())
    full_ld = float(
        task.metric(engine.run(circuit_spec(engine, task, set(engine.graph.edges))), task.clean).mean()
    )
    corrupt_ld = float(task.metric(engine.run(circuit_spec(engine, task, set())), task.clean).mean())
    out = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": 1},
        "model": "4 layers x 8 heads, d_model 128, MLPs, LayerNorm, learned positions; trained on one-template IOI",
        "training": training,
        "task": {
            "pairs": args.n,
            "positions": int(data["clean"].shape[1]),
            "logit_diff_full": full_ld,
            "logit_diff_corrupt": corrupt_ld,
        },
        "edges": {"interplab": len(engine.graph.edges), "auto-circuit": peer["n_edges"] if peer else None},
        "sizes": list(SIZES),
        "rounds": args.rounds,
        "eap_ig": "interplab eap_ig(steps=5, variant='inputs')",
        "auto_circuit": peer["versions"] if peer else f"not run: {args.autocircuit_python} missing",
        "methods": methods,
        "top_k_overlap": overlap,
        "ratios": ratios,
    }
    if peer is not None:
        out["eap_max_abs_diff_relative_to_max_score"] = eap_max_diff
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
