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
