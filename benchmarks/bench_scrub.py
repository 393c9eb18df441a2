"""Benchmark: causal scrubbing and edge attribution patching on CPU.

1. Causal scrubbing of the induction hypothesis (four refinements, the last one the full story) over 2,000
   reference examples on the hand-built two-layer induction model (`interplab.circuits.planted`): wall and
   CPU time, the example-forwards the engine ran (cached clean forwards, plus node evaluations) and the number a
   naive implementation runs (one whole forward per input of the treeified model per example); the naive time
   is estimated from the measured cost of one batched example-forward.
2. A position-resolved hypothesis on the published paren balancer: REMIX experiment 3a (42 per-position claims
   on head 2.1's input, its mask claimed by input length, 1.0 and 2.0 on count-and-open) over 4,000 reference
   examples drawn from the fixture's 100,000 strings: wall and CPU time (goal < 2 minutes on one thread), the
   engine's example-forward equivalents against a naive per-path implementation (the hand-written reference
   of tests/scrub/remix_reference.py: one whole forward per datum and position, timed on a quarter of the
   references and scaled), and the loss against the published one.
3. EAP over every edge of a random 4-layer, 8-head model (d_model 256, 32 positions, batch 16): one clean forward
   with a backward plus one corrupted forward, against exact edge patching (one patched run per edge), with the
   correlation between the two sets of scores.

Contenders run interleaved in rounds; medians are reported. Run from the repository root::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. python benchmarks/bench_scrub.py --out benchmarks/results/scrub.json
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

from interplab.circuits import DiscoveryTask, EdgeEngine, Spec, eap  # noqa: E402
from interplab.circuits.planted import induction_data, planted_induction  # noqa: E402
from interplab.model import ModelConfig, Transformer  # noqa: E402
from interplab.scrub import ScrubConfig, scrub  # noqa: E402
from interplab.scrub.induction import induction_steps, induction_task, smeared_induction_steps  # noqa: E402


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def bench_scrub(rounds: int, n: int, model_path: str | None = None) -> dict:
    if model_path is None:
        model = planted_induction()
        tokens, _, _ = induction_data(4 * n, seed=1)
        hyp = induction_steps()[-1]
        label = (
            "planted-induction (2 layers, 2 heads, d_model 58, hand-built; see interplab.circuits.planted)"
        )
    else:  # a trained induction-2l model: its induction head is a0.0 (smeared keys)
        from interplab.model.load import load_model

        model = load_model(model_path)
        tokens, _, _ = induction_data(4 * n, 32, 20, seed=1)
        hyp = smeared_induction_steps("a0.0")[-1]
        label = f"induction-2l trained with the preset ({model_path}); tokens < 32, length 20"
    task = induction_task(tokens)
    config = ScrubConfig(n_examples=n, n_seeds=1, per_claim=False, batch_size=500)
    walls, cpus, fwd_walls = [], [], []
    result = None
    for _ in range(rounds):
        result, wall, cpu = timed(lambda: scrub(model, task, hyp, config))
        walls.append(wall)
        cpus.append(cpu)
        # the cost of one batched example-forward, for the naive estimate
        _, fw, _ = timed(lambda: model(tokens[:n]))
        fwd_walls.append(fw / n)
    assert result is not None
    f = result.forwards
    per_forward = statistics.median(fwd_walls)
    return {
        "model": label,
        "hypothesis": hyp.name,
        "n_examples": n,
        "rounds": rounds,
        "wall_s_median": statistics.median(walls),
        "cpu_s_median": statistics.median(cpus),
        "recovered": result.recovered.mean,
        "loss_scrubbed": result.loss_scrubbed.mean,
        "loss_original": result.loss_original.mean,
        "loss_random": result.loss_random.mean,
        "clean_example_forwards": f["clean_example_forwards"],
        "node_evaluations": f["node_evaluations"],
        "engine_example_forwards_equivalent": f["clean_example_forwards"]
        + f["node_evaluations"] / f["n_nodes"],
        "naive_example_forwards": f["naive_example_forwards"],
        "naive_wall_s_estimate": f["naive_example_forwards"] * per_forward,
        "note": "naive = one whole forward per input of the treeified model per example (original, baseline and "
        "scrubbed runs); its time is estimated from the measured batched cost of one example-forward",
    }


def bench_scrub_positions(rounds: int, n: int, fixture: str) -> dict:
    from interplab.scrub.compile import compile_hypothesis
    from interplab.scrub.parens import load_paren_model, paren_task
    from interplab.scrub.remix import REMIX_EXPERIMENTS, remix_hypothesis
    from tests.scrub.remix_reference import run as naive_run

    model = load_paren_model(fixture)
    task = paren_task(fixture)
    hyp = remix_hypothesis("3a", model)
    config = ScrubConfig(n_examples=n, n_seeds=1, per_claim=False, batch_size=1000)
    walls, cpus = [], []
    result = None
    for _ in range(rounds):  # a fresh engine each round: its clean-forward cache starts empty
        result, wall, cpu = timed(lambda: scrub(model, task, hyp, config))
        walls.append(wall)
        cpus.append(cpu)
    assert result is not None
    f = result.forwards
    refs = torch.randperm(task.tokens.shape[0], generator=torch.Generator().manual_seed(0))[: n // 4]
    (losses, _), naive_wall, _ = timed(lambda: naive_run(model, task, "3a", refs))
    published = REMIX_EXPERIMENTS["3a"]
    compiled = compile_hypothesis(EdgeEngine(model, task.tokens[:10]), hyp)
    n_claims = sum(1 for c in compiled.claims() if c.path.startswith("logits/a2.1/a2.1.in@"))
    return {
        "model": "the published paren balancer (3 layers x 2 heads, d_model 56, 42 positions), ../shared fixture",
        "hypothesis": "REMIX 3a: a2.1.in@[0..41] with a per-position feature (42 claims) + a2.1.mask + 1.0, 2.0",
        "per_position_claims": n_claims,
        "n_examples": n,
        "rounds": rounds,
        "wall_s_median": statistics.median(walls),
        "cpu_s_median": statistics.median(cpus),
        "goal_wall_s": 120,
        "loss_scrubbed": result.loss_scrubbed.mean,
        "loss_se": result.loss_scrubbed.se,
        "loss_published": published.loss,
        "tolerance_published": published.se,
        "recovered": result.recovered.mean,
        "clean_example_forwards": f["clean_example_forwards"],
        "node_evaluations": f["node_evaluations"],
        "engine_example_forwards_equivalent": f["clean_example_forwards"]
        + f["node_evaluations"] / f["n_nodes"],
        "naive_example_forwards": f["naive_example_forwards"],
        "naive_per_path_wall_s_measured_on_quarter": naive_wall,
        "naive_per_path_wall_s_estimate": naive_wall * n / refs.numel(),
        "naive_per_path_loss_on_quarter": float(losses.mean()),
        "note": "naive = the hand-written per-path implementation (tests/scrub/remix_reference.py), one forward "
        "of the whole model per datum, timed on n/4 references and scaled by 4",
    }


def bench_eap(rounds: int) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, n_layers=4, n_heads=8, d_vocab=512, n_ctx=64, init_range=0.05)
    model = Transformer(cfg)
    tokens = torch.randint(0, 512, (32, 32))
    labels = torch.randint(0, 512, (32,))

    def metric(logits, rows):
        return logits[:, -1].log_softmax(-1)[torch.arange(rows.numel()), labels[rows]]

    task = DiscoveryTask(
        name="random", tokens=tokens, clean=torch.arange(16), corrupt=torch.arange(16, 32), metric=metric
    )
    engine = EdgeEngine(model, tokens)
    edges = engine.graph.edges
    eap_walls, eap_cpus = [], []
    scores = None
    for _ in range(rounds):
        scores, wall, cpu = timed(lambda: eap(model, task, engine=engine))
        eap_walls.append(wall)
        eap_cpus.append(cpu)
    assert scores is not None
    corrupt = Spec(task.corrupt)  # type: ignore[arg-type]
    base = metric(engine.run(Spec(task.clean)), task.clean).mean()

    def exact():
        return torch.stack(
            [
                metric(engine.run(Spec(task.clean, {e: corrupt}, propagate=True)), task.clean).mean() - base
                for e in edges
            ]
        )

    effects, exact_wall, exact_cpu = timed(exact)
    x, y = scores.scores, effects
    corr = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    top = 50
    overlap = (
        len(
            set(torch.argsort(x.abs(), descending=True)[:top].tolist())
            & set(torch.argsort(y.abs(), descending=True)[:top].tolist())
        )
        / top
    )
    return {
        "model": "random 4 layers x 8 heads, d_model 256, MLPs, learned positions; batch 16 x 32 positions",
        "n_edges": len(edges),
        "passes": scores.passes,
        "rounds": rounds,
        "eap_wall_s_median": statistics.median(eap_walls),
        "eap_cpu_s_median": statistics.median(eap_cpus),
        "exact_patching_wall_s": exact_wall,
        "exact_patching_cpu_s": exact_cpu,
        "exact_patched_runs": len(edges),
        "speedup_wall": exact_wall / statistics.median(eap_walls),
        "pearson_eap_vs_exact": corr,
        f"top{top}_overlap_eap_vs_exact": overlap,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/scrub.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--paren-fixture", default="../shared/fixtures/paren_balancer")
    parser.add_argument("--paren-n", type=int, default=4000)
    parser.add_argument(
        "--induction-model", default=None, help="a trained induction-2l folder to scrub as well"
    )
    parser.add_argument(
        "--only",
        choices=["all", "scrub", "parens", "eap"],
        default="all",
        help="run one part and update that part of an existing --out file",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    out = json.loads(path.read_text()) if args.only != "all" and path.is_file() else {}
    out["machine"] = {
        "platform": platform.platform(),
        "torch": torch.__version__,
        "threads": args.threads,
        "load_average": os.getloadavg(),
    }
    if args.only in ("all", "scrub"):
        out["scrub_induction"] = bench_scrub(args.rounds, args.n)
        if args.induction_model:
            out["scrub_induction_2l_trained"] = bench_scrub(args.rounds, args.n, args.induction_model)
    if args.only in ("all", "parens"):
        if Path(args.paren_fixture).is_dir():
            out["scrub_parens_3a"] = bench_scrub_positions(args.rounds, args.paren_n, args.paren_fixture)
        else:
            out["scrub_parens_3a"] = {"skipped": f"paren fixture {args.paren_fixture} absent"}
    if args.only in ("all", "eap"):
        out["eap_4l8h"] = bench_eap(args.rounds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
