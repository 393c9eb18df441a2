"""EAP-IG and clean-corrupted against a hand-written per-edge reference, the identities between the methods,
completeness, and planted circuits (one where plain EAP's clean-point gradient is saturated)."""

import pytest
import torch

from interplab.circuits import Ablation, DiscoveryTask, EdgeEngine, Spec
from interplab.circuits.circuit import faithfulness
from interplab.circuits.eap import EdgeScores, ScoreSign, attribute, clean_corrupted, eap, eap_ig
from interplab.circuits.graph import NodeKind, Slot
from interplab.circuits.planted import PLANTED_EDGES, planted_induction
from interplab.hooks.site import Site, SiteKind
from tests.circuits.discovery_tasks import planted_task, random_model, random_task


# ---- a hand-written reference: one forward + backward per point, one loop over edges ------------------------
def _senders(model, tokens):
    cfg = model.cfg
    names = [Site(SiteKind.EMBED).name, Site(SiteKind.POS_EMBED).name]
    for layer in range(cfg.n_layers):
        names += [Site(SiteKind.RESULT, layer).name]
        if cfg.has_mlp:
            names.append(Site(SiteKind.MLP_OUT, layer).name)
    names = [n for n in names if n in model.hook_registry]
    _, cache = model.run_with_cache(tokens, names)
    return {n: cache[n] for n in names}


def reference(model, task, points):
    """``points``: (site replaced or None, alpha); the site's output becomes alpha*clean + (1-alpha)*corrupt
    (a constant), the rest of the model runs on the clean input; gradients are averaged over the points."""
    cfg = model.cfg
    clean_tokens, corrupt_tokens = task.tokens[task.clean], task.tokens[task.corrupt]
    clean, corrupt = _senders(model, clean_tokens), _senders(model, corrupt_tokens)
    slot_sites = {Slot.Q: SiteKind.Q_INPUT, Slot.K: SiteKind.K_INPUT, Slot.V: SiteKind.V_INPUT}
    grad_names = [Site(k, layer).name for layer in range(cfg.n_layers) for k in slot_sites.values()]
    if cfg.has_mlp:
        grad_names += [Site(SiteKind.MLP_IN, layer).name for layer in range(cfg.n_layers)]
    grad_names.append(Site(SiteKind.RESID_POST, cfg.n_layers - 1).name)
    total = {n: 0.0 for n in grad_names}
    for site, alpha in points:
        grads = {}

        def keep(g, s, grads=grads):
            grads[s.name] = g.detach()

        def swap(act, s, alpha=alpha):
            return (alpha * clean[s.name] + (1 - alpha) * corrupt[s.name]).requires_grad_(True)

        fwd = [] if site is None else [(site, swap)]
        with torch.enable_grad(), model.hooks(fwd, [(n, keep) for n in grad_names]):
            task.metric(model(clean_tokens), task.clean).mean().backward()
        for n in grad_names:
            total[n] = total[n] + grads.get(n, 0.0)
    model.zero_grad(set_to_none=True)

    def output(values, node):
        if node.kind is NodeKind.EMBED:
            return values[Site(SiteKind.EMBED).name]
        if node.kind is NodeKind.POS_EMBED:
            return values[Site(SiteKind.POS_EMBED).name]
        if node.kind is NodeKind.HEAD:
            bias = model.blocks[node.layer].attn.b_O / cfg.n_heads
            return values[Site(SiteKind.RESULT, node.layer).name][:, :, node.head] + bias
        return values[Site(SiteKind.MLP_OUT, node.layer).name]

    graph = EdgeEngine(model, task.tokens).graph
    scores = []
    for e in graph.edges:
        r = e.receiver
        if r.kind is NodeKind.HEAD:
            g = total[Site(slot_sites[e.slot], r.layer).name][:, :, r.head]
        elif r.kind is NodeKind.MLP:
            g = total[Site(SiteKind.MLP_IN, r.layer).name]
        else:
            g = total[Site(SiteKind.RESID_POST, cfg.n_layers - 1).name]
        delta = output(corrupt, e.sender) - output(clean, e.sender)
        scores.append((delta * g).sum() / len(points))
    return torch.stack(scores)


def groups(cfg):
    out = [Site(SiteKind.EMBED).name]
    for layer in range(cfg.n_layers):
        out.append(Site(SiteKind.RESULT, layer).name)
        if cfg.has_mlp:
            out.append(Site(SiteKind.MLP_OUT, layer).name)
    return out


@pytest.mark.parametrize("batch_size", [64, 5])
def test_every_method_equals_the_hand_written_reference(batch_size):
    model, task = random_model(), random_task()
    embed = Site(SiteKind.EMBED).name
    m = 3
    cases = {
        "eap": (eap(model, task, batch_size=batch_size), [(None, 1.0)]),
        "inputs": (eap_ig(model, task, m, batch_size=batch_size), [(embed, k / m) for k in range(m)]),
        "activations": (
            eap_ig(model, task, m, variant="activations", batch_size=batch_size),
            [(g, k / m) for g in groups(model.cfg) for k in range(1, m + 1)],
        ),
    }
    for name, (scores, points) in cases.items():
        torch.testing.assert_close(
            scores.scores, reference(model, task, points), rtol=1e-4, atol=1e-6, msg=name
        )


def test_one_step_identities():
    model, task = random_model(), random_task()
    plain = eap(model, task)
    # the right-rule single point is the clean run: EAP exactly
    torch.testing.assert_close(
        eap_ig(model, task, 1, rule="right").scores, plain.scores, rtol=1e-5, atol=1e-7
    )
    # MIB's left rule puts its single point at the corrupted embedding; clean-corrupted averages both ends
    corrupted_point = eap_ig(model, task, 1)
    torch.testing.assert_close(
        clean_corrupted(model, task).scores, (plain.scores + corrupted_point.scores) / 2, rtol=1e-5, atol=1e-7
    )


def test_completeness_the_embedding_edges_sum_to_the_metric_difference():
    # IG along the embedding path: the edges out of `embed` carry all of it (pos_embed does not change)
    model, task = planted_induction(), planted_task(60)
    engine = EdgeEngine(model, task.tokens)
    full = task.metric(engine.run(Spec(task.clean)), task.clean).mean()
    corrupted = task.metric(engine.run(Spec(task.corrupt)), task.clean).mean()
    diff = float(corrupted - full)

    def embed_sum(steps, rule):
        s = eap_ig(model, task, steps, rule=rule, engine=engine)
        return sum(float(x) for e, x in zip(s.edges, s.scores, strict=True) if e.sender.name == "embed")

    errors = {m: abs(embed_sum(m, "left") - diff) for m in (4, 16, 64)}
    assert errors[64] < errors[16] < errors[4]  # the left Riemann sum converges like 1/m
    torch.testing.assert_close(embed_sum(64, "midpoint"), diff, rtol=0.01, atol=0.0)
    torch.testing.assert_close(embed_sum(64, "left"), diff, rtol=0.05, atol=0.0)


def test_eap_ig_ranks_the_planted_edges_first():
    model, task = planted_induction(), planted_task()
    for variant in ("inputs", "activations"):
        ranked = eap_ig(model, task, variant=variant).ranked()
        assert {name for name, _ in ranked[: len(PLANTED_EDGES)]} == set(PLANTED_EDGES), variant


def test_eap_ig_recovers_a_saturated_circuit_that_eap_misses():
    # sharp attention and a large copied logit: at the clean point the log-prob and the attention softmaxes are
    # saturated, so EAP's gradients of the K-composition edges are ~1e-22 and it ranks the noise head above them
    model, task = planted_induction(sharpness=30.0, out_scale=30.0), planted_task()
    engine = EdgeEngine(model, task.tokens)
    k = len(PLANTED_EDGES)
    found = {}
    for method in ("eap", "clean-corrupted", "eap-ig", "eap-ig-activations"):
        scores = attribute(model, task, method, engine=engine)
        top = {e.name for e in scores.top(k)}
        found[method] = (len(top & set(PLANTED_EDGES)), faithfulness(engine, task, scores.top(k)).fraction)
    assert found["eap"][0] < k and found["eap"][1] < 0.6
    for method in ("eap-ig", "eap-ig-activations"):
        assert found[method][0] == k
        torch.testing.assert_close(found[method][1], 1.0, atol=0.01, rtol=0)


def test_ablations_and_passes():
    model, base = random_model(), random_task()
    task = DiscoveryTask(
        name="zero", tokens=base.tokens, clean=base.clean, corrupt=Ablation.ZERO, metric=base.metric
    )
    assert eap(model, task).passes == {"forward": 1, "backward": 1}
    assert eap_ig(model, base, 5).passes == {"forward": 7, "backward": 5}  # + a clean and a corrupted forward
    n_groups = 1 + 2 * model.cfg.n_layers
    assert eap_ig(model, task, 2, variant="activations").passes == {  # + a clean forward (nothing to corrupt)
        "forward": 1 + 2 * n_groups,
        "backward": 2 * n_groups,
    }
    with pytest.raises(ValueError, match="variant='activations'"):
        eap_ig(model, task)
    with pytest.raises(ValueError, match="corrupted rows"):
        clean_corrupted(model, task)
    with pytest.raises(ValueError, match="valid: eap, eap-ig"):
        attribute(model, base, "eap-igg")
    with pytest.raises(ValueError, match="steps must be >= 1"):
        eap_ig(model, base, 0)
    with pytest.raises(ValueError, match="unknown rule"):
        eap_ig(model, base, rule="simpson")  # type: ignore[arg-type]


def test_zero_ablation_activations_one_step_matches_the_reference_with_bias_shares():
    model, base = random_model(), random_task()
    task = DiscoveryTask(
        name="zero", tokens=base.tokens, clean=base.clean, corrupt=Ablation.ZERO, metric=base.metric
    )
    scores = eap(model, task)
    # zero-ablating a head removes its bias share too: its delta is -(result + b_O / n_heads)
    engine = EdgeEngine(model, task.tokens)
    head = engine.graph.node("a0.1")
    edge = engine.graph.edge("a0.1->logits")
    g_final = _final_grad(model, task)
    expected = float((-engine.clean_output(head, task.clean) * g_final).sum())
    torch.testing.assert_close(scores.by_name()[edge.name], expected, rtol=1e-4, atol=1e-6)


def _final_grad(model, task):
    grads = {}
    name = Site(SiteKind.RESID_POST, model.cfg.n_layers - 1).name
    with torch.enable_grad(), model.hooks([], [(name, lambda g, s: grads.__setitem__("g", g.detach()))]):
        task.metric(model(task.tokens[task.clean]), task.clean).mean().backward()
    model.zero_grad(set_to_none=True)
    return grads["g"]


def test_no_parameter_gradients_are_left_behind():
    model, task = random_model(), random_task()
    eap_ig(model, task, 2)
    eap_ig(model, task, 2, variant="activations")
    assert all(p.grad is None for p in model.parameters())


def test_edge_scores_rankings():
    model, task = random_model(), random_task()
    s = eap(model, task)
    assert s.method == "eap" and s.sign is ScoreSign.EFFECT
    signed = s.order(absolute=False)
    assert torch.equal(signed, torch.argsort(-s.scores, descending=True, stable=True))
    mask = EdgeScores(s.edges, s.scores.abs(), {}, method="mask", sign=ScoreSign.IMPORTANCE)
    assert torch.equal(mask.order(absolute=False), mask.order())
    with pytest.raises(ValueError, match="one score per edge"):
        EdgeScores(s.edges, s.scores[:3], {})


def test_paren_balancer_eap_ig_beats_eap(shared_dir):
    # the published paren model is so confident that EAP's gradients are tiny (docs/circuits.md: 29% top-12,
    # 17.6% before issue 15's padding semantics; EAP-IG 52%)
    from interplab.cli.scrub import load_any_model
    from interplab.scrub.tasks import build_task, discovery_task

    data = shared_dir / "fixtures" / "paren_balancer"
    model = load_any_model(None, "parens", data)
    task = discovery_task(build_task("parens", model, data=data), 200)
    engine = task.engine(model)
    plain = faithfulness(engine, task, eap(model, task, engine=engine).top(12)).fraction
    ig = faithfulness(engine, task, eap_ig(model, task, engine=engine).top(12)).fraction
    torch.testing.assert_close(plain, 0.291, atol=0.01, rtol=0)
    torch.testing.assert_close(ig, 0.522, atol=0.01, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [dict(n_kv_heads=2), dict(post_norms=True, normalization="rmsnorm")],
    ids=["gqa", "post_norms"],
)
def test_grouped_query_and_post_norm_models(overrides):
    # one right-rule step is EAP's clean point on these architectures too, and completeness holds
    model, task = random_model(**overrides), random_task()
    plain = eap(model, task)
    torch.testing.assert_close(
        eap_ig(model, task, 1, rule="right").scores, plain.scores, rtol=1e-5, atol=1e-7
    )
    engine = EdgeEngine(model, task.tokens)
    diff = float(
        task.metric(engine.run(Spec(task.corrupt)), task.clean).mean()
        - task.metric(engine.run(Spec(task.clean)), task.clean).mean()
    )
    s = eap_ig(model, task, 32, rule="midpoint", engine=engine)
    total = sum(float(x) for e, x in zip(s.edges, s.scores, strict=True) if e.sender.name == "embed")
    torch.testing.assert_close(total, diff, rtol=0.02, atol=1e-6)
    assert torch.isfinite(eap_ig(model, task, 2, variant="activations").scores).all()
