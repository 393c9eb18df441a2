"""Core metrics side by side with SAEBench 0.6 (`sae_bench.evals.core.main.run_evals` through a real SAELens
``ActivationsStore``, in its own venv: INTERPLAB_SAEBENCH_PYTHON or .peers/saebench/bin/python; skipped with the
reason when absent) on the same model (an interplab model exported to TransformerLens), SAE (SAELens layout)
and tokens.

- `saebench_core` equals every SAEBench number (SAEBench's definitions, reproduced);
- `evaluate_sae` equals SAEBench where the definitions coincide: L0, per-latent density, dead and dense
  fractions on the same kept tokens, and the CE losses and CE loss recovered when no token is left out;
- where they differ (explained variance's total variance, KL's positions and score, CE over special tokens) the
  test pins SAEBench's definition with a hand computation.
"""

import pytest
import torch
from torch.testing import assert_close

from interplab.model import ModelConfig, Transformer
from interplab.sae import create_sae
from interplab.sae.activations import TokenFilter
from interplab.sae.config import SAEConfig
from interplab.sae.evaluate import evaluate_sae
from interplab.sae.saebench import SAEBENCH_CORE, saebench_core
from tests.peers import peer_env, peer_python
from tests.saebench_peer import prepare, run_saebench

HOOK = "blocks.0.hook_resid_post"
BOS = 1
BATCH = 4


def tokens(n: int = 12, pos: int = 24, seed: int = 0) -> torch.Tensor:
    """Packed rows: BOS at position 0 and before each 'document' inside a row."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(2, 60, (n, pos), generator=g)
    t[:, 0] = BOS
    t[torch.rand(n, pos, generator=g) < 0.08] = BOS
    return t


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    python = peer_python("saebench")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=60, n_ctx=32, d_mlp=64, name="tiny")
    ).eval()
    toks = tokens()
    saes = {
        "topk": create_sae(SAEConfig(d_in=32, d_sae=96, architecture="topk", k=6, hook_name=HOOK), seed=1),
        "relu": create_sae(SAEConfig(d_in=32, d_sae=96, architecture="relu", hook_name=HOOK), seed=2),
    }
    cases = {  # name: (SAE, ignored tokens, exclude specials from the splice)
        "topk_bos": ("topk", {BOS}, False),
        "relu_bos": ("relu", {BOS}, False),
        "relu_none": ("relu", set(), False),
        "topk_bos_keep": ("topk", {BOS}, True),
    }
    root = tmp_path_factory.mktemp("saebench")
    specs, model_dir = [], None
    for case, (arch, ignore, keep) in cases.items():
        specs.append(
            prepare(model, saes[arch], toks, root / case, batch_size=BATCH, ignore_tokens=ignore,
                    exclude_special=keep, model_folder=model_dir)
        )  # fmt: skip
        model_dir = model_dir or root / case / "model"
    theirs = dict(zip(cases, run_saebench(python, specs, peer_env()), strict=True))
    return model, saes, toks, cases, theirs


@pytest.mark.parametrize("case", ["topk_bos", "relu_bos", "relu_none", "topk_bos_keep"])
def test_saebench_core_equals_saebench(both, case):
    model, saes, toks, cases, theirs = both
    arch, ignore, keep = cases[case]
    got = theirs[case]
    assert got["tokens_match"] == {"reconstruction": True, "sparsity": True}
    ours = saebench_core(
        model,
        saes[arch],
        list(toks.split(BATCH)),
        ignore_tokens=ignore,
        exclude_special_from_reconstruction=keep,
    )
    assert set(SAEBENCH_CORE) <= set(got["metrics"]), sorted(set(SAEBENCH_CORE) - set(got["metrics"]))
    for m in SAEBENCH_CORE:
        assert_close(ours[m], got["metrics"][m], rtol=2e-5, atol=2e-6, msg=lambda s, m=m: f"{m}: {s}")


@pytest.mark.parametrize("case", ["topk_bos", "relu_bos"])
def test_evaluate_sae_equals_saebench_where_defined_alike(both, case):
    """Same kept tokens (BOS dropped: position 0 holds BOS in every row): L0, density, dead, dense."""
    model, saes, toks, cases, theirs = both
    arch, _, _ = cases[case]
    got = theirs[case]["metrics"]
    report = evaluate_sae(model, saes[arch], toks.split(BATCH), token_filter=TokenFilter(bos_token_id=BOS))
    assert_close(report.l0, got["l0"], rtol=1e-6, atol=1e-6)
    assert_close(report.density.double(), torch.tensor(theirs[case]["feature_density"], dtype=torch.float64),
                 rtol=1e-6, atol=1e-7)  # fmt: skip
    assert_close(report.dead_fraction, 1 - got["frac_alive"], rtol=0, atol=1e-9)
    assert_close(report.dense_fraction, got["freq_over_10_percent"], rtol=0, atol=1e-9)
    # CE differs only by SAEBench dropping the predictions made at BOS positions: both losses on the same
    # model, so the clean CE over every prediction is a token-weighted mix of SAEBench's and the BOS ones
    assert report.ce_clean != pytest.approx(got["ce_loss_without_sae"], rel=1e-6)


def test_ce_loss_recovered_equals_saebench_with_nothing_ignored(both):
    model, saes, toks, _, theirs = both
    got = theirs["relu_none"]["metrics"]
    report = evaluate_sae(model, saes["relu"], toks.split(BATCH), token_filter=TokenFilter(exclude_bos=False))
    assert_close(report.ce_clean, got["ce_loss_without_sae"], rtol=1e-5, atol=1e-6)
    assert_close(report.ce_spliced, got["ce_loss_with_sae"], rtol=1e-5, atol=1e-6)
    assert_close(report.ce_zero_ablation, got["ce_loss_with_ablation"], rtol=1e-5, atol=1e-6)
    # a random model's zero-ablation gap is tiny (|CE_zero - CE_clean| ~ 0.005 nats here), so SAEBench's
    # float32 means set the ratio's tolerance: 3e-5 relative on each CE, times CE / |gap|
    gap = abs(got["ce_loss_with_ablation"] - got["ce_loss_without_sae"])
    tol = 3e-5 * got["ce_loss_with_ablation"] / gap
    assert_close(report.ce_loss_recovered, got["ce_loss_score"], rtol=0, atol=tol)
    assert_close(report.l0, got["l0"], rtol=1e-6, atol=1e-6)
    # KL: SAEBench averages over every position (the last too), interplab over the L-1 that predict a token
    assert report.kl_div != pytest.approx(got["kl_div_with_sae"], rel=1e-4)


def test_saebench_explained_variance_is_its_formula(both):
    """SAEBench 0.6's explained variance, by hand: 1 - E|x - x̂|² / (E|x|² - m²), m the mean of x_j² over
    tokens and dimensions (batch means averaged), which is not interplab's centred 1 - FVU."""
    model, saes, toks, cases, theirs = both
    sae = saes["topk"]
    keep = TokenFilter(bos_token_id=BOS)
    resid, sq, msq = [], [], []
    for b in toks.split(BATCH):
        _, cache = model.run_with_cache(b, names=[HOOK])
        x = cache[HOOK][keep.mask(b)].double()
        x_hat = sae(x.float()).reconstruction.double()
        resid.append((x - x_hat).pow(2).sum(-1).mean())
        sq.append(x.pow(2).sum(-1).mean())
        msq.append(x.pow(2).mean())
    by_hand = 1 - torch.stack(resid).mean() / (torch.stack(sq).mean() - torch.stack(msq).mean() ** 2)
    got = theirs["topk_bos"]["metrics"]
    assert_close(got["explained_variance"], float(by_hand), rtol=1e-5, atol=1e-6)
    fvu = evaluate_sae(model, sae, toks.split(BATCH), token_filter=keep).fvu
    assert abs((1 - fvu) - got["explained_variance"]) > 1e-3
