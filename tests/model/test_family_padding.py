"""Left padding and generation are exact on every converted family: a left-padded batch gives `transformers`'
logits and residual stream (every layer) at each row's real positions under the same attention mask, and greedy
generation from it (with and without the key/value cache) gives transformers' greedy ``generate``. Prompts are
longer than every sliding window, and generation runs past the windows and past LongRoPE's switch."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from interplab import load_model
from interplab.model.generate import generate
from interplab.model.rope import cache_expires_at
from tests.model.test_load_hf import VARIANTS
from tests.model.test_load_hf import _make as make_hf
from tests.model.test_load_hf_qk_norm import VARIANTS as QK_NORM_VARIANTS
from tests.model.test_load_hf_qk_norm import make_hf as make_qk_norm_hf

PAD = 0
LENGTHS = (14, 6, 10)  # the longest row unpadded, as in a batch that generate pads on the left
NEW = 6


def _sharpen(hf) -> None:  # noqa: ANN001
    """Weights large enough that attention is peaked and greedy choices are far from ties."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2 and "norm" not in name:
                p.mul_(10.0)


def _left_padded(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    width = max(LENGTHS)
    tokens = torch.full((len(LENGTHS), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
    for i, n in enumerate(LENGTHS):
        tokens[i, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, width - n :] = 1
    return tokens, mask


# every family's variants (the multimodal Gemma-3 checkpoint's text model is Gemma-3 text's, checked beside it)
FAMILIES = list(VARIANTS) + [v for v in QK_NORM_VARIANTS if v != "gemma3-multimodal"]


@pytest.mark.parametrize("variant", FAMILIES)
def test_left_padded_batch_and_greedy_generation_equal_transformers(tmp_path, variant):
    hf = make_hf(variant) if variant in VARIANTS else make_qk_norm_hf(variant)
    _sharpen(hf)
    hf.save_pretrained(tmp_path)
    check_left_padding_and_generation(hf, load_model(tmp_path))


def check_left_padding_and_generation(hf, model) -> None:  # noqa: ANN001
    """A left-padded batch through ``model`` (interplab) and ``hf`` (its transformers original): logits and
    residual stream at the real positions, greedy generation with and without the cache, each step's logits."""
    tokens, mask = _left_padded(hf.config.vocab_size)
    real = mask.bool()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate gives a left-padded batch
    with torch.no_grad():
        ref = hf(tokens, attention_mask=mask, position_ids=positions, output_hidden_states=True)
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names=lambda n: n.endswith("resid_pre"))
    assert_close(logits[real], ref.logits[real], atol=1e-4, rtol=1e-5)
    for layer in range(model.cfg.n_layers):
        got = cache[f"blocks.{layer}.hook_resid_pre"][real]
        assert_close(got, ref.hidden_states[layer][real], atol=1e-4, rtol=1e-5, msg=f"resid_pre {layer}")

    expected = hf.generate(
        tokens,
        attention_mask=mask,
        max_new_tokens=NEW,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
        output_logits=True,
        return_dict_in_generate=True,
    )
    for use_kv_cache in (True, False):
        ours = generate(model, tokens, NEW, attention_mask=mask, use_kv_cache=use_kv_cache)
        assert torch.equal(ours.tokens, expected.sequences), f"use_kv_cache={use_kv_cache}"
    # every step's logits too, the cache's way (one token at a time, past every sliding window)
    got = step_logits(model, expected.sequences, mask, tokens.shape[1], use_cache=True)
    assert_close(got, torch.stack(expected.logits, 1), atol=1e-4, rtol=1e-5)


def step_logits(model, sequences, mask, prompt: int, *, use_cache: bool) -> torch.Tensor:  # noqa: ANN001
    """[batch step vocab]: the last-position logits of each generation step that produced ``sequences`` from
    its first ``prompt`` tokens (``mask`` their attention mask), fed one token at a time through the key/value
    cache or as the whole sequence again."""
    kv = model.new_kv_cache() if use_cache else None
    step_in, step_mask, full_mask = sequences[:, :prompt], mask, mask
    out = []
    with torch.no_grad():
        for step in range(sequences.shape[1] - prompt):
            out.append(model(step_in, attention_mask=step_mask, kv_cache=kv)[:, -1])
            nxt = sequences[:, prompt + step : prompt + step + 1]
            full_mask = torch.cat([full_mask, torch.ones_like(nxt)], 1)
            length = prompt + step + 1
            if use_cache and not cache_expires_at(model.cfg.rope_scaling, length):
                step_in, step_mask = nxt, torch.ones_like(nxt)
            else:  # (at LongRoPE's switch to its long factors the cache is recomputed, as generate does)
                step_in, step_mask = sequences[:, :length], full_mask
                kv = model.new_kv_cache() if use_cache else None
    return torch.stack(out, 1)
