"""Data parallelism: 2 gloo processes under torchrun train exactly like 1 process with the same global batch."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from interplab.train import read_log, train

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    from interplab.train import TrainConfig, train

    torch.set_num_threads(1)
    train(TrainConfig.from_file(sys.argv[1]), sys.argv[2])
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_processes_match_one(corpus_dir, tmp_path, tiny_config):
    cfg = tiny_config(corpus_dir, steps=6, batch_size=4, grad_accum=1, eval_every=3)
    train(cfg, tmp_path / "one")
    cfg.to_json(tmp_path / "cfg.json")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": os.getcwd()}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(tmp_path / "worker.py"),
        str(tmp_path / "cfg.json"),
        str(tmp_path / "two"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [r for r in read_log(tmp_path / "one") if "loss" in r]
    two = [r for r in read_log(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, 7))
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in two]), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=1e-5
    )
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in a:
        # Adam divides by sqrt(v): where a gradient is ~0, allreduce-order rounding moves a weight by ~1e-5
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-4)


LEAK = textwrap.dedent(
    """
    import sys
    import tempfile
    import torch
    import torch.distributed as dist
    if sys.argv[1] == "interplab":
        import interplab.train.distributed  # noqa: F401
    store = dist.FileStore(tempfile.mktemp(), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    group = dist.group.WORLD
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])  # the first optimizer imports torch._dynamo
    dist.destroy_process_group()
    print(sys.getrefcount(group) - 2)  # references left besides `group` and getrefcount's own argument
    """
)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_no_reference_to_the_process_group_outlives_destroy(tmp_path):
    """torch.distributed.nn.functional's default arguments capture the world group when it is imported; torch
    imports it lazily (first optimizer -> torch._dynamo -> FSDP), i.e. after init_process_group, so the group
    outlived destroy_process_group and was torn down at interpreter exit, where gloo sometimes aborted a rank
    that had finished (SIGABRT, 'terminate called without an active exception'). interplab imports it first."""
    (tmp_path / "leak.py").write_text(LEAK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}

    def left(mode: str) -> int:
        cmd = [sys.executable, str(tmp_path / "leak.py"), mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return int(proc.stdout.split()[-1])

    assert left("plain") > 0, "torch no longer leaks the group: the pre-import may be unnecessary"
    assert left("interplab") == 0
