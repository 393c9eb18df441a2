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


def _expanded_and_windows():
    from interplab.model import ModelConfig, Transformer
    from interplab.routing import expand_mlp

    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=24, n_ctx=12, d_mlp=24))
    expanded, expansion = expand_mlp(model, 8, seed=1)
    with torch.no_grad():  # let the expansion's units matter, so gradients flow through them
        for block in expanded.blocks:
            block.mlp.W_out[24:] = torch.randn(8, 16) * 0.1
    return expanded, expansion, torch.randint(0, 24, (6, 13))


@pytest.mark.parametrize("original", [0.0, -0.75, 0.4])
def test_era_forget_weight_on_the_original_units_is_the_route(original):
    from interplab.routing.era import lm_loss

    expanded, expansion, windows = _expanded_and_windows()

    def grads(routing):
        expanded.zero_grad(set_to_none=True)
        if routing is None:
            lm_loss(expanded, windows).backward()
        else:
            forget = torch.ones(len(windows), dtype=torch.long)
            with routing.router().apply(expanded, forget), routing.param_routes()[1].apply(expanded):
                lm_loss(expanded, windows).backward()
        return {n: p.grad.clone() for n, p in expanded.named_parameters() if p.grad is not None}

    plain = grads(None)
    cfg = ERAConfig(forget_original_weight=original, forget_shared_weight=1.0)
    routed = grads(cfg.routing(expansion))
    # the last layer's W_in: each unit's column gets its unit's weight times the unrouted gradient
    w_in, w_in0 = routed["blocks.1.mlp.W_in"], plain["blocks.1.mlp.W_in"]
    torch.testing.assert_close(w_in[:, :24], original * w_in0[:, :24])
    torch.testing.assert_close(w_in[:, 24:], w_in0[:, 24:])
    torch.testing.assert_close(routed["unembed.W_U"], plain["unembed.W_U"])  # downstream: untouched
    # the strict default: forget data trains nothing outside the expansion
    strict = grads(ERAConfig().routing(expansion))
    assert torch.count_nonzero(strict["unembed.W_U"]) == 0
    assert torch.count_nonzero(strict["blocks.1.mlp.W_in"][:, :24]) == 0
    assert torch.count_nonzero(strict["blocks.1.mlp.W_in"][:, 24:]) > 0


def test_era_paper_preset():
    paper = ERAConfig.paper(steps=7)
    assert (paper.forget_original_weight, paper.forget_shared_weight, paper.retain_expansion_weight) == (
        -0.75,
        1.0,
        1.0,
    )
    assert paper.steps == 7 and ERAConfig.paper(forget_original_weight=-0.5).forget_original_weight == -0.5
    default = ERAConfig()
    assert (default.forget_original_weight, default.forget_shared_weight) == (0.0, 0.0)
    with pytest.raises(ValueError, match="forget_original_weight must be a finite number"):
        ERAConfig(forget_original_weight=float("nan"))
