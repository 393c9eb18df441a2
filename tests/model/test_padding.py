"""A padded batch gives each prompt its own logits at its real positions (left and right padding)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.model.model_variants import make_model

VARIANTS = [
    "gpt2",
    "rotary_neox_rms_gated_gqa",
    "rotary_gptj_partial_parallel",
    "smeared_keys",
    "gemma_like",
    "bidirectional",
    "attn_only_nonorm_nopos",
    "qk_norm_local_global",
    "olmo_like",
]
LENGTHS = [5, 2, 8]
PAD = 0


def prompts(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, vocab, (n,), generator=g) for n in LENGTHS]


def pad(seqs: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        tokens[i, sl], mask[i, sl] = s, 1
    return tokens, mask


def real(x: torch.Tensor, i: int, n: int, width: int, side: str, dim: int = 0) -> torch.Tensor:
    start = width - n if side == "left" else 0
    return x[i].narrow(dim, start, n)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_batch_equals_each_prompt_alone(variant, side):
    model = make_model(variant)
    seqs = prompts(model.cfg.d_vocab)
    tokens, mask = pad(seqs, side)
    width = tokens.shape[1]
    names = lambda n: n.endswith(("resid_post", "hook_z", "hook_pattern"))  # noqa: E731
    logits, cache = model.run_with_cache(tokens, names=names, attention_mask=mask)
    for i, s in enumerate(seqs):
        alone, alone_cache = model.run_with_cache(s[None], names=names)
        n = len(s)
        assert_close(real(logits, i, n, width, side), alone[0], atol=1e-5, rtol=1e-5)
        for name in alone_cache:
            got = cache[name]
            if name.endswith("hook_pattern"):  # [batch head q k]: real queries, real keys
                got = real(got, i, n, width, side, dim=1).narrow(-1, width - n if side == "left" else 0, n)
                assert_close(got, alone_cache[name][0], atol=1e-5, rtol=1e-5, msg=name)
            else:
                assert_close(
                    real(got, i, n, width, side), alone_cache[name][0], atol=1e-5, rtol=1e-5, msg=name
                )


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("variant", ["gpt2", "rotary_neox_rms_gated_gqa"])
def test_padded_batch_patching_equals_patching_each_prompt(variant, side):
    model = make_model(variant)
    seqs = prompts(model.cfg.d_vocab)
    tokens, mask = pad(seqs, side)
    width = tokens.shape[1]
    direction = torch.randn(model.cfg.d_model)

    def steer(x, site):
        return x + direction

    def ablate_head(z, site):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    hooks = [(("resid_pre", 1), steer), (("z", 0), ablate_head), (("pattern", 1), lambda p, s: p * 1.0)]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=mask)
        for i, s in enumerate(seqs):
            alone = model.run_with_hooks(s[None], fwd_hooks=hooks)
            assert_close(real(logits, i, len(s), width, side), alone[0], atol=1e-5, rtol=1e-5)


def test_padding_queries_do_not_produce_nan():
    model = make_model("gpt2")
    tokens, mask = pad(prompts(model.cfg.d_vocab), "right")
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    for name in cache:
        if not name.endswith("hook_attn_scores"):  # scores are -inf at masked keys, as in TransformerLens
            assert torch.isfinite(cache[name]).all(), name


def test_full_mask_is_the_unmasked_forward():
    model = make_model("rotary_neox_rms_gated_gqa")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6))
    with torch.no_grad():
        assert_close(model(tokens, attention_mask=torch.ones_like(tokens)), model(tokens), atol=0, rtol=0)


def test_mask_shape_is_checked():
    model = make_model("gpt2")
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\), tokens \(2, 4\)"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
