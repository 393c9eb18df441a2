"""Weight processing leaves log-probabilities unchanged, on random models and on HF-loaded ones."""

import copy

import pytest
import torch
import transformers

from interplab import load_model
from interplab.model import ModelConfig, Transformer
from interplab.model.process import (
    center_unembed,
    center_writing_weights,
    fold_layer_norm,
    fold_value_biases,
    process_weights,
)

BASE = dict(d_model=32, n_layers=2, n_heads=4, d_vocab=61, n_ctx=24)
ARCHS = {
    "gpt2-like": dict(act_fn="gelu_tanh"),
    "llama-like-gqa": dict(
        normalization="rmsnorm", positional="rotary", n_kv_heads=2, gated_mlp=True, act_fn="silu"
    ),
    "neox-like-parallel": dict(positional="rotary", rotary_dim=4, parallel_attn_mlp=True),
    "tied-attn-only": dict(attn_only=True, tie_embeddings=True),
    "tied-layernorm-gated-mqa": dict(tie_embeddings=True, n_kv_heads=1, gated_mlp=True, act_fn="gelu"),
    "gemma-like": dict(
        normalization="rmsnorm",
        positional="rotary",
        post_norms=True,
        gated_mlp=True,
        attn_softcap=20.0,
        logit_softcap=10.0,
        embed_scale=32**0.5,
        tie_embeddings=True,
        sliding_window=5,
        sliding_layers=(0,),
    ),
    "layernorm-gated-gate-bias-yarn": dict(
        gated_mlp=True,
        gate_bias=True,
        act_fn="silu",
        positional="rotary",
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    ),
    "bidirectional-classifier": dict(causal=False, d_vocab_out=3, act_fn="relu", unembed_bias=True),
    "smeared-keys": dict(smear_keys=True, attn_only=True),
    # q/k norms: ln1 still folds into W_Q/W_K (and centring holds under LayerNorm), the q/k norms keep their w
    "qk-norm-layernorm-rotary-bases": dict(positional="rotary", qk_norm="head", rotary_bases=(10.0, 1e4)),
    "olmo-like": dict(
        normalization="rmsnorm",
        positional="rotary",
        qk_norm="full",
        pre_norms=False,
        post_norms=True,
        gated_mlp=True,
    ),
}


def random_model(arch: str) -> Transformer:
    model = Transformer(ModelConfig(**BASE, **ARCHS[arch]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "w":
                p.uniform_(0.5, 1.5)
            elif leaf.startswith("b") or leaf == "smear":
                if not (
                    leaf == "b" and name.endswith("ln2.b") and model.cfg.gated_mlp and not model.cfg.gate_bias
                ):
                    p.normal_(
                        0, 0.3
                    )  # a gated MLP's gate without b_gate has no bias to fold ln2.b into: keep it 0
            else:
                p.normal_(0, 0.3)
    return model


def log_probs(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(tokens).double(), dim=-1)


def _applies(fn, model: Transformer) -> bool:
    cfg = model.cfg
    if fn is center_writing_weights:
        return cfg.normalization.value == "layernorm" and not cfg.post_norms
    if fn is center_unembed:
        return cfg.logit_softcap is None
    return True


FUNCTIONS = {
    f.__name__: f for f in (fold_layer_norm, center_writing_weights, center_unembed, fold_value_biases)
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("fn_name", list(FUNCTIONS))
def test_each_function_keeps_log_probs(arch, fn_name):
    fn = FUNCTIONS[fn_name]
    model = random_model(arch)
    tokens = torch.randint(0, BASE["d_vocab"], (3, 12))
    before = log_probs(model, tokens)
    if not _applies(fn, model):
        kept = copy.deepcopy(model.state_dict())
        with pytest.raises(ValueError, match="layernorm|LayerNorm|post_norms|logit_softcap"):
            fn(model)
        for k, v in model.state_dict().items():  # refused: nothing changed
            torch.testing.assert_close(v, kept[k], atol=0, rtol=0)
        return
    assert fn(model) is model
    torch.testing.assert_close(log_probs(model, tokens), before, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_all_combined_keep_log_probs_and_padding(arch):
    model = random_model(arch)
    tokens = torch.randint(0, BASE["d_vocab"], (3, 12))
    mask = torch.ones_like(tokens)
    mask[0, 8:] = 0
    before = log_probs(model, tokens)
    with torch.no_grad():
        before_masked = torch.log_softmax(model(tokens, attention_mask=mask).double(), -1)
    process_weights(model)
    torch.testing.assert_close(log_probs(model, tokens), before, atol=1e-4, rtol=0)
    with torch.no_grad():
        after_masked = torch.log_softmax(model(tokens, attention_mask=mask).double(), -1)
    torch.testing.assert_close(after_masked, before_masked, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2-like", "llama-like-gqa", "tied-layernorm-gated-mqa", "gemma-like"])
def test_processed_weights_have_the_promised_form(arch, tmp_path):
    model = random_model(arch)
    tied = model.cfg.tie_embeddings
    process_weights(model)
    cfg = model.cfg
    assert not cfg.tie_embeddings and hasattr(model.unembed, "W_U")
    assert all(m.cfg is cfg for m in model.modules() if hasattr(m, "cfg")), "a submodule kept the old config"
    for name, p in model.named_parameters():
        if name.endswith((".ln1.w", ".ln2.w")) or name == "ln_final.w":
            torch.testing.assert_close(p, torch.ones_like(p), atol=0, rtol=0)
        if name.endswith((".ln1.b", ".ln2.b")) or name == "ln_final.b":
            torch.testing.assert_close(p, torch.zeros_like(p), atol=0, rtol=0)
        if name.endswith("attn.b_V"):
            torch.testing.assert_close(p, torch.zeros_like(p), atol=0, rtol=0)
    if cfg.normalization.value == "layernorm":
        for w in (model.embed.W_E, model.blocks[0].attn.W_O, model.blocks[1].mlp.W_out):
            torch.testing.assert_close(w.mean(-1), torch.zeros(w.shape[:-1]), atol=1e-6, rtol=0)
    if cfg.logit_softcap is None:
        torch.testing.assert_close(model.unembed.W_U.mean(-1), torch.zeros(cfg.d_model), atol=1e-6, rtol=0)
    # the processed model round-trips through interplab's format
    tokens = torch.randint(0, BASE["d_vocab"], (2, 10))
    again = load_model(model.save(tmp_path / "m"))
    assert again.cfg == cfg and tied in (True, False)
    torch.testing.assert_close(again(tokens), model(tokens), atol=0, rtol=0)


def test_fold_layer_norm_refuses_a_bias_the_gate_cannot_take():
    model = random_model("tied-layernorm-gated-mqa")
    with torch.no_grad():
        model.blocks[1].ln2.b.fill_(0.1)
    kept = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"blocks\.1\.ln2\.b .*gate"):
        fold_layer_norm(model)
    assert model.cfg.tie_embeddings  # nothing changed, not even the tying
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, kept[k], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama-like-gqa", "gemma-like"])
@pytest.mark.parametrize("seed", [0, 1])
def test_transformer_lens_four_flags_on_rmsnorm_skip_what_is_invalid_with_a_warning(arch, seed):
    """TL's usual flags (all four True) on RMSNorm models: the invalid steps are skipped, each with one warning
    naming its flag; the valid ones are applied; log-probabilities are unchanged."""
    torch.manual_seed(seed)
    model = random_model(arch)
    tokens = torch.randint(0, BASE["d_vocab"], (3, 12))
    before = log_probs(model, tokens)
    w_e = model.embed.W_E.detach().clone()
    with pytest.warns(UserWarning) as record:
        process_weights(
            model, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True
        )
    messages = [str(w.message) for w in record]
    skipped = [m.split("=")[0] for m in messages if "skipped" in m]
    expected = ["center_writing_weights"] + (["center_unembed"] if model.cfg.logit_softcap else [])
    assert skipped == expected, messages
    assert "normalization='rmsnorm'" in messages[0] or "post_norms" in messages[0]
    torch.testing.assert_close(log_probs(model, tokens), before, atol=1e-4, rtol=0)
    torch.testing.assert_close(model.embed.W_E, w_e, atol=0, rtol=0)  # writing weights not centred
    for name, p in model.named_parameters():  # ln folded, value biases folded
        if name.endswith((".ln1.w", ".ln2.w")) or name == "ln_final.w":
            torch.testing.assert_close(p, torch.ones_like(p), atol=0, rtol=0)
        if name.endswith("attn.b_V"):
            torch.testing.assert_close(p, torch.zeros_like(p), atol=0, rtol=0)
    if model.cfg.logit_softcap is None:
        torch.testing.assert_close(
            model.unembed.W_U.mean(-1), torch.zeros(model.cfg.d_model), atol=1e-6, rtol=0
        )


def test_load_model_with_transformer_lens_flags_on_rmsnorm_warns_and_loads(tmp_path):
    model = random_model("llama-like-gqa")
    tokens = torch.randint(0, BASE["d_vocab"], (2, 10))
    before = log_probs(model, tokens)
    model.save(tmp_path / "m")
    with pytest.warns(UserWarning, match="center_writing_weights=True skipped"):
        loaded = load_model(
            tmp_path / "m",
            fold_ln=True,
            center_writing_weights=True,
            center_unembed=True,
            fold_value_biases=True,
        )
    torch.testing.assert_close(log_probs(loaded, tokens), before, atol=1e-4, rtol=0)


SMALL_HF = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=71,
    max_position_embeddings=64,
)
HF_FAMILIES = {  # family -> (config class, model class, config beyond SMALL_HF)
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", None),
    "neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=1)),
    "llama-mlp-bias-rope-llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            num_key_value_heads=2,
            mlp_bias=True,
            attention_bias=True,
            rope_parameters={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8,
                "rope_theta": 10000.0,
            },
        ),
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(num_key_value_heads=2, partial_rotary_factor=0.5, pad_token_id=0),
    ),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=16, sliding_window=4),
    ),
}


def _hf_family(family: str):
    config_cls, model_cls, extra = HF_FAMILIES[family]
    if extra is None:  # GPT-2 names its fields differently
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=71, n_positions=64)
    else:
        cfg = getattr(transformers, config_cls)(**SMALL_HF, **extra)
    return cfg, getattr(transformers, model_cls)


@pytest.mark.parametrize("family", list(HF_FAMILIES))
def test_hf_loaded_and_processed_matches_transformers(tmp_path, family):
    cfg, cls = _hf_family(family)
    hf_model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif "norm" in name or ".ln_" in name:
                p.uniform_(0.5, 1.5)
    hf_model.save_pretrained(tmp_path)
    layernorm = family in ("gpt2", "neox")
    model = load_model(
        tmp_path,
        fold_ln=True,
        center_writing_weights=layernorm,
        center_unembed=family != "gemma2",
        fold_value_biases=True,
    )
    tokens = torch.randint(0, 71, (3, 16))
    with torch.no_grad():
        expected = torch.log_softmax(hf_model(tokens).logits.double(), -1)
        got = torch.log_softmax(model(tokens).double(), -1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
