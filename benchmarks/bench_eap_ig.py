"""Benchmark: EAP, EAP-IG (inputs and activations, m = 5) and clean-corrupted over every edge of a 4-layer,
8-head model on CPU, and MIB's metrics of each.

The model is random (d_model 256, MLPs, learned positions; 1,620 edges), the data 32 positions; each method
scores every edge for a batch of ``--n`` clean examples against as many corrupted ones. Reported per method:
wall and CPU time (median of ``--rounds``), the passes it used, and how well it predicts exact patching (one
patched run per edge, computed once): Pearson correlation and overlap of the top 50 by |score|. Then CPR and
CMD over MIB's ten sizes for each method (one curve evaluation each). The issue's target: EAP-IG over all
edges of this model in under 10 s of CPU.

``--tasks`` measures instead how faithful each method's circuits are on tasks with known or trained
circuits: the planted induction model and its saturated version (`interplab.circuits.planted`, top 5 = the
planted size), the published paren balancer (``../shared/fixtures/paren_balancer``, top 12, where EAP was
17.6% faithful) and IOI on a 2-layer attention-only model trained here (seed 0, 600 steps, ABC corruption,
metric: logit of IO minus S at the end; top 20% of edges): faithfulness of the top-k circuit by |score|, CPR
and CMD over MIB's sizes, agreement with exact patching of every edge, and the time of each method.

Interplab only (the side-by-side with auto-circuit is benchmarks/bench_discovery.py). Run from the repository
root::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/bench_eap_ig.py --out benchmarks/results/eap_ig.json
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/bench_eap_ig.py --tasks --out benchmarks/results/eap_ig_tasks.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interplab.circuits import DiscoveryTask, EdgeEngine, Spec, attribute  # noqa: E402
from interplab.circuits.circuit import faithfulness  # noqa: E402
from interplab.circuits.metrics import circuit_metrics  # noqa: E402
from interplab.circuits.planted import PLANTED_EDGES, induction_data, planted_induction  # noqa: E402
from interplab.model import ModelConfig, Transformer  # noqa: E402
from interplab.tasks.ioi import IOITask  # noqa: E402

SHARED = Path(os.environ.get("INTERPLAB_SHARED", Path(__file__).resolve().parents[2] / "shared"))

METHODS = ("eap", "eap-ig", "eap-ig-activations", "clean-corrupted")


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def setup(n: int):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, n_layers=4, n_heads=8, d_vocab=512, n_ctx=64, init_range=0.05)
    model = Transformer(cfg)
    tokens = torch.randint(0, 512, (2 * n, 32))
    labels = torch.randint(0, 512, (2 * n,))

    def metric(logits, rows):
        return logits[:, -1].log_softmax(-1)[torch.arange(rows.numel()), labels[rows]]

    task = DiscoveryTask(
        name="random", tokens=tokens, clean=torch.arange(n), corrupt=torch.arange(n, 2 * n), metric=metric
    )
    return model, task


def bench(n: int, rounds: int, exact: bool) -> dict:
    model, task = setup(n)
    engine = EdgeEngine(model, task.tokens)
    edges = engine.graph.edges
    engine.ensure_clean(torch.arange(task.tokens.shape[0]))  # the engine's cache is shared by every method
    out: dict = {
        "model": "random 4 layers x 8 heads, d_model 256, MLPs, learned positions; 32 positions",
        "n_examples": n,
        "n_edges": len(edges),
        "steps": 5,
        "methods": {},
    }
    effects = None
    if exact:
        effects, wall, cpu = timed(lambda: exact_effects(engine, task))
        out["exact_patching"] = {"wall_s": wall, "cpu_s": cpu, "patched_runs": len(edges)}
    for method in METHODS:
        walls, cpus = [], []
        scores = None
        for _ in range(rounds):
            scores, wall, cpu = timed(lambda method=method: attribute(model, task, method, engine=engine))
            walls.append(wall)
            cpus.append(cpu)
        assert scores is not None
        row = {
            "wall_s_median": statistics.median(walls),
            "cpu_s_median": statistics.median(cpus),
            "passes": scores.passes,
        }
        if effects is not None:
            row |= agreement(scores.scores, effects, 50)
        metrics, wall, _ = timed(lambda scores=scores: circuit_metrics(model, task, scores, engine=engine))
        row |= {"cpr": metrics.cpr, "cmd": metrics.cmd, "metrics_wall_s": wall}
        out["methods"][method] = row
    return out


def exact_effects(engine: EdgeEngine, task: DiscoveryTask) -> torch.Tensor:
    """The change of the mean metric when each edge alone carries its corrupted value (one patched run each)."""
    base = task.metric(engine.run(Spec(task.clean)), task.clean).mean()
    corrupt = task.corrupt_value()
    return torch.stack(
        [
            task.metric(engine.run(Spec(task.clean, {e: corrupt}, propagate=True)), task.clean).mean() - base
            for e in engine.graph.edges
        ]
    )


def agreement(scores: torch.Tensor, effects: torch.Tensor, top: int) -> dict:
    """Pearson correlation with the exact effects and the overlap of the top ``top`` edges by magnitude."""
    a = set(torch.argsort(scores.abs(), descending=True)[:top].tolist())
    b = set(torch.argsort(effects.abs(), descending=True)[:top].tolist())
    return {
        "pearson_vs_exact": float(torch.corrcoef(torch.stack([scores.double(), effects.double()]))[0, 1]),
        f"top{top}_overlap_vs_exact": len(a & b) / top,
    }


def planted_task(n: int = 120) -> DiscoveryTask:
    tokens, labels, _ = induction_data(2 * n)

    def metric(logits, rows):
        return logits[:, -1].float().log_softmax(-1)[torch.arange(rows.numel()), labels[rows]]

    rows = torch.arange(n)
    return DiscoveryTask(name="planted", tokens=tokens, clean=rows, corrupt=rows + n, metric=metric)


def trained_ioi(steps: int = 600, n: int = 200) -> tuple[Transformer, DiscoveryTask]:
    """A 2-layer attention-only model trained on IOI (cross-entropy of the IO at the end), and its task."""
    torch.manual_seed(0)
    ioi = IOITask()
    model = Transformer(ioi.model_config(d_model=64, n_layers=2, n_heads=4, attn_only=True))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(steps):
        b = ioi.generate(64, seed=1000 + step)
        logits = model(b.tokens, attention_mask=b.attention_mask)
        final = logits[torch.arange(64), b.meta["end_pos"]]
        loss = torch.nn.functional.cross_entropy(final, b.meta["io_token"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    b = ioi.generate(n, seed=1)
    tokens = torch.cat([b.tokens, b.meta["corrupted_tokens"]])
    mask = torch.cat([b.attention_mask, b.attention_mask])
    end = torch.cat([b.meta["end_pos"], b.meta["end_pos"]])
    io = torch.cat([b.meta["io_token"], b.meta["io_token"]])
    s = torch.cat([b.meta["s_token"], b.meta["s_token"]])

    def metric(logits, rows):
        final = logits[torch.arange(rows.numel()), end[rows]]
        return final.gather(1, io[rows, None])[:, 0] - final.gather(1, s[rows, None])[:, 0]

    rows = torch.arange(n)
    task = DiscoveryTask(
        name="ioi", tokens=tokens, clean=rows, corrupt=rows + n, metric=metric, attention_mask=mask
    )
    return model, task


def bench_tasks() -> dict:
    cases: dict[str, tuple] = {
        "planted_induction": (planted_induction(), planted_task(), len(PLANTED_EDGES)),
        "planted_induction_saturated": (
            planted_induction(sharpness=30.0, out_scale=30.0),
            planted_task(),
            len(PLANTED_EDGES),
        ),
    }
    paren = SHARED / "fixtures" / "paren_balancer"
    if paren.is_dir():
        from interplab.cli.scrub import load_any_model
        from interplab.scrub.tasks import build_task, discovery_task

        model = load_any_model(None, "parens", paren)
        cases["paren_balancer"] = (model, discovery_task(build_task("parens", model, data=paren), 200), 12)
    (model, task), train_s, _ = timed(trained_ioi)
    cases["ioi_trained_2l_attn_only"] = (model, task, int(0.2 * len(task.engine(model).graph.edges)))
    out: dict = {"ioi_train_wall_s": train_s}
    for name, (model, task, k) in cases.items():
        engine = task.engine(model)
        n_edges = len(engine.graph.edges)
        row: dict = {"n_edges": n_edges, "k": k, "methods": {}}
        effects = exact_effects(engine, task)
        for method in METHODS:
            scores, wall, cpu = timed(
                lambda m=model, t=task, e=engine, a=method: attribute(m, t, a, engine=e)
            )
            f = faithfulness(engine, task, scores.top(k)).fraction
            metrics = circuit_metrics(model, task, scores, engine=engine)
            row["methods"][method] = {
                f"faithfulness_top{k}": f,
                "cpr": metrics.cpr,
                "cmd": metrics.cmd,
                "f_signed": list(metrics.curves["signed"].faithfulness),
                "f_absolute": list(metrics.curves["absolute"].faithfulness),
                "wall_s": wall,
                "cpu_s": cpu,
            }
            row["methods"][method] |= agreement(scores.scores, effects, k)
            if name.startswith("planted"):
                found = {e.name for e in scores.top(k)} & set(PLANTED_EDGES)
                row["methods"][method]["planted_edges_in_top_k"] = len(found)
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/eap_ig.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-exact", action="store_true", help="skip exact patching of every edge")
    parser.add_argument("--tasks", action="store_true", help="faithfulness on planted, paren and IOI tasks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: dict = {
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "threads": args.threads,
            "load_average": os.getloadavg(),
        }
    }
    if args.tasks:
        out |= bench_tasks()
    else:
        for i, n in enumerate(args.n):
            out[f"4l8h_n{n}"] = bench(n, args.rounds, exact=not args.no_exact and i == 0)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
