"""Running real TransformerLens 3.9 beside the suite, in its own interpreter (never imported here), found by
`tests.peers.peer_python` (``INTERPLAB_TL_PYTHON`` or ``.peers/tl``; a skip that says how to get it otherwise).

`run_tl_jobs` runs ``tests/tl_peer_script.py`` once for several jobs (TL's import takes ~15 s): each job builds
a random ``HookedTransformer`` from a TL config, saves it as a TL checkpoint (``model.pt`` +
``transformerlens_config.json``) in its ``out`` folder, and writes, per pass, TL's cache of every hook with its
logits and loss (``pass{i}.safetensors``, keys ``__logits__`` and ``__loss__``), and optionally the weights after
``process_weights_`` (``processed.safetensors``).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.peers import peer_env, peer_python

SCRIPT = Path(__file__).with_name("tl_peer_script.py")


def run_tl_jobs(jobs: list[dict], workdir: Path, tokens: torch.Tensor, *, timeout: float = 900) -> dict:
    """Run ``jobs`` (each: ``config`` TL config kwargs, ``out`` folder, optional ``seed``, ``passes`` [flag
    dicts, e.g. ``{"use_attn_result": True}`` or ``{"attention_mask": [[1, 1, 0]]}``], ``process`` kwargs of
    ``process_weights_``, ``zero_gated_b_in``) in one TransformerLens process on ``tokens``. Returns
    ``{"transformer_lens": version}``."""
    python = peer_python("tl")
    workdir.mkdir(parents=True, exist_ok=True)
    save_file({"tokens": tokens.contiguous()}, str(workdir / "tokens.safetensors"))
    spec = {"jobs": [{"tokens": str(workdir / "tokens.safetensors"), **job} for job in jobs]}
    spec["done"] = str(workdir / "done.json")
    (workdir / "spec.json").write_text(json.dumps(spec))
    env = {**peer_env(), "PYTHONPATH": ""}
    proc = subprocess.run(
        [python, str(SCRIPT), str(workdir / "spec.json")],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=workdir,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"TransformerLens ({python}) failed:\n{proc.stderr[-4000:]}")
    info = json.loads((workdir / "done.json").read_text())
    if not info["transformer_lens"].startswith("3.9"):
        pytest.skip(f"{python} has transformer-lens {info['transformer_lens']}; these tests compare with 3.9")
    return info
