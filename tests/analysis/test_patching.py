import pytest
import torch

from interplab.analysis import (
    CorrectProb,
    LogitDiff,
    NormalizedLogitDiff,
    PatchConfig,
    SequenceLoss,
    activation_patch,
    activation_patch_loop,
    attribution_patch,
)
from tests.analysis.conftest import VARIANTS, make_model

TARGETS = [
    ("resid_pre", None),
    ("resid_mid", None),
    ("resid_post", None),
    ("attn_out", None),
    ("mlp_out", None),
    ("z", False),
    ("z", True),
    ("q", False),
    ("q", True),
    ("k", True),
    ("v", False),
    ("v", True),
    ("pattern", False),
    ("pattern", True),
    ("mlp_post", False),
    ("mlp_post", True),
]


def _metric(kind):
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    if kind == "logit_diff":
        return LogitDiff(answer=answer, wrong=wrong, positions=torch.tensor([6, 3, -1]))
    if kind == "prob":
        return CorrectProb(answer=answer)
    return SequenceLoss(tokens=torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(3)))


def _applicable(model, target):
    cfg = model.cfg
    if target in ("mlp_out", "mlp_post", "resid_mid") and cfg.attn_only:
        return False
    return not (target == "resid_mid" and cfg.parallel_attn_mlp)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("target,by_position", TARGETS)
def test_batched_equals_loop(variant, target, by_position, pair):
    model = make_model(**VARIANTS[variant])
    if not _applicable(model, target):
        pytest.skip("target absent in this architecture")
    clean, corrupted = pair
    indices = [0, 7, 30] if target == "mlp_post" else None
    # every metric kind on the plain model; the logit difference on the other architectures
    for kind in ("logit_diff", "prob", "loss") if variant == "gpt2" else ("logit_diff",):
        metric = _metric(kind)
        for direction in ("denoise", "noise"):
            expected = activation_patch_loop(
                model,
                clean,
                corrupted,
                metric,
                target,
                by_position=by_position,
                direction=direction,
                indices=indices,
            )
            for budget in (40, 4096):  # several chunks with different suffix starts, and one chunk per layer
                got = activation_patch(
                    model,
                    clean,
                    corrupted,
                    metric,
                    target,
                    by_position=by_position,
                    direction=direction,
                    indices=indices,
                    config=PatchConfig(max_batch_tokens=budget),
                )
                torch.testing.assert_close(got.per_example, expected.per_example, atol=1e-5, rtol=0)
                assert got.dims == expected.dims
                assert got.clean_metric == pytest.approx(expected.clean_metric, abs=1e-6)


def test_batched_equals_loop_with_padding(model, pair):
    clean, corrupted = pair
    mask = torch.ones_like(clean)
    mask[0, :2] = 0  # left padding
    mask[1, -2:] = 0  # right padding
    metric = LogitDiff(
        answer=torch.tensor([1, 2, 3]), wrong=torch.tensor([4, 5, 6]), positions=torch.tensor([6, 4, 6])
    )
    for target, by_pos in (("resid_pre", None), ("z", True), ("k", True)):
        expected = activation_patch_loop(
            model, clean, corrupted, metric, target, by_position=by_pos, attention_mask=mask
        )
        got = activation_patch(
            model,
            clean,
            corrupted,
            metric,
            target,
            by_position=by_pos,
            attention_mask=mask,
            config=PatchConfig(max_batch_tokens=30),
        )
        torch.testing.assert_close(got.per_example, expected.per_example, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "target,by_position", [("resid_pre", None), ("z", False), ("mlp_post", True), ("v", True)]
)
def test_clean_into_clean_changes_nothing(model, pair, target, by_position):
    clean, _ = pair
    metric = _metric("logit_diff")
    result = activation_patch(
        model,
        clean,
        clean,
        metric,
        target,
        by_position=by_position,
        indices=[1, 2] if target == "mlp_post" else None,
    )
    expected = metric(model(clean))
    torch.testing.assert_close(result.per_example, expected.expand_as(result.per_example), atol=1e-5, rtol=0)


def test_full_denoising_at_last_layer_recovers_clean(model, pair):
    clean, corrupted = pair
    metric = _metric("logit_diff")
    last = model.cfg.n_layers - 1
    # patching every position of the last layer's resid_post at once = the clean run
    result = activation_patch(model, clean, corrupted, metric, "resid_post", layers=[last])
    read = result.per_example[0, 6]  # the read positions are 6, 3, 6 (last = 6)
    torch.testing.assert_close(read[[0, 2]], metric(model(clean))[[0, 2]], atol=1e-5, rtol=0)

    clean_resid = model.run_with_cache(clean, [("resid_pre", last)])[1][("resid_pre", last)]
    with model.hooks([(("resid_pre", last), lambda act, site: clean_resid)]):
        patched = metric(model(corrupted))
    torch.testing.assert_close(patched, metric(model(clean)), atol=1e-5, rtol=0)


def test_normalized_logit_diff_is_zero_and_one_at_baselines(model, pair):
    clean, corrupted = pair
    ld = LogitDiff(answer=torch.tensor([1, 2, 3]), wrong=torch.tensor([4, 5, 6]))
    metric = NormalizedLogitDiff.calibrate(ld, model(clean), model(corrupted))
    result = activation_patch(model, clean, corrupted, metric, "resid_pre")
    # the baselines come from patching's own forwards (only the read positions unembedded): float32 rounding
    # of the logits, divided by the small clean-corrupted gap, reached 1.9e-5 on some CPUs' kernels
    assert result.clean_metric == pytest.approx(1.0, abs=1e-4)
    assert result.corrupted_metric == pytest.approx(0.0, abs=1e-4)
    # all positions of resid_pre at layer 0 patched at the last position only moves the last position's input
    assert result.values.shape == (2, 7)


@pytest.mark.parametrize("patch_fn", [activation_patch, attribution_patch, activation_patch_loop])
def test_bad_inputs(model, pair, patch_fn):
    clean, corrupted = pair
    metric = _metric("logit_diff")
    with pytest.raises(ValueError, match=r"clean tokens have shape \(3, 7\) but corrupted tokens \(3, 6\)"):
        patch_fn(model, clean, corrupted[:, :6], metric, "resid_pre")
    with pytest.raises(ValueError, match="one value per example"):
        patch_fn(model, clean, corrupted, lambda logits: logits[:, -1, 0].mean(), "resid_pre")
    with pytest.raises(ValueError, match=r"unknown head index 4: layers have 4 heads \(0..3\)"):
        patch_fn(model, clean, corrupted, metric, "z", indices=[4])
    with pytest.raises(ValueError, match="unknown patch target 'resid'"):
        patch_fn(model, clean, corrupted, metric, "resid")
    with pytest.raises(ValueError, match="unknown layer 5"):
        patch_fn(model, clean, corrupted, metric, "resid_pre", layers=[5])
    with pytest.raises(ValueError, match="max_batch_tokens"):
        PatchConfig(max_batch_tokens=0)


def test_result_plot_and_save(model, pair, tmp_path):
    clean, corrupted = pair
    result = activation_patch(model, clean, corrupted, _metric("logit_diff"), "z", by_position=True)
    fig = result.plot()
    assert fig.data[0].z is not None and len(fig.data[0].y) == 2 * 4  # rows: layer x head
    assert list(fig.data[0].x)[0] == "0:" + str(int(clean[0, 0]))
    result.save(tmp_path / "r.html")
    result.save(tmp_path / "r.json")
    assert (tmp_path / "r.html").stat().st_size > 1000
    import json

    data = json.loads((tmp_path / "r.json").read_text())
    assert data["dims"] == ["layer", "pos", "head"] and len(data["values"]) == 2


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_finishing_the_last_block_at_a_few_positions_equals_gathering_the_full_output(variant, pair):
    # what batched patching does to unembed only the read positions: Block.finish on gathered positions
    model = make_model(**VARIANTS[variant])
    tokens, _ = pair
    ctx = model.context(tokens)
    resid = model.embed_tokens(tokens, ctx)
    keep = torch.tensor([[6, 0], [3, 3], [1, 5]])
    last = model.blocks[-1]
    with torch.no_grad():
        full = model.run_blocks(resid, ctx)
        resid_pre, attn_out = last.attend(model.run_blocks(resid, ctx, stop=model.cfg.n_layers - 1), ctx)
        index = keep[:, :, None].expand(-1, -1, resid_pre.shape[-1])
        kept = last.finish(resid_pre.gather(1, index), attn_out.gather(1, index))
    torch.testing.assert_close(kept, full.gather(1, keep[:, :, None].expand(-1, -1, full.shape[-1])))
