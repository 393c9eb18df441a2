"""The LLC of one small transformer by interplab and by devinterp 2.0 (its own venv, `tests.peers`) on the same
weights, data and SGLD settings: the two estimates agree within 3 combined chain-to-chain SEs. Skips with the
reason unless the devinterp peer is there (INTERPLAB_DEVINTERP_PYTHON or .peers/devinterp)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess

import torch
import torch.nn.functional as F

from interplab.dynamics import SGLDConfig, estimate_llc, lm_loss
from interplab.io import save_tensors
from interplab.model import ModelConfig, Transformer
from tests.peers import ROOT, peer_env, peer_python

SETTINGS = {"lr": 1e-4, "gamma": 100.0, "nbeta": 20.0, "chains": 4, "draws": 40, "batch_size": 8, "seed": 0}


def test_llc_agrees_with_devinterp(tmp_path):
    python = peer_python("devinterp")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=24, n_ctx=16, attn_only=True))
    half = torch.randint(0, 24, (64, 8))
    tokens = torch.cat([half, half], 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save(tmp_path / "model")
    save_tensors(tmp_path / "tokens.safetensors", {"tokens": tokens})
    done = subprocess.run(
        [python, str(ROOT / "benchmarks" / "_devinterp_llc.py"), str(tmp_path / "model")]
        + [str(tmp_path / "tokens.safetensors"), json.dumps(SETTINGS)],
        capture_output=True,
        text=True,
        env={**peer_env(), "PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    s = SETTINGS
    cfg = SGLDConfig(
        step_size=s["lr"], gamma=s["gamma"], nbeta=s["nbeta"], chains=s["chains"], draws=s["draws"], burn_in=0
    )
    ours = estimate_llc(model, (tokens,), lm_loss, SGLDConfig(**{**vars(cfg), "batch_size": s["batch_size"]}))
    their_se = statistics.stdev(theirs["per_chain"]) / math.sqrt(len(theirs["per_chain"]))
    assert abs(theirs["init_loss"] - ours.init_loss) < 1e-4  # the same weights and data
    se = math.hypot(ours.se, their_se)
    assert abs(ours.llc - theirs["llc"]) <= 3 * se, (ours.llc, ours.se, theirs["llc"], their_se)
