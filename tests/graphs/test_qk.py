"""QK attribution: the parts sum to the model's attention score; on the planted model the whole score of the
copying head is the query token C against the key token A."""

from __future__ import annotations

import pytest
import torch

from interplab.graphs.qk import qk_attribution
from interplab.model import Transformer
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


@pytest.mark.parametrize("name", ["gpt2", "rotary_neox_rms_gated_gqa", "rotary_gptj_partial_parallel"])
def test_parts_sum_to_the_score(name):
    model = variant_model(name)
    clt = random_clt(model, d_sae=6)
    qk = qk_attribution(model, clt, torch.randint(0, 23, (7,)), layer=1, head=1, query_pos=6, key_pos=3)
    torch.testing.assert_close(qk.total, torch.tensor(qk.score), atol=1e-4, rtol=1e-4)
    assert qk.pairs.abs().sum() > 0


def test_parts_sum_to_the_score_with_a_rotary_base_per_layer():
    model = Transformer(VARIANTS["rotary_neox_rms_gated_gqa"].replace(rotary_bases=(10.0, 3.0)))
    randomize(model)
    qk = qk_attribution(
        model, random_clt(model, d_sae=6), torch.randint(0, 23, (7,)), layer=1, head=1, query_pos=6, key_pos=2
    )
    torch.testing.assert_close(qk.total, torch.tensor(qk.score), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "variant, why", [("qk_norm_local_global", "qk_norm='head'"), ("smeared_keys", "smeared keys")]
)
def test_refuses_what_is_not_bilinear(variant, why):
    """Scores that are not a bilinear form of the residual stream (q/k norms, smeared keys) are refused."""
    model = variant_model(variant)
    with pytest.raises(ValueError, match=why):
        qk_attribution(
            model,
            random_clt(model),
            torch.zeros(4, dtype=torch.long),
            layer=0,
            head=0,
            query_pos=1,
            key_pos=0,
        )
