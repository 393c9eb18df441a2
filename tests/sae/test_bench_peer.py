"""k-sparse probing side by side with SAEBench 0.6 (`sae_bench.evals.sparse_probing.probe_training`, in its own
venv: INTERPLAB_SAEBENCH_PYTHON or .peers/saebench/bin/python; skipped with the reason when absent): on the
same activations, labels and train/test split, the same top-k latents (SAEBench's absolute mean difference)
and the same held-out accuracy of the logistic probe on them (sklearn's L2 C=1 there, ours L-BFGS here)."""

import json
import subprocess

import pytest
import torch
from torch.testing import assert_close

from interplab.sae.bench import k_sparse_probe, rank_latents
from tests.peers import peer_env, peer_python

PEER = """
import json, sys, torch
from sae_bench.evals.sparse_probing import probe_training as pt
d = json.load(sys.stdin)
acts, labels = torch.tensor(d["acts"]), torch.tensor(d["labels"])
train, test = torch.tensor(d["train"]), torch.tensor(d["test"])
out = {}
for k in d["ks"]:
    mask = pt.get_top_k_mean_diff_mask(acts[train], labels[train], k)
    tr = pt.apply_topk_mask_reduce_dim(acts[train], mask)
    te = pt.apply_topk_mask_reduce_dim(acts[test], mask)
    _, acc = pt.train_sklearn_probe(tr, labels[train], te, labels[test])
    out[k] = {"latents": sorted(torch.nonzero(~mask).flatten().tolist()), "accuracy": float(acc)}
print(json.dumps(out))
"""


def planted(seed: int = 0, n: int = 1500, d: int = 24):
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=g) < 0.35
    acts = torch.relu(torch.randn(n, d, generator=g) * 0.5)
    strength = {3: 1.5, 11: 1.0, 17: 0.6, 5: 0.3}  # informative latents of decreasing strength
    for j, s in strength.items():
        acts[:, j] += labels.float() * s + torch.rand(n, generator=g) * 0.8
    return acts, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_k_sparse_probe_matches_saebench(seed):
    python = peer_python("saebench")
    acts, labels = planted(seed)
    ks = (1, 2, 5)
    perm = torch.randperm(acts.shape[0], generator=torch.Generator().manual_seed(0))
    n_test = int(acts.shape[0] * 0.3)  # k_sparse_probe's own split (seed 0, test_fraction 0.3)
    test, train = perm[:n_test], perm[n_test:]
    payload = {"acts": acts.tolist(), "labels": labels.long().tolist(), "train": train.tolist(),
               "test": test.tolist(), "ks": list(ks)}  # fmt: skip
    done = subprocess.run(
        [python, "-c", PEER],
        input=json.dumps(payload),
        capture_output=True,
        text=True,
        env=peer_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    ours = k_sparse_probe(acts, labels, ks=ks)
    for r in ours:
        assert sorted(r.latents) == theirs[str(r.k)]["latents"]
        assert sorted(r.latents) == sorted(
            rank_latents(acts[train], labels[train], absolute=True)[: r.k].tolist()
        )
        assert_close(r.accuracy, theirs[str(r.k)]["accuracy"], atol=0.02, rtol=0)
