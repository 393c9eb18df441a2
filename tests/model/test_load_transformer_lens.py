"""TransformerLens checkpoints: the published paren balancer, and state dicts in TL layout made from our models."""

import gzip
import json
from types import MappingProxyType

import pytest
import torch
from safetensors.torch import load_file, save_file

from interplab import load_model
from interplab.model import ModelConfig, Transformer
from interplab.model.convert.transformer_lens import load_transformer_lens, tl_config_to_model_config
from tests.tl_peer import run_tl_jobs

PAD, START, END, OPEN, CLOSE = 1, 0, 2, 3, 4


def paren_tokens(strings: list[str], n_ctx: int = 42) -> torch.Tensor:
    """The paren balancer's tokenisation: [start] + parens + [end], padded to n_ctx (see its README)."""
    tokens = torch.full((len(strings), n_ctx), PAD, dtype=torch.long)
    for i, s in enumerate(strings):
        ids = [START] + [OPEN if c == "(" else CLOSE for c in s] + [END]
        tokens[i, : len(ids)] = torch.tensor(ids)
    return tokens


def test_paren_balancer_classifies_its_data_set(shared_dir):
    folder = shared_dir / "fixtures" / "paren_balancer"
    model = load_model(folder / "brackets_model_state_dict.pt")
    assert model.cfg.d_vocab_out == 2 and not model.cfg.causal and model.cfg.n_layers == 3
    with gzip.open(folder / "remix_parens.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 100_000
    rows = rows[::25]  # 4,000 examples, deterministic
    tokens = paren_tokens([s for s, _ in rows])
    labels = torch.tensor([int(balanced) for _, balanced in rows])
    with torch.no_grad():
        logits = model(tokens, attention_mask=tokens != PAD)[:, 0]
    loss = torch.nn.functional.cross_entropy(logits, labels)
    # the published reference: BCE of (balanced - unbalanced) logit difference, 0.00 (SE 0.01)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 1] - logits[:, 0], labels.float())
    accuracy = (logits.argmax(-1) == labels).float().mean().item()
    assert loss.item() < 1e-3 and bce.item() < 1e-3
    assert accuracy >= 0.999
    # the same model from the folder, with the config given explicitly
    tl_cfg = json.loads((folder / "transformerlens_config.json").read_text())
    again = load_model(folder, tl_config=tl_cfg)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens[:64], attention_mask=tokens[:64] != PAD)[:, 0], logits[:64])


def to_tl_config(cfg: ModelConfig, normalization_type: str) -> dict:
    return {
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "d_head": cfg.d_head,
        "d_mlp": cfg.d_mlp if cfg.has_mlp else None,
        "d_vocab": cfg.d_vocab,
        "d_vocab_out": cfg.d_vocab_out,
        "n_ctx": cfg.n_ctx,
        "act_fn": {"gelu_tanh": "gelu_new"}.get(cfg.act_fn.value, cfg.act_fn.value),
        "normalization_type": normalization_type,
        "attention_dir": "causal" if cfg.causal else "bidirectional",
        "positional_embedding_type": "rotary" if cfg.positional.value == "rotary" else "standard",
        "attn_only": cfg.attn_only,
        "n_key_value_heads": cfg.n_kv_heads if cfg.n_kv_heads != cfg.n_heads else None,
        "rotary_dim": cfg.rotary_dim,
        "gated_mlp": cfg.gated_mlp,
        "parallel_attn_mlp": cfg.parallel_attn_mlp,
        "eps": cfg.norm_eps,
        "original_architecture": "LlamaForCausalLM",
        "dtype": "torch.float32",
        "device": "cuda:0",
        "use_attn_result": False,
    }


def to_tl_state(model: Transformer, normalization_type: str) -> dict[str, torch.Tensor]:
    """Our state dict in TransformerLens' layout: same names, GQA K/V as _W_K, plus TL's buffers."""
    cfg = model.cfg
    state = {}
    for name, tensor in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if normalization_type.endswith("Pre") and (".ln" in name or name.startswith("ln_final")):
            continue  # folded norms store no weights in TL
        if cfg.n_kv_heads != cfg.n_heads and leaf in ("W_K", "W_V", "b_K", "b_V"):
            name = name[: -len(leaf)] + "_" + leaf
        state[name] = tensor.clone()
    for layer in range(cfg.n_layers):
        state[f"blocks.{layer}.attn.mask"] = torch.ones(cfg.n_ctx, cfg.n_ctx, dtype=torch.bool).tril()
        state[f"blocks.{layer}.attn.IGNORE"] = torch.tensor(-1e5)
        if cfg.positional.value == "rotary":
            state[f"blocks.{layer}.attn.rotary_sin"] = torch.zeros(cfg.n_ctx, cfg.rotary_dim)
            state[f"blocks.{layer}.attn.rotary_cos"] = torch.ones(cfg.n_ctx, cfg.rotary_dim)
    return state


BASE = dict(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=24)
VARIANTS = {
    "LN-learned": (dict(act_fn="gelu_tanh"), "LN"),
    "LNPre-bidirectional-classifier": (dict(act_fn="relu", causal=False, d_vocab_out=3), "LNPre"),
    "RMS-rotary-gqa-gated": (
        dict(
            normalization="rmsnorm",
            positional="rotary",
            n_kv_heads=2,
            gated_mlp=True,
            act_fn="silu",
            rotary_dim=4,
        ),
        "RMS",
    ),
    "RMSPre-parallel": (dict(normalization="rmsnorm", parallel_attn_mlp=True, act_fn="gelu"), "RMSPre"),
    "attn-only": (dict(attn_only=True), "LN"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_tl_layout_round_trip(tmp_path, variant, suffix):
    extra, norm_type = VARIANTS[variant]
    model = Transformer(ModelConfig(**BASE, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if norm_type.endswith("Pre") and (".ln" in name or name.startswith("ln_final")):
                p.fill_(1.0 if name.endswith(".w") else 0.0)
            elif name.rsplit(".", 1)[-1].startswith("b_") or name.endswith((".w", ".b")):
                p.normal_(0, 0.1)  # non-trivial biases and norm weights, so a dropped one shows
    state = to_tl_state(model, norm_type)
    tl_b_in = {}
    if model.cfg.gated_mlp:
        # TL's gated MLP adds b_in after the product (act(x W_gate) * (x W_in) + b_in); ours adds it inside
        # (x W_in + b_in). The reference is our model with b_in = 0 and TL's b_in added at hook_post.
        for layer in range(model.cfg.n_layers):
            tl_b_in[layer] = model.blocks[layer].mlp.b_in.detach().clone()
            model.blocks[layer].mlp.b_in.data.zero_()
    file = tmp_path / f"model{suffix}"
    if suffix == ".pt":
        torch.save(state, file)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    (tmp_path / "transformerlens_config.json").write_text(json.dumps(to_tl_config(model.cfg, norm_type)))
    loaded = load_model(file)
    tokens = torch.randint(0, 50, (2, 20))
    hooks = [
        (f"blocks.{layer}.mlp.hook_post", lambda act, site, b=b: act + b) for layer, b in tl_b_in.items()
    ]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(tokens), model.run_with_hooks(tokens, fwd_hooks=hooks), atol=1e-5, rtol=0
        )
    assert loaded.cfg.n_kv_heads == model.cfg.n_kv_heads and loaded.cfg.causal == model.cfg.causal


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("normalization_type", "LNX", "normalization_type='LNX'"),
        ("positional_embedding_type", "alibi", "positional_embedding_type='alibi'"),
        ("act_fn", "solu_ln", "act_fn='solu_ln'"),
        ("attention_dir", "sideways", "attention_dir='sideways'"),
        ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True"),
        ("post_embedding_ln", True, "post_embedding_ln=True"),
    ],
)
def test_unsupported_tl_config_values_error_clearly(field, value, message):
    cfg = to_tl_config(Transformer(ModelConfig(**BASE)).cfg, "LN")
    cfg[field] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        tl_config_to_model_config(cfg)


def test_missing_and_unexpected_weights_are_named(tmp_path):
    model = Transformer(ModelConfig(**BASE))
    state = to_tl_state(model, "LN")
    del state["blocks.1.mlp.W_out"]
    torch.save(state, tmp_path / "m.pt")
    cfg = to_tl_config(model.cfg, "LN")
    with pytest.raises(KeyError, match="blocks.1.mlp.W_out"):
        load_transformer_lens(tmp_path / "m.pt", cfg)
    state = to_tl_state(model, "LN")
    state["blocks.0.attn.W_extra"] = torch.zeros(3)
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(KeyError, match="W_extra"):
        load_transformer_lens(tmp_path / "m.pt", cfg)


def test_missing_tl_config_is_explained(tmp_path):
    torch.save(to_tl_state(Transformer(ModelConfig(**BASE)), "LN"), tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError, match="transformerlens_config.json"):
        load_model(tmp_path / "m.pt")


# ---- parity with TransformerLens 3.9 itself, run in its own interpreter (tests/tl_peer.py; skipped without it) --
TL_VARIANTS = {
    "LN-gelu_new": dict(act_fn="gelu_new"),
    "LNPre-bidirectional-classifier": dict(
        normalization_type="LNPre", attention_dir="bidirectional", d_vocab_out=3, act_fn="relu"
    ),
    "RMS-rotary-gqa-gated": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        n_key_value_heads=2,
        gated_mlp=True,
        act_fn="silu",
    ),
    "parallel-partial-rotary-adjacent": dict(
        positional_embedding_type="rotary",
        rotary_dim=4,
        rotary_adjacent_pairs=True,
        parallel_attn_mlp=True,
        act_fn="gelu",
    ),
    "attn-only": dict(attn_only=True, act_fn=None),
    "gemma-like": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=20.0,
        output_logits_soft_cap=10.0,
        use_local_attn=True,
        window_size=4,
        attn_types=["local", "global"],
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
    ),
}
PROCESSING_VARIANTS = {
    "LN": dict(act_fn="gelu_new"),
    "RMS-rotary-gqa": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=8,
        n_key_value_heads=2,
        act_fn="silu",
    ),
    "parallel-bidirectional": dict(
        parallel_attn_mlp=True, act_fn="gelu", attention_dir="bidirectional", d_vocab_out=3
    ),
}
TL_FLAGS = dict(
    fold_ln=True, center_writing_weights=True, center_unembed=True
)  # TL's from_pretrained defaults


@pytest.fixture(scope="module")
def tl_runs(tmp_path_factory):
    """Random TL models (non-trivial biases and norm weights) saved as .pt + config JSON, TL's logits on
    ``tokens``, and (processing variants) TL's weights after ``process_weights_`` with its default flags."""
    work = tmp_path_factory.mktemp("tl")
    tokens = torch.randint(0, 50, (2, 20), generator=torch.Generator().manual_seed(0))
    base = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=24, seed=0)
    jobs = [
        dict(config={**base, **cfg}, out=str(work / "parity" / name), passes=[{}])
        for name, cfg in TL_VARIANTS.items()
    ]
    jobs += [
        dict(config={**base, **cfg}, out=str(work / "processing" / name), process=TL_FLAGS)
        for name, cfg in PROCESSING_VARIANTS.items()
    ]
    run_tl_jobs(jobs, work, tokens)
    return work, tokens


@pytest.mark.parametrize("variant", list(TL_VARIANTS))
def test_parity_with_transformer_lens(tl_runs, variant):
    work, tokens = tl_runs
    folder = work / "parity" / variant
    ours = load_model(folder / "model.pt")
    theirs = load_file(str(folder / "pass0.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs["__logits__"], atol=1e-4, rtol=0)
        if "__loss__" in theirs:  # language models (not the classifier)
            torch.testing.assert_close(
                ours(tokens, return_type="loss"), theirs["__loss__"][0], atol=1e-5, rtol=0
            )


@pytest.mark.parametrize(("weights_key", "config_key"), [("state_dict", "cfg"), ("model", "config")])
def test_checkpoint_with_embedded_config(tmp_path, weights_key, config_key):
    model = Transformer(ModelConfig(**BASE, act_fn="relu"))
    cfg = to_tl_config(model.cfg, "LN")
    torch.save({weights_key: to_tl_state(model, "LN"), config_key: cfg, "step": 1000}, tmp_path / "ckpt.pth")
    loaded = load_model(tmp_path / "ckpt.pth")
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), atol=1e-5, rtol=0)


def test_not_a_state_dict_is_explained(tmp_path):
    torch.save({"step": 3, "lr": [0.1]}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_model(tmp_path / "opt.pt", tl_config=to_tl_config(Transformer(ModelConfig(**BASE)).cfg, "LN"))


@pytest.mark.parametrize("variant", list(PROCESSING_VARIANTS))
def test_processing_equals_transformer_lens_processing(tl_runs, variant):
    """TL's usual flags (fold_ln, center_writing_weights, center_unembed, fold_value_biases) give TL's processed
    weights, RMSNorm models included (where centring the writing weights is skipped, with a warning, as in TL)."""
    work, _ = tl_runs
    folder = work / "processing" / variant
    flags = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)
    if PROCESSING_VARIANTS[variant].get("normalization_type") == "RMS":
        with pytest.warns(UserWarning, match="center_writing_weights=True skipped"):
            ours = load_model(folder / "model.pt", **flags)
    else:
        ours = load_model(folder / "model.pt", **flags)
    theirs = {k.replace("._", "."): v for k, v in load_file(str(folder / "processed.safetensors")).items()}
    compared = 0
    for name, value in ours.state_dict().items():
        if name in theirs:
            torch.testing.assert_close(value, theirs[name], atol=1e-6, rtol=0)
            compared += 1
    assert compared >= 20


def test_saving_over_the_checkpoint_leaves_the_loaded_model_alone(tmp_path):
    """torch.save rewrites a file in place: loaded weights must not alias (memory-map) the file."""
    model = Transformer(ModelConfig(**BASE))
    cfg = to_tl_config(model.cfg, "LN")
    torch.save(to_tl_state(model, "LN"), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", tl_config=cfg)
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        before = loaded(tokens)
    torch.save({k: torch.zeros_like(v) for k, v in to_tl_state(model, "LN").items()}, tmp_path / "ckpt.pt")
    torch.save({"small": torch.zeros(1)}, tmp_path / "ckpt.pt")  # shorter file: a mapped page would fault
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), before, atol=0, rtol=0)


def test_tl_config_may_be_any_mapping(tmp_path):
    """load_model takes ``tl_config`` as a Mapping: a read-only one is read like a dict (it was taken for a path)."""
    model = Transformer(ModelConfig(**BASE))
    torch.save(to_tl_state(model, "LN"), tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt", tl_config=MappingProxyType(to_tl_config(model.cfg, "LN")))
    tokens = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens))
