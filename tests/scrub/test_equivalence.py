"""The hypothesis compiler against hand-written hook computations: position claims, node-level claims (one
datum on every path), rewrites and mask claims give the logits that plain model hooks give, on three
architectures, for data rows fixed per claim (``CompiledHypothesis.spec(data=...)``).

The references never touch the engine: each is the treeified model written out with `run_with_hooks` and
`run_with_cache` (a head recomputed from given q/k/v inputs under a given input's mask, an MLP from a given
input, the unembedding from a given final residual stream)."""

import pytest
import torch

from interplab.circuits.engine import EdgeEngine
from interplab.model import ModelConfig, Transformer
from interplab.scrub import Claim, Hypothesis, Rewrite, compile_hypothesis

ARCHS = {
    "gpt2": dict(act_fn="gelu"),
    "llama": dict(
        normalization="rmsnorm",
        positional="rotary",
        gated_mlp=True,
        act_fn="silu",
        attn_bias=False,
        mlp_bias=False,
    ),
    "neox-parallel": dict(parallel_attn_mlp=True, positional="rotary", rotary_dim=8),
}
N_ROWS, N_POS, BATCH = 48, 8, 6


def make(arch: str):
    torch.manual_seed(0)
    cfg = ModelConfig(
        d_model=32, n_layers=2, n_heads=2, d_vocab=20, n_ctx=12, d_mlp=48, init_range=0.3, **ARCHS[arch]
    )
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, 20, (N_ROWS, N_POS))
    lengths = torch.randint(5, N_POS + 1, (N_ROWS,))
    mask = (torch.arange(N_POS)[None] < lengths[:, None]).long()  # right padding, its own length per row
    return model, tokens, mask


class Hand:
    """The model's pieces through its hook points only."""

    def __init__(self, model: Transformer, tokens, mask):
        self.model, self.tokens, self.mask = model, tokens, mask
        self.cfg = model.cfg
        self._acts = {}

    def acts(self, rows):
        key = tuple(rows.tolist())
        if key not in self._acts:
            self._acts[key] = self._run(rows)
        return self._acts[key]

    def _run(self, rows):
        names = ["hook_embed", "hook_pos_embed"]
        for layer in range(self.cfg.n_layers):
            names += [f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.attn.hook_result"]
            names += [f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.hook_resid_post"]
            names.append(f"blocks.{layer}.hook_mlp_in")
        names = [n for n in names if n in self.model.hook_registry]
        _, cache = self.model.run_with_cache(self.tokens[rows], names, attention_mask=self.mask[rows])
        return cache

    def embed(self, rows):
        return self.acts(rows)["hook_embed"]

    def resid_pre(self, layer, rows):
        return self.acts(rows)[f"blocks.{layer}.hook_resid_pre"]

    def final(self, rows):
        return self.acts(rows)[f"blocks.{self.cfg.n_layers - 1}.hook_resid_post"]

    def head_out(self, layer, head, rows):
        b_o = self.model.blocks[layer].attn.b_O / self.cfg.n_heads
        return self.acts(rows)[f"blocks.{layer}.attn.hook_result"][:, :, head] + b_o

    def mlp_out(self, layer, rows):
        return self.acts(rows)[f"blocks.{layer}.hook_mlp_out"]

    def head(self, layer, head, q, k, v, mask_rows):
        """Head ``layer.head`` reading residual streams q, k, v [b p d], mask and positions of ``mask_rows``."""
        got = {}

        def put(x, site, value):
            x = x.clone()
            x[:, :, head] = value
            return x

        hooks = [
            (f"blocks.{layer}.hook_{s}_input", lambda x, site, value=value: put(x, site, value))
            for s, value in (("q", q), ("k", k), ("v", v))
        ]
        hooks.append((f"blocks.{layer}.attn.hook_result", lambda x, site: got.setdefault("r", x)))
        with torch.no_grad():
            self.model.run_with_hooks(self.tokens[mask_rows], hooks, attention_mask=self.mask[mask_rows])
        return got["r"][:, :, head] + self.model.blocks[layer].attn.b_O / self.cfg.n_heads

    def mlp(self, layer, x, rows):
        got = {}
        hooks = [
            (f"blocks.{layer}.hook_mlp_in", lambda h, site: x),
            (f"blocks.{layer}.hook_mlp_out", lambda h, site: got.setdefault("o", h)),
        ]
        with torch.no_grad():
            self.model.run_with_hooks(self.tokens[rows], hooks, attention_mask=self.mask[rows])
        return got["o"]

    def unembed(self, resid, rows):
        last = f"blocks.{self.cfg.n_layers - 1}.hook_resid_post"
        with torch.no_grad():
            return self.model.run_with_hooks(
                self.tokens[rows], [(last, lambda x, site: resid)], attention_mask=self.mask[rows]
            )


def rows_for(keys, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randint(0, N_ROWS, (BATCH,), generator=gen) for k in keys}


def run(model, tokens, mask, root, data, same=()):
    engine = EdgeEngine(model, tokens, mask)
    compiled = compile_hypothesis(engine, Hypothesis(root))
    refs = torch.arange(BATCH)
    record = {}
    spec = compiled.spec(refs, torch.Generator().manual_seed(0), data=data, record=record)
    # the test fixed every datum the hypothesis draws (others="same": the claim's own datum)
    assert set(record) - {"logits"} == set(data) | {f"{p} (others)" for p in same}
    for p in same:
        assert torch.equal(record[f"{p} (others)"], record[p])
    return engine.run(spec), refs


def check(got, expected, refs, hand):
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    clean = hand.unembed(hand.final(refs), refs)
    assert (got - clean).abs().max() > 1e-3  # the hypothesis changed something


@pytest.mark.parametrize("arch", list(ARCHS))
def test_position_claims_equal_hooks_at_those_positions(arch):
    model, tokens, mask = make(arch)
    hand = Hand(model, tokens, mask)
    root = Claim(
        "logits",
        children=[
            Claim("a1.0", children=[Claim("a1.0.in@2"), Claim("a1.0.q@[4..5]")]),
            Claim("a0.1", positions=3),
        ],
    )
    keys = ["logits (others)", "logits/a1.0 (others)", "logits/a1.0/a1.0.in@2", "logits/a1.0/a1.0.q@[4..5]"]
    data = rows_for(keys + ["logits/a0.1@3"])
    # a1.0's own datum only conditions its children's: the head runs on its other-inputs datum
    data["logits/a1.0"] = torch.arange(BATCH) + 20
    got, refs = run(model, tokens, mask, root, data)
    o0, o1 = data["logits (others)"], data["logits/a1.0 (others)"]
    d2, d3, d4 = data["logits/a1.0/a1.0.in@2"], data["logits/a1.0/a1.0.q@[4..5]"], data["logits/a0.1@3"]
    kv = hand.resid_pre(1, o1).clone()
    kv[:, 2] = hand.resid_pre(1, d2)[:, 2]
    q = kv.clone()
    q[:, 4:6] = hand.resid_pre(1, d3)[:, 4:6]
    a10 = hand.head(1, 0, q, kv, kv, o1)
    resid = hand.final(o0) + a10 - hand.head_out(1, 0, o0)
    resid[:, 3] += hand.head_out(0, 1, d4)[:, 3] - hand.head_out(0, 1, o0)[:, 3]
    check(got, hand.unembed(resid, o0), refs, hand)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("head_everywhere", [False, True])
def test_a_node_claim_feeds_every_path_from_one_datum(arch, head_everywhere):
    """REMIX 2a's shape. ``head_everywhere``: a0.0 is itself a node-level claim (directly and via m0, one
    datum), and by precedence it owns the embedding's paths through it without ``avoid``."""
    model, tokens, mask = make(arch)
    hand = Hand(model, tokens, mask)
    head = Claim("a0.0", paths="all") if head_everywhere else Claim("a0.0")
    emb = Claim("embed", paths="all") if head_everywhere else Claim("embed", paths="all", avoid=["a0.0"])
    root = Claim("logits", children=[Claim("a1.0", children=[Claim("a1.0.in@1", children=[head, emb])])])
    inner = "logits/a1.0/a1.0.in@1"
    keys = ["logits (others)", "logits/a1.0", "logits/a1.0 (others)", inner, inner + " (others)"]
    data = rows_for(keys + [inner + "/a0.0", inner + "/embed"])
    got, refs = run(model, tokens, mask, root, data)
    o0, o1, o2 = data["logits (others)"], data["logits/a1.0 (others)"], data[inner + " (others)"]
    d_head, d_emb = data[inner + "/a0.0"], data[inner + "/embed"]
    # below a1.0's input at position 1: the embedding on every path (direct, via a0.1, via m0) from d_emb,
    # a0.0 directly (and via m0 when it claims every path) from d_head, the rest (pos_embed, masks) from o2
    delta_e = hand.embed(d_emb) - hand.embed(o2)
    delta_h = hand.head_out(0, 0, d_head) - hand.head_out(0, 0, o2)
    x0 = hand.resid_pre(0, o2) + delta_e
    a01 = hand.head(0, 1, x0, x0, x0, o2)
    if model.cfg.parallel_attn_mlp:
        m0 = hand.mlp(0, x0, o2)
    else:
        mid = x0 + hand.head_out(0, 0, o2) + a01 + (delta_h if head_everywhere else 0)
        m0 = hand.mlp(0, mid, o2)
    x1 = (
        hand.resid_pre(1, o2)
        + delta_e
        + delta_h
        + (a01 - hand.head_out(0, 1, o2))
        + (m0 - hand.mlp_out(0, o2))
    )
    inputs = hand.resid_pre(1, o1).clone()
    inputs[:, 1] = x1[:, 1]
    a10 = hand.head(1, 0, inputs, inputs, inputs, o1)
    check(got, hand.unembed(hand.final(o0) + a10 - hand.head_out(1, 0, o0), o0), refs, hand)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rewrites_sum_their_parts_each_on_its_own_datum(arch):
    model, tokens, mask = make(arch)
    hand = Hand(model, tokens, mask)
    table = torch.randn(20, 32, generator=torch.Generator().manual_seed(3))
    direction = torch.randn(32, generator=torch.Generator().manual_seed(4))

    def phi(value, toks):  # reads both the value and the tokens of its datum
        return 0.5 * value + table[toks]

    proj = Rewrite.projection(direction).parts["projection"]
    rewrite = Rewrite(parts={"phi": phi, "proj": proj})
    root = Claim(
        "logits",
        children=[
            Claim(
                "a0.0",
                rewrite=rewrite,
                children=[
                    Claim("a0.0:phi", children=[Claim("a0.0.q")]),  # phi of the head computed under a claim
                    Claim("a0.0:residual"),
                ],
            )
        ],
    )
    keys = ["logits (others)", "logits/a0.0", "logits/a0.0 (others)", "logits/a0.0/a0.0:phi"]
    keys += ["logits/a0.0/a0.0:phi (others)", "logits/a0.0/a0.0:phi/a0.0.q", "logits/a0.0/a0.0:residual"]
    data = rows_for(keys)
    got, refs = run(model, tokens, mask, root, data)
    o0, o1 = data["logits (others)"], data["logits/a0.0 (others)"]
    d_phi, o_phi = data["logits/a0.0/a0.0:phi"], data["logits/a0.0/a0.0:phi (others)"]
    d_q, d_res = data["logits/a0.0/a0.0:phi/a0.0.q"], data["logits/a0.0/a0.0:residual"]
    head_phi = hand.head(
        0, 0, hand.resid_pre(0, d_q), hand.resid_pre(0, o_phi), hand.resid_pre(0, o_phi), o_phi
    )
    v_res = hand.head_out(0, 0, d_res)
    value = (
        phi(head_phi, tokens[d_phi])
        + proj(hand.head_out(0, 0, o1), tokens[o1])  # the unclaimed part: the claim's other-inputs datum
        + (v_res - phi(v_res, tokens[d_res]) - proj(v_res, tokens[d_res]))
    )
    check(got, hand.unembed(hand.final(o0) + value - hand.head_out(0, 0, o0), o0), refs, hand)
    # a projection and its rejection on one datum sum to the head's value on it
    same = Claim("logits", children=[Claim("a0.0", rewrite=Rewrite.projection(direction), leaf=False)])
    data = rows_for(["logits (others)", "logits/a0.0", "logits/a0.0 (others)"], seed=2)
    got, _ = run(model, tokens, mask, same, data)
    o0, o1 = data["logits (others)"], data["logits/a0.0 (others)"]
    expected = hand.unembed(hand.final(o0) + hand.head_out(0, 0, o1) - hand.head_out(0, 0, o0), o0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("claimed", [True, False])
def test_a_head_mask_comes_from_its_mask_claim_or_the_covering_others_datum(arch, claimed):
    model, tokens, mask = make(arch)
    hand = Hand(model, tokens, mask)
    children = [Claim("a1.0.q")] + ([Claim("a1.0.mask")] if claimed else [])
    root = Claim("logits", children=[Claim("a1.0", children=children)])
    keys = ["logits (others)", "logits/a1.0", "logits/a1.0 (others)", "logits/a1.0/a1.0.q"]
    data = rows_for(keys + (["logits/a1.0/a1.0.mask"] if claimed else []))
    got, refs = run(model, tokens, mask, root, data)
    o0, o1, d_q = data["logits (others)"], data["logits/a1.0 (others)"], data["logits/a1.0/a1.0.q"]
    # REMIX: an unclaimed mask follows the datum covering the head (an internal claim: its others datum)
    rows_mask = data["logits/a1.0/a1.0.mask"] if claimed else o1
    kv = hand.resid_pre(1, o1)
    a10 = hand.head(1, 0, hand.resid_pre(1, d_q), kv, kv, rows_mask)
    check(got, hand.unembed(hand.final(o0) + a10 - hand.head_out(1, 0, o0), o0), refs, hand)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_others_same_runs_unclaimed_inputs_on_the_claims_own_datum(arch):
    model, tokens, mask = make(arch)
    hand = Hand(model, tokens, mask)
    root = Claim("logits", others="same", children=[Claim("m1", children=[Claim("a0.1", positions=[0, 2])])])
    data = rows_for(["logits/m1", "logits/m1 (others)", "logits/m1/a0.1@[0,2]"])
    got, refs = run(model, tokens, mask, root, data, same=["logits"])
    o1, d = data["logits/m1 (others)"], data["logits/m1/a0.1@[0,2]"]
    x = hand.acts(o1)["blocks.1.hook_mlp_in"].clone()
    x[:, [0, 2]] += (hand.head_out(0, 1, d) - hand.head_out(0, 1, o1))[:, [0, 2]]
    # the root's unclaimed inputs run on the reference itself (others="same")
    resid = hand.final(refs) + hand.mlp(1, x, o1) - hand.mlp_out(1, refs)
    check(got, hand.unembed(resid, refs), refs, hand)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_mask_claim_alone_changes_only_the_heads_mask_at_the_claimed_position(arch):
    model, tokens, mask = make(arch)
    hand = Hand(model, tokens, mask)
    # the last position: a causal head reads the padding there (rows are 5 to 8 tokens long)
    root = Claim("logits", children=[Claim("a1.0@7", children=[Claim("a1.0.mask")])])
    keys = ["logits (others)", "logits/a1.0@7", "logits/a1.0@7 (others)", "logits/a1.0@7/a1.0.mask"]
    data = rows_for(keys, seed=5)
    got, refs = run(model, tokens, mask, root, data)
    o0, o1, d_mask = data["logits (others)"], data["logits/a1.0@7 (others)"], data["logits/a1.0@7/a1.0.mask"]
    x = hand.resid_pre(1, o1)
    a10 = hand.head(1, 0, x, x, x, d_mask)
    resid = hand.final(o0).clone()
    resid[:, 7] += a10[:, 7] - hand.head_out(1, 0, o0)[:, 7]
    check(got, hand.unembed(resid, o0), refs, hand)
    assert not torch.equal(mask[o1].sum(1), mask[d_mask].sum(1))  # the mask claim mattered
