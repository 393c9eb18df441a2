"""Every hook TransformerLens 3.9 caches has, under the same name, the same value in interplab: random TL
models (unprocessed weights, norm weights and biases far from 1 and 0) of two sizes, LayerNorm (GPT-2-like)
and RMSNorm (Llama-like, grouped-query attention), loaded into interplab from their TL checkpoints. Runs real
TransformerLens in its own interpreter (see tests/tl_peer.py); skipped when it is not available."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from interplab import load_model
from tests.tl_peer import run_tl_jobs

D_VOCAB, N_CTX = 50, 24
LLAMA = dict(
    act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=8, gated_mlp=True
)
CONFIGS = {
    "gpt2-like-small": dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, act_fn="gelu_new", normalization_type="LN"
    ),
    "gpt2-like-wider": dict(
        n_layers=3, d_model=48, n_heads=6, d_head=8, d_mlp=80, act_fn="gelu", normalization_type="LN"
    ),
    "llama-like-gqa-small": dict(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_key_value_heads=2, **LLAMA
    ),
    "llama-like-mqa-wider": dict(
        n_layers=3, d_model=48, n_heads=6, d_head=8, d_mlp=96, n_key_value_heads=1, **LLAMA
    ),
    "neox-like-parallel": dict(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        act_fn="gelu",
        positional_embedding_type="rotary",
        rotary_dim=4,
        parallel_attn_mlp=True,
    ),
    "gemma-like-post-norms-softcap-local": dict(
        n_layers=2,
        d_model=32,
        n_heads=4,
        d_head=8,
        d_mlp=64,
        n_key_value_heads=2,
        use_normalization_before_and_after=True,
        attn_scores_soft_cap=20.0,
        output_logits_soft_cap=10.0,
        use_local_attn=True,
        window_size=4,
        attn_types=["local", "global"],
        **{**LLAMA, "act_fn": "gelu_pytorch_tanh"},
    ),
}
# TL hooks interplab does not have: the post-norms' own scale and normalised vector (interplab's post-norms have
# no hook points; hook_attn_out / hook_mlp_out are after them in both)
NOT_IN_INTERPLAB = (
    "ln1_post.hook_scale",
    "ln1_post.hook_normalized",
    "ln2_post.hook_scale",
    "ln2_post.hook_normalized",
)
# pass 0: TL's own defaults plus the opt-in per-head results and mlp_in; 1: split Q/K/V inputs; 2: attn_in
# (TL supports it only without GQA); 3: a left-padded batch (loss and logits at real positions)
PASSES = [
    {"use_attn_result": True, "use_hook_mlp_in": True},
    {"use_split_qkv_input": True},
    {"use_attn_in": True},
]
MASK = [[0, 0, 0] + [1] * 17, [1] * 20]


@pytest.fixture(scope="module")
def tl_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("tl_hooks")
    tokens = torch.randint(0, D_VOCAB, (2, 20), generator=torch.Generator().manual_seed(3))
    jobs = []
    for name, cfg in CONFIGS.items():
        gqa = cfg.get("n_key_value_heads") is not None
        passes = [p for p in PASSES if not (gqa and p.get("use_attn_in"))] + [{"attention_mask": MASK}]
        config = {**cfg, "d_vocab": D_VOCAB, "n_ctx": N_CTX, "seed": 0}
        jobs.append(dict(config=config, out=str(work / name), passes=passes, zero_gated_b_in=True, seed=1))
    run_tl_jobs(jobs, work, tokens)
    return work, tokens, jobs


def _load_pass(folder, i):
    data = load_file(str(folder / f"pass{i}.safetensors"))
    return data.pop("__logits__"), data.pop("__loss__")[0], data


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_transformer_lens_hook_has_its_value_in_interplab(tl_runs, name):
    work, tokens, jobs = tl_runs
    job = next(j for j in jobs if j["out"].endswith(name))
    ours = load_model(work / name / "model.pt")
    logits, cache = ours.run_with_cache(tokens)
    loss = ours(tokens, return_type="loss")
    compared: set[str] = set()
    for i, flags in enumerate(job["passes"]):
        tl_logits, tl_loss, tl_cache = _load_pass(work / name, i)
        if "attention_mask" in flags:
            mask = torch.tensor(flags["attention_mask"])
            ours_masked, ours_loss = ours(tokens, attention_mask=mask, return_type="both")
            real = mask.bool()
            torch.testing.assert_close(ours_masked[real], tl_logits[real], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(ours_loss, tl_loss, atol=1e-5, rtol=1e-5)
            continue
        torch.testing.assert_close(logits, tl_logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loss, tl_loss, atol=1e-5, rtol=1e-5)
        if flags.get("use_split_qkv_input"):
            # ln1 runs once per head input in TL on this path; the per-head inputs themselves are compared
            names = [n for n in tl_cache if n.endswith(("hook_q_input", "hook_k_input", "hook_v_input"))]
        elif flags.get("use_attn_in"):
            names = [n for n in tl_cache if n.endswith("hook_attn_in")]
        else:
            names = list(tl_cache)
        assert names, flags
        names = [n for n in names if not n.endswith(NOT_IN_INTERPLAB)]
        missing = [n for n in names if n not in ours.hook_points]
        assert not missing, f"TransformerLens hooks interplab does not have: {missing}"
        for hook in names:
            assert cache[hook].shape == tl_cache[hook].shape, hook
            torch.testing.assert_close(cache[hook], tl_cache[hook], atol=1e-4, rtol=1e-4, msg=hook)
            compared.add(hook)
    n_layers = CONFIGS[name]["n_layers"]
    for layer in range(n_layers):
        for hook in ("ln1.hook_normalized", "ln2.hook_normalized", "ln1.hook_scale", "hook_q_input"):
            assert f"blocks.{layer}.{hook}" in compared
    assert {"ln_final.hook_normalized", "ln_final.hook_scale", "hook_embed"} <= compared
    if CONFIGS[name].get("n_key_value_heads") is None:
        assert f"blocks.{n_layers - 1}.hook_attn_in" in compared
    # every interplab hook but attn_in under GQA (which TL cannot run) was compared
    assert set(ours.hook_names) == compared
