"""Loading never materialises a second copy of the weights: the model is built on the meta device and each
tensor is read memory-mapped, converted and placed on its own. Measured in a fresh process on a ~160 MB
GPT-2 checkpoint (peak resident set, VmHWM, reset after the imports), with bounds generous enough for
allocator noise yet below what any full copy would need (2x the weights in float32; 1.5x for a bfloat16
load that converted a whole float32 state dict)."""

import json
from pathlib import Path

import pytest
import torch
import transformers

from tests.scripts_env import run_python

CHILD = """
import json, sys, torch
from pathlib import Path
from interplab import load_model

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

dtype = getattr(torch, sys.argv[2])
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
rss0 = status("VmRSS")
model = load_model(sys.argv[1], dtype=None if dtype is torch.float32 else dtype)
total = 0.0
with torch.no_grad():
    for p in model.parameters():  # read every weight (a mapped file is paged in here at the latest)
        total += float(p.float().sum())
params = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
print(json.dumps({"peak_rise": status("VmHWM") - rss0, "param_bytes": sum(params.values()),
                  "largest": max(params.values()), "dtype": str(model.W_E.dtype)}))
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=512, n_layer=12, n_head=8, vocab_size=4096, n_positions=1024)
    path = tmp_path_factory.mktemp("gpt2-160mb")
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path, sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _load(path: Path, dtype: str) -> dict:
    proc = run_python(["-c", CHILD, str(path), dtype], cwd=path, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_float32_load_holds_one_copy(checkpoint):
    path, file_bytes = checkpoint
    got = _load(path, "float32")
    assert got["param_bytes"] == pytest.approx(file_bytes, rel=0.05)
    # one copy of the weights (mapped or converted), plus slack for the interpreter and allocator
    assert got["peak_rise"] <= 1.2 * got["param_bytes"] + 32 * 2**20, got


def test_bfloat16_load_converts_tensor_by_tensor(checkpoint):
    path, file_bytes = checkpoint
    got = _load(path, "bfloat16")
    assert got["dtype"] == "torch.bfloat16" and got["param_bytes"] == pytest.approx(file_bytes / 2, rel=0.05)
    # the bfloat16 model plus a few float32 tensors in flight, never the float32 state dict
    assert got["peak_rise"] <= got["param_bytes"] + 4 * 2 * got["largest"] + 32 * 2**20, got
