"""Feature absorption side by side with SAEBench 0.6's first-letter absorption eval
(`sae_bench.evals.absorption`, in its own venv: INTERPLAB_SAEBENCH_PYTHON or .peers/saebench/bin/python;
skipped with the reason when absent), on an interplab model (exported to TransformerLens, with its own BPE
tokenizer) and TopK SAE: SAEBench tokenises its prompts, trains its ground-truth probe and k-sparse probes,
and flags each probe true positive as fully absorbed or not. On the same inputs (the interplab model's
activations of SAEBench's prompt tokens, SAEBench's probe direction and split features), interplab's
`absorption_flags` gives the same flag for every word."""

import random

import pytest
import torch

from interplab.data import train_bpe
from interplab.model import ModelConfig, Transformer
from interplab.model.config import Positional
from interplab.sae import create_sae
from interplab.sae.config import SAEConfig
from tests.peers import peer_env, peer_python
from tests.saebench_peer import ABSORPTION_SUFFIX, absorption_spec, compare_absorption, run_absorption_peer

HOOK = "blocks.0.hook_resid_post"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tokenizer():
    """A BPE whose vocabulary holds words of every first letter as single tokens (with and without a leading
    space), SAEBench's prompt words and every answer `` X`` as one token."""
    rng = random.Random(0)
    words = ["".join([c, *rng.choices(LETTERS, k=rng.randint(2, 4))]) for c in LETTERS for _ in range(6)]
    lines = []
    for _ in range(60):
        w = rng.sample(words, 12)
        lines.append(" ".join(w))
        lines.append("\n".join(f"{x}{ABSORPTION_SUFFIX} {x[0].upper()}" for x in w[:4]))
    return train_bpe(lines, 700)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    python = peer_python("saebench")
    tok = tokenizer()
    assert all(len(tok.encode(" " + c.upper())) == 1 for c in LETTERS)
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=32, n_layers=1, n_heads=4, d_vocab=tok.vocab_size, n_ctx=256, d_mlp=64,
                    positional=Positional.LEARNED, name="tiny")
    ).eval()  # fmt: skip
    model.tokenizer = tok
    sae = create_sae(SAEConfig(d_in=32, d_sae=128, architecture="topk", k=8, hook_name=HOOK), seed=1)
    spec = absorption_spec(model, sae, tmp_path_factory.mktemp("absorption"), max_k_value=3)
    got = run_absorption_peer(python, spec, peer_env())
    return model, sae, got


def test_saebench_absorption_runs_offline_on_cpu(result):
    model, _, got = result
    assert "error" not in got, got.get("traceback")
    assert got["prompt_token_pos"] == -(1 + len(model.tokenizer.encode(ABSORPTION_SUFFIX)))
    assert set(got["letters"]) <= set(LETTERS) and got["words"]
    # a random model reads no first letter: SAEBench's gate (20 letters with probe F1 > 0.6) is not met, so
    # its published score is absent; the per-letter numbers exist
    assert not got["gate_met"] and got["mean_full_absorption_score"] is None
    assert got["mean_full_absorption_all_letters"] is not None


def test_interplab_absorption_rule_equals_saebench_on_its_own_inputs(result):
    model, sae, got = result
    cmp = compare_absorption(model, sae, got)
    assert cmp["sae_bench_full_absorptions"] > 0  # some words are absorbed: the rule is exercised both ways
    assert cmp["max_abs_diff_x"] < 1e-4  # the export and SAEBench's tokenisation: the same activations
    assert cmp["agree"] == cmp["words"]
    assert cmp["interplab_full_absorptions"] == cmp["sae_bench_full_absorptions"]
    per_letter = {w: v["theirs"] for w, v in cmp["per_letter"].items()}
    assert per_letter == {w: got["letters"][w]["num_full_absorption"] for w in per_letter}
