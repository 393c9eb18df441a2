"""Parity with `transformers`: tiny random models of each family, saved locally, loaded by `load_model`."""

import json

import pytest
import torch
import transformers

from interplab import load_model

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=101)


def _neox(**kw):
    return transformers.GPTNeoXConfig(
        **{**SMALL, "max_position_embeddings": 64, **kw}
    ), transformers.GPTNeoXForCausalLM


def _llama(**kw):
    return transformers.LlamaConfig(
        **{**SMALL, "max_position_embeddings": 64, **kw}
    ), transformers.LlamaForCausalLM


def _mistral(**kw):
    cfg = {**SMALL, "max_position_embeddings": 64, "sliding_window": None, **kw}
    return transformers.MistralConfig(**cfg), transformers.MistralForCausalLM


def _qwen2(**kw):
    return transformers.Qwen2Config(
        **{**SMALL, "max_position_embeddings": 64, **kw}
    ), transformers.Qwen2ForCausalLM


def _gemma2(**kw):
    cfg = {**SMALL, "head_dim": 8, "max_position_embeddings": 64, "query_pre_attn_scalar": 16, **kw}
    return transformers.Gemma2Config(**cfg), transformers.Gemma2ForCausalLM


def _phi3(**kw):
    cfg = {
        **SMALL,
        "max_position_embeddings": 64,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **kw,
    }
    return transformers.Phi3Config(**cfg), transformers.Phi3ForCausalLM


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
    "rope_theta": 10000.0,
}
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.3, 1.7, 2.5],
    "long_factor": [1.0, 2.0, 4.0, 8.0],
    "rope_theta": 10000.0,
}


def _gpt2(**kw):
    cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64, bos_token_id=0, eos_token_id=0, **kw
    )
    return cfg, transformers.GPT2LMHeadModel


VARIANTS = {
    "gpt2": lambda: _gpt2(),
    "gpt2-untied": lambda: _gpt2(tie_word_embeddings=False),
    "neox-parallel-partial-rotary": lambda: _neox(rotary_pct=0.25),
    "neox-sequential-full-rotary": lambda: _neox(use_parallel_residual=False, rotary_pct=1.0),
    "neox-tied-no-bias": lambda: _neox(tie_word_embeddings=True, attention_bias=False, rotary_pct=0.5),
    "llama-mha": lambda: _llama(),
    "llama-gqa-theta": lambda: _llama(num_key_value_heads=2, rope_theta=500.0),
    "llama-mqa-tied-head-dim": lambda: _llama(num_key_value_heads=1, tie_word_embeddings=True, head_dim=16),
    "llama-attention-bias": lambda: _llama(attention_bias=True),
    "llama-mlp-attention-bias": lambda: _llama(
        mlp_bias=True, attention_bias=True, num_key_value_heads=2, pretraining_tp=2
    ),
    "llama-rope-llama3": lambda: _llama(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
    "mistral-gqa": lambda: _mistral(num_key_value_heads=2),
    "mistral-sliding-window": lambda: _mistral(num_key_value_heads=2, sliding_window=5),
    "qwen2-gqa-bias": lambda: _qwen2(num_key_value_heads=2),
    "qwen2-tied-sliding": lambda: _qwen2(
        num_key_value_heads=1,
        tie_word_embeddings=True,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
    ),
    "phi3-mha": lambda: _phi3(),
    "phi3-gqa-partial-rotary-sliding": lambda: _phi3(
        num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=5
    ),
    # sequences of 20 > original 16 tokens: the long factors
    "phi3-longrope": lambda: _phi3(original_max_position_embeddings=16, rope_parameters=LONGROPE),
    "gemma2-sliding": lambda: _gemma2(num_key_value_heads=2, sliding_window=6),
    "gemma2-untied-mqa": lambda: _gemma2(num_key_value_heads=1, tie_word_embeddings=False, sliding_window=3),
}


def _random_biases_and_norms(model: torch.nn.Module) -> None:
    """Random init leaves biases at 0 and norms at 1: make them random so a dropped or misplaced one shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.2) if name.endswith("bias") else p.uniform_(0.5, 1.5)


def _parity(hf_model, path, seq: int = 20, batch: int = 3, **load_kw) -> None:
    model = load_model(path, **load_kw)
    tokens = torch.randint(0, hf_model.config.vocab_size, (batch, seq))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = model(tokens)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def _make(variant: str):
    cfg, cls = VARIANTS[variant]()
    torch.manual_seed(0)
    hf_model = cls(cfg).eval()
    _random_biases_and_norms(hf_model)
    if getattr(cfg, "tie_word_embeddings", False):
        hf_model.tie_weights()
    return hf_model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_family_parity(tmp_path, variant):
    hf_model = _make(variant)
    hf_model.save_pretrained(tmp_path)
    # longer than every sliding window used above, so the window matters
    _parity(hf_model, tmp_path, seq=20)


@pytest.mark.parametrize("variant", ["llama-gqa-theta", "neox-parallel-partial-rotary", "gemma2-sliding"])
def test_sharded_safetensors(tmp_path, variant):
    hf_model = _make(variant)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    _parity(hf_model, tmp_path)


def _to_pytorch_bin(folder) -> None:
    """Rewrite a saved folder as pytorch .bin files (transformers 5 only writes safetensors)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        renames = {
            f: f.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            for f in set(data["weight_map"].values())
        }
        data["weight_map"] = {k: renames[v] for k, v in data["weight_map"].items()}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(data))
        index.unlink()
    else:
        renames = {"model.safetensors": "pytorch_model.bin"}
    for old, new in renames.items():
        torch.save(load_file(str(folder / old)), folder / new)
        (folder / old).unlink()


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("variant", ["gpt2", "qwen2-gqa-bias"])
def test_pytorch_bin(tmp_path, variant, sharded):
    hf_model = _make(variant)
    hf_model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    _to_pytorch_bin(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    assert len(list(tmp_path.glob("*.bin"))) > (1 if sharded else 0)
    _parity(hf_model, tmp_path)


def test_dtype_and_grad_flags(tmp_path):
    hf_model = _make("llama-gqa-theta")
    hf_model.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.cfg.n_kv_heads == 2 and model.cfg.rotary_base == 500.0


def test_unknown_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
    with pytest.raises(ValueError, match=r"model_type='mamba'.*supported: .*gemma2.*gpt2.*gpt_neox.*llama"):
        load_model(tmp_path)


def test_missing_weight_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model = _make("llama-mha")
    hf_model.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(tmp_path)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_model(tmp_path / "nowhere")


def test_folder_without_weights(tmp_path):
    _make("gpt2").config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)


def _legacy(variant: str, d: dict) -> dict:
    """Rewrite a transformers-5 config.json the way real checkpoints on the hub were written (flat rope keys,
    no layer_types), as Pythia, Llama-2, Qwen2 and Gemma-2 folders downloaded years ago still are."""
    rope = d.pop("rope_parameters")
    family = d["model_type"]
    if family == "gpt_neox":
        d["rotary_pct"], d["rotary_emb_base"] = rope["partial_rotary_factor"], rope["rope_theta"]
    else:
        d["rope_theta"], d["rope_scaling"] = rope["rope_theta"], None
    d.pop("layer_types", None)
    if family == "qwen2" and d.get("sliding_window") is None:
        d["sliding_window"], d["use_sliding_window"] = 4096, False  # the old default: window off
    return d


@pytest.mark.parametrize(
    "variant",
    [
        "neox-parallel-partial-rotary",
        "llama-gqa-theta",
        "qwen2-gqa-bias",
        "qwen2-tied-sliding",
        "gemma2-sliding",
        "mistral-sliding-window",
    ],
)
def test_legacy_hub_configs(tmp_path, variant):
    hf_model = _make(variant)
    hf_model.save_pretrained(tmp_path)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps(_legacy(variant, json.loads(cfg_file.read_text()))))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # transformers reads it too
    _parity(reloaded, tmp_path, seq=20)
    _parity(hf_model, tmp_path, seq=20)


def test_weights_file_inside_a_folder_loads_the_folder(tmp_path):
    hf_model = _make("gpt2")
    hf_model.save_pretrained(tmp_path)
    _parity(hf_model, tmp_path / "model.safetensors")


def test_legacy_non_zip_bin(tmp_path):
    hf_model = _make("llama-mqa-tied-head-dim")
    hf_model.save_pretrained(tmp_path)
    _to_pytorch_bin(tmp_path)
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    _parity(hf_model, tmp_path)


def test_tokenizer_json_is_attached(tmp_path):
    from interplab.data.tokenizer import train_bpe

    cfg, cls = _gpt2()
    cfg.vocab_size = 300
    hf_model = cls(cfg).eval()
    hf_model.save_pretrained(tmp_path)
    tok = train_bpe(["the cat sat on the mat\n"] * 20, vocab_size=300)
    tok.save(tmp_path / "tokenizer.json")
    model = load_model(tmp_path)
    assert model.tokenizer is not None
    tokens = model.to_tokens("the cat sat")
    assert model.to_string(tokens[0]) == "the cat sat"
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=1e-4, rtol=0)


def test_local_loading_never_opens_a_socket(tmp_path, monkeypatch):
    import socket

    hf_model = _make("qwen2-gqa-bias")
    hf_model.save_pretrained(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError(f"load_model tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    _parity(hf_model, tmp_path)
