"""Splitting a model by layers across devices (`interplab.model.placement`, `load_model(device_map=...)`).

CPU has one device type, so the split is tested with devices that are all ``cpu`` (results equal the unsplit
model exactly) and with ``meta`` for the later half (the forward moves activations onto each block's device:
the ``cpu`` half computes the same values, the ``meta`` half propagates shapes); planning and its errors use
``max_memory`` budgets."""

import re

import pytest
import torch
import transformers
from safetensors.torch import load_file

from interplab import load_model
from interplab.model.convert import HFCheckpoint
from interplab.model.generate import generate
from interplab.model.placement import (
    check_device_map,
    device_map_of,
    dispatch,
    infer_device_map,
    parse_memory,
    part_sizes,
)
from tests.model.test_load_hf import _make
from tests.model.test_load_hf_qk_norm import make_hf
from tests.model.test_parallel import save_tiny_llama


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Llama (rotary, GQA, untied) saved as Hugging Face would."""
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), tied=False)


TOKENS = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(TOKENS).index_fill_(1, torch.tensor([0, 1]), 0)


def test_split_on_cpus_equals_unsplit(folder):
    whole = load_model(folder)
    split = load_model(
        folder, device_map={"embed": "cpu", "blocks.0": "cpu", "blocks": "cpu", "unembed": "cpu"}
    )
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters(), strict=True):
        assert torch.equal(a, b), name  # the same weights, bit for bit
    names = ["blocks.1.hook_resid_post", "blocks.3.attn.hook_pattern"]
    want, want_cache = whole.run_with_cache(TOKENS, names=names, attention_mask=MASK)
    got, got_cache = split.run_with_cache(TOKENS, names=names, attention_mask=MASK)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for n in names:
        torch.testing.assert_close(got_cache[n], want_cache[n], rtol=0, atol=0)
    gen = generate(split, TOKENS[:, :5], max_new_tokens=4).tokens
    torch.testing.assert_close(gen, generate(whole, TOKENS[:, :5], max_new_tokens=4).tokens)


def test_activations_move_to_each_blocks_device(folder):
    """blocks 0-1 on cpu, 2-3 and the unembedding on meta: the forward moves the residual stream (and the
    rotary tables and padding mask) to meta at block 2; what ran on cpu equals the unsplit model."""
    whole = load_model(folder)
    plan = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "cpu", "blocks": "meta", "unembed": "meta"}
    split = load_model(folder, device_map=plan)
    assert [str(d) for d in device_map_of(split).values()] == ["cpu", "cpu", "cpu", "meta", "meta", "meta"]
    seen = {}

    def record(act, site):
        seen[site.name] = act

    def patch(act, site):
        return act * 0.5

    hooks = [("blocks.0.hook_resid_post", patch), ("blocks.1.hook_resid_post", record)]
    with split.hooks(fwd_hooks=hooks[:1], read_hooks=[*hooks[1:], ("blocks.2.hook_resid_post", record)]):
        logits = split(TOKENS, attention_mask=MASK)
    assert logits.is_meta and logits.shape == (2, 9, 101)
    assert seen["blocks.2.hook_resid_post"].is_meta  # computed on block 2's device
    with torch.no_grad():
        _, cache = whole.run_with_cache(
            TOKENS, names=["blocks.1.hook_resid_post"], fwd_hooks=hooks[:1], attention_mask=MASK
        )
    torch.testing.assert_close(
        seen["blocks.1.hook_resid_post"], cache["blocks.1.hook_resid_post"], rtol=0, atol=0
    )


def test_meta_parts_are_never_read(folder):
    split = load_model(
        folder, device_map={"embed": "meta", "blocks.0": "meta", "blocks": "cpu", "unembed": "meta"}
    )
    whole = load_model(folder)
    assert split.blocks[0].attn.W_Q.is_meta and split.W_E.is_meta
    assert torch.equal(split.blocks[3].mlp.W_out, whole.blocks[3].mlp.W_out)


def test_auto_fills_devices_in_order_and_says_what_does_not_fit(folder):
    sizes = part_sizes(load_model(folder))
    budget = sizes["embed"] + 2 * sizes["blocks.0"]
    plan = infer_device_map(load_model(folder), max_memory={"cpu": budget, "meta": "1MB"})
    assert [str(plan[f"blocks.{i}"]) for i in range(4)] == ["cpu", "cpu", "meta", "meta"]
    model = load_model(folder, device_map="auto", max_memory={"cpu": budget, "meta": "1MB"})
    assert {k: str(v) for k, v in device_map_of(model).items()} == {k: str(v) for k, v in plan.items()}
    total = sum(sizes.values())
    with pytest.raises(
        ValueError, match=r"does not fit.*It needs .* MiB of weights.*available: cpu .*meta"
    ) as e:
        load_model(folder, device_map="auto", max_memory={"cpu": budget, "meta": sizes["blocks.0"]})
    assert f"{total / 2**20:.1f} MiB" in str(e.value)
    with pytest.raises(ValueError, match=r"puts .* on cpu \(embed, blocks.0..3, unembed\), which has"):
        check_device_map(
            model, {"embed": "cpu", "blocks": "cpu", "unembed": "cpu"}, max_memory={"cpu": budget}
        )


def test_bad_device_maps_are_named(folder):
    model = load_model(folder)
    with pytest.raises(ValueError, match="names no device for 'blocks.1' and 2 more"):
        check_device_map(model, {"embed": "cpu", "blocks.0": "cpu", "unembed": "cpu"})
    with pytest.raises(ValueError, match="unknown part 'block.0'"):
        check_device_map(model, {"embed": "cpu", "blocks": "cpu", "unembed": "cpu", "block.0": "cpu"})
    with pytest.raises(ValueError, match="'gpu' is not a device"):
        check_device_map(model, {"embed": "gpu", "blocks": "cpu", "unembed": "cpu"})
    with pytest.raises(ValueError, match='"auto" or a dict'):
        load_model(folder, device_map="balanced")
    with pytest.raises(ValueError, match="device= or device_map="):
        load_model(folder, device="meta", device_map="auto")
    with pytest.raises(ValueError, match="cannot read memory budget '12 parsecs'"):
        parse_memory("12 parsecs")
    assert parse_memory("1.5GiB") == 3 * 2**29 and parse_memory("500MB") == 500 * 10**6
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs CUDA devices or max_memory"):
            load_model(folder, device_map="auto")


def test_tied_unembedding_stays_with_the_embedding(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    model = load_model(tmp_path)
    with pytest.raises(ValueError, match="ties its unembedding"):
        check_device_map(model, {"embed": "cpu", "blocks": "cpu", "unembed": "meta"})
    sizes = part_sizes(model)
    plan = infer_device_map(model, max_memory={"cpu": sizes["embed"] + sizes["unembed"] + 1, "meta": "1GB"})
    assert str(plan["unembed"]) == str(plan["embed"]) == "cpu" and str(plan["blocks.0"]) == "meta"


def test_dispatch_a_model_in_memory_and_native_folders(folder, tmp_path):
    whole = load_model(folder)
    whole.save(tmp_path / "native")
    plan = {"embed": "cpu", "blocks.0": "cpu", "blocks": "meta", "unembed": "meta"}
    native = load_model(tmp_path / "native", device_map=plan)
    assert native.blocks[1].attn.W_Q.is_meta and torch.equal(
        native.blocks[0].attn.W_Q, whole.blocks[0].attn.W_Q
    )
    state = load_file(tmp_path / "native" / "model.safetensors")  # what the whole-file reader gave
    reloaded = dict(load_model(tmp_path / "native").named_parameters())
    assert state.keys() == reloaded.keys() and all(torch.equal(state[k], reloaded[k]) for k in state)
    bf16 = load_model(tmp_path / "native", dtype=torch.bfloat16)  # converted tensor by tensor
    for (name, a), (_, b) in zip(whole.named_parameters(), bf16.named_parameters(), strict=True):
        assert torch.equal(a.to(torch.bfloat16), b), name
    moved = dispatch(load_model(folder), plan)
    assert moved.blocks[1].attn.W_Q.is_meta and not moved.blocks[0].attn.W_Q.is_meta


FAMILIES = [
    "gpt2-untied",
    "neox-parallel-partial-rotary",
    "llama-gqa-theta",
    "qwen2-gqa-bias",
    "gemma2-sliding",
]
QK_FAMILIES = ["qwen3-gqa", "gemma3-multimodal", "olmo2-gqa-bias"]


@pytest.mark.parametrize("variant", FAMILIES + QK_FAMILIES)
def test_every_family_skips_meta_blocks_and_keeps_the_rest_exact(tmp_path, variant, monkeypatch):
    """The converters run on meta tensors for the blocks a device map puts on meta (their checkpoint keys
    are found by layer in each family's naming); everything else is the unsplit load, bit for bit."""
    hf_model = make_hf(variant) if variant in QK_FAMILIES else _make(variant)
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")  # sharded: tensors come from several files
    whole = load_model(tmp_path)
    read = []
    get = HFCheckpoint.get

    def spy(self, key):
        tensor = get(self, key)
        if not tensor.is_meta:
            read.append(key)
        return tensor

    monkeypatch.setattr(HFCheckpoint, "get", spy)
    split = load_model(
        tmp_path, device_map={"embed": "cpu", "blocks.0": "meta", "blocks": "cpu", "unembed": "cpu"}
    )
    for (name, a), (_, b) in zip(whole.named_parameters(), split.named_parameters(), strict=True):
        if name.startswith("blocks.0."):
            assert b.is_meta and b.shape == a.shape and b.dtype == a.dtype, name
        else:
            assert torch.equal(a, b), name
    assert read and not [k for k in read if re.search(r"\b(h|layers)\.0\.", k)]  # block 0 never read
