"""SAE training and activation caching across processes (CPU, gloo, under torchrun): a rank-sharded cache holds
exactly the rows one process writes; the ranks read every row of the one-process stream once; data-parallel
training ends where one process ends; a rank killed mid-run stops the job and the same command resumes to
the uninterrupted result, bit for bit; a sweep spread over ranks writes the run folder one process writes."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from interplab.runs import LOG, TRAIN_SUMMARY
from interplab.sae import SAEConfig, create_sae, load_sae
from interplab.sae.disk_store import DiskActivationStore, cache_activations, rank_folder
from interplab.sae.sweep import cache_source, plan_sweep, spread_names, train_sweep
from interplab.sae.train import train_saes
from interplab.train import distributed
from tests.sae.dist_setup import HOOK, sweep_config, tiny_model, token_stream, train_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)


def _torchrun(out: Path, nproc: int = 2, **env: str) -> subprocess.Popen[str]:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    environ.update(env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / "sae" / "dist_worker.py"), str(out), str(STEPS)]  # fmt: skip
    return subprocess.Popen(cmd, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted torchrun of 2 processes: rank-sharded cache, data-parallel run, spread sweep."""
    out = tmp_path_factory.mktemp("two")
    code, output = _finish(_torchrun(out))
    assert code == 0, output[-4000:]
    return out


@pytest.fixture()
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: the reference's float reductions run in the same order
    yield
    torch.set_num_threads(before)


def _all_rows(store: DiskActivationStore) -> torch.Tensor:
    rows = torch.cat([store.shard(i, HOOK) for i in range(len(store.shards))])
    return rows[torch.argsort(rows[:, 0])]


def test_rank_sharded_cache_holds_the_rows_of_one_process(two, tmp_path):
    single = cache_activations(tiny_model(), token_stream(), [HOOK], tmp_path / "one", shard_rows=100,
                               source={"test": 1})  # fmt: skip
    sharded = DiskActivationStore(two / "cache")
    assert sharded.manifest["world"] == 2 and sharded.manifest["complete"]
    assert sharded.rows == single.rows == 21 * 4 * 15
    assert {sh["rank"] for sh in sharded.shards} == {0, 1}
    assert all(sh["file"].startswith("ranks/rank_0000") for sh in sharded.shards)
    assert sharded.manifest["identity"] == DiskActivationStore(tmp_path / "one").manifest["identity"]
    assert torch.equal(_all_rows(sharded), _all_rows(DiskActivationStore(tmp_path / "one")))


def test_ranks_read_every_row_of_the_one_process_stream_once(two):
    ranks = [torch.load(two / f"rows_{r}.pt") for r in range(2)]
    assert [r["tokens"] for r in ranks] == [STEPS * 32] * 2
    source = cache_source(two / "cache", [HOOK], batch_size=32, steps=STEPS)
    expected = [b[HOOK] for _, b in zip(range(STEPS), source.batches, strict=False)]
    got = [torch.cat([r["rows"][i * 16 : (i + 1) * 16] for r in ranks]) for i in range(STEPS)]
    assert all(r["rows"].shape[0] == STEPS * 16 for r in ranks)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(g, e), f"batch {i}"


def test_data_parallel_training_equals_one_process(two, one_thread):
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=HOOK))
    source = cache_source(two / "cache", [HOOK], batch_size=32, steps=STEPS)
    result = train_saes(sae, source.batches, train_config(STEPS))
    ddp = load_sae(two / "run" / "saes" / "sae")
    for (name, p), q in zip(sae.named_parameters(), ddp.parameters(), strict=True):
        assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    logged = [json.loads(line) for line in (two / "run" / LOG).read_text().splitlines()]
    rows = [r for r in logged if "loss" in r]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in result.history]
    # the log's means are over every rank's rows (all-reduced), not rank 0's half
    assert_close(torch.tensor([r["mse"] for r in rows]), torch.tensor([r["mse"] for r in result.history]),
                 rtol=1e-4, atol=1e-6)  # fmt: skip


def test_ranks_that_start_from_different_weights_train_one_sae(two):
    """Each rank draws its own initial weights (seed = rank); the trainer's start-up broadcast makes every rank
    train rank 0's, so they end bit-identical (without the broadcast each rank keeps its own start and the
    averaged gradients move them apart: this test and the one-process comparison above fail)."""
    ranks = [torch.load(two / f"rows_{r}.pt") for r in range(2)]
    differ = [
        k for k in ranks[0]["initial"] if not torch.equal(ranks[0]["initial"][k], ranks[1]["initial"][k])
    ]
    assert "W_enc" in differ and "W_dec" in differ  # the ranks really started apart
    for key, p in ranks[0]["final"].items():
        assert torch.equal(p, ranks[1]["final"][key]), key


def test_sweep_spread_over_ranks_writes_what_one_process_writes(two, tmp_path, one_thread):
    cfg = sweep_config()
    src = cache_source(two / "cache", [HOOK], batch_size=cfg.batch_size, steps=cfg.steps)
    plan = plan_sweep(src.widths, cfg)
    train_sweep(plan, src, cfg, tmp_path / "one")
    spread = two / "sweep"
    assert (spread / "config.json").read_text() == (tmp_path / "one" / "config.json").read_text()
    assert sorted(p.name for p in (spread / "saes").iterdir()) == sorted(plan.saes)
    for name in plan.saes:
        a, b = load_sae(tmp_path / "one" / "saes" / name), load_sae(spread / "saes" / name)
        for (key, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            assert torch.equal(p, q), f"{name}.{key}"
    rows = [json.loads(line) for line in (tmp_path / "one" / LOG).read_text().splitlines()]
    assert [json.loads(line) for line in (spread / LOG).read_text().splitlines()] == rows
    assert json.loads((spread / TRAIN_SUMMARY).read_text()) == json.loads(
        (tmp_path / "one" / TRAIN_SUMMARY).read_text()
    )
    assert {p.name for p in spread.glob("training_*.html")} == {
        p.name for p in (tmp_path / "one").glob("*.html")
    }


def test_killed_rank_stops_the_job_and_the_same_command_resumes_bit_exactly(two, tmp_path):
    proc = _torchrun(tmp_path, KILL_STEP="6", ONLY="train")
    deadline = time.monotonic() + 180
    while not (tmp_path / "pid").is_file():
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.monotonic() < deadline, "rank 1 never reached step 6"
        time.sleep(0.1)
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)
    start = time.monotonic()
    code, output = _finish(proc, timeout=120)
    assert code != 0, output[-4000:]
    assert time.monotonic() - start < 60, "the surviving rank hung"
    assert "Signal 9" in output or "SIGKILL" in output, output[-4000:]
    assert (tmp_path / "run" / "checkpoints" / "step_000004").is_dir()
    (tmp_path / "pid").unlink()
    # another number of processes may resume too: one process continues the same global batches (rounding)
    shutil.copytree(tmp_path / "run", tmp_path / "alone")
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=HOOK))
    source = cache_source(tmp_path / "cache", [HOOK], batch_size=32, steps=STEPS)
    alone = train_saes(sae, source.batches, train_config(STEPS), run_dir=tmp_path / "alone", data=source.data)
    assert alone.resumed_from == 4 and alone.tokens == STEPS * 32
    for p, q in zip(sae.parameters(), load_sae(two / "run" / "saes" / "sae").parameters(), strict=True):
        assert_close(p, q, rtol=1e-4, atol=1e-5)
    code, output = _finish(_torchrun(tmp_path, ONLY="train"))  # the same command, run again
    assert code == 0, output[-4000:]
    for r in range(2):
        resumed, whole = torch.load(tmp_path / f"rows_{r}.pt"), torch.load(two / f"rows_{r}.pt")
        assert resumed["resumed_from"] == 4 and resumed["tokens"] == whole["tokens"]
        assert torch.equal(resumed["rows"], whole["rows"][4 * 16 :])  # steps 4.. again, nothing skipped
    a, b = load_sae(tmp_path / "run" / "saes" / "sae"), load_sae(two / "run" / "saes" / "sae")
    for (key, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), key
    metrics = [
        r for r in (json.loads(x) for x in (tmp_path / "run" / LOG).read_text().splitlines()) if "sae" in r
    ]
    whole_metrics = [
        r for r in (json.loads(x) for x in (two / "run" / LOG).read_text().splitlines()) if "sae" in r
    ]
    assert metrics == whole_metrics


def test_two_nodes_of_one_process_each_train_like_one_node_of_two(two, tmp_path):
    """Two torchrun agents (--nnodes 2, one process each) meet at a c10d rendezvous: global ranks 0 and 1, both
    LOCAL_RANK 0. Sharding follows the global rank, so the run is the one-node run, bit for bit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
               "ONLY": "train"}  # fmt: skip
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(node),
                "--nproc_per_node",
                "1",
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "interplab-test",
                str(ROOT / "tests" / "sae" / "dist_worker.py"),
                str(tmp_path),
                str(STEPS),
            ],  # fmt: skip
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for node in range(2)
    ]
    for proc in procs:
        code, output = _finish(proc)
        assert code == 0, output[-4000:]
    ranks = [torch.load(tmp_path / f"rows_{r}.pt") for r in range(2)]
    assert [(r["local_rank"], r["world"]) for r in ranks] == [(0, 2), (0, 2)]
    for r in range(2):
        assert torch.equal(ranks[r]["rows"], torch.load(two / f"rows_{r}.pt")["rows"])
    a, b = load_sae(tmp_path / "run" / "saes" / "sae"), load_sae(two / "run" / "saes" / "sae")
    for (key, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), key


@pytest.mark.slow
def test_a_hung_rank_stops_the_job_with_a_clear_error(tmp_path):
    code, output = _finish(_torchrun(tmp_path, HANG_STEP="5", ONLY="train", INTERPLAB_DIST_TIMEOUT="3"))
    assert code != 0
    assert "did not reach an all-reduce" in output and "run the same command again to resume" in output, (
        output[-4000:]
    )


@pytest.mark.slow
def test_four_processes_cache_and_train_like_one(tmp_path, one_thread):
    code, output = _finish(_torchrun(tmp_path, nproc=4, ONLY="train"))
    assert code == 0, output[-4000:]
    single = cache_activations(tiny_model(), token_stream(), [HOOK], tmp_path / "one", shard_rows=100,
                               source={"test": 1})  # fmt: skip
    four = DiskActivationStore(tmp_path / "cache")
    assert four.manifest["world"] == 4 and four.rows == single.rows
    assert torch.equal(_all_rows(four), _all_rows(DiskActivationStore(tmp_path / "one")))
    torch.manual_seed(0)
    sae = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=HOOK))
    train_saes(sae, cache_source(tmp_path / "cache", [HOOK], batch_size=32, steps=STEPS).batches,
               train_config(STEPS))  # fmt: skip
    for p, q in zip(sae.parameters(), load_sae(tmp_path / "run" / "saes" / "sae").parameters(), strict=True):
        assert_close(q, p, rtol=1e-4, atol=1e-5)


# ---- in one process: ranks simulated by passing rank and world ----


def test_simulated_ranks_cache_the_rows_of_one_process_and_refuse_another_world(tmp_path):
    model, toks = tiny_model(), token_stream()
    one = cache_activations(model, toks, [HOOK], tmp_path / "one", shard_rows=70, max_rows=500)
    for r in (2, 1, 0):  # rank 0 last: it writes the manifest once every rank is done
        cache_activations(
            model, toks, [HOOK], tmp_path / "three", shard_rows=70, max_rows=500, rank=r, world=3
        )
    three = DiskActivationStore(tmp_path / "three")
    assert three.rows == one.rows == 540  # max_rows cuts at the token batch one process cuts at
    assert torch.equal(_all_rows(three), _all_rows(DiskActivationStore(tmp_path / "one")))
    # a finished cache is read (and "resumed": nothing to do) by any number of processes
    assert cache_activations(model, toks, [HOOK], tmp_path / "three", shard_rows=70, max_rows=500).rows == 540
    # an unfinished one only by the number that started it
    cache_activations(model, toks, [HOOK], tmp_path / "part", shard_rows=70, rank=1, world=3)
    assert rank_folder(tmp_path / "part", 1, 3).is_dir()
    for r, w in ((0, 2), (None, None)):
        with pytest.raises(
            ValueError, match=r"being written by 3 processes.*torchrun with 3 processes.*--overwrite"
        ):
            cache_activations(model, toks, [HOOK], tmp_path / "part", shard_rows=70, rank=r, world=w)
    redone = cache_activations(
        model, toks, [HOOK], tmp_path / "part", shard_rows=70, overwrite=True
    )  # the fix
    assert redone.rows == 21 * 60 and not rank_folder(tmp_path / "part", 1, 3).exists()

    class Killed(Exception):
        pass

    def die(rows: int) -> None:
        if rows > 150:
            raise Killed

    with pytest.raises(Killed):  # one process killed after its first shards
        cache_activations(model, toks, [HOOK], tmp_path / "solo", shard_rows=60, progress=die)
    with pytest.raises(ValueError, match=r"being written by one process.*without torchrun.*--overwrite"):
        cache_activations(model, toks, [HOOK], tmp_path / "solo", shard_rows=60, rank=0, world=2)


def test_rank_slices_of_every_batch_are_the_one_process_batch_and_a_bad_split_is_refused(tmp_path):
    cache_activations(tiny_model(), token_stream(), [HOOK], tmp_path / "c", shard_rows=100)
    store = DiskActivationStore(tmp_path / "c")
    whole = list(store.batches(32, chunk_rows=16, mix_chunks=3, epochs=2, seed=3))
    for world in (2, 4):
        parts = [list(store.batches(32, chunk_rows=16, mix_chunks=3, epochs=2, seed=3, rank=r, world=world))
                 for r in range(world)]  # fmt: skip
        assert all(len(p) == len(whole) for p in parts)
        for i, batch in enumerate(whole):
            assert torch.equal(torch.cat([p[i][HOOK] for p in parts]), batch[HOOK])
    with pytest.raises(ValueError, match=r"batch size 30 does not divide over 4 processes.*e.g. 28 or 32"):
        next(store.batches(30, rank=1, world=4))


def test_torchrun_environment_is_checked(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2, WORLD_SIZE=2.*0 <= RANK < WORLD_SIZE"):
        distributed.env_info()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.env_info() == distributed.DistInfo(rank=1, world=2, local_rank=1)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR.*is not set: launch with torchrun"):
        distributed.init_distributed(torch.device("cpu"))
    monkeypatch.setenv("INTERPLAB_DIST_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="INTERPLAB_DIST_TIMEOUT='soon'"):
        distributed.timeout_s()


def test_a_sweep_is_spread_disjointly_and_never_over_more_ranks_than_saes():
    names = [f"s{i}" for i in range(5)]
    shares = [spread_names(names, r, 3) for r in range(3)]
    assert sorted(sum(shares, [])) == names and shares[0] == ["s0", "s3"]
    with pytest.raises(ValueError, match="5 SAE.*cannot be spread over 6 processes.*at most 5"):
        spread_names(names, 0, 6)


@pytest.mark.slow
def test_the_cli_caches_and_trains_under_torchrun(tmp_path):
    """`torchrun -m interplab sae cache` then `sae train --spread`: the commands join torchrun's group, rank 0
    prints, a --batch that does not divide is refused."""
    import random

    from interplab.data import CharTokenizer
    from interplab.model import ModelConfig, Transformer

    t, tok = tmp_path, CharTokenizer("abcdefgh \n")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=tok.vocab_size, n_ctx=64, d_mlp=32)
    )
    model.tokenizer = tok
    model.save(t / "model")
    rng = random.Random(0)
    (t / "corpus").mkdir()
    for i in range(20):
        text = "\n".join("".join(rng.choice("abcdefgh ") for _ in range(200)) for _ in range(8))
        (t / "corpus" / f"{i}.txt").write_text(text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "INTERPLAB_CACHE": str(t / "cache")}
    run = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "interplab",
    ]
    cache = ["sae", "cache", str(t / "model"), "--hook", HOOK, "--out", str(t / "acts"), "--tokens", "2000",
             "--seq-len", "32", "--batch", "4", "--corpus", str(t / "corpus"), "--dtype", "float32"]  # fmt: skip
    done = subprocess.run(run + cache, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "(written by 2 processes)" in done.stdout and done.stdout.count("rows in") == 1  # rank 0 prints
    assert DiskActivationStore(t / "acts").manifest["world"] == 2
    train = ["sae", "train", "--cache", str(t / "acts"), "--hook", HOOK, "--steps", "6", "--batch", "64",
             "--expansion", "2", "--sweep", "k=2,4,8", "--spread", "--out", str(t / "sweep")]  # fmt: skip
    done = subprocess.run(run + train, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert len(list((t / "sweep" / "saes").iterdir())) == 3
    bad = ["sae", "train", "--cache", str(t / "acts"), "--hook", HOOK, "--steps", "6", "--batch", "63",
           "--out", str(t / "dp")]  # fmt: skip
    done = subprocess.run(run + bad, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--batch 63 does not divide over 2 processes" in done.stdout + done.stderr
