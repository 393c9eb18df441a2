"""Expand-route-ablate on a small model and a synthetic two-language corpus."""

import pytest
import torch

from interplab.routing.era import ERAConfig, run_era
from interplab.routing.era_data import ERAData, markov_windows, package_rule, stdlib_files


def test_era_localises_the_forget_data_and_resists_retraining():
    torch.set_num_threads(1)
    data = markov_windows()
    cfg = ERAConfig(
        d_model=32,
        n_layers=1,
        n_heads=2,
        d_mlp=64,
        expand_units=32,
        steps=300,
        batch_size=16,
        labelled_fractions=(1.0,),
        relearn_sizes=(16,),
        eval_windows=200,
        retain_finetune_steps=20,
    )
    result = run_era(data, cfg)
    none, filtered, era = result.row("none"), result.row("filter"), result.row("era")
    before = era.before_ablation
    forget_rise = era.forget_loss - before["forget_loss"]
    retain_rise = era.retain_loss - before["retain_loss"]
    assert forget_rise > 1.0 and forget_rise > 5 * max(retain_rise, 0.0), (before, era)
    assert era.retain_loss < none.retain_loss + 0.5  # the retain language survives ablation
    # robustness: after fine-tuning on 16 forget windows, ERA's forget loss stays above no intervention's
    assert era.relearn_forget_loss[16] > none.relearn_forget_loss[16] + 0.5
    assert filtered.forget_loss > none.forget_loss + 1.0  # the baseline, reported next to it
    assert [r[0] for r in result.table()] == ["condition", "none", "filter", "era"]


def test_era_data_validation():
    data = markov_windows(n_train=50, n_val=5, seq_len=8)
    with pytest.raises(ValueError, match="needs forget and retain windows"):
        ERAData(
            train=data.train,
            train_forget=torch.zeros(50, dtype=torch.bool),
            val_retain=data.val_retain,
            val_forget=data.val_forget,
            d_vocab=data.d_vocab,
        )
    with pytest.raises(ValueError, match=r"train_forget has shape \(49,\)"):
        ERAData(
            train=data.train,
            train_forget=data.train_forget[1:],
            val_retain=data.val_retain,
            val_forget=data.val_forget,
            d_vocab=data.d_vocab,
        )
    with pytest.raises(ValueError, match="labelled_fractions"):
        ERAConfig(labelled_fractions=(0.0,))


def test_stdlib_forget_rule():
    files = stdlib_files()
    rule = package_rule("email")
    forget = [rel for rel, _ in files if rule(rel)]
    assert forget and all(rel.startswith("email/") for rel in forget)
    assert not any("site-packages" in rel or rel.startswith("test/") for rel, _ in files)
