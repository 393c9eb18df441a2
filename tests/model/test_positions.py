"""Positions of a padded batch (issue 15 item 5): index minus the row's leading pads.

Left padding renumbers a prompt from its first real token (generation from a left-padded batch, with or without
the key/value cache, is unchanged and equals `transformers`' own ``generate``); right pads and holes keep their
own index, as in TransformerLens' right padding (its forward without a mask) and rust_circuit, so a pad key read
under another input's longer mask carries its own position."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from interplab import load_model
from interplab.model import Transformer
from interplab.model.generate import generate
from tests.model.model_variants import make_model
from tests.model.test_load_hf import _make as make_hf
from tests.tl_peer import run_tl_jobs

PAD = 0


def test_positions_are_the_index_minus_the_leading_pads():
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1, 1],  # left padding: renumbered from the first real token
            [1, 1, 1, 0, 0, 0],  # right padding: every pad keeps its index
            [1, 1, 0, 1, 1, 0],  # a hole: counted, not skipped
            [0, 1, 0, 1, 0, 0],  # both
            [0, 0, 0, 0, 0, 0],  # no real token
            [1, 1, 1, 1, 1, 1],
        ]
    )
    expected = torch.tensor(
        [
            [0, 0, 0, 1, 2, 3],
            [0, 1, 2, 3, 4, 5],
            [0, 1, 2, 3, 4, 5],
            [0, 0, 1, 2, 3, 4],
            [0, 0, 0, 0, 0, 0],
            [0, 1, 2, 3, 4, 5],
        ]
    )
    assert torch.equal(Transformer.padded_positions(mask), expected)
    # the old rule (cumsum of the mask) and the new one agree wherever a row has no pad after a real token
    old = (mask.cumsum(-1) - 1).clamp(min=0)
    left_only = torch.tensor([True, False, False, False, True, True])
    assert torch.equal(old[left_only], expected[left_only])


def _masked_reference(model: Transformer, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The forward with no mask (positions 0..pos-1 in every row), the padded batch's attention mask (which
    keys each query sees, the model's own rule) put onto the scores by a hook: what a right-padded batch must
    compute everywhere, its pads included, when a pad's position is its index."""
    allowed = model.context(tokens, mask).mask(tokens.shape[1], None, model.cfg.causal)  # [batch 1 q k]
    assert allowed is not None

    def hide(scores, site):
        return scores.masked_fill(~allowed, float("-inf"))

    hooks = [(f"blocks.{layer}.attn.hook_attn_scores", hide) for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        return model.run_with_hooks(tokens, hooks)


@pytest.mark.parametrize("variant", ["gpt2", "rotary_neox_rms_gated_gqa", "bidirectional", "smeared_keys"])
def test_a_right_padded_batch_gives_pads_their_own_positions(variant):
    model = make_model(variant)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, model.cfg.d_vocab, (3, 9), generator=g)
    mask = torch.ones_like(tokens)
    mask[0, 6:] = 0
    mask[1, 2:] = 0
    tokens[~mask.bool()] = PAD
    with torch.no_grad():
        got = model(tokens, attention_mask=mask)
    # every position, pads included (their values are what a longer mask reads in patching and scrubbing)
    assert_close(got, _masked_reference(model, tokens, mask), atol=1e-5, rtol=1e-5)
    if model.cfg.positional.value == "learned":
        _, cache = model.run_with_cache(tokens, ["hook_pos_embed"], attention_mask=mask)
        assert_close(cache["hook_pos_embed"], model.W_pos[:9].expand(3, 9, -1), atol=0, rtol=0)


@pytest.mark.parametrize("hf_variant", ["llama-gqa-theta", "gpt2"])
def test_left_padded_generation_equals_transformers_generate(tmp_path, hf_variant):
    hf = make_hf(hf_variant)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(1)
    lengths = [6, 3, 5]
    tokens = torch.full((3, 6), PAD, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 6 - n :] = torch.randint(1, hf.config.vocab_size, (n,), generator=g)
        mask[i, 6 - n :] = 1
    with torch.no_grad():
        ref = hf.generate(
            tokens,
            attention_mask=mask,
            max_new_tokens=5,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    for use_kv_cache in (True, False):
        ours = generate(model, tokens, 5, attention_mask=mask, use_kv_cache=use_kv_cache)
        assert torch.equal(ours.tokens, ref.sequences), use_kv_cache
    # the logits of every step, at each row's real positions, too
    seq = ref.sequences
    full_mask = torch.cat([mask, torch.ones(3, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(seq, attention_mask=full_mask)
    for step, step_logits in enumerate(ref.logits):
        assert_close(logits[:, 5 + step], step_logits, atol=1e-4, rtol=1e-4)


def test_right_padding_matches_transformer_lens(tmp_path):
    """TransformerLens pads on the right by running without a mask: its positions are 0..pos-1 in every row.
    interplab with the mask gives the same positional embeddings and the same layer-0 queries and keys at
    every position, pads included, and the same everything at the real positions."""
    tokens = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(4))
    tokens[0, 7:] = PAD
    mask = (torch.arange(12) < torch.tensor([[7], [12]])).long()
    configs = {
        "learned": dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, act_fn="gelu_new"),
        "rotary": dict(
            n_layers=2,
            d_model=32,
            n_heads=4,
            d_head=8,
            d_mlp=64,
            act_fn="silu",
            normalization_type="RMS",
            positional_embedding_type="rotary",
            rotary_dim=8,
            n_key_value_heads=2,
        ),
    }
    jobs = [
        dict(config={**cfg, "d_vocab": 50, "n_ctx": 16, "seed": 0}, out=str(tmp_path / name), passes=[{}])
        for name, cfg in configs.items()
    ]
    run_tl_jobs(jobs, tmp_path, tokens)
    real = mask.bool()
    for name in configs:
        tl_cache = load_file(str(tmp_path / name / "pass0.safetensors"))
        ours = load_model(tmp_path / name / "model.pt")
        logits, cache = ours.run_with_cache(tokens, attention_mask=mask)
        assert_close(logits[real], tl_cache["__logits__"][real], atol=1e-4, rtol=1e-4)
        everywhere = ["hook_embed", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k"]
        everywhere += ["hook_pos_embed"] if name == "learned" else ["blocks.0.attn.hook_rot_k"]
        for hook in everywhere:
            assert_close(cache[hook], tl_cache[hook], atol=1e-5, rtol=1e-5, msg=f"{name} {hook}")
        for hook in (
            "blocks.1.hook_resid_pre",
            "blocks.1.attn.hook_rot_q" if name == "rotary" else "hook_embed",
        ):
            assert_close(cache[hook][real], tl_cache[hook][real], atol=1e-4, rtol=1e-4, msg=f"{name} {hook}")
