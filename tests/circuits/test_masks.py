"""Mask-optimisation discovery: the masked forward against the model and the edge engine, and the learned
masks against a planted circuit."""

import json

import pytest
import torch
from typer.testing import CliRunner

from interplab.circuits.circuit import DiscoveryTask, circuit_spec, faithfulness
from interplab.circuits.discovery import eap
from interplab.circuits.engine import Ablation, EdgeEngine
from interplab.circuits.masked import MaskedForward, connected
from interplab.circuits.masks import (
    MaskConfig,
    MaskScores,
    Method,
    Objective,
    learn_masks,
    mask_sweep,
)
from interplab.circuits.planted import NOISE_EDGES, PLANTED_EDGES, planted_induction
from interplab.cli.main import app
from tests.circuits.discovery_tasks import planted_task
from tests.circuits.test_engine import forward, make_model

VARIANTS = {
    "mlp-learned-ln": dict(),
    "attn-only-rotary-smear": dict(attn_only=True, positional="rotary", smear_keys=True),
    "parallel-rms": dict(parallel_attn_mlp=True, normalization="rmsnorm"),
    "bidirectional-padded": dict(causal=False),
    "gqa-rotary": dict(n_kv_heads=2, positional="rotary", normalization="rmsnorm"),
}


def random_task(variant: str, corrupt="rows") -> DiscoveryTask:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (12, 10), generator=gen)
    mask = None
    if variant.endswith("padded"):
        mask = torch.ones(12, 10, dtype=torch.long)
        mask[::3, 7:] = 0
        mask[1::4, 5:] = 0
    clean = torch.arange(6)

    def metric(logits, rows):
        return logits[:, -1, 0] - logits[:, -1, 1]

    return DiscoveryTask(
        name="random",
        tokens=tokens,
        clean=clean,
        corrupt=clean + 6 if corrupt == "rows" else Ablation(corrupt),
        metric=metric,
        attention_mask=mask,
    )


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_all_ones_is_the_model_and_all_zeros_the_corrupted_model(variant):
    model = make_model(**VARIANTS[variant])
    task = random_task(variant)
    fwd = MaskedForward(model, task)
    mask = task.attention_mask
    clean_mask = None if mask is None else mask[task.clean]
    corrupt_mask = None if mask is None else mask[task.corrupt]
    with torch.no_grad():
        ones = fwd(torch.ones(fwd.n_edges))
        zeros = fwd(torch.zeros(fwd.n_edges))
    torch.testing.assert_close(ones, forward(model, task.tokens[task.clean], clean_mask))
    corrupted = forward(model, task.tokens[task.corrupt], corrupt_mask)
    if mask is None:
        torch.testing.assert_close(zeros, corrupted, atol=1e-5, rtol=1e-4)
    else:  # every edge corrupted: the corrupted run wherever both inputs have real tokens
        real = (mask[task.clean] * mask[task.corrupt]).bool()
        torch.testing.assert_close(zeros[real], corrupted[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_random_binary_mask_is_the_engines_patched_run(variant):
    model = make_model(**VARIANTS[variant])
    task = random_task(variant)
    engine = task.engine(model)
    fwd = MaskedForward(model, task, engine=engine)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        mask = (torch.rand(fwd.n_edges, generator=gen) < 0.5).float()
        keep = {e for e, m in zip(engine.graph.edges, mask.tolist(), strict=True) if m == 1}
        expected = engine.run(circuit_spec(engine, task, keep))
        with torch.no_grad():
            torch.testing.assert_close(fwd(mask), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("ablation", ["zero", "mean"])
def test_ablations_are_the_engines(ablation):
    model = make_model()
    task = random_task("mlp-learned-ln", corrupt=ablation)
    engine = task.engine(model)
    fwd = MaskedForward(model, task, engine=engine)
    mask = (torch.rand(fwd.n_edges, generator=torch.Generator().manual_seed(3)) < 0.6).float()
    keep = {e for e, m in zip(engine.graph.edges, mask.tolist(), strict=True) if m == 1}
    with torch.no_grad():
        torch.testing.assert_close(
            fwd(mask), engine.run(circuit_spec(engine, task, keep)), atol=1e-5, rtol=1e-4
        )


def test_per_example_masks_equal_the_loop_and_soft_masks_interpolate_linearly_at_the_logits():
    model = make_model()
    task = random_task("mlp-learned-ln")
    engine = task.engine(model)
    fwd = MaskedForward(model, task, engine=engine)
    gen = torch.Generator().manual_seed(2)
    masks = torch.rand(6, fwd.n_edges, generator=gen)
    idx = torch.tensor([0, 3, 3, 5, 1, 0])
    with torch.no_grad():
        batched = fwd(masks, idx)
        looped = torch.cat([fwd(masks[i], idx[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(batched, looped)
    # a soft mask on the edges into the logits alone mixes the residual streams linearly
    into = [i for i, e in enumerate(engine.graph.edges) if e.receiver == engine.graph.logits]
    m = torch.ones(fwd.n_edges)
    m[into] = 0.25
    resid_clean = engine.clean_input(engine.graph.logits, task.clean)
    resid_corrupt = engine.clean_input(engine.graph.logits, task.corrupt)
    expected = model.unembed_resid(0.25 * resid_clean + 0.75 * resid_corrupt)
    with torch.no_grad():
        torch.testing.assert_close(fwd(m), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mlp-learned-ln", "parallel-rms", "bidirectional-padded", "gqa-rotary"])
def test_the_gradient_at_the_full_model_is_minus_eap(variant):
    # d metric / d m_e = (z_e - c_e) . d metric / d x_r: EAP's score with the opposite sign
    model = make_model(**VARIANTS[variant])
    task = random_task(variant)
    engine = task.engine(model)
    fwd = MaskedForward(model, task, engine=engine)
    mask = torch.ones(fwd.n_edges, requires_grad=True)
    task.metric(fwd(mask), task.clean).mean().backward()
    assert mask.grad is not None
    torch.testing.assert_close(mask.grad, -eap(model, task, engine=engine).scores, atol=1e-5, rtol=1e-4)
    assert bool((mask.grad != 0).sum() > fwd.n_edges // 2)


def test_dangling_edges_are_dropped(planted):
    fwd = MaskedForward(planted, planted_task())
    names = [e.name for e in fwd.graph.edges]
    kept = ["embed->a0.0.v", "pos_embed->a0.0.q", "a0.0->a1.0.k", "a1.0->logits", "embed->a1.0.q"]
    dangling = ["a0.1->a1.1.q", "embed->a1.1.k"]  # a0.1 is reached from nothing, a1.1 reaches nothing
    keep = torch.zeros(2, len(names), dtype=torch.bool)
    for e in kept + dangling:
        keep[0, names.index(e)] = True
    keep[1, names.index("a0.0->logits")] = True  # a head reached from nothing: its edge carries nothing
    got = connected(fwd, keep)
    assert {names[i] for i in got[0].nonzero()[:, 0].tolist()} == set(kept)
    assert not bool(got[1].any())


def test_post_norm_models_are_refused():
    with pytest.raises(ValueError, match="post_norms"):
        MaskedForward(make_model(post_norms=True), random_task("mlp-learned-ln"))


def test_bad_masks_are_refused():
    model = make_model()
    fwd = MaskedForward(model, random_task("mlp-learned-ln"))
    with pytest.raises(ValueError, match="n_edges"):
        fwd(torch.ones(fwd.n_edges + 1))
    with pytest.raises(ValueError, match="one per example"):
        fwd(torch.ones(3, fwd.n_edges), torch.arange(2))
    with pytest.raises(ValueError, match="target_edges"):
        MaskConfig(method=Method.UGS, target_edges=4)
    with pytest.raises(ValueError, match="steps"):
        MaskConfig(steps=0)


# ---- the planted circuit ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted():
    return planted_induction()


@pytest.mark.parametrize(
    "config",
    [
        MaskConfig(method=Method.UGS, lam=0.02, steps=80, batch_size=16, n_samples=2, lr=0.1),
        MaskConfig(method=Method.HARD_CONCRETE, lam=1.0, steps=80, batch_size=16),
        MaskConfig(method=Method.HARD_CONCRETE, target_edges=len(PLANTED_EDGES), steps=80, batch_size=16),
    ],
    ids=["ugs", "hard-concrete", "hard-concrete-target"],
)
def test_the_learned_masks_are_exactly_the_planted_circuit(planted, config):
    task = planted_task()
    engine = task.engine(planted)
    got = learn_masks(planted, task, config, engine=engine)
    k = len(PLANTED_EDGES)
    assert {e.name for e in got.top(k)} == set(PLANTED_EDGES)  # precision = recall = 1 at the planted size
    if config.method is Method.UGS:  # the noise head's two edges come next: they change the output a little
        ranked = [name for name, _ in got.ranked()]
        assert set(ranked[k : k + len(NOISE_EDGES)]) == set(NOISE_EDGES)
    # the planted edges are kept, the edges that change nothing are pruned
    probs = dict(got.ranked())
    assert min(probs[e] for e in PLANTED_EDGES) > 0.9
    unused = [e.name for e in engine.graph.edges if e.name not in PLANTED_EDGES + NOISE_EDGES]
    assert max(probs[e] for e in unused) < 0.5
    # at least as faithful as EAP at the same size
    ours = faithfulness(engine, task, got.top(k))
    theirs = faithfulness(engine, task, eap(planted, task, engine=engine).top(k))
    assert ours.fraction >= theirs.fraction - 1e-6
    torch.testing.assert_close(ours.fraction, 1.0, atol=0.02, rtol=0)
    assert len(got.curve["loss"]) == config.steps
    assert got.curve["edges"][-1] < got.curve["edges"][0]
    assert isinstance(got, MaskScores) and got.scores.dtype == torch.float64


def test_progress_sweep_and_plot(planted):
    task = planted_task()
    calls = []
    config = MaskConfig(steps=3, batch_size=4, n_samples=1)
    got = mask_sweep(planted, task, [1e-1, 1e-3], config, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(1, 7)]
    assert [s.config.lam for s in got] == [1e-1, 1e-3]
    assert got[0].plot().data
    assert got[0].passes == {"forward": 4, "backward": 3}


def test_the_metric_objective_trains(planted):
    task = planted_task()
    got = learn_masks(planted, task, MaskConfig(objective=Objective.METRIC, lam=0.02, steps=100, lr=0.1))
    assert {e.name for e in got.top(len(PLANTED_EDGES))} == set(PLANTED_EDGES)


def test_the_learned_forward_matches_on_the_masked_engine_for_the_planted_model(planted):
    task = planted_task()
    engine = EdgeEngine(planted, task.tokens)
    fwd = MaskedForward(planted, task, engine=engine)
    keep = {engine.graph.edge(e) for e in PLANTED_EDGES}
    mask = torch.tensor([1.0 if e in keep else 0.0 for e in engine.graph.edges])
    with torch.no_grad():
        torch.testing.assert_close(
            fwd(mask), engine.run(circuit_spec(engine, task, keep)), atol=1e-4, rtol=1e-4
        )


def test_discover_command_learns_masks(tmp_path):
    out = tmp_path / "d"
    args = ["discover", "--model", "planted-induction", "--task", "induction", "--method", "ugs"]
    args += ["--k", "5", "--lam", "0.02", "--mask-steps", "60", "--n", "50", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert set(report["edges"]) == set(PLANTED_EDGES)
    assert report["method"] == "ugs" and len(report["details"]["curve"]["loss"]) == 60
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "ugs" and config["lam"] == 0.02 and config["mask_steps"] == 60
    metrics = json.loads((out / "metrics.json").read_text())  # MIB's CPR/CMD of the learned scores
    assert "cpr" in json.dumps(metrics).lower()
