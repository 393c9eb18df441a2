import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from interplab.sae.activations import ActivationStream, TensorActivations, TokenFilter, model_activations
from interplab.sae.disk_store import ActivationDataError, DiskActivationStore, cache_activations
from tests.sae.helpers import token_batches

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def test_model_activations_match_cache_and_drop_bos_and_pad(tiny_model):
    toks = token_batches(1)[0]
    toks[1, 10:] = 0  # right padding with token 0
    acts = model_activations(tiny_model, toks, HOOKS, token_filter=TokenFilter(pad_token_id=0))
    _, cache = tiny_model.run_with_cache(toks, names=HOOKS)
    keep = torch.ones_like(toks, dtype=torch.bool)
    keep[:, 0] = False
    keep[1, 10:] = False
    for h in HOOKS:
        assert_close(acts[h], cache[h][keep])
    assert acts[HOOKS[0]].shape[0] == 4 * 15 - 6


def test_unknown_hook_is_a_clear_error(tiny_model):
    with pytest.raises((KeyError, ValueError), match="blocks.5"):
        model_activations(tiny_model, token_batches(1)[0], ["blocks.5.hook_resid_post"])


def test_stream_serves_every_row_once(tiny_model):
    batches = token_batches(6)
    direct = torch.cat([model_activations(tiny_model, b, HOOKS[:1])[HOOKS[0]] for b in batches])
    stream = ActivationStream(tiny_model, batches, HOOKS, batch_size=30, buffer_tokens=120, seed=1)
    got = list(stream)
    assert all(b[HOOKS[0]].shape == (30, 32) for b in got)
    served = torch.cat([b[HOOKS[0]] for b in got])
    assert served.shape[0] == (direct.shape[0] // 30) * 30
    # shuffled, and every served row is a distinct real row
    assert not torch.equal(served, direct[: served.shape[0]])
    idx = [(direct == r).all(-1).nonzero()[0, 0].item() for r in served]
    assert len(set(idx)) == len(idx)
    # rows stay aligned across hooks
    both = {h: torch.cat([model_activations(tiny_model, b, HOOKS)[h] for b in batches]) for h in HOOKS}
    first = got[0]
    j = [(both[HOOKS[0]] == r).all(-1).nonzero()[0, 0].item() for r in first[HOOKS[0]]]
    assert_close(first[HOOKS[1]], both[HOOKS[1]][j])


def test_tensor_activations_epochs():
    acts = {"a": torch.arange(100.0)[:, None]}
    got = torch.cat([b["a"] for b in TensorActivations(acts, batch_size=10, epochs=2)])
    assert sorted(got[:100, 0].tolist()) == list(range(100)) == sorted(got[100:, 0].tolist())


def test_cache_round_trip_and_halves_bytes(tiny_model, tmp_path):
    batches = token_batches(5)
    full = cache_activations(tiny_model, batches, HOOKS, tmp_path / "f32", shard_rows=100)
    half = cache_activations(tiny_model, batches, HOOKS, tmp_path / "bf16", shard_rows=100, dtype="bfloat16")
    assert full.rows == half.rows == 5 * 4 * 15
    assert full.shards == 3
    assert 0.49 < half.bytes_on_disk / full.bytes_on_disk < 0.52
    store = DiskActivationStore(tmp_path / "f32")
    direct = {h: torch.cat([model_activations(tiny_model, b, HOOKS)[h] for b in batches]) for h in HOOKS}
    ordered = list(store.batches(50, shuffle=False, chunk_rows=7, mix_chunks=3))
    for h in HOOKS:
        assert_close(torch.cat([b[h] for b in ordered]), direct[h])
    bstore = DiskActivationStore(tmp_path / "bf16")
    got = torch.cat([b[HOOKS[0]] for b in bstore.batches(60, shuffle=False)])
    assert_close(got, direct[HOOKS[0]].bfloat16().float())
    store.validate()


def test_shuffled_read_covers_every_row_once_across_shards(tiny_model, tmp_path):
    cache_activations(tiny_model, token_batches(6), HOOKS, tmp_path / "c", shard_rows=60)
    store = DiskActivationStore(tmp_path / "c")
    assert len(store.shards) == 6
    got = list(store.batches(36, chunk_rows=10, mix_chunks=4, seed=3))
    rows = torch.cat([b[HOOKS[0]] for b in got])
    assert rows.shape[0] == 360
    allrows = torch.cat([store.shard(s, HOOKS[0]) for s in range(6)])
    ids = torch.tensor([(allrows == r).all(-1).nonzero()[0, 0].item() for r in rows])
    assert sorted(ids.tolist()) == list(range(360))
    first_batch_shards = {int(i) // 60 for i in ids[:36]}
    assert len(first_batch_shards) >= 2  # a batch mixes shards


class _Killed(Exception):
    pass


def _dies_after(batches, n):
    for i, b in enumerate(batches):
        if i == n:
            raise _Killed
        yield b


def test_kill_and_resume_gives_the_same_cache(tiny_model, tmp_path):
    batches = token_batches(7)
    with pytest.raises(_Killed):
        cache_activations(tiny_model, _dies_after(batches, 3), HOOKS, tmp_path / "r", shard_rows=100)
    manifest = json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert not manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == 120
    result = cache_activations(tiny_model, batches, HOOKS, tmp_path / "r", shard_rows=100)
    assert result.resumed_from_shard == 1 and result.rows == 7 * 60
    clean = cache_activations(tiny_model, batches, HOOKS, tmp_path / "clean", shard_rows=100)
    a, b = DiskActivationStore(tmp_path / "r"), DiskActivationStore(tmp_path / "clean")
    assert a.manifest == b.manifest == json.loads((tmp_path / "r" / "manifest.json").read_text())
    assert a.rows == clean.rows
    for h in HOOKS:
        assert_close(
            torch.cat([a.shard(i, h) for i in range(len(a.shards))]),
            torch.cat([b.shard(i, h) for i in range(len(b.shards))]),
        )
    with pytest.raises(ValueError, match="holds a cache of"):
        cache_activations(tiny_model, batches, HOOKS, tmp_path / "r", dtype="float16")


def test_nan_names_shard_and_row(tiny_model, tmp_path):
    cache_activations(tiny_model, token_batches(4), HOOKS, tmp_path / "n", shard_rows=100)
    file = tmp_path / "n" / "shard_00001.safetensors"
    t = load_file(str(file))
    t[HOOKS[1]][17, 3] = float("nan")
    save_file(t, str(file))
    store = DiskActivationStore(tmp_path / "n")
    with pytest.raises(
        ActivationDataError, match=r"shard_00001.safetensors \(blocks.1.hook_mlp_out\), row 17"
    ):
        list(store.batches(20, shuffle=False))
    with pytest.raises(ActivationDataError, match="row 17"):
        store.validate()
    with pytest.raises(KeyError, match="no activations for"):
        list(store.batches(20, hooks=["blocks.0.hook_mlp_out"]))
