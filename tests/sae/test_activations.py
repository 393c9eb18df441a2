import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from interplab.integrity import IntegrityError, file_record
from interplab.model import Transformer
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
    with pytest.raises(ValueError, match="written with dtype=float32; this run asks for float16"):
        cache_activations(tiny_model, batches, HOOKS, tmp_path / "r", dtype="float16")


def _killed_cache(model, path, batches, **kw):
    with pytest.raises(_Killed):
        cache_activations(model, _dies_after(batches, 3), HOOKS, path, shard_rows=100, **kw)


@pytest.mark.parametrize("what", ["model", "seq_len", "order", "source", "hooks", "budget", "filter"])
def test_resume_with_other_inputs_is_refused_naming_the_difference(tiny_model, tmp_path, what):
    """A resumed cache never mixes rows of two sources: every input that determines the rows is checked."""
    batches = token_batches(7)
    src = {"corpus": "c", "split": "train", "seq_len": 16}
    _killed_cache(tiny_model, tmp_path / "c", batches, source=src, max_rows=400)
    before = json.loads((tmp_path / "c" / "manifest.json").read_text())
    kw = {"source": src, "max_rows": 400, "token_filter": TokenFilter()}
    model, hooks, toks = tiny_model, HOOKS, batches
    if what == "model":
        torch.manual_seed(1)
        model = Transformer(tiny_model.cfg)  # same config, other weights
        expect = "model weights"
    elif what == "seq_len":
        toks = [b[:, :8] for b in batches]
        expect = "other token batches"
    elif what == "order":
        toks = batches[::-1]
        expect = "other token batches"
    elif what == "source":
        kw["source"] = {**src, "split": "validation"}
        expect = "split=train; this run asks for validation"
    elif what == "hooks":
        hooks = HOOKS[:1]
        expect = "hooks="
    elif what == "budget":
        kw["max_rows"] = 200
        expect = "max_rows=400; this run asks for 200"
    else:
        kw["token_filter"] = TokenFilter(exclude_bos=False)
        expect = "token_filter="
    with pytest.raises(ValueError, match=expect):
        cache_activations(model, toks, hooks, tmp_path / "c", shard_rows=100, **kw)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == before  # nothing written
    res = cache_activations(model, toks, hooks, tmp_path / "c", shard_rows=100, overwrite=True, **kw)
    assert res.resumed_from_shard == 0
    cache_activations(model, toks, hooks, tmp_path / "fresh", shard_rows=100, **kw)
    assert DiskActivationStore(tmp_path / "c").manifest == DiskActivationStore(tmp_path / "fresh").manifest


def test_fewer_token_batches_than_consumed_is_refused(tiny_model, tmp_path):
    batches = token_batches(7)
    _killed_cache(tiny_model, tmp_path / "c", batches)
    with pytest.raises(ValueError, match="consumed 2 token batches, but this run yields only 1"):
        cache_activations(tiny_model, batches[:1], HOOKS, tmp_path / "c", shard_rows=100)


def test_a_folder_that_is_not_a_cache_is_never_written_or_deleted(tiny_model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is not empty and is not an activation cache"):
            cache_activations(tiny_model, token_batches(2), HOOKS, tmp_path / "mine", overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_old_caches_are_read_but_not_resumed(tiny_model, tmp_path):
    cache_activations(tiny_model, token_batches(3), HOOKS, tmp_path / "v1", shard_rows=100)
    file = tmp_path / "v1" / "manifest.json"
    m = json.loads(file.read_text())
    old = {"version": 1, "hooks": m["hooks"], "dtype": m["dtype"], "complete": True}
    old["shards"] = [{k: s[k] for k in ("file", "rows", "token_batches")} for s in m["shards"]]
    file.write_text(json.dumps(old))
    assert DiskActivationStore(tmp_path / "v1").rows == 3 * 60
    with pytest.raises(ValueError, match="older interplab"):
        cache_activations(tiny_model, token_batches(3), HOOKS, tmp_path / "v1", shard_rows=100)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shard_is_named_when_read(tiny_model, tmp_path, damage):
    cache_activations(tiny_model, token_batches(4), HOOKS, tmp_path / "d", shard_rows=100)
    file = tmp_path / "d" / "shard_00001.safetensors"
    data = bytearray(file.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x01  # inside the tensor data: still loads as numbers
    else:
        data = data[:-8]
    file.write_bytes(bytes(data))
    store = DiskActivationStore(tmp_path / "d")
    with pytest.raises(IntegrityError, match="shard_00001.safetensors"):
        list(store.batches(20, seed=0))


def test_nan_names_shard_and_row(tiny_model, tmp_path):
    cache_activations(tiny_model, token_batches(4), HOOKS, tmp_path / "n", shard_rows=100)
    file = tmp_path / "n" / "shard_00001.safetensors"
    t = load_file(str(file))
    t[HOOKS[1]][17, 3] = float("nan")
    save_file(t, str(file))
    manifest_file = tmp_path / "n" / "manifest.json"  # as if written so: the shard's checksum matches
    m = json.loads(manifest_file.read_text())
    m["shards"][1].update(file_record(file))
    manifest_file.write_text(json.dumps(m))
    store = DiskActivationStore(tmp_path / "n")
    with pytest.raises(
        ActivationDataError, match=r"shard_00001.safetensors \(blocks.1.hook_mlp_out\), row 17"
    ):
        list(store.batches(20, shuffle=False))
    with pytest.raises(ActivationDataError, match="row 17"):
        store.validate()
    with pytest.raises(KeyError, match="no activations for"):
        list(store.batches(20, hooks=["blocks.0.hook_mlp_out"]))


def test_a_cache_killed_before_its_first_manifest_starts_again(tiny_model, tmp_path):
    """SIGKILL between writing shard 0 and the manifest leaves the shard (and maybe a temp file) alone."""
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "shard_00000.safetensors").write_bytes(b"partial")
    (folder / ".shard_00001.safetensors.abc.tmp").write_bytes(b"partial")
    res = cache_activations(tiny_model, token_batches(3), HOOKS, folder, shard_rows=100)
    assert res.rows == 3 * 60 and DiskActivationStore(folder).rows == 3 * 60
    assert not list(folder.glob(".*.tmp"))


def test_the_manifest_is_an_activation_cache_of_the_run_contract(tiny_model, tmp_path):
    from interplab.runs import VERSIONS, CacheRun, Kind, detect

    cache_activations(tiny_model, token_batches(2), HOOKS, tmp_path / "c", shard_rows=100)
    run = CacheRun.open(tmp_path / "c")
    assert run.manifest["kind"] == Kind.ACTIVATION_CACHE.value
    assert run.manifest["version"] == VERSIONS[Kind.ACTIVATION_CACHE]
    file = tmp_path / "c" / "manifest.json"
    old = {k: v for k, v in json.loads(file.read_text()).items() if k != "kind"}  # before kinds
    file.write_text(json.dumps(old))
    assert detect(tmp_path / "c") is Kind.ACTIVATION_CACHE
