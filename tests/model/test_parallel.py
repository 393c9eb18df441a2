"""Pipeline-parallel inference (`interplab.model.parallel`): two gloo processes under torchrun, each holding
half of the blocks, give the single-process results (logits, loss, padding, their own cache, a patch on rank
0 seen in rank 1's logits, generation); other ranks' hook points are refused."""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from interplab import load_model
from interplab.model.generate import generate
from interplab.model.parallel import stage_device_map, stage_layers
from tests.scripts_env import ROOT, run_python

WORKER = ROOT / "tests" / "model" / "pipeline_worker.py"


def test_stage_layers_tile_the_model():
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ValueError, match="between 1 and n_layers=2"):
        stage_layers(2, 3)
    plan = stage_device_map(4, 1, 2, tied=True)
    assert [str(plan[f"blocks.{i}"]) for i in range(4)] == ["meta", "meta", "cpu", "cpu"]
    assert str(plan["embed"]) == str(plan["unembed"]) == "cpu"  # tied: the last rank needs W_E too
    assert str(stage_device_map(4, 0, 2)["unembed"]) == "meta"


def save_tiny_llama(folder, tied):
    """A tiny Llama (rotary, GQA, 4 layers) saved as Hugging Face would, into ``folder``."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=101,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Rotary + GQA Llama, untied and tied (the last rank then holds the embedding too)."""
    folders = [save_tiny_llama(tmp_path / "untied", False), save_tiny_llama(tmp_path / "tied", True)]
    out = tmp_path / "out"
    out.mkdir()
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    proc = run_python([*torchrun, str(out), *map(str, folders)], cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, folder in enumerate(folders):
        _compare(folder, [load_file(out / f"{i}.rank{r}.safetensors") for r in range(2)])


def _compare(folder, ranks):
    model = load_model(folder)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 101, (2, 9), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    names = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.3.hook_resid_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names=names)
        want = {
            "logits": logits,
            "masked": model(tokens, attention_mask=mask),
            "loss": model(tokens, return_type="loss").reshape(1),
            "patched": model.run_with_hooks(
                tokens, fwd_hooks=[("blocks.1.hook_mlp_out", lambda a, s: torch.zeros_like(a))]
            ),
            "generated": generate(model, tokens, max_new_tokens=4, attention_mask=mask).tokens,
        }
    assert not torch.allclose(want["patched"], want["logits"])  # the patch on rank 0 matters
    for r, got in enumerate(ranks):
        for key, value in want.items():  # every rank returns the pipeline's result
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5, msg=f"{folder} rank {r}: {key}")
        assert got["refused"].item() == 1
        assert got["held"].tolist() == [[0, 1], [2, 3]][r]  # each rank read only its own blocks
    for name in names[:2]:
        torch.testing.assert_close(ranks[0][f"cache.{name}"], cache[name], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranks[1][f"cache.{names[2]}"], cache[names[2]], rtol=1e-5, atol=1e-5)
    assert sorted(k for k in ranks[1] if k.startswith("cache.")) == [f"cache.{names[2]}"]
