"""TransformerLens' calling habits work on a `Transformer`, or fail saying what to write instead:
``names_filter``, ``remove_batch_dim``, ``return_type``, hook functions ``fn(activation, hook)`` reading
``hook.name``, and the stacked weight views ``model.W_Q`` ... ``model.b_out``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from tests.model.model_variants import VARIANTS, make_model

LM_VARIANTS = [n for n in sorted(VARIANTS) if VARIANTS[n].d_vocab_out == VARIANTS[n].d_vocab]


def tokens_for(model, batch: int = 3, pos: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", LM_VARIANTS)
def test_return_types_give_logits_loss_both_or_nothing(variant):
    model = make_model(variant)
    tokens = tokens_for(model)
    with torch.no_grad():
        logits = model(tokens)
        reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        assert_close(model(tokens, return_type="logits"), logits, atol=0, rtol=0)
        assert_close(model(tokens, return_type="loss"), reference, atol=1e-6, rtol=1e-6)
        both = model(tokens, return_type="both")
        assert isinstance(both, tuple) and len(both) == 2
        assert_close(both[0], logits, atol=0, rtol=0)
        assert_close(both[1], reference, atol=1e-6, rtol=1e-6)
        assert model(tokens, return_type=None) is None
        per_token = model(tokens, return_type="loss", loss_per_token=True)
        assert per_token.shape == (3, 8)
        assert_close(per_token.mean(), reference, atol=1e-6, rtol=1e-6)
        # run_with_hooks and run_with_cache pass return_type on
        assert_close(model.run_with_hooks(tokens, return_type="loss"), reference, atol=1e-6, rtol=1e-6)
        loss, cache = model.run_with_cache(tokens, names=["hook_embed"], return_type="loss")
        assert_close(loss, reference, atol=1e-6, rtol=1e-6)
        assert list(cache) == ["hook_embed"]


def test_loss_under_padding_counts_real_predictions_only():
    model = make_model("gpt2")
    tokens = tokens_for(model, batch=2, pos=8)
    mask = torch.ones_like(tokens)
    mask[0, :3] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        loss = model(tokens, attention_mask=mask, return_type="loss")
        alone = []
        for row in range(2):
            real = mask[row].bool()
            lg = model(tokens[row][real][None])
            alone.append(F.cross_entropy(lg[0, :-1], tokens[row][real][1:], reduction="none"))
    assert_close(loss, torch.cat(alone).mean(), atol=1e-5, rtol=1e-5)


def test_bad_return_type_and_classifier_loss_are_explained():
    model = make_model("gpt2")
    tokens = tokens_for(model)
    with pytest.raises(ValueError, match="return_type='probs' is not one of"):
        model(tokens, return_type="probs")
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, return_type="loss", stop_at_layer=1)
    classifier = make_model("bidirectional")
    with pytest.raises(ValueError, match="d_vocab_out=3"):
        classifier(tokens_for(classifier), return_type="loss")


@pytest.mark.parametrize(
    "names_filter",
    [
        "blocks.1.hook_resid_post",
        ["blocks.0.attn.hook_pattern", "ln_final.hook_normalized"],
        lambda name: name.endswith("hook_scale"),
    ],
    ids=["str", "list", "callable"],
)
def test_names_filter_is_names(names_filter):
    model = make_model("gpt2")
    tokens = tokens_for(model)
    _, by_names = model.run_with_cache(tokens, names=names_filter)
    _, by_filter = model.run_with_cache(tokens, names_filter=names_filter)
    assert list(by_filter) == list(by_names) and len(by_filter) >= 1
    for name in by_filter:
        assert_close(by_filter[name], by_names[name], atol=0, rtol=0)
    with pytest.raises(TypeError, match="both names and names_filter"):
        model.run_with_cache(tokens, names="hook_embed", names_filter="hook_embed")


def test_remove_batch_dim_drops_the_batch_of_one():
    model = make_model("rotary_neox_rms_gated_gqa")
    tokens = tokens_for(model, batch=1)
    _, cache = model.run_with_cache(tokens)
    _, flat = model.run_with_cache(tokens, remove_batch_dim=True)
    assert list(flat) == list(cache)
    for name in cache:
        assert_close(flat[name], cache[name][0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="needs a batch of one, got 3"):
        model.run_with_cache(tokens_for(model), remove_batch_dim=True)


def test_hook_functions_written_for_transformer_lens_work():
    """``fn(activation, hook)`` reading ``hook.name`` (and ``hook.layer`` as an int, not TL's method)."""
    model = make_model("gpt2")
    tokens = tokens_for(model)
    seen = []

    def ablate_head_0(z, hook):
        seen.append((hook.name, hook.layer))
        z = z.clone()
        z[:, :, 0] = 0.0
        return z

    with torch.no_grad():
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_z"), ablate_head_0)])
    assert seen == [("blocks.0.attn.hook_z", 0), ("blocks.1.attn.hook_z", 1)]
    assert not torch.allclose(ablated, model(tokens))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, t: m(t, past_kv_cache=None), "kv_cache=model.new_kv_cache()"),
        (lambda m, t: m(t, prepend_bos=True), "to_tokens"),
        (lambda m, t: m(t, start_at_layer=1), "run_blocks"),
        (lambda m, t: m.run_with_cache(t, incl_bwd=True), "bwd_hooks"),
        (lambda m, t: m.run_with_cache(t, pos_slice=-1), "index the cached tensors"),
        (lambda m, t: m.run_with_hooks(t, reset_hooks_end=False), "scoped"),
        (lambda m, t: m(t, frobnicate=1), "unexpected keyword argument 'frobnicate'"),
        (lambda m, t: m("some text"), "to_tokens"),
    ],
)
def test_transformer_lens_only_arguments_say_what_to_write(call, message):
    model = make_model("gpt2")
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(model, tokens_for(model))


@pytest.mark.parametrize(
    ("variant", "attribute", "message"),
    [
        ("gpt2", "add_hook", "model.hooks"),
        ("gpt2", "set_use_attn_result", "computed whenever"),
        ("gpt2", "hook_dict", "model.hook_points"),
        ("gpt2", "W_gate", "only gated MLPs"),
        ("rotary_neox_rms_gated_gqa", "W_pos", "rotary positions"),
        ("attn_only_nonorm_nopos", "W_in", "attention-only"),
        ("attn_only_nonorm_nopos", "b_out", "attention-only"),
    ],
)
def test_missing_transformer_lens_attributes_say_why(variant, attribute, message):
    model = make_model(variant)
    with pytest.raises(AttributeError, match=message):
        getattr(model, attribute)
    assert not hasattr(model, attribute)


STACKED = {  # name -> (module, shape without the layer dimension, as a function of the config)
    "W_Q": ("attn", lambda c: (c.n_heads, c.d_model, c.d_head)),
    "W_K": ("attn", lambda c: (c.n_heads, c.d_model, c.d_head)),
    "W_V": ("attn", lambda c: (c.n_heads, c.d_model, c.d_head)),
    "W_O": ("attn", lambda c: (c.n_heads, c.d_head, c.d_model)),
    "b_Q": ("attn", lambda c: (c.n_heads, c.d_head)),
    "b_K": ("attn", lambda c: (c.n_heads, c.d_head)),
    "b_V": ("attn", lambda c: (c.n_heads, c.d_head)),
    "b_O": ("attn", lambda c: (c.d_model,)),
    "W_in": ("mlp", lambda c: (c.d_model, c.d_mlp)),
    "W_gate": ("mlp", lambda c: (c.d_model, c.d_mlp)),
    "W_out": ("mlp", lambda c: (c.d_mlp, c.d_model)),
    "b_in": ("mlp", lambda c: (c.d_mlp,)),
    "b_out": ("mlp", lambda c: (c.d_model,)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_stacked_weight_views_have_transformer_lens_shapes_and_values(variant):
    model = make_model(variant)
    cfg = model.cfg
    checked = 0
    for name, (module, shape) in STACKED.items():
        if module == "mlp" and not cfg.has_mlp or name == "W_gate" and not cfg.gated_mlp:
            assert not hasattr(model, name)
            continue
        stacked = getattr(model, name)
        assert stacked.shape == (cfg.n_layers, *shape(cfg)), name
        for layer, block in enumerate(model.blocks):
            own = getattr(getattr(block, module), name)
            if name in ("W_K", "W_V", "b_K", "b_V"):  # one per query head: query head h reads kv head h // g
                own = own.repeat_interleave(cfg.n_groups, dim=0)
            assert_close(stacked[layer], own, atol=0, rtol=0, msg=name)
        checked += 1
    assert checked >= 8
    assert model.W_E is model.embed.W_E and model.b_U is model.unembed.b_U
    assert model.W_U.shape == (cfg.d_model, cfg.d_vocab_out)
    if cfg.positional.value == "learned":
        assert model.W_pos is model.pos_embed.W_pos


def test_stacked_views_read_the_current_weights_refuse_writes_and_pass_gradients():
    model = make_model("rotary_neox_partial_mqa")
    with torch.no_grad():
        model.blocks[1].attn.W_K.add_(1.0)
    assert_close(model.W_K[1, 2], model.blocks[1].attn.W_K[0], atol=0, rtol=0)  # MQA: every head reads kv 0
    with pytest.raises(AttributeError, match=r"read-only .* model\.blocks\[layer\]\.attn\.W_Q"):
        model.W_Q = torch.zeros(1)
    model.W_O.sum().backward()
    assert model.blocks[0].attn.W_O.grad is not None
    assert_close(model.blocks[0].attn.W_O.grad, torch.ones_like(model.blocks[0].attn.W_O), atol=0, rtol=0)
