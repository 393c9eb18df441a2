import json

import pytest
import torch

from interplab import runs
from interplab.analysis.formation import FormationResult, find_formation_step, formation, in_context_score
from interplab.analysis.heads import head_scores, patterns_and_logits, repeated_random_tokens
from interplab.model import ModelConfig, Transformer
from interplab.train import train

HALF = 10


def _model():
    return Transformer(
        ModelConfig(d_model=36, n_layers=2, n_heads=3, d_vocab=50, n_ctx=2 * HALF, attn_only=True)
    )


def _planted(pattern, site):
    """Layer 1: head 0 attends to the induction target, head 1 to the previous token; head 2 is untouched."""
    if site.layer != 1:
        return None
    out = pattern.clone()
    q_len = out.shape[-1]
    out[:, :2] = 0
    for q in range(q_len):
        out[:, 1, q, max(q - 1, 0)] = 1.0
        out[:, 0, q, q - HALF + 1 if q >= HALF else q] = 1.0
    return out


def test_planted_heads_score_one():
    model = _model()
    tokens = repeated_random_tokens(50, HALF, 4, seed=1, distinct=False)
    assert torch.equal(tokens[:, :HALF], tokens[:, HALF:])
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", _planted)]):
        scores = head_scores(model, tokens, period=HALF)
        ind, prev = scores.induction, scores.previous_token
    torch.testing.assert_close(ind[1, :2], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(prev[1, :2], torch.tensor([0.0, 1.0]))


def test_scores_equal_a_plain_loop():
    model = _model()
    tokens = repeated_random_tokens(50, HALF, 3, seed=2, distinct=False)
    pat, _ = patterns_and_logits(model, tokens)  # layer batch head q k
    scores = head_scores(model, tokens, period=HALF)
    ind, prev = scores.induction, scores.previous_token
    for layer in range(2):
        for head in range(3):
            i = [pat[layer, b, head, q, q - HALF + 1] for b in range(3) for q in range(HALF, 2 * HALF)]
            p = [pat[layer, b, head, q, q - 1] for b in range(3) for q in range(1, 2 * HALF)]
            torch.testing.assert_close(ind[layer, head], torch.stack(i).mean())
            torch.testing.assert_close(prev[layer, head], torch.stack(p).mean())


def test_score_inputs_are_checked():
    model = _model()
    with pytest.raises(ValueError, match="must repeat with period"):
        head_scores(model, torch.randint(0, 50, (2, 20)), period=HALF)
    losses = torch.zeros(2, 32)
    losses[:, -4:] = 1.0
    assert in_context_score(losses) == pytest.approx(1.0)


def test_find_formation_step():
    steps = [0, 100, 200, 300, 400]
    assert find_formation_step(steps, [0.01, 0.02, 0.2, 0.6, 0.62]) == 300
    assert find_formation_step(steps, [0.01, 0.02, 0.05, 0.1, 0.12]) is None


def test_formation_on_a_run(corpus_dir, tmp_path, tiny_config):
    cfg = tiny_config(corpus_dir, steps=6)
    train(cfg, tmp_path / "run")
    result = formation(tmp_path / "run", n_seqs=2, half=8, val_seqs=2)
    assert list(result.steps) == cfg.checkpoints.steps(6)
    assert result.induction.shape == (len(result.steps), 2, 2)
    assert all(v is not None for v in result.val_loss)
    paths = result.save(tmp_path / "out")
    data = json.loads((tmp_path / "out" / "formation.json").read_text())
    assert (data["kind"], data["version"]) == ("formation", runs.VERSIONS[runs.Kind.FORMATION])
    assert runs.Report.open(tmp_path / "out").kind is runs.Kind.FORMATION
    again = FormationResult.from_dict(data)
    torch.testing.assert_close(again.induction, result.induction)
    assert "| step |" in (tmp_path / "out" / "formation.md").read_text()
    assert (tmp_path / "out" / "formation.html").stat().st_size > 1000
    assert paths["png"] is not None or paths["png_error"]
