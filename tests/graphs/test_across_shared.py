"""One CLT shared by the checkpoints of a training run: balanced pooling of their activations, a planted pair
of checkpoints where the later one has an extra feature (the shared dictionary names it literally), the
graphs equal to ones built by hand with the same CLT, the fit against each checkpoint's own CLT, refusals."""

from __future__ import annotations

import pytest
import torch

from interplab import runs
from interplab.graphs import AttributionGraph, attribute, graphs_across
from interplab.model import ModelConfig, Transformer
from interplab.runs import Kind, write_json
from interplab.runs.names import CLT_DIR, CLTS_DIR
from interplab.runs.openers import CLTTrainRun
from interplab.sae.clt import CLTConfig, save_clt
from interplab.sae.clt_shared import pooled_activations, rows_per_checkpoint, train_clt_shared
from interplab.sae.clt_train import CLTTrainConfig, evaluate_clt
from interplab.train.checkpoint import save_checkpoint
from tests.graphs.planted import BOS, A, B, C, D, exact_transcoder, planted_model

TOKENS = [BOS, A, D, C]


def _train_run(path, models):
    path.mkdir()
    write_json(
        path / "config.json", Kind.TRAIN, {"model": {}, "data": {}, "optim": {}, "steps": 1, "batch_size": 1}
    )
    for step, model in models.items():
        save_checkpoint(path, step, model, None, {"step": step})
    return path


def _own_clts(path, clts):
    """A CLT run across checkpoints (as `train_clt_across` writes it) holding the given CLTs."""
    names = [runs.checkpoint_name(s) for s in clts]
    write_json(path / "config.json", Kind.CLT_TRAIN, {"across": {"checkpoints": names}, "train": {}})
    for name, clt in zip(names, clts.values(), strict=True):
        write_json(path / CLTS_DIR / name / "config.json", Kind.CLT_TRAIN, {"train": {}, "data": {}})
        save_clt(clt, path / CLTS_DIR / name / CLT_DIR)
    return path


def _planted_pair():
    """(before, after). After: the planted model (A -> layer-0 feature -> the head copies it to C's position ->
    layer-1 feature -> logit B) plus a bigram C -> B. Before: the head does not copy yet (W_V = 0), layer 1's
    MLP has no neuron at all (the feature is extra in after), and layer 0's neuron writes 2 e1 instead of e1
    (a misfit of the shared dictionary, which writes e1: its error node holds the other e1)."""
    after = planted_model()
    with torch.no_grad():
        after.unembed.W_U[:, B] += torch.eye(8)[2]
    before = planted_model()
    with torch.no_grad():
        before.unembed.W_U.copy_(after.unembed.W_U)
        before.blocks[1].attn.W_V.zero_()
        before.blocks[1].mlp.W_in.zero_()
        before.blocks[1].mlp.W_out.zero_()
        before.blocks[0].mlp.W_out[0] *= 2.0
    return before, after


def test_shared_clt_names_the_extra_feature_and_equals_graphs_built_by_hand(tmp_path):
    before, after = _planted_pair()
    run = _train_run(tmp_path / "run", {10: before, 20: after})
    shared = exact_transcoder(after)  # the dictionary of the later checkpoint: exact there, a misfit before
    save_clt(shared, tmp_path / "shared")
    own = _own_clts(tmp_path / "own", {10: exact_transcoder(before), 20: exact_transcoder(after)})
    fit_tokens = torch.tensor([[BOS, A, D, C, A, C, D, C], [BOS, D, A, C, C, A, D, C]])
    across = graphs_across(
        run, tmp_path / "shared", TOKENS, [B], steps=[10, 20], out=tmp_path / "across", clt="shared",
        own_clts=own, fit_tokens=fit_tokens,
    )  # fmt: skip
    assert across.shared and across.steps == [10, 20]
    changes = across.changes_between(10, 20)
    appeared = {c.identity for c in changes if c.what == "node" and c.change == "appeared"}
    # the extra feature (layer 1's latent 0 at C's position) appears under its own index, as does the path
    assert appeared == {"1_0_3", "0_0_1"}
    edges = {c.identity for c in changes if c.what == "edge" and c.change == "appeared"}
    assert edges == {"E_1_1 -> 0_0_1", "0_0_1 -> 1_0_3", "1_0_3 -> 3_4_3"}
    assert not [c for c in changes if c.change == "vanished"]
    assert across.counts[0]["features_matched"] == 2 * 4  # one dictionary: every latent is itself
    for step, model in ((10, before), (20, after)):
        saved = AttributionGraph.load(tmp_path / "across" / runs.checkpoint_name(step))
        by_hand = attribute(model, shared, TOKENS, targets=[B])
        assert saved.node_ids() == by_hand.node_ids()
        torch.testing.assert_close(saved.adjacency, by_hand.adjacency)
    # before, layer 0's MLP writes 2 e1 where the dictionary writes e1: its error node at A holds the rest
    first = AttributionGraph.load(tmp_path / "across" / "step_000010")
    err = first.nodes.index(
        next(n for n in first.nodes if n.kind.value == "error" and (n.layer, n.position) == (0, 1))
    )
    assert first.nodes[err].value == pytest.approx(1.0)
    rows = {r["step"]: r for r in across.fit or []}
    for step, model, own_clt in (
        (10, before, exact_transcoder(before)),
        (20, after, exact_transcoder(after)),
    ):
        assert rows[step]["fvu_shared"] == pytest.approx(evaluate_clt(model, shared, fit_tokens).fvu_total)
        assert rows[step]["fvu_own"] == pytest.approx(evaluate_clt(model, own_clt, fit_tokens).fvu_total)
    assert rows[10]["fvu_shared"] > 0.1 and rows[10]["fvu_own"] == pytest.approx(0.0, abs=1e-10)
    assert rows[20]["fvu_shared"] == pytest.approx(0.0, abs=1e-10)
    assert "fvu shared | fvu own" in across.markdown()
    again = type(across).load(tmp_path / "across")
    assert again.to_dict() == across.to_dict()


def test_shared_clt_refusals(tmp_path):
    before, after = _planted_pair()
    run = _train_run(tmp_path / "run", {10: before, 20: after})
    save_clt(exact_transcoder(after), tmp_path / "shared")
    with pytest.raises(ValueError, match="name the steps"):
        graphs_across(run, tmp_path / "shared", TOKENS, [B], clt="shared")
    own = _own_clts(tmp_path / "own", {10: exact_transcoder(before), 20: exact_transcoder(after)})
    with pytest.raises(ValueError, match="not one CLT shared"):
        graphs_across(run, own, TOKENS, [B], clt="shared")
    with pytest.raises(ValueError, match="give clt='shared'"):
        graphs_across(run, own, TOKENS, [B], own_clts=own)
    with pytest.raises(ValueError, match="no checkpoint of step 30"):
        graphs_across(run, tmp_path / "shared", TOKENS, [B], steps=[10, 30], clt="shared")
    # a checkpoint of another shape than the shared CLT: named
    wide = Transformer(ModelConfig(d_model=16, n_layers=2, n_heads=1, d_vocab=6, n_ctx=8, d_mlp=4))
    save_checkpoint(run, 30, wide, None, {"step": 30})
    with pytest.raises(ValueError, match=r"at step 30.*d_model 16"):
        graphs_across(run, tmp_path / "shared", TOKENS, [B], steps=[10, 30], clt="shared")


def _models():
    out = {}
    for i, name in enumerate(("step_000010", "step_000020")):
        torch.manual_seed(i)
        out[name] = Transformer(
            ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=32, n_ctx=16, d_mlp=32)
        )
    return out


def test_pooled_batches_hold_each_checkpoints_rows_in_balance():
    models = _models()
    cfg = CLTTrainConfig(clt=CLTConfig(n_layers=2, d_model=16, d_sae=32), total_steps=3, batch_size=11)
    assert rows_per_checkpoint(11, 2) == [6, 5]
    tokens = torch.randint(0, 32, (24, 16), generator=torch.Generator().manual_seed(0))
    batches = list(pooled_activations(models, list(tokens.split(4)), cfg))
    assert len(batches) > 3
    m1, m2 = models.values()
    for batch in batches:
        for layer in range(2):
            x, y = batch[f"blocks.{layer}.hook_resid_mid"], batch[f"blocks.{layer}.hook_mlp_out"]
            assert x.shape[0] == 11
            with torch.no_grad():
                for rows, mine, other in ((slice(0, 6), m1, m2), (slice(6, 11), m2, m1)):
                    b = mine.blocks[layer]
                    torch.testing.assert_close(b.mlp(b.ln2(x[rows])), y[rows])
                    wrong = other.blocks[layer]
                    assert not torch.allclose(wrong.mlp(wrong.ln2(x[rows])), y[rows], atol=1e-3)
    with pytest.raises(ValueError, match="cannot hold a row of each"):
        rows_per_checkpoint(1, 2)


def test_train_clt_shared_records_its_checkpoints_and_fits_both(tmp_path):
    models = _models()
    cfg = CLTTrainConfig(
        clt=CLTConfig(n_layers=2, d_model=16, d_sae=64, activation="topk", k=8),
        total_steps=60, batch_size=64, lr=3e-3, log_every=20,
    )  # fmt: skip
    tokens = torch.randint(0, 32, (160, 16), generator=torch.Generator().manual_seed(0))
    result = train_clt_shared(models, tokens, cfg, tmp_path / "shared", source={"run": "somewhere"})
    run = CLTTrainRun.open(tmp_path / "shared")
    assert run.shared == {"run": "somewhere", "checkpoints": list(models), "rows_per_checkpoint": [32, 32]}
    assert (run.clt / "cfg.json").is_file()
    held_out = torch.randint(0, 32, (8, 16), generator=torch.Generator().manual_seed(9))
    untrained = [
        evaluate_clt(m, type(result.clt)(result.clt.cfg), held_out).fvu_total for m in models.values()
    ]
    fvu = [evaluate_clt(m, result.clt, held_out).fvu_total for m in models.values()]
    assert all(f < 0.6 * u for f, u in zip(fvu, untrained, strict=True)), (fvu, untrained)
    odd = {
        **models,
        "step_000030": Transformer(ModelConfig(d_model=8, n_layers=2, n_heads=2, d_vocab=32, n_ctx=16)),
    }
    with pytest.raises(ValueError, match=r"step_000030 \(2 layers, d_model 8\)"):
        train_clt_shared(odd, tokens, cfg)
