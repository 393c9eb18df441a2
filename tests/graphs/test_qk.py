"""QK attribution: the parts sum to the model's attention score; on the planted model the whole score of the
copying head is the query token C against the key token A; with smeared keys the part through the previous
position is the right one (a planted previous-token key, the model's own keys, finite differences in the gate)."""

from __future__ import annotations

import math

import pytest
import torch

from interplab.graphs.qk import QKPair, qk_attribution
from interplab.model import Transformer
from interplab.model.attention import apply_rotary, rotary_tables
from tests.graphs.helpers import random_clt, variant_model
from tests.graphs.planted import BOS, A, C, D, exact_transcoder, planted_model
from tests.model.model_variants import VARIANTS, randomize


def test_planted_score_is_c_against_a():
    model = planted_model()
    qk = qk_attribution(
        model, exact_transcoder(model), torch.tensor([BOS, A, D, C]), layer=1, head=0, query_pos=3, key_pos=1
    )
    assert qk.score == pytest.approx(8.0)
    assert qk.top(1)[0][:2] == (f"E_{C}_3", f"E_{A}_1")
    assert qk.top(1)[0][2] == pytest.approx(8.0, abs=1e-5)
    torch.testing.assert_close(qk.total, torch.tensor(8.0), atol=1e-5, rtol=1e-5)
    assert qk.pairs_prev is None and float(qk.through_previous) == 0.0


GATE = 0.25


def smeared_planted_model() -> Transformer:
    """The planted model with smeared keys (gate 0.25: a key is 1/4 its own position's raw key, 3/4 the
    previous one's) whose copying head's key reads e1, what layer 0's feature 0 writes at an A: the query C
    matches the position *after* an A through the smear, the induction head's key (score 8 x 3/4 there)."""
    base = planted_model()
    model = Transformer(base.cfg.replace(smear_keys=True))
    model.load_state_dict(base.state_dict(), strict=False)
    e = torch.eye(8)
    with torch.no_grad():
        attn = model.blocks[1].attn
        attn.W_K[0] = 4.0 * torch.outer(e[1], e[0]) * (8**0.5) / 2
        attn.smear.fill_(math.log(GATE / (1 - GATE)))
        model.blocks[0].attn.smear.zero_()
    return model


def test_planted_previous_token_key_drives_the_score_through_the_smear():
    """Query C at 3, key D at 2 (after the A at 1): all of the score is C's token against layer 0's feature 0
    at position 1, through the previous position's key; at key 1 (the A itself) it comes through its own."""
    model = smeared_planted_model()
    clt = exact_transcoder(model)
    tokens = torch.tensor([BOS, A, D, C])
    qk = qk_attribution(model, clt, tokens, layer=1, head=0, query_pos=3, key_pos=2)
    assert qk.gate == pytest.approx(GATE)
    assert qk.score == pytest.approx(8.0 * (1 - GATE), abs=1e-5)
    best = qk.top(10)
    assert best[0] == QKPair(f"E_{C}_3", "0_0_1", pytest.approx(6.0, abs=1e-5), 1)  # type: ignore[arg-type]
    assert all(abs(p.part) < 1e-6 for p in best[1:])
    assert qk.pairs_prev is not None
    torch.testing.assert_close(qk.through_previous, torch.tensor(6.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(qk.current, torch.tensor(0.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(qk.pairs.abs().sum(), torch.tensor(0.0), atol=1e-6, rtol=0)
    own = qk_attribution(model, clt, tokens, layer=1, head=0, query_pos=3, key_pos=1, graph=qk.graph)
    assert own.score == pytest.approx(8.0 * GATE, abs=1e-5)
    assert own.top(1)[0] == QKPair(f"E_{C}_3", "0_0_1", pytest.approx(2.0, abs=1e-5), 1)  # type: ignore[arg-type]
    torch.testing.assert_close(own.through_previous, torch.tensor(0.0), atol=1e-6, rtol=0)


BILINEAR = {
    "gpt2": VARIANTS["gpt2"],
    "rotary_neox_rms_gated_gqa": VARIANTS["rotary_neox_rms_gated_gqa"],
    "rotary_gptj_partial_parallel": VARIANTS["rotary_gptj_partial_parallel"],
    "smeared_keys": VARIANTS["smeared_keys"],  # rotary, LayerNorm
    "gpt2_smeared": VARIANTS["gpt2"].replace(smear_keys=True),  # learned positions
    "gqa_smeared": VARIANTS["rotary_neox_rms_gated_gqa"].replace(smear_keys=True),  # a gate per key head
    "qk_norm_head": VARIANTS["qk_norm_local_global"],  # per-head q/k RMSNorm, GQA, post norms
    "qk_norm_full_smeared": VARIANTS["qk_norm_local_global"].replace(qk_norm="full", smear_keys=True),
}


@pytest.mark.parametrize("key_pos", [0, 3])
@pytest.mark.parametrize("name", list(BILINEAR))
def test_parts_sum_to_the_score(name, key_pos):
    torch.manual_seed(0)
    model = Transformer(BILINEAR[name])
    randomize(model)
    clt = random_clt(model, d_sae=6)
    qk = qk_attribution(model, clt, torch.randint(0, 23, (7,)), layer=1, head=1, query_pos=6, key_pos=key_pos)
    torch.testing.assert_close(qk.total, torch.tensor(qk.score), atol=1e-5, rtol=1e-5)
    assert qk.pairs.abs().sum() > 0
    if model.cfg.smear_keys and key_pos > 0:
        assert qk.pairs_prev is not None and qk.pairs_prev.abs().sum() > 0
    else:
        assert qk.pairs_prev is None


@pytest.mark.parametrize("name", ["smeared_keys", "gqa_smeared"])
def test_routes_equal_the_models_own_keys(name):
    """The part through each position equals the model's own query against that position's raw key
    (``hook_k``, before smearing), weighted by the gate and rotated at the key position: a hand computation."""
    torch.manual_seed(1)
    model = Transformer(BILINEAR[name])
    randomize(model)
    cfg = model.cfg
    tokens = torch.randint(0, 23, (7,))
    layer, head, i, j = 1, 3, 6, 4
    qk = qk_attribution(
        model, random_clt(model, d_sae=6), tokens, layer=layer, head=head, query_pos=i, key_pos=j
    )
    _, cache = model.run_with_cache(
        tokens[None], names=[f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"]
    )
    kv = head // cfg.n_groups
    g = float(torch.sigmoid(model.blocks[layer].attn.smear[kv].detach()))

    def rot(x, pos):
        cos, sin = rotary_tables(cfg.rotary_config(layer), torch.tensor([[pos]]), x.dtype)
        return apply_rotary(x[None, None, None], cos, sin, cfg.rotary_style)[0, 0, 0]

    q = rot(cache[f"blocks.{layer}.attn.hook_q"][0, i, head], i)
    k = cache[f"blocks.{layer}.attn.hook_k"][0, :, kv]
    a = cfg.attn_scale
    torch.testing.assert_close(qk.current, g * q @ rot(k[j], j) / a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qk.through_previous, (1 - g) * q @ rot(k[j - 1], j) / a, atol=1e-5, rtol=1e-5)


def test_routes_are_the_finite_difference_in_the_gate():
    """The score is linear in the gate g (layer l's smear changes nothing below it): its derivative is
    current / g - through_previous / (1 - g), by central differences of the real model's scores."""
    torch.manual_seed(2)
    model = Transformer(BILINEAR["qk_norm_full_smeared"])
    randomize(model)
    model.double()
    tokens = torch.randint(0, 23, (7,))
    layer, head, i, j = 1, 0, 5, 3
    clt = random_clt(model, d_sae=6).double()
    qk = qk_attribution(model, clt, tokens, layer=layer, head=head, query_pos=i, key_pos=j)
    attn = model.blocks[layer].attn
    g = float(torch.sigmoid(attn.smear[0].detach()))
    name = f"blocks.{layer}.attn.hook_attn_scores"

    def score_at(gate: float) -> float:
        with torch.no_grad():
            attn.smear[0] = math.log(gate / (1 - gate))
            _, cache = model.run_with_cache(tokens[None], names=[name])
        return float(cache[name][0, head, i, j])

    h = 1e-4
    slope = (score_at(g + h) - score_at(g - h)) / (2 * h)
    expected = float(qk.current) / g - float(qk.through_previous) / (1 - g)
    assert slope == pytest.approx(expected, rel=1e-6, abs=1e-8)
    assert abs(float(qk.through_previous)) > 1e-3


def test_parts_sum_to_the_score_with_a_rotary_base_per_layer():
    model = Transformer(VARIANTS["rotary_neox_rms_gated_gqa"].replace(rotary_bases=(10.0, 3.0)))
    randomize(model)
    qk = qk_attribution(
        model, random_clt(model, d_sae=6), torch.randint(0, 23, (7,)), layer=1, head=1, query_pos=6, key_pos=2
    )
    torch.testing.assert_close(qk.total, torch.tensor(qk.score), atol=1e-4, rtol=1e-4)


def test_refuses_soft_capped_scores():
    """A soft-capped score (tanh of the bilinear one) is not a sum of parts: refused, naming what is valid."""
    model = variant_model("gemma_like")
    with pytest.raises(ValueError, match=r"attn_softcap=5.0.*valid: attn_softcap None"):
        qk_attribution(
            model,
            random_clt(model),
            torch.zeros(4, dtype=torch.long),
            layer=0,
            head=0,
            query_pos=1,
            key_pos=0,
        )


def test_top_leaves_out_zero_parts():
    """In layer 0 of an attention-only path the only sources are the tokens: two nonzero pairs, no zeros listed."""
    model = smeared_planted_model()
    with torch.no_grad():
        model.blocks[0].attn.W_Q[0] = torch.outer(torch.eye(8)[2], torch.eye(8)[0])
        model.blocks[0].attn.W_K[0] = torch.outer(torch.eye(8)[0], torch.eye(8)[0])
    qk = qk_attribution(
        model, exact_transcoder(model), torch.tensor([BOS, A, D, C]), layer=0, head=0, query_pos=3, key_pos=2
    )
    top = qk.top(10)
    assert [(p.query, p.key, p.through) for p in top] == [(f"E_{C}_3", f"E_{A}_1", 1)]
    assert top[0].part == pytest.approx(
        0.5 / 8**0.5, abs=1e-6
    )  # (1 - g) of the previous key, one head of d 8
