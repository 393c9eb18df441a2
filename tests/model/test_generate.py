"""Generation: the KV cache equals recomputation, padded batches equal single prompts, hooks apply."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from interplab.model.generate import Generation, generate
from tests.model.model_variants import VARIANTS, make_model

CAUSAL = [name for name, cfg in VARIANTS.items() if cfg.causal]


def prompt_batch(vocab: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    seqs = [torch.randint(1, vocab, (n,), generator=g) for n in (4, 1, 3)]
    tokens = torch.zeros(3, 4, dtype=torch.long)
    mask = torch.zeros(3, 4, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, 4 - len(s) :], mask[i, 4 - len(s) :] = s, 1
    return seqs, tokens, mask


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("variant", CAUSAL)
def test_incremental_decoding_equals_recomputing_the_full_forward(variant, padded):
    model = make_model(variant)
    _, tokens, mask = prompt_batch(model.cfg.d_vocab)
    if not padded:
        mask = torch.ones_like(mask)
    kv = model.new_kv_cache()
    seq, seq_mask = tokens, mask
    with torch.no_grad():
        step_logits = model(tokens, attention_mask=mask, kv_cache=kv)
        for step in range(5):
            full = model(seq, attention_mask=seq_mask)
            assert_close(step_logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5, msg=f"step {step}")
            nxt = torch.randint(0, model.cfg.d_vocab, (3, 1))
            seq = torch.cat([seq, nxt], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], 1)
            step_logits = model(nxt, attention_mask=torch.ones_like(nxt), kv_cache=kv)
    assert kv.length == seq.shape[1]


@pytest.mark.parametrize("variant", CAUSAL)
def test_cached_generation_equals_uncached_generation(variant):
    model = make_model(variant)
    _, tokens, mask = prompt_batch(model.cfg.d_vocab)
    fast = generate(model, tokens, 6, attention_mask=mask)
    slow = generate(model, tokens, 6, attention_mask=mask, use_kv_cache=False)
    assert torch.equal(fast.tokens, slow.tokens) and torch.equal(fast.attention_mask, slow.attention_mask)


@pytest.mark.parametrize(
    "variant",
    ["gpt2", "rotary_neox_rms_gated_gqa", "smeared_keys", "gemma_like", "qk_norm_local_global", "olmo_like"],
)
def test_left_padded_batch_generates_what_each_prompt_generates_alone(variant):
    model = make_model(variant)
    seqs, tokens, mask = prompt_batch(model.cfg.d_vocab)
    batch = generate(model, tokens, 6, attention_mask=mask)
    assert batch.prompt_length == 4 and batch.new_tokens.shape == (3, 6)
    for i, s in enumerate(seqs):
        alone = generate(model, s, 6)
        assert torch.equal(batch.new_tokens[i], alone.new_tokens[0]), i
        assert torch.equal(batch.tokens[i][batch.attention_mask[i].bool()], alone.tokens[0])


def test_right_padded_prompts_are_moved_left():
    model = make_model("gpt2")
    seqs, tokens, mask = prompt_batch(model.cfg.d_vocab)
    right = torch.zeros_like(tokens)
    right_mask = torch.zeros_like(mask)
    for i, s in enumerate(seqs):
        right[i, : len(s)], right_mask[i, : len(s)] = s, 1
    a = generate(model, right, 4, attention_mask=right_mask)
    b = generate(model, tokens, 4, attention_mask=mask)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.attention_mask, b.attention_mask)


def test_hooks_apply_at_every_step():
    model = make_model("rotary_neox_rms_gated_gqa")
    _, tokens, mask = prompt_batch(model.cfg.d_vocab)
    steer = 3 * torch.randn(model.cfg.d_model)
    hooks = [(("resid_pre", 1), lambda x, s: x + steer)]
    plain = generate(model, tokens, 6, attention_mask=mask)
    steered = generate(model, tokens, 6, attention_mask=mask, fwd_hooks=hooks)
    recomputed = generate(model, tokens, 6, attention_mask=mask, fwd_hooks=hooks, use_kv_cache=False)
    assert not torch.equal(plain.tokens, steered.tokens)
    assert torch.equal(steered.tokens, recomputed.tokens)
    shapes = []
    generate(
        model,
        tokens,
        3,
        attention_mask=mask,
        fwd_hooks=[(("pattern", 0), lambda p, s: shapes.append(p.shape))],
    )
    assert shapes == [(3, 4, 4, 4), (3, 4, 1, 5), (3, 4, 1, 6)]
    assert not model.hook_registry.any_active


def test_sampling_is_seeded_and_top_k_top_p_limit_it():
    model = make_model("gpt2")
    tokens = torch.tensor([[1, 2, 3]])
    greedy = generate(model, tokens, 8)
    a = generate(model, tokens, 8, temperature=1.0, seed=7)
    b = generate(model, tokens, 8, temperature=1.0, seed=7)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(
        generate(model, tokens.expand(4, 3), 8, temperature=5.0, seed=1).new_tokens,
        greedy.new_tokens.expand(4, 8),
    )
    assert torch.equal(generate(model, tokens, 8, temperature=2.0, top_k=1, seed=3).tokens, greedy.tokens)
    assert torch.equal(generate(model, tokens, 8, temperature=2.0, top_p=1e-6, seed=3).tokens, greedy.tokens)
    # top_k=2: every sampled token is one of the two most likely under the model
    out = generate(model, tokens.expand(6, 3), 5, temperature=3.0, top_k=2, seed=0)
    with torch.no_grad():
        logits = model(out.tokens)[:, 2:-1]
    top2 = logits.topk(2, dim=-1).indices
    assert (top2 == out.new_tokens[..., None]).any(-1).all()


def test_stop_at_eos_fills_and_masks_finished_rows():
    model = make_model("gpt2")
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    greedy = generate(model, tokens, 6)
    eos = int(greedy.new_tokens[0, 1])
    out = generate(model, tokens, 6, stop_at_eos=True, eos_token_id=eos)
    row = out.new_tokens[0]
    assert row[1] == eos and (row[2:] == eos).all()
    assert out.attention_mask[0, 3:].tolist() == [1, 1] + [0] * (out.new_tokens.shape[1] - 2)


class CharTokenizer:
    """A character-level tokenizer ('a' = 1 ...), enough to test string prompts."""

    eos_token_id = 0

    def to_tokens(self, text, prepend_bos=False, padding_side="right"):  # noqa: ANN001, ANN201, ARG002
        return torch.tensor([[ord(c) - 96 for c in text]])

    def decode(self, tokens):  # noqa: ANN001, ANN201
        return "".join(chr(t + 96) if t else "." for t in tokens)


def test_string_prompts_are_tokenised_left_padded_and_decoded(tmp_path):
    model = make_model("gpt2")
    model.tokenizer = CharTokenizer()
    out = generate(model, ["abc", "d"], 3)
    assert out.tokens[1, :2].tolist() == [0, 0] and out.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 1]
    alone = generate(model, "d", 3)
    assert out.text[1] == alone.text[0] and alone.text[0].startswith("d") and len(alone.text[0]) == 4
    saved = Generation.load(out.save(tmp_path / "gen.json"))
    assert torch.equal(saved.tokens, out.tokens) and saved.text == out.text and saved.prompt_length == 3


def test_bad_options_are_refused():
    model = make_model("gpt2")
    tokens = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, tokens, 2, temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, tokens, 2, temperature=1, top_p=0)
    with pytest.raises(ValueError, match="top_k must be at least 1, got 0"):
        generate(model, tokens, 2, temperature=1, top_k=0)
    with pytest.raises(
        ValueError, match=f"2 tokens plus max_new_tokens=20 exceeds the model's n_ctx={model.cfg.n_ctx}"
    ):
        generate(model, tokens, 20)
    with pytest.raises(ValueError, match="causal"):
        generate(make_model("bidirectional"), tokens, 2)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, tokens, 2, stop_at_eos=True)
    with pytest.raises(ValueError, match="no real token"):
        generate(model, tokens, 2, attention_mask=torch.tensor([[0, 0]]))


def test_string_prompts_with_a_real_bpe_tokenizer():
    from interplab.data.tokenizer import train_bpe

    tok = train_bpe(["def f(x):\n    return x + 1\n"] * 30, vocab_size=300)
    model = make_model("gpt2").__class__(VARIANTS["gpt2"].replace(d_vocab=tok.vocab_size, n_ctx=32))
    model.tokenizer = tok
    out = generate(model, ["def f(x):", "return"], 4)
    alone = generate(model, "return", 4)
    assert out.text[1] == alone.text[0] and out.text[1].startswith("return")
    assert torch.equal(out.new_tokens[1], alone.new_tokens[0])
