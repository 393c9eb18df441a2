"""Parity with `transformers` for the families with q/k norms (Qwen3, Gemma-3, OLMo-2): tiny random models
saved locally and loaded by `load_model`. Logits, the residual stream entering every block, the attention
patterns and the q/k norms' outputs at float32 1e-4; a left-padded batch (each prompt as `transformers` runs
it alone); greedy generation from a left-padded batch equal to ``transformers``' own ``generate``."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.testing import assert_close

from interplab import load_model
from interplab.model.generate import generate
from interplab.model.process import process_weights

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    head_dim=8,
    intermediate_size=64,
    vocab_size=101,
    max_position_embeddings=64,
)
PAD = 0
GEMMA3_TYPES = ["sliding_attention", "full_attention", "sliding_attention"]


def _qwen3(**kw):
    return transformers.Qwen3Config(**{**SMALL, **kw}), transformers.Qwen3ForCausalLM


def _olmo2(**kw):
    return transformers.Olmo2Config(**{**SMALL, **kw}), transformers.Olmo2ForCausalLM


def _gemma3(**kw):
    cfg = {
        **SMALL,
        "query_pre_attn_scalar": 16,
        "sliding_window": 4,
        "layer_types": GEMMA3_TYPES,
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 50_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        },
        **kw,
    }
    return transformers.Gemma3TextConfig(**cfg), transformers.Gemma3ForCausalLM


def _gemma3_multimodal(**kw):
    text, _ = _gemma3(**kw)
    vision = transformers.SiglipVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    cfg = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    return cfg, transformers.Gemma3ForConditionalGeneration


VARIANTS = {
    "qwen3-gqa": lambda: _qwen3(num_key_value_heads=2, rope_theta=500.0),
    "qwen3-tied-sliding-bias": lambda: _qwen3(
        num_key_value_heads=1,
        tie_word_embeddings=True,
        attention_bias=True,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    ),
    "gemma3-text": lambda: _gemma3(num_key_value_heads=2),
    "gemma3-text-softcap-untied": lambda: _gemma3(
        num_key_value_heads=1,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        tie_word_embeddings=False,
    ),
    "gemma3-multimodal": lambda: _gemma3_multimodal(num_key_value_heads=2),
    "olmo2-mha": lambda: _olmo2(),
    "olmo2-gqa-bias": lambda: _olmo2(num_key_value_heads=2, attention_bias=True, rope_theta=300.0),
}


def make_hf(variant: str):  # noqa: ANN201
    cfg, cls = VARIANTS[variant]()
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random biases and norm weights (random init leaves them 0 or 1), so a slip shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name:
                # Gemma's norms multiply by (1 + w): w around 0, the others around 1
                p.uniform_(-0.5, 0.5) if "gemma" in variant else p.uniform_(0.5, 1.5)
    return model


def _text_model(hf):  # noqa: ANN001, ANN202
    """The decoder stack (the text model of a multimodal Gemma-3)."""
    inner = hf.model
    return getattr(inner, "language_model", inner)


def _hf_run(hf, tokens, mask=None):  # noqa: ANN001, ANN202
    """Logits, hidden states and attentions of ``transformers`` (eager attention), and its q/k norms' outputs."""
    normed: dict[str, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(_text_model(hf).layers):
        for which in ("q_norm", "k_norm"):
            module = getattr(block.self_attn, which)
            handles.append(
                module.register_forward_hook(
                    lambda m, i, o, key=f"{layer}.{which}": normed.__setitem__(key, o.detach())
                )
            )
    try:
        with torch.no_grad():
            out = hf(tokens, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    return out, normed


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):  # noqa: ANN001, ANN201
    hf = make_hf(request.param)
    hf.set_attn_implementation("eager")
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def test_logits_and_hooks_equal_transformers(pair):
    variant, hf, path = pair
    model = load_model(path)
    n_layers = model.cfg.n_layers
    tokens = torch.randint(1, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    out, normed = _hf_run(hf, tokens)
    logits, cache = model.run_with_cache(tokens)
    assert_close(logits, out.logits, atol=1e-4, rtol=0)
    for layer in range(n_layers):
        assert_close(
            cache["resid_pre", layer], out.hidden_states[layer], atol=1e-4, rtol=0, msg=f"resid {layer}"
        )
        assert_close(
            cache["pattern", layer], out.attentions[layer], atol=1e-4, rtol=0, msg=f"pattern {layer}"
        )
        attn = model.blocks[layer].attn
        for which in ("q_norm", "k_norm"):
            ours = cache[f"blocks.{layer}.attn.{which}.hook_normalized"] * getattr(attn, which).w
            theirs = normed[f"{layer}.{which}"]
            if variant.startswith("gemma3"):  # [batch head pos d_head]; ours is [batch pos head d_head]
                theirs = theirs.transpose(1, 2)
            assert_close(ours, theirs.reshape(ours.shape), atol=1e-4, rtol=0, msg=f"{which} {layer}")
    # what the family's config turned into
    cfg = model.cfg
    assert cfg.qk_norm.value == ("full" if variant.startswith("olmo2") else "head")
    if variant.startswith("gemma3"):
        assert cfg.rotary_bases == (100.0, 50_000.0, 100.0) and cfg.sliding_layers == (0, 2)
        assert cfg.attn_scale == 4.0
    if variant.startswith("olmo2"):
        assert not cfg.pre_norms and "blocks.0.ln1.hook_normalized" not in model.hook_names


def test_left_padded_batch_gives_each_prompt_what_transformers_gives_it_alone(pair):
    _, hf, path = pair
    model = load_model(path)
    lengths = [9, 4, 7]
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(1, 101, (n,), generator=g) for n in lengths]
    tokens = torch.full((3, 9), PAD, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, 9 - len(s) :], mask[i, 9 - len(s) :] = s, 1
    logits, cache = model.run_with_cache(tokens, attention_mask=mask, names=lambda n: "norm.hook" in n)
    for i, s in enumerate(seqs):
        out, _ = _hf_run(hf, s[None])
        n = len(s)
        assert_close(logits[i, 9 - n :], out.logits[0], atol=1e-4, rtol=0, msg=f"row {i}")
        _, alone = model.run_with_cache(s[None], names=lambda n: "norm.hook" in n)
        for name in alone:
            assert_close(cache[name][i, 9 - n :], alone[name][0], atol=1e-5, rtol=1e-5, msg=name)


def test_left_padded_greedy_generation_equals_transformers_generate(pair):
    variant, hf, path = pair
    model = load_model(path)
    lengths = [6, 3, 5]
    g = torch.Generator().manual_seed(1)
    tokens = torch.full((3, 6), PAD, dtype=torch.long)
    mask = torch.zeros(3, 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, 6 - n :] = torch.randint(1, 101, (n,), generator=g)
        mask[i, 6 - n :] = 1
    with torch.no_grad():
        ref = hf.generate(
            tokens,
            attention_mask=mask,
            max_new_tokens=6,  # past the sliding windows (4) of Qwen3 and Gemma-3
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
    for use_kv_cache in (True, False):
        ours = generate(model, tokens, 6, attention_mask=mask, use_kv_cache=use_kv_cache)
        assert torch.equal(ours.tokens, ref.sequences), (variant, use_kv_cache)
    full_mask = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        logits = model(ref.sequences, attention_mask=full_mask)
    for step, step_logits in enumerate(ref.logits):
        assert_close(logits[:, 5 + step], step_logits, atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_weight_processing_keeps_the_log_probabilities(pair):
    """fold_ln (the pre-norms into W_Q/W_K/W_V and W_in/W_gate, ln_final into W_U; OLMo-2 has no pre-norms,
    and the q/k norms stay: their weights act after the normalisation, before rotary, which no weight before
    them can hold), fold_value_biases and center_unembed (where no logit soft-capping forbids it)."""
    _, hf, path = pair
    model = load_model(path)
    tokens = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(tokens).log_softmax(-1)
        q_norm_w = model.blocks[0].attn.q_norm.w.clone()
        process_weights(model)
        after = model(tokens).log_softmax(-1)
    assert_close(after, before, atol=1e-4, rtol=0)
    assert torch.equal(model.blocks[0].attn.q_norm.w, q_norm_w)
    if model.cfg.pre_norms:
        assert torch.equal(model.blocks[0].ln1.w, torch.ones_like(model.blocks[0].ln1.w))


def _rewrite_config(path, change) -> None:  # noqa: ANN001
    file = path / "config.json"
    file.write_text(json.dumps(change(json.loads(file.read_text()))))


def test_legacy_gemma3_config_with_a_pattern_and_flat_rope_keys(tmp_path):
    """Gemma-3 folders written before transformers 5: ``sliding_window_pattern``, ``rope_theta`` and
    ``rope_local_base_freq`` instead of ``layer_types`` and per-type ``rope_parameters``."""
    hf = make_hf("gemma3-text")
    hf.save_pretrained(tmp_path)

    def legacy(d: dict) -> dict:
        d.pop("layer_types")
        rope = d.pop("rope_parameters")
        d["sliding_window_pattern"] = 2  # layers 0 and 2 local, 1 global: as GEMMA3_TYPES
        d["rope_theta"] = rope["full_attention"]["rope_theta"]
        d["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        d["rope_scaling"] = None
        return d

    _rewrite_config(tmp_path, legacy)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # transformers reads it too
    assert reloaded.config.layer_types == GEMMA3_TYPES
    model = load_model(tmp_path)
    assert model.cfg.rotary_bases == (100.0, 50_000.0, 100.0)
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(model(tokens), reloaded(tokens).logits, atol=1e-4, rtol=0)
        assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_rope_scaling_and_unsupported_options_are_refused_by_name(tmp_path):
    hf = make_hf("gemma3-text")
    hf.config.save_pretrained(tmp_path)

    def scaled(d: dict) -> dict:  # (the global layers' scaling is read: tests/model/test_rope_scaling.py)
        d["rope_parameters"]["sliding_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4}
        return d

    _rewrite_config(tmp_path, scaled)
    with pytest.raises(ValueError, match="Gemma-3 rope scaling 'linear' on its sliding_attention layers"):
        load_model(tmp_path)
    _rewrite_config(tmp_path, lambda d: {**d, "rope_parameters": None, "use_bidirectional_attention": True})
    with pytest.raises(ValueError, match="use_bidirectional_attention=True"):
        load_model(tmp_path)
    make_hf("qwen3-gqa").config.save_pretrained(tmp_path)
    _rewrite_config(
        tmp_path, lambda d: {**d, "rope_parameters": {"rope_type": "proportional", "factor": 4.0}}
    )
    with pytest.raises(
        ValueError, match="Qwen3 rope scaling 'proportional' is not supported.*default, linear"
    ):
        load_model(tmp_path)


def test_saved_and_reloaded_model_is_the_same_model(pair, tmp_path):
    """The new config fields (qk_norm, pre_norms, rotary_bases) survive interplab's own folder format."""
    _, _, path = pair
    model = load_model(path)
    model.save(tmp_path / "saved")
    again = load_model(tmp_path / "saved")
    assert again.cfg == model.cfg
    tokens = torch.randint(0, 101, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(again(tokens), model(tokens))


def test_old_configs_load_and_bad_values_are_named():
    from interplab.model import ModelConfig

    old = dict(
        d_model=16, n_layers=2, n_heads=4, d_vocab=23, n_ctx=12, version=1
    )  # written before the fields
    cfg = ModelConfig.from_dict(old)
    assert cfg.qk_norm.value == "none" and cfg.pre_norms and cfg.rotary_bases == ()
    assert ModelConfig.from_dict(
        cfg.replace(positional="rotary", rotary_bases=(1.0, 2.0)).to_dict()
    ).rotary_bases == (
        1.0,
        2.0,
    )
    base = {k: v for k, v in old.items() if k != "version"}
    with pytest.raises(ValueError, match="qk_norm='rms' is not one of: none, head, full"):
        ModelConfig(**base, qk_norm="rms")
    with pytest.raises(ValueError, match="rotary_bases has 1 values, but the model has 2 layers"):
        ModelConfig(**base, positional="rotary", rotary_bases=(1.0,))
    with pytest.raises(ValueError, match="rotary_bases is set but positional='learned'"):
        ModelConfig(**base, rotary_bases=(1.0, 2.0))
    with pytest.raises(ValueError, match="pre_norms=False needs post_norms=True"):
        ModelConfig(**base, pre_norms=False)


@pytest.mark.parametrize("variant", ["qwen3-tied-sliding-bias", "olmo2-gqa-bias"])
def test_legacy_configs_with_flat_rope_keys_and_no_layer_types(tmp_path, variant):
    """Qwen3 and OLMo-2 folders written before transformers 5 (``rope_theta``, no ``layer_types``: Qwen3's
    sliding layers then follow ``max_window_layers``)."""
    hf = make_hf(variant)
    hf.save_pretrained(tmp_path)

    def legacy(d: dict) -> dict:
        d.pop("layer_types", None)
        d["rope_theta"], d["rope_scaling"] = d.pop("rope_parameters")["rope_theta"], None
        return d

    _rewrite_config(tmp_path, legacy)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model = load_model(tmp_path)
    if variant.startswith("qwen3"):
        assert model.cfg.sliding_layers == (1, 2) and model.cfg.sliding_window == 4
    tokens = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(model(tokens), reloaded(tokens).logits, atol=1e-4, rtol=0)
        assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
