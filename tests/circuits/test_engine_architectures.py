"""The edge engine, path patching, scrubbing and EAP on every family `load_model` reads (issue 15 item 9):
tiny random `transformers` models (GPT-2, NeoX parallel, Llama with grouped-query and multi-query attention,
Gemma-2 with post-norms), saved locally and loaded offline, checked against the model, `transformers` and
hand-written hook computations.

The semantics checked (docs/circuits.md, "Edges"): under grouped-query attention every query head has its own
q, k and v input, its keys made with its group's shared weights, so an edge into ``a1.2.k`` changes head 1.2
alone; under post-norms what a receiver reads from layer l's attention is ``ln1_post(sum of the heads, each as
its edge carries it)``."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.testing import assert_close

from interplab import load_model
from interplab.circuits import (
    DiscoveryTask,
    EdgeEngine,
    Spec,
    acdc,
    eap,
    eap_circuit,
    patch_edges,
    path_patch,
)
from interplab.circuits.circuit import faithfulness
from interplab.circuits.engine import Ablation
from interplab.circuits.split import kv_per_query_head
from interplab.scrub import Claim, Hypothesis, ScrubConfig, ScrubTask, scrub
from tests.model.test_load_hf import _make as make_hf

FAMILIES = [
    "gpt2",
    "neox-parallel-partial-rotary",
    "llama-gqa-theta",
    "llama-mqa-tied-head-dim",
    "gemma2-sliding",
]
ROWS, POS = 8, 10
A, B = torch.arange(4), torch.arange(4, 8)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """family -> (interplab model, transformers model, tokens), built once."""
    out = {}
    for family in FAMILIES:
        hf = make_hf(family)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():  # far from transformers' small init, so every edge matters
            for p in hf.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.3, generator=gen)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        tokens = torch.randint(
            0, hf.config.vocab_size, (ROWS, POS), generator=torch.Generator().manual_seed(7)
        )
        out[family] = (load_model(folder), hf, tokens)
    return out


def forward(model, tokens: Tensor, hooks=()) -> Tensor:
    with torch.no_grad():
        return model.run_with_hooks(tokens, list(hooks))


# ---- hand-written references: hooks on the model itself --------------------------------------------------------
def _rms(norm, x: Tensor) -> Tensor:
    """Gemma-2's RMSNorm written out (the converted weight already holds its 1 + w)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.w


def slot_change(model, tokens: Tensor, head_deltas: dict[tuple[int, int], Tensor]) -> dict[int, Tensor]:
    """layer -> the change of the residual stream a receiver reads when the heads' outputs change by
    ``head_deltas`` ((layer, head) -> [batch pos d_model]): the plain sum, or with post-norms
    ``ln1_post(attention output before the norm + the layer's changes) - hook_attn_out``."""
    cfg = model.cfg
    out: dict[int, Tensor] = {}
    for (layer, _), delta in head_deltas.items():
        out[layer] = out[layer] + delta if layer in out else delta
    if not cfg.post_norms:
        return out
    names = [f"blocks.{layer}.attn.hook_result" for layer in out] + [
        f"blocks.{layer}.hook_attn_out" for layer in out
    ]
    _, cache = model.run_with_cache(tokens, names)
    for layer, delta in out.items():
        block = model.blocks[layer]
        pre = cache[f"blocks.{layer}.attn.hook_result"].sum(2) + block.attn.b_O
        out[layer] = _rms(block.ln1_post, pre + delta) - cache[f"blocks.{layer}.hook_attn_out"]
    return out


def hand_patched(model, tokens: Tensor, receiver: str, change: Tensor) -> Tensor:
    """Logits when ``receiver`` (``a1.2.k``, ``m1``, ``logits``) alone reads its input plus ``change``, everything
    downstream recomputed. A query head's own q input is ``hook_q_input``; its k or v input under grouped-query
    attention is not a hook of the model (the group shares it), so: one run with the group's k (v) input changed
    gives the head's z (which reads nothing else of the group), a second run puts that z into the clean model."""
    cfg = model.cfg
    if receiver == "logits":
        return forward(
            model, tokens, [(f"blocks.{cfg.n_layers - 1}.hook_resid_post", lambda x, s: x + change)]
        )
    if receiver.startswith("m"):
        return forward(model, tokens, [(f"blocks.{int(receiver[1:])}.hook_mlp_in", lambda x, s: x + change)])
    name, slot = receiver.rsplit(".", 1)
    layer, head = (int(i) for i in name[1:].split("."))

    def add_to(copy: int):
        def hook(x, site):
            x = x.clone()
            x[:, :, copy] += change
            return x

        return hook

    if slot == "q":
        return forward(model, tokens, [(f"blocks.{layer}.hook_q_input", add_to(head))])
    _, cache = model.run_with_cache(
        tokens,
        [f"blocks.{layer}.attn.hook_z"],
        fwd_hooks=[(f"blocks.{layer}.hook_{slot}_input", add_to(head // cfg.n_groups))],
    )
    z_head = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]

    def put_z(z, site):
        z = z.clone()
        z[:, :, head] = z_head
        return z

    return forward(model, tokens, [(f"blocks.{layer}.attn.hook_z", put_z)])


def head_result(model, tokens: Tensor, layer: int, head: int) -> Tensor:
    _, cache = model.run_with_cache(tokens, [f"blocks.{layer}.attn.hook_result"])
    return cache[f"blocks.{layer}.attn.hook_result"][:, :, head]


def mlp_receiver(model, layer: int) -> str:
    """An MLP that reads heads of ``layer`` (the next layer's under parallel attention and MLP)."""
    return f"m{layer + 1 if model.cfg.parallel_attn_mlp else layer}"


# ---- the engine ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_the_clean_engine_is_the_model_and_transformers(loaded, family):
    model, hf, tokens = loaded[family]
    engine = EdgeEngine(model, tokens, batch_size=3)
    got = engine.run(Spec(torch.arange(ROWS)))
    assert_close(got, forward(model, tokens), atol=0, rtol=0)
    with torch.no_grad():
        assert_close(got, hf(tokens).logits, atol=1e-4, rtol=1e-4)
    # every edge recomputed from the same input, and every edge from another input
    every_a = {e: Spec(A) for e in engine.graph.edges}
    assert_close(
        engine.run(Spec(A, every_a, propagate=True)), forward(model, tokens[A]), atol=1e-5, rtol=1e-5
    )
    every_b = {e: Spec(B) for e in engine.graph.edges}
    assert_close(
        engine.run(Spec(A, every_b, propagate=True)), forward(model, tokens[B]), atol=1e-5, rtol=1e-5
    )
    into_logits = {e: Spec(B) for e in engine.graph.edges_into(engine.graph.logits)}
    assert_close(engine.run(Spec(A, into_logits)), forward(model, tokens[B]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("receiver", ["a1.2.k", "a1.3.v", "a1.2.q", "mlp", "logits"])
@pytest.mark.parametrize("family", FAMILIES)
def test_an_edge_patch_equals_hooks_replacing_that_input(loaded, family, receiver):
    model, _, tokens = loaded[family]
    engine = EdgeEngine(model, tokens)
    sender = (1, 0) if receiver == "logits" else (0, 1)
    receiver = mlp_receiver(model, 0) if receiver == "mlp" else receiver
    edge = f"a{sender[0]}.{sender[1]}->{receiver}"
    got = patch_edges(engine, A, {edge: B})
    delta = head_result(model, tokens[B], *sender) - head_result(model, tokens[A], *sender)
    change = slot_change(model, tokens[A], {sender: delta})[sender[0]]
    expected = hand_patched(model, tokens[A], receiver, change)
    assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (got - forward(model, tokens[A])).abs().max() > 1e-3, "the patch changed nothing"
    # the same edge as a path patch from the sender to the receiver's input
    assert_close(path_patch(engine, A, B, [edge.split("->")[0]], [receiver]), got, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_heads_of_a_layer_meet_inside_its_post_norm(loaded, family):
    """Three senders of one layer into one slot: their changes are summed before the post-norm (with
    post-norms; a plain sum otherwise); zero-ablating a head removes its term inside the norm, mean-ablating
    puts its mean (before the norm) there."""
    model, _, tokens = loaded[family]
    engine = EdgeEngine(model, tokens)
    patches = {
        "a0.1->a1.2.k": B,
        "a0.2->a1.2.k": Ablation.ZERO,
        "a0.3->a1.2.k": Ablation.MEAN,
        "embed->a1.2.k": B,
    }
    got = patch_edges(engine, A, patches)
    b_o = model.blocks[0].attn.b_O / model.cfg.n_heads
    mean_3 = head_result(model, tokens, 0, 3).mean(0) + b_o  # over the engine's whole data set
    deltas = {
        (0, 1): head_result(model, tokens[B], 0, 1) - head_result(model, tokens[A], 0, 1),
        (0, 2): -(head_result(model, tokens[A], 0, 2) + b_o),
        (0, 3): mean_3 - (head_result(model, tokens[A], 0, 3) + b_o),
    }
    change = slot_change(model, tokens[A], deltas)[0]
    _, ca = model.run_with_cache(tokens[A], ["hook_embed"])
    _, cb = model.run_with_cache(tokens[B], ["hook_embed"])
    change = change + cb["hook_embed"] - ca["hook_embed"]
    assert_close(got, hand_patched(model, tokens[A], "a1.2.k", change), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama-gqa-theta", "llama-mqa-tied-head-dim", "gemma2-sliding"])
def test_patching_one_heads_key_leaves_the_rest_of_its_group(loaded, family):
    model, _, tokens = loaded[family]
    engine = EdgeEngine(model, tokens)
    g = model.cfg.n_groups
    assert g > 1
    spec = Spec(A, {engine.graph.edge("a0.1->a1.2.k"): Spec(B), engine.graph.edge("m0->a1.2.v"): Spec(B)})
    group = [h for h in range(model.cfg.n_heads) if h // g == 2 // g]
    assert len(group) > 1
    for h in range(model.cfg.n_heads):
        out = engine.run(spec, node=f"a1.{h}")
        clean = engine.clean_output(engine.graph.node(f"a1.{h}"), A)
        if h == 2:
            assert (out - clean).abs().max() > 1e-3
        else:
            assert_close(out, clean, atol=1e-6, rtol=1e-6, msg=f"head 1.{h} of the group changed")


def test_kv_per_query_head_is_the_same_model(loaded):
    model, _, tokens = loaded["gemma2-sliding"]
    split = kv_per_query_head(model)
    assert (
        split.cfg.n_kv_heads == model.cfg.n_heads and split.blocks[0].attn.W_K.shape[0] == model.cfg.n_heads
    )
    assert split.embed.W_E.data_ptr() == model.embed.W_E.data_ptr()  # shared, not copied
    assert_close(forward(split, tokens), forward(model, tokens), atol=1e-6, rtol=1e-6)
    gpt2 = loaded["gpt2"][0]
    assert kv_per_query_head(gpt2) is gpt2


# ---- scrubbing and EAP end to end ------------------------------------------------------------------------------
def _last_token(tokens: Tensor) -> Tensor:
    return tokens[:, -1] % 2


@pytest.mark.parametrize("family", FAMILIES)
def test_a_scrub_hypothesis_runs_on_every_family(loaded, family):
    model, _, tokens = loaded[family]
    tokens = torch.randint(0, model.cfg.d_vocab, (64, POS), generator=torch.Generator().manual_seed(1))
    labels = tokens[:, -1]

    def loss(logits: Tensor, rows: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits[:, -1].float(), labels[rows], reduction="none")

    task = ScrubTask(name="copy", tokens=tokens, loss=loss)
    cfg = ScrubConfig(n_examples=32, n_seeds=1, per_claim=False, batch_size=16)
    trivial = scrub(model, task, Hypothesis.trivial(), cfg)
    assert trivial.loss_scrubbed.mean == pytest.approx(trivial.loss_original.mean, rel=1e-5)
    claimed = Hypothesis(
        Claim("logits", children=[Claim("a1.2", _last_token, children=[Claim("a1.2.k", _last_token)])]),
        name="one head",
    )
    r = scrub(model, task, claimed, cfg)
    assert torch.isfinite(torch.tensor(r.loss_scrubbed.mean))
    assert r.loss_scrubbed.mean != trivial.loss_scrubbed.mean


def _metric(logits: Tensor, rows: Tensor) -> Tensor:
    return logits[:, -1, 3] - logits[:, -1, 5]


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_scores_are_the_derivative_of_the_hand_patched_metric(loaded, family):
    """EAP's score of an edge is d metric / dt with the edge carrying clean + t (corrupt - clean), at t = 0
    (the mean over the batch): checked against central differences of the hand-written hook computation, in
    float64, for edges into a grouped key, a value, a query, an MLP and the logits."""
    model, _, tokens = loaded[family]
    model = model.double()
    try:
        task = DiscoveryTask(name="t", tokens=tokens, clean=A, corrupt=B, metric=_metric)
        scores = eap(model, task)
        by_name = dict(zip([e.name for e in scores.edges], scores.scores.tolist(), strict=True))
        eps = 1e-4
        for sender, receiver in [
            ((0, 1), "a1.2.k"),
            ((0, 3), "a1.1.v"),
            ((0, 0), "a1.3.q"),
            ((0, 2), mlp_receiver(model, 0)),
            ((1, 1), "logits"),
        ]:
            delta = head_result(model, tokens[B], *sender) - head_result(model, tokens[A], *sender)
            values = []
            for t in (eps, -eps):
                change = slot_change(model, tokens[A], {sender: t * delta})[sender[0]]
                values.append(_metric(hand_patched(model, tokens[A], receiver, change), A).mean())
            derivative = float((values[0] - values[1]) / (2 * eps))
            name = f"a{sender[0]}.{sender[1]}->{receiver}"
            assert by_name[name] == pytest.approx(derivative, rel=1e-5, abs=1e-8), name
    finally:
        model.float()


@pytest.mark.parametrize("family", ["llama-mqa-tied-head-dim", "gemma2-sliding"])
def test_acdc_and_the_eap_circuit_run(loaded, family):
    """ACDC's patched runs and a circuit's faithfulness go through the engine: with every edge kept the
    circuit is the model, with none it is the corrupted model."""
    model, _, tokens = loaded[family]
    task = DiscoveryTask(name="t", tokens=tokens, clean=A, corrupt=B, metric=_metric)
    circuit = acdc(model, task, threshold=0.5)
    assert 0 < len(circuit.edges) < circuit.n_edges_total
    top = eap_circuit(model, task, k=10)
    assert len(top.edges) == 10
    engine = task.engine(model)
    everything = faithfulness(engine, task, set(engine.graph.edges))
    assert everything.metric_circuit == pytest.approx(everything.metric_full, abs=1e-5)
    nothing = faithfulness(engine, task, set())  # every edge corrupted: the model on the corrupted inputs
    on_b = float(_metric(forward(model, tokens[B]), A).mean())
    assert nothing.metric_circuit == pytest.approx(on_b, abs=1e-4)


@pytest.mark.parametrize("family", ["llama-gqa-theta", "gemma2-sliding"])
def test_an_edge_split_by_position_patches_only_there(loaded, family):
    model, _, tokens = loaded[family]
    engine = EdgeEngine(model, tokens)
    got = patch_edges(engine, A, {"a0.1->a1.2.k@3,5": B})
    delta = head_result(model, tokens[B], 0, 1) - head_result(model, tokens[A], 0, 1)
    keep = torch.zeros(POS, 1, dtype=torch.bool)
    keep[[3, 5]] = True
    change = slot_change(model, tokens[A], {(0, 1): delta * keep})[0]
    assert_close(got, hand_patched(model, tokens[A], "a1.2.k", change), atol=1e-5, rtol=1e-5)
