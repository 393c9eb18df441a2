"""The edge engine against ordinary forward passes and hand-written hook computations."""

import pytest
import torch

from interplab.circuits.engine import Ablation, AtPositions, EdgeEngine, Spec
from interplab.circuits.graph import ComponentGraph
from interplab.circuits.patching import patch_edges, path_patch
from interplab.model import ModelConfig, Transformer

VARIANTS = {
    "mlp-learned-ln": dict(),
    "attn-only-rotary-smear": dict(attn_only=True, positional="rotary", smear_keys=True),
    "parallel-rms": dict(parallel_attn_mlp=True, normalization="rmsnorm"),
    "bidirectional": dict(causal=False),
    "gqa-rotary-smear": dict(n_kv_heads=2, positional="rotary", smear_keys=True),
    "mqa-post-norms-bidirectional": dict(
        n_kv_heads=1, post_norms=True, normalization="rmsnorm", causal=False
    ),
    "qk-norm-rotary-bases": dict(
        n_kv_heads=2, positional="rotary", normalization="rmsnorm", qk_norm="head", rotary_bases=(10.0, 1e4)
    ),
    "olmo-no-pre-norms": dict(
        positional="rotary", normalization="rmsnorm", qk_norm="full", pre_norms=False, post_norms=True
    ),
}


def make_model(**kw) -> Transformer:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=16, d_mlp=64, init_range=0.2, **kw)
    return Transformer(cfg)


def forward(model, tokens, mask=None):
    with torch.no_grad():
        return model(tokens, attention_mask=mask)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_edge_from_the_same_input_is_the_ordinary_forward(variant):
    model = make_model(**VARIANTS[variant])
    tokens = torch.randint(0, 50, (12, 10))
    engine = EdgeEngine(model, tokens, batch_size=5)
    a = torch.arange(6)
    every = {e: Spec(a) for e in engine.graph.edges}
    torch.testing.assert_close(engine.run(Spec(a, every)), forward(model, tokens[a]))
    torch.testing.assert_close(engine.run(Spec(a, every, propagate=True)), forward(model, tokens[a]))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_edge_from_b_is_the_forward_on_b(variant):
    model = make_model(**VARIANTS[variant])
    tokens = torch.randint(0, 50, (12, 10))
    engine = EdgeEngine(model, tokens)
    a, b = torch.arange(6), torch.arange(6, 12)
    every = {e: Spec(b) for e in engine.graph.edges}
    expected = forward(model, tokens[b])
    torch.testing.assert_close(engine.run(Spec(a, every, propagate=True)), expected, atol=1e-4, rtol=1e-4)
    # treeified: only the logits' edges need to come from b
    into_logits = {e: Spec(b) for e in engine.graph.edges_into(engine.graph.logits)}
    torch.testing.assert_close(engine.run(Spec(a, into_logits)), expected, atol=1e-4, rtol=1e-4)


def test_padding_masks_follow_the_input():
    model = make_model(causal=False)
    tokens = torch.randint(0, 50, (8, 10))
    mask = torch.ones(8, 10, dtype=torch.long)
    mask[::2, 7:] = 0
    engine = EdgeEngine(model, tokens, mask)
    a, b = torch.arange(4), torch.arange(4, 8)
    every = {e: Spec(b) for e in engine.graph.edges}
    got = engine.run(Spec(a, every, propagate=True))
    torch.testing.assert_close(got[:, :7], forward(model, tokens[b], mask[b])[:, :7], atol=1e-4, rtol=1e-4)


def test_examples_may_have_different_assignments():
    model = make_model()
    tokens = torch.randint(0, 50, (10, 8))
    engine = EdgeEngine(model, tokens)
    base = torch.tensor([0, 1, 2, 3])
    src = torch.tensor([5, 1, 7, 3])  # examples 1 and 3 patched from themselves: unchanged
    logits = patch_edges(engine, base, {"a0.2->a1.3.k": src, "m0->logits": src})
    looped = torch.cat(
        [
            patch_edges(
                engine, base[i : i + 1], {"a0.2->a1.3.k": src[i : i + 1], "m0->logits": src[i : i + 1]}
            )
            for i in range(4)
        ]
    )
    torch.testing.assert_close(logits, looped)
    torch.testing.assert_close(logits[[1, 3]], forward(model, tokens[[1, 3]]))
    assert not torch.allclose(logits[0], forward(model, tokens[0:1])[0])


def _hand_path_patch(model, tok_a, tok_b, via_mlp: bool):
    """a0.1 -> a1.2.k (or a0.1 -> m0 -> a1.2.k) with plain hooks."""
    _, ca = model.run_with_cache(
        tok_a, ["blocks.0.attn.hook_result", "blocks.0.hook_mlp_out", "blocks.0.hook_resid_mid"]
    )
    _, cb = model.run_with_cache(tok_b, ["blocks.0.attn.hook_result"])
    delta = cb["blocks.0.attn.hook_result"][:, :, 1] - ca["blocks.0.attn.hook_result"][:, :, 1]
    if via_mlp:
        block = model.blocks[0]
        with torch.no_grad():
            mlp_new = block.mlp(block.ln2(ca["blocks.0.hook_resid_mid"] + delta))
        delta = mlp_new - ca["blocks.0.hook_mlp_out"]

    def hook(x, site):
        x = x.clone()
        x[:, :, 2] += delta
        return x

    return forward_hooked(model, tok_a, [("blocks.1.hook_k_input", hook)])


def forward_hooked(model, tokens, hooks):
    with torch.no_grad():
        return model.run_with_hooks(tokens, hooks)


@pytest.mark.parametrize("via_mlp", [False, True])
def test_path_patching_equals_a_hand_written_hook_computation(via_mlp):
    model = make_model()
    tokens = torch.randint(0, 50, (10, 8))
    engine = EdgeEngine(model, tokens)
    a, b = torch.arange(5), torch.arange(5, 10)
    via = [["m0"]] if via_mlp else []
    got = path_patch(engine, a, b, ["a0.1"], ["a1.2.k"], via=via)
    expected = _hand_path_patch(model, tokens[a], tokens[b], via_mlp)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - forward(model, tokens[a])).abs().max() > 1e-3  # the patch did something


def test_zero_ablating_every_head_of_a_layer_zeroes_attn_out():
    model = make_model()
    tokens = torch.randint(0, 50, (6, 8))
    engine = EdgeEngine(model, tokens)
    a = torch.arange(6)
    heads = [n for n in engine.graph.nodes if n.name.startswith("a0.")]
    patches = {e: Ablation.ZERO for e in engine.graph.edges if e.sender in heads}

    def zero(x, site):
        return torch.zeros_like(x)

    expected = forward_hooked(model, tokens, [("blocks.0.hook_attn_out", zero)])
    torch.testing.assert_close(engine.run(Spec(a, patches, propagate=True)), expected, atol=1e-5, rtol=1e-5)


def test_mean_ablation_uses_the_data_set_mean():
    model = make_model()
    tokens = torch.randint(0, 50, (6, 8))
    engine = EdgeEngine(model, tokens)
    _, cache = model.run_with_cache(tokens, ["blocks.1.hook_mlp_out"])
    mean = cache["blocks.1.hook_mlp_out"].mean(0)

    def hook(x, site):
        return mean.expand_as(x)

    expected = forward_hooked(model, tokens, [("blocks.1.hook_mlp_out", hook)])
    got = patch_edges(engine, torch.arange(6), {"m1->logits": Ablation.MEAN})
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_clean_forwards_are_computed_once_per_row():
    model = make_model()
    tokens = torch.randint(0, 50, (10, 8))
    engine = EdgeEngine(model, tokens)
    a = torch.tensor([0, 1, 2, 0, 1, 2])
    engine.run(Spec(a, {engine.graph.edge("a0.0->logits"): Spec(torch.tensor([3, 3, 3, 4, 4, 4]))}))
    engine.run(Spec(a[:3]))
    assert engine.stats.clean_examples == 5


def test_graph_names_and_errors():
    graph = ComponentGraph(make_model().cfg)
    assert graph.edge("a0.1->a1.2.k").name == "a0.1->a1.2.k"
    assert len(graph.edges_into(graph.node("logits"))) == 2 + 8 + 2
    with pytest.raises(ValueError, match="a9.0"):
        graph.node("a9.0")
    with pytest.raises(ValueError, match="does not write before"):
        graph.edge("a1.0->a0.1.q")
    with pytest.raises(ValueError, match="three inputs"):
        graph.slot("a1.0")
    heads_parallel = ComponentGraph(make_model(parallel_attn_mlp=True).cfg)
    assert "a1.0" not in [s.name for s in heads_parallel.senders(heads_parallel.node("m1"))]


def test_edges_split_by_position_equal_a_hook_on_that_position():
    model = make_model()
    tokens = torch.randint(0, 50, (10, 8))
    engine = EdgeEngine(model, tokens)
    a, b = torch.arange(5), torch.arange(5, 10)
    got = patch_edges(engine, a, {"a0.1->a1.2.k@3,5": b, "m1->logits@7": Ablation.ZERO})
    _, ca = model.run_with_cache(tokens[a], ["blocks.0.attn.hook_result"])
    _, cb = model.run_with_cache(tokens[b], ["blocks.0.attn.hook_result"])
    delta = cb["blocks.0.attn.hook_result"][:, :, 1] - ca["blocks.0.attn.hook_result"][:, :, 1]

    def k_hook(x, site):
        x = x.clone()
        x[:, [3, 5], 2] += delta[:, [3, 5]]
        return x

    def mlp_hook(x, site):
        x = x.clone()
        x[:, 7] = 0
        return x

    expected = forward_hooked(
        model, tokens[a], [("blocks.1.hook_k_input", k_hook), ("blocks.1.hook_mlp_out", mlp_hook)]
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="integers"):
        patch_edges(engine, a, {"m1->logits@x": b})


def test_a_position_patch_of_another_batch_is_refused_naming_both_batches():
    """The check reads the batch of the Spec inside AtPositions (it used to raise AttributeError instead)."""
    edge = ComponentGraph.from_model(make_model()).edges[0]
    inner = Spec(torch.arange(3))
    with pytest.raises(ValueError, match=r"has batch \(3,\), the spec has \(4,\)"):
        Spec(torch.arange(4), {edge: AtPositions(inner, torch.tensor([0]))})
