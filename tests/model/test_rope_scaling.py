"""Scaled rotary embeddings (linear, dynamic NTK, YaRN, Llama-3, LongRoPE) equal `transformers`' on tiny random
models: logits, every layer's residual stream and the rotated queries and keys, within the original context and
beyond it; generation with and without the key/value cache; configs round-trip; bad input is named."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch.testing import assert_close

from interplab import load_model
from interplab.model import ModelConfig, Transformer
from interplab.model.generate import generate
from interplab.model.process import set_config
from interplab.model.rope import (
    DynamicNTKRope,
    LinearRope,
    Llama3Rope,
    LongRope,
    YarnRope,
    inverse_frequencies,
)
from tests.model.test_family_padding import check_left_padding_and_generation, step_logits
from tests.model.test_load_hf import LONGROPE
from tests.model.test_load_hf_qk_norm import _gemma3 as gemma3_config

# max_position_embeddings (dynamic) / original_max_position_embeddings: sequences of 24 go beyond it
ORIGINAL = 16
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=101,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
ROPES = {  # name -> (family, rope parameters beyond rope_theta, config beyond SMALL)
    "linear": ("llama", {"rope_type": "linear", "factor": 2.0}, {}),
    "dynamic": ("llama", {"rope_type": "dynamic", "factor": 3.0}, {"max_position_embeddings": ORIGINAL}),
    "yarn": ("llama", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}, {}),
    "yarn-mscale-betas-untruncated": (
        "qwen2",
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 8,
            "mscale": 0.7,
            "mscale_all_dim": 1.0,
            "beta_fast": 8,
            "beta_slow": 2,
            "truncate": False,
        },
        {"num_key_value_heads": 2},
    ),
    "llama3": (
        "llama",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
        {"num_key_value_heads": 2, "rope_theta": 500.0},
    ),
    "linear-mistral-sliding": (
        "mistral",
        {"rope_type": "linear", "factor": 4.0},
        {"sliding_window": 5, "num_key_value_heads": 2},
    ),
    "yarn-qwen3": (
        "qwen3",
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
        {"num_key_value_heads": 2, "head_dim": 8},
    ),
    "llama3-olmo2": (
        "olmo2",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
        {},
    ),
    "longrope-phi3": ("phi3", LONGROPE, {"original_max_position_embeddings": ORIGINAL}),
    "yarn-qwen3-attention-factor": (  # (what a TransformerLens config can say: its yarn_attention_factor)
        "qwen3",
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "attention_factor": 1.25,
            "beta_fast": 16.0,
        },
        {"num_key_value_heads": 2, "head_dim": 8},
    ),
    # GPT-NeoX: the scaling covers its rotary part only (partial_rotary_factor)
    "linear-neox": ("gpt_neox", {"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, {}),
    "dynamic-neox": (
        "gpt_neox",
        {"rope_type": "dynamic", "factor": 3.0, "partial_rotary_factor": 0.5},
        {"max_position_embeddings": ORIGINAL},
    ),
    "yarn-neox-sequential-full-rotary": (
        "gpt_neox",
        {
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
            "partial_rotary_factor": 1.0,
        },
        {"use_parallel_residual": False},
    ),
    # Gemma-2: transformers scales every layer, the sliding-window ones too
    "llama3-gemma2": (
        "gemma2",
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIGINAL,
        },
        {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 5},
    ),
    "dynamic-gemma2": (
        "gemma2",
        {"rope_type": "dynamic", "factor": 3.0},
        {"max_position_embeddings": ORIGINAL, "head_dim": 8},
    ),
    "longrope-phi3-partial": (
        "phi3",
        {**LONGROPE, "short_factor": [1.0, 1.5], "long_factor": [2.0, 5.0], "partial_rotary_factor": 0.5},
        {"original_max_position_embeddings": ORIGINAL},
    ),
}
CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
}


def _save(name: str, path, *, scaled: bool = True):
    family, rope, extra = ROPES[name]
    config_cls, model_cls = CLASSES[family]
    extra = {"max_position_embeddings": 64, **extra}
    theta = extra.pop("rope_theta", 10000.0)
    params = {**rope, "rope_theta": theta} if scaled else {"rope_type": "default", "rope_theta": theta}
    if not scaled and "partial_rotary_factor" in rope:
        params["partial_rotary_factor"] = rope["partial_rotary_factor"]
    torch.manual_seed(0)
    hf = model_cls(config_cls(**SMALL, **extra, rope_parameters=params)).eval()
    with torch.no_grad():  # weights large enough that attention is sharp and every rotation shows
        for pname, p in hf.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3)
    hf.save_pretrained(path)
    return model_cls


def _fresh(model_cls, path):
    """A newly loaded HF model: its dynamic rotary embedding keeps state between calls."""
    return model_cls.from_pretrained(path).eval()


def _hf_rotated(hf, tokens: torch.Tensor, family: str):
    """HF's logits, hidden states and the rotated queries and keys of every layer (through its rotary function)."""
    module = getattr(transformers.models, family)
    module = getattr(module, f"modeling_{family}")
    rotated: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = module.apply_rotary_pos_emb

    def record(q, k, cos, sin, *args, **kwargs):
        q, k = original(q, k, cos, sin, *args, **kwargs)
        rotated.append((q.transpose(1, 2), k.transpose(1, 2)))  # [batch pos head d_head], as interplab
        return q, k

    module.apply_rotary_pos_emb = record
    try:
        with torch.no_grad():
            out = hf(tokens, output_hidden_states=True)
    finally:
        module.apply_rotary_pos_emb = original
    return out.logits, out.hidden_states, rotated


@pytest.mark.parametrize("seq", [12, 24])
@pytest.mark.parametrize("name", list(ROPES))
def test_scaled_rope_matches_transformers(tmp_path, name, seq):
    family = ROPES[name][0]
    model_cls = _save(name, tmp_path)
    hf = _fresh(model_cls, tmp_path)
    model = load_model(tmp_path)
    tokens = torch.randint(3, 101, (2, seq), generator=torch.Generator().manual_seed(seq))
    logits, hidden, rotated = _hf_rotated(hf, tokens, family)
    got, cache = model.run_with_cache(tokens)
    assert_close(got, logits, atol=1e-4, rtol=0)
    for layer in range(model.cfg.n_layers):
        assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=1e-4, rtol=0)
        assert_close(cache[f"blocks.{layer}.attn.hook_rot_q"], rotated[layer][0], atol=1e-4, rtol=0)
        assert_close(cache[f"blocks.{layer}.attn.hook_rot_k"], rotated[layer][1], atol=1e-4, rtol=0)
    # the scaling is really applied: the unscaled model differs (dynamic NTK only beyond its original length)
    if name.startswith("dynamic") and seq <= ORIGINAL:
        return
    plain = load_model(tmp_path)
    set_config(plain, plain.cfg.replace(rope_scaling=None))
    with torch.no_grad():
        assert (plain(tokens) - logits).abs().max() > 1e-2


def test_dynamic_ntk_generation_equals_transformers_with_and_without_the_cache(tmp_path):
    """A prompt inside the original context, generation past it: with the cache each key keeps the frequencies
    of the step that computed it (as HF's cached generate), without it every step recomputes all of them at the
    current length (as HF's uncached generate); the two differ, so both are checked."""
    model_cls = _save("dynamic", tmp_path)
    model = load_model(tmp_path)
    tokens = torch.randint(3, 101, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # left padding
    results = {}
    for use_cache in (True, False):
        ref = _fresh(model_cls, tmp_path).generate(
            tokens,
            attention_mask=mask,
            max_new_tokens=8,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
            eos_token_id=None,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ours = generate(model, tokens, 8, attention_mask=mask, use_kv_cache=use_cache)
        assert torch.equal(ours.tokens, ref.sequences), use_cache
        results[use_cache] = step_logits(model, ref.sequences, mask, 13, use_cache=use_cache)
        assert_close(results[use_cache], torch.stack(ref.logits, 1), atol=1e-4, rtol=0)
    assert (results[True] - results[False]).abs().max() > 1e-3  # past 16 tokens the cache matters


@pytest.mark.parametrize("use_cache", [True, False])
def test_longrope_generation_across_the_switch_equals_transformers(tmp_path, use_cache):
    """Phi-3's generate recomputes its cache when a generation first passes original_max_position_embeddings
    (short factors before, long after); so does interplab's, and its uncached generation is that computation."""
    model_cls = _save("longrope-phi3", tmp_path)
    model = load_model(tmp_path)
    tokens = torch.randint(3, 101, (2, 13), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    ref = _fresh(model_cls, tmp_path).generate(tokens, use_cache=use_cache, **kw)
    assert torch.equal(generate(model, tokens, 8, use_kv_cache=use_cache).tokens, ref)


def test_configs_round_trip_and_old_configs_load(tmp_path):
    scalings = [
        LinearRope(factor=2.0),
        DynamicNTKRope(factor=2.0, original_max_position_embeddings=8),
        YarnRope(factor=4.0, original_max_position_embeddings=8, beta_fast=16.0),
        Llama3Rope(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8),
        LongRope(
            short_factor=(1.0, 2.0),
            long_factor=(3.0, 4.0),
            original_max_position_embeddings=8,
            attention_factor=1.2,
        ),
    ]
    base = dict(d_model=16, n_layers=1, n_heads=2, d_vocab=11, n_ctx=16, positional="rotary", rotary_dim=4)
    for scaling in scalings:
        cfg = ModelConfig(**base, rope_scaling=scaling)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        model = Transformer(cfg)
        model.save(tmp_path / scaling.rope_type)
        assert load_model(tmp_path / scaling.rope_type).cfg.rope_scaling == scaling
    old = ModelConfig(**base).to_dict()
    del old["rope_scaling"], old["gate_bias"]  # what interplab wrote before these fields existed
    assert ModelConfig.from_dict(old) == ModelConfig(**base)
    # the derived yarn attention factor: 0.1 ln(4) + 1
    assert abs(scalings[2].attention_factor - 1.1386294361) < 1e-9


def test_linear_scaling_is_position_interpolation():
    """Planted: with linear factor f, position p rotates exactly as position p / f does unscaled."""
    freq, factor = inverse_frequencies(LinearRope(factor=4.0), base=10000.0, dim=8)
    plain, _ = inverse_frequencies(None, base=10000.0, dim=8)
    assert factor == 1.0
    assert_close(12 * freq, 3 * plain, atol=1e-6, rtol=0)


def _hf_config_folder(tmp_path, rope: dict) -> None:
    d = transformers.LlamaConfig(**SMALL, max_position_embeddings=64).to_dict()
    d["rope_parameters"] = {**rope, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(d))


@pytest.mark.parametrize("rope_type", ["proportional", "su", "mrope"])
def test_unsupported_rope_type_is_named_with_the_supported_ones(tmp_path, rope_type):
    _hf_config_folder(tmp_path, {"rope_type": rope_type, "factor": 2.0})
    with pytest.raises(
        ValueError,
        match=rf"rope scaling '{rope_type}' is not supported.*default, linear, dynamic, yarn, llama3, longrope",
    ):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["linear-neox", "yarn-neox-sequential-full-rotary", "llama3-gemma2"])
def test_scaled_neox_and_gemma2_left_padding_and_generation_equal_transformers(tmp_path, name):
    """The families that gained rope scaling: a left-padded batch and greedy generation (cached and not) equal
    transformers', as every family's unscaled variants do in test_family_padding."""
    model_cls = _save(name, tmp_path)
    check_left_padding_and_generation(_fresh(model_cls, tmp_path), load_model(tmp_path))


def test_missing_rope_parameter_is_named(tmp_path):
    _hf_config_folder(tmp_path, {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0})
    with pytest.raises(ValueError, match=r"'llama3' needs 'low_freq_factor'"):
        load_model(tmp_path)


def test_bad_rope_scaling_in_a_model_config_is_named():
    base = dict(d_model=16, n_layers=1, n_heads=2, d_vocab=11, n_ctx=16, positional="rotary")
    with pytest.raises(ValueError, match=r"'su' is not supported by interplab; supported: default, linear"):
        ModelConfig(**base, rope_scaling={"rope_type": "su", "factor": 2.0})
    with pytest.raises(
        ValueError, match=r"'linear' has no fields \['low_freq_factor'\]; its fields: \['factor'\]"
    ):
        ModelConfig(**base, rope_scaling={"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0})
    with pytest.raises(ValueError, match=r"factor must be a positive number, got -1"):
        ModelConfig(**base, rope_scaling={"rope_type": "linear", "factor": -1})
    with pytest.raises(ValueError, match=r"rope_scaling='linear' needs positional='rotary', got 'learned'"):
        ModelConfig(**{**base, "positional": "learned"}, rope_scaling=LinearRope(factor=2.0))
    model = Transformer(
        ModelConfig(
            **base,
            rope_scaling=LongRope(
                short_factor=(1.0,),
                long_factor=(1.0,),
                original_max_position_embeddings=4,
                attention_factor=1.0,
            ),
        )
    )
    with pytest.raises(ValueError, match=r"'longrope' has 1 factors, but rotary_dim=8 needs 4"):
        model(torch.tensor([[1, 2, 3]]))


# a TransformerLens config of a small rotary model (the tests add n_layers and what they check)
TL_ROTARY = dict(
    d_model=32,
    n_heads=4,
    d_mlp=64,
    d_vocab=50,
    n_ctx=64,
    act_fn="silu",
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=8,
)


@pytest.mark.filterwarnings("error")  # every field is read: no "ignored" warning
def test_transformer_lens_ntk_by_parts_is_llama3_rope():
    """TransformerLens' NTK-by-parts rope (its Llama-3.1/3.2 configs) is transformers' llama3 formula; the
    original context is NTK_original_ctx_len (older TransformerLens, without that field, used n_ctx)."""
    from interplab.model.convert.transformer_lens import tl_config_to_model_config

    tl = dict(
        TL_ROTARY,
        n_layers=1,
        d_head=8,
        gated_mlp=True,
        rotary_base=500000.0,
        use_NTK_by_parts_rope=True,
        NTK_by_parts_low_freq_factor=1.0,
        NTK_by_parts_high_freq_factor=4.0,
        NTK_by_parts_factor=32.0,
    )
    expected = Llama3Rope(
        factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
    )
    assert tl_config_to_model_config(tl).rope_scaling == expected
    tl["NTK_original_ctx_len"] = 8192
    scaling = tl_config_to_model_config(tl).rope_scaling
    assert scaling == expected.__class__(**{**vars(expected), "original_max_position_embeddings": 8192})
    assert tl_config_to_model_config({**tl, "use_NTK_by_parts_rope": False}).rope_scaling is None


@pytest.mark.parametrize(
    "name", ["linear", "dynamic", "llama3", "yarn-mscale-betas-untruncated", "longrope-phi3"]
)
def test_legacy_rope_scaling_configs(tmp_path, name):
    """config.json as hub checkpoints wrote it before transformers 5: a flat ``rope_theta`` beside
    ``rope_scaling`` (Llama-2-era files name the kind ``type``, Llama-3.1's ``rope_type``; Phi-3's 128k files
    call longrope ``su``); transformers reads them, and so does interplab, to the same logits."""
    model_cls = _save(name, tmp_path)
    cfg_file = tmp_path / "config.json"
    d = json.loads(cfg_file.read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type")
    if name in ("linear", "dynamic"):
        rope["type"] = kind
    else:
        rope["rope_type"] = "su" if kind == "longrope" else kind
    d["rope_scaling"] = rope
    cfg_file.write_text(json.dumps(d))
    hf = _fresh(model_cls, tmp_path)
    model = load_model(tmp_path)
    assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.rope_type == kind
    tokens = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_gemma3_scales_its_global_layers_only(tmp_path):
    """Gemma-3 4B+ scale the positions of their global (full_attention) layers linearly and leave the local ones:
    logits, residual stream and rotated q/k equal transformers', and scaling every layer (or none) differs."""
    rope = {
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 50_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
    }
    cfg, _ = gemma3_config(num_key_value_heads=2, rope_parameters=rope)  # local, global, local layers
    torch.manual_seed(0)
    hf = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            p.normal_(0, 0.3) if "norm" not in pname else p.uniform_(-0.5, 0.5)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert model.cfg.rope_scaling == LinearRope(factor=4.0) and model.cfg.rope_scaled_layers == (1,)
    assert model.cfg.n_layers == 3
    tokens = torch.randint(3, 101, (2, 20), generator=torch.Generator().manual_seed(3))
    logits, hidden, rotated = _hf_rotated(hf, tokens, "gemma3")
    got, cache = model.run_with_cache(tokens)
    assert_close(got, logits, atol=1e-4, rtol=0)
    for layer in range(3):
        assert_close(cache[f"blocks.{layer}.hook_resid_pre"], hidden[layer], atol=1e-4, rtol=0)
        assert_close(cache[f"blocks.{layer}.attn.hook_rot_q"], rotated[layer][0], atol=1e-4, rtol=0)
    for changes in (dict(rope_scaled_layers=()), dict(rope_scaling=None, rope_scaled_layers=())):
        other = load_model(tmp_path)
        set_config(other, other.cfg.replace(**changes))
        with torch.no_grad():
            assert (other(tokens) - logits).abs().max() > 1e-2, changes


@pytest.mark.parametrize("kind", ["linear", "dynamic"])
def test_legacy_neox_rope_scaling_config(tmp_path, kind):
    """A GPT-NeoX config.json as transformers 4 wrote it: ``rotary_emb_base``, ``rotary_pct`` and
    ``rope_scaling: {"type": ...}``; transformers reads it, and so does interplab, to the same logits."""
    name = f"{kind}-neox"
    model_cls = _save(name, tmp_path)
    cfg_file = tmp_path / "config.json"
    d = json.loads(cfg_file.read_text())
    rope = d.pop("rope_parameters")
    d["rotary_emb_base"], d["rotary_pct"] = 500.0, rope["partial_rotary_factor"]
    d["rope_scaling"] = {"type": kind, "factor": rope["factor"]}
    cfg_file.write_text(json.dumps(d))
    hf = _fresh(model_cls, tmp_path)
    assert hf.config.rope_parameters["rope_theta"] == 500.0
    model = load_model(tmp_path)
    assert model.cfg.rope_scaling is not None and model.cfg.rope_scaling.rope_type == kind
    assert model.cfg.rotary_base == 500.0 and model.cfg.rotary_dim == 4
    tokens = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def _hf_to_tl(hf, tl_extra: dict, *, qk_norm: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """A Llama/Qwen3 transformers model as TransformerLens converts it (its ``convert_llama_weights`` /
    ``convert_qwen3_weights`` and its Qwen3 config): heads split out of the projections, K/V of grouped-query
    attention as ``_W_K``/``_W_V``, zero biases, q/k norms at ``blocks.L.attn.q_norm.w``."""
    c = hf.config
    h, kv, dh, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    state = {"embed.W_E": sd["model.embed_tokens.weight"]}
    for layer in range(c.num_hidden_layers):
        b, o = f"model.layers.{layer}.", f"blocks.{layer}."
        gqa = "_" if kv != h else ""
        state[o + "ln1.w"] = sd[b + "input_layernorm.weight"]
        state[o + "attn.W_Q"] = sd[b + "self_attn.q_proj.weight"].reshape(h, dh, d).transpose(1, 2)
        state[o + f"attn.{gqa}W_K"] = sd[b + "self_attn.k_proj.weight"].reshape(kv, dh, d).transpose(1, 2)
        state[o + f"attn.{gqa}W_V"] = sd[b + "self_attn.v_proj.weight"].reshape(kv, dh, d).transpose(1, 2)
        state[o + "attn.b_Q"] = torch.zeros(h, dh)
        state[o + f"attn.{gqa}b_K"] = torch.zeros(kv, dh)
        state[o + f"attn.{gqa}b_V"] = torch.zeros(kv, dh)
        state[o + "attn.W_O"] = sd[b + "self_attn.o_proj.weight"].reshape(d, h, dh).permute(1, 2, 0)
        state[o + "attn.b_O"] = torch.zeros(d)
        if qk_norm:
            state[o + "attn.q_norm.w"] = sd[b + "self_attn.q_norm.weight"]
            state[o + "attn.k_norm.w"] = sd[b + "self_attn.k_norm.weight"]
        state[o + "ln2.w"] = sd[b + "post_attention_layernorm.weight"]
        state[o + "mlp.W_in"] = sd[b + "mlp.up_proj.weight"].T
        state[o + "mlp.W_gate"] = sd[b + "mlp.gate_proj.weight"].T
        state[o + "mlp.W_out"] = sd[b + "mlp.down_proj.weight"].T
        state[o + "mlp.b_in"] = torch.zeros(c.intermediate_size)
        state[o + "mlp.b_out"] = torch.zeros(d)
        state[o + "attn.rotary_sin"] = torch.zeros(64, dh)  # TL's buffers (recomputed by interplab)
        state[o + "attn.rotary_cos"] = torch.ones(64, dh)
    state["ln_final.w"] = sd["model.norm.weight"]
    state["unembed.W_U"] = sd["lm_head.weight"].T
    state["unembed.b_U"] = torch.zeros(c.vocab_size)
    tl = dict(
        d_model=d,
        d_head=dh,
        n_heads=h,
        n_key_value_heads=kv if kv != h else None,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        n_ctx=64,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        use_attn_scale=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_base=c.rope_parameters["rope_theta"],
        rotary_adjacent_pairs=False,
        rotary_dim=dh,
        final_rms=True,
        gated_mlp=True,
        use_qk_norm=qk_norm,
        original_architecture=type(hf).__name__,
        **tl_extra,
    )
    return state, tl


# HF model (ROPES name, scaled?) -> the TransformerLens config fields that say the same
TL_OPTIONS = {
    "qk-norm": ("yarn-qwen3", False, {}),
    "qk-norm-yarn": (
        "yarn-qwen3-attention-factor",
        True,
        dict(
            use_yarn_rope=True,
            yarn_factor=4.0,
            yarn_attention_factor=1.25,
            yarn_beta_fast=16.0,
            yarn_beta_slow=1.0,
            yarn_original_max_position_embeddings=ORIGINAL,
        ),
    ),
    "rotary-scaling-factor": ("linear", True, dict(rotary_scaling_factor=2.0)),
}


@pytest.mark.filterwarnings("error")  # every TL field is read: no "ignored" warning
@pytest.mark.parametrize("option", list(TL_OPTIONS))
def test_transformer_lens_qk_norm_and_rope_options_equal_transformers(tmp_path, option):
    """A transformers model converted to TransformerLens' layout and config as TransformerLens converts it
    (``use_qk_norm``: per-head RMSNorm of q and k before rotary; ``use_yarn_rope`` with its explicit
    ``yarn_attention_factor``; ``rotary_scaling_factor``: linear on the global layers) loads to transformers'
    logits, rotated q/k, left-padded batches and greedy generation; without the option it differs."""
    from interplab.model.convert.transformer_lens import load_transformer_lens

    name, scaled, extra = TL_OPTIONS[option]
    model_cls = _save(name, tmp_path / "hf", scaled=scaled)
    hf = _fresh(model_cls, tmp_path / "hf")
    qk_norm = ROPES[name][0] == "qwen3"
    state, tl = _hf_to_tl(hf, extra, qk_norm=qk_norm)
    torch.save({"state_dict": state, "cfg": tl}, tmp_path / "tl.pt")
    model = load_transformer_lens(tmp_path / "tl.pt")
    tokens = torch.randint(3, 101, (2, 24), generator=torch.Generator().manual_seed(4))
    logits, hidden, rotated = _hf_rotated(hf, tokens, ROPES[name][0])
    got, cache = model.run_with_cache(tokens)
    assert_close(got, logits, atol=1e-4, rtol=0)
    for layer in range(model.cfg.n_layers):
        assert_close(cache[f"blocks.{layer}.attn.hook_rot_q"], rotated[layer][0], atol=1e-4, rtol=0)
        assert_close(cache[f"blocks.{layer}.attn.hook_rot_k"], rotated[layer][1], atol=1e-4, rtol=0)
    check_left_padding_and_generation(hf, model)
    # the option is really read: the checkpoint without it computes something else
    if qk_norm and not scaled:
        state = {k: v for k, v in state.items() if "_norm." not in k}
        off = dict(tl, use_qk_norm=False)
    else:
        off = {k: v for k, v in tl.items() if k not in extra}
    torch.save({"state_dict": state, "cfg": off}, tmp_path / "off.pt")
    with torch.no_grad():
        assert (load_transformer_lens(tmp_path / "off.pt")(tokens) - logits).abs().max() > 1e-2


def test_transformer_lens_rotary_scaling_factor_scales_global_layers_only():
    """TransformerLens' ``rotary_scaling_factor`` (its Gemma-3 configs) divides the positions of the global
    layers only; with NTK-by-parts or YaRN on, TransformerLens ignores it, and so does interplab."""
    from interplab.model.convert.transformer_lens import tl_config_to_model_config

    tl = dict(
        TL_ROTARY,
        n_layers=3,
        rotary_scaling_factor=8.0,
        use_local_attn=True,
        window_size=4,
        attn_types=["local", "global", "local"],
    )
    cfg = tl_config_to_model_config(tl)
    assert cfg.rope_scaling == LinearRope(factor=8.0) and cfg.rope_scaled_layers == (1,)
    assert tl_config_to_model_config({**tl, "attn_types": ["local"] * 3}).rope_scaling is None
    yarn = tl_config_to_model_config({**tl, "use_yarn_rope": True, "yarn_factor": 2.0})
    assert yarn.rope_scaling == YarnRope(
        factor=2.0, original_max_position_embeddings=4096, attention_factor=1.0
    )
    assert yarn.rope_scaled_layers == ()


def test_transformer_lens_olmo_full_qk_norm_is_refused():
    from interplab.model.convert.transformer_lens import tl_config_to_model_config

    tl = dict(d_model=32, n_layers=1, n_heads=4, d_vocab=50, n_ctx=16, act_fn="silu")
    with pytest.raises(ValueError, match=r"original_architecture='Olmo2ForCausalLM' .* not supported"):
        tl_config_to_model_config({**tl, "original_architecture": "Olmo2ForCausalLM"})
