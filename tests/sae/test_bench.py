"""The SAE evaluation suite (`interplab.sae.bench`): every metric against a hand computation on planted cases."""

import json
import math
import statistics

import pytest
import torch
from torch.testing import assert_close

from interplab.data import CharTokenizer
from interplab.sae import create_sae
from interplab.sae.bench import (
    PY_CLASSES,
    BenchConfig,
    BenchResult,
    absorption,
    absorption_flags,
    balanced_accuracy,
    bench_sae,
    bench_saes,
    first_letter_labels,
    fit_logistic,
    k_sparse_probe,
    labelled_metrics,
    python_token_labels,
    rank_latents,
    reseed_noise,
)
from interplab.sae.config import Architecture, SAEConfig
from interplab.sae.evaluate import evaluate_sae

from .helpers import token_batches

HOOK = "blocks.0.hook_resid_post"


def identity_sae(d_in: int):
    """A ReLU SAE with latents +e_i and -e_i: it reconstructs any input exactly, and latent i (i < d_in)
    fires exactly where coordinate i is positive, latent d_in + i where it is negative."""
    sae = create_sae(SAEConfig(d_in=d_in, d_sae=2 * d_in, architecture=Architecture.RELU, hook_name=HOOK))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_reseed_noise_by_hand():
    s = reseed_noise([1.0, 2.0, 4.0])
    mean = 7 / 3
    sd = math.sqrt(((1 - mean) ** 2 + (2 - mean) ** 2 + (4 - mean) ** 2) / 2)
    assert_close(torch.tensor([s["mean"], s["sd"], s["cv"]]), torch.tensor([mean, sd, sd / mean]))
    assert s["n"] == 3
    one = reseed_noise([5.0])
    assert (one["mean"], one["sd"], one["cv"], one["n"]) == (5.0, 0.0, 0.0, 1)
    assert math.isnan(reseed_noise([0.0, 0.0])["cv"]) and reseed_noise([])["n"] == 0


def test_core_metrics_of_a_perfect_sae_by_hand(tiny_model):
    sae = identity_sae(32)
    batches = token_batches(3)
    got = bench_sae(tiny_model, sae, batches)
    _, cache = tiny_model.run_with_cache(torch.cat(batches), names=[HOOK])
    x = cache[HOOK].flatten(0, 1)
    fires = torch.cat([x > 0, x < 0], 1)
    assert_close(got["l0"], float(fires.sum(1).float().mean()))
    assert_close(got["dead_fraction"], float((~fires.any(0)).float().mean()))
    assert_close(got["dense_fraction"], float((fires.float().mean(0) > 0.1).float().mean()))
    assert_close(got["fvu"], 0.0, atol=1e-9, rtol=0)
    assert_close(got["kl_div"], 0.0, atol=1e-6, rtol=0)
    assert_close(got["ce_loss_recovered"], 1.0, atol=1e-5, rtol=0)
    # and the core metrics are evaluate_sae's own numbers, not a second implementation
    rep = evaluate_sae(tiny_model, sae, batches)
    assert got == {m: float(getattr(rep, m)) for m in got}


def test_rank_latents_and_probe_recover_a_planted_latent():
    g = torch.Generator().manual_seed(0)
    n, d = 600, 12
    labels = torch.rand(n, generator=g) < 0.4
    acts = torch.rand(n, d, generator=g) * 0.5
    acts[:, 7] = labels.float() * 2.0 + torch.rand(n, generator=g) * 0.2  # latent 7 is the property
    acts[:, 3] = labels.float() * 0.6 + torch.rand(n, generator=g)  # a weaker, noisier correlate
    order = rank_latents(acts, labels)
    assert order[:2].tolist() == [7, 3]
    # the ranking is mean_pos - mean_neg, by hand
    diff = acts[labels].mean(0) - acts[~labels].mean(0)
    assert_close(diff[order], diff.sort(descending=True).values)
    res = k_sparse_probe(acts, labels, ks=(1, 2))
    assert res[0].latents == (7,) and res[0].accuracy == 1.0
    assert res[1].latents[0] == 7 and res[1].accuracy == 1.0


def test_balanced_accuracy_by_hand_and_on_a_rare_property_with_no_signal():
    pred = torch.tensor([1, 1, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    y = torch.tensor([1, 0, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    # true-positive rate 1/2, true-negative rate 4/6
    assert_close(balanced_accuracy(pred, y), (1 / 2 + 4 / 6) / 2)
    assert balanced_accuracy(pred[y], y[y]) == 0.5  # one class only: its rate alone
    g = torch.Generator().manual_seed(3)
    rare = torch.rand(4000, generator=g) < 0.05  # 5% positives, latents carry nothing about them
    res = k_sparse_probe(torch.rand(4000, 4, generator=g), rare, ks=(2,))[0]
    assert res.accuracy > 0.9  # the majority rate: plain accuracy looks good
    assert_close(res.balanced_accuracy, 0.5, atol=0.05, rtol=0)  # balanced accuracy says chance


def test_balanced_accuracy_sees_a_weak_signal_on_a_rare_property():
    """5% positives and a latent that shifts by 1 on them under unit Gaussian noise. The plain probe's
    threshold sits where the log-odds x - 1/2 + log(5/95) cross 0 (x ~ 3.4): it almost never says "yes", so
    its balanced accuracy reads ~0.5, as the metric did before the class-balanced fit, although the latent
    carries the property. The class-balanced probe's threshold is the midpoint 1/2, where both rates are
    Phi(1/2) = 0.691."""
    g = torch.Generator().manual_seed(4)
    rare = torch.rand(20000, generator=g) < 0.05
    acts = torch.randn(20000, 2, generator=g)
    acts[:, 0] += rare.float()
    res = k_sparse_probe(acts, rare, ks=(1,))[0]
    assert res.latents == (0,)
    assert res.accuracy > 0.93  # the majority rate
    w, b = fit_logistic(acts[:, :1], rare.float())
    plain = balanced_accuracy(acts[:, :1].double() @ w + b > 0, rare)
    assert_close(plain, 0.5, atol=0.02, rtol=0)
    phi = 0.5 * (1 + math.erf(0.5 / math.sqrt(2)))
    assert_close(res.balanced_accuracy, phi, atol=0.04, rtol=0)


def test_probe_on_an_uninformative_latent_is_at_chance_and_errors_are_clear():
    g = torch.Generator().manual_seed(1)
    labels = torch.rand(2000, generator=g) < 0.5
    acts = torch.rand(2000, 3, generator=g)
    acc = k_sparse_probe(acts, labels, ks=(1,))[0].accuracy
    assert 0.4 < acc < 0.6
    with pytest.raises(ValueError, match="both classes"):
        rank_latents(acts, torch.ones(2000, dtype=torch.bool))
    with pytest.raises(ValueError, match="k=9"):
        k_sparse_probe(acts, labels, ks=(9,))


def test_absorption_planted_by_construction():
    # d_in 3; the class direction is e0. Latent 0 = e0 (main), latent 1 = (e0 + e1)/sqrt2 absorbs the class on
    # some tokens, latent 2 = e2 is unrelated.
    w_dec = torch.tensor([[1.0, 0, 0], [2**-0.5, 2**-0.5, 0], [0, 0, 1.0]])
    rows = (
        [([1, 0, 0], [1.0, 0, 0], True)] * 5  # main latent fires: caught
        + [([0, 1, 0], [2**-0.5, 2**-0.5, 0], True)] * 3  # main silent, latent 1 carries it: absorbed
        + [([0, 0, 1], [0, 0, 1.0], True)] * 2  # main silent, only an unrelated latent: a plain miss
        + [([0, 0, 1], [0, 0, 1.0], False)] * 10  # negatives
    )
    acts = torch.tensor([r[0] for r in rows], dtype=torch.float)
    x = torch.tensor([r[1] for r in rows])
    labels = torch.tensor([r[2] for r in rows])
    a = absorption(x, acts, w_dec, labels, [0])
    assert (a.positives, a.false_negatives, a.absorbed) == (10, 5, 3)
    assert_close(a.absorption_rate, 0.3)
    assert_close(a.false_negative_rate, 0.5)
    # the fraction rule: latent 1 carries a_1 * (w_1 . u) of x . u; demand more than it carries -> not absorbed
    u = x[labels].mean(0) - x[~labels].mean(0)
    u = u / u.norm()
    carried = float(w_dec[1] @ u) / float(x[5] @ u)
    assert absorption(x, acts, w_dec, labels, [0], fraction=carried * 1.01).absorbed == 0
    assert absorption(x, acts, w_dec, labels, [0], fraction=carried * 0.99).absorbed == 3
    # the cosine rule: latent 1's cosine with u, by hand
    cos1 = float(w_dec[1] @ u) / float(w_dec[1].norm())
    assert absorption(x, acts, w_dec, labels, [0], cos_threshold=cos1 + 1e-6).absorbed == 0


def test_absorption_follows_saebench_full_absorption_rule_by_hand():
    """A given direction u = e0 and all-positive tokens (SAEBench's setting: probe true positives). Main latent
    0 silent everywhere. Token 0: latent 1 (cos 1/sqrt2) carries 0.5 of x . u = 1: absorbed. Token 1: the same
    latent, but x . u < 0 (no class signal to absorb): not absorbed. Token 2: the top projecting latent is
    latent 3 (cos 0.02 < 0.025, a huge activation), latent 1 would carry enough: not absorbed (SAEBench reads
    only the top latent). Token 3: the main latent fires: not a false negative."""
    s2 = 2**-0.5
    # unit rows; row 3 has cosine 0.02 with e0
    w_dec = torch.tensor([[1.0, 0, 0], [s2, s2, 0], [0, 0, 1.0], [0.02, (1 - 0.02**2) ** 0.5, 0]])
    x = torch.tensor([[1.0, 0.3, 0], [-1.0, 0.3, 0], [1.0, 0.3, 0], [1.0, 0, 0]])
    a1 = 0.5 / s2  # a_1 * (w_1 . u) = 0.5
    acts = torch.tensor([[0, a1, 0, 0], [0, a1, 0, 0], [0, a1, 0, 50.0], [1.0, 0, 0, 0]])
    fn, absorbed = absorption_flags(x, acts, w_dec, torch.tensor([2.0, 0, 0]), [0])
    assert fn.tolist() == [True, True, True, False]
    assert absorbed.tolist() == [True, False, False, False]
    a = absorption(x, acts, w_dec, torch.ones(4, dtype=torch.bool), [0], direction=torch.tensor([1.0, 0, 0]))
    assert (a.positives, a.false_negatives, a.absorbed) == (4, 3, 1)
    # the fraction rule at its edge: latent 1 carries exactly 0.5 of x . u on token 0
    assert absorption_flags(x, acts, w_dec, torch.tensor([1.0, 0, 0]), [0], fraction=0.5 + 1e-9)[1].sum() == 0


def test_python_token_labels_by_hand():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789()[]:=+#'\" \n")
    text = "def f(x):\n  return x+12 # c\n"
    ids = torch.tensor([tok.encode(text)])
    got = python_token_labels(tok, ids)[0].tolist()
    K, N, OP, D, C, W = (PY_CLASSES.index(c) for c in ("keyword", "name", "operator", "number", "comment",
                                                     "whitespace"))  # fmt: skip
    want = [K, K, K, W, N, OP, N, OP, OP, W, W, W] + [K] * 6 + [W, N, OP, D, D, W, C, W, C, W]
    assert got == want


def test_python_token_labels_keep_what_tokenize_reached():
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz()'\" \n")
    ids = torch.tensor([tok.encode("if x '")])  # an unterminated string: tokenize raises at the end
    got = python_token_labels(tok, ids)[0].tolist()
    assert got[:3] == [PY_CLASSES.index("keyword")] * 2 + [PY_CLASSES.index("whitespace")]
    assert got[3] == PY_CLASSES.index("name")


def test_first_letter_labels_by_hand():
    tok = CharTokenizer("abz1 ")
    ids = torch.tensor([tok.encode("ab z1 ")])
    assert first_letter_labels(tok, ids)[0].tolist() == [1, 2, 0, 26, 0, 0]


def test_labelled_metrics_on_a_perfect_sae_find_the_planted_coordinate():
    # property: coordinate 2 of x is positive. The identity SAE's latent 2 fires exactly there: k=1 probe
    # accuracy 1, and nothing absorbs it (no false negatives).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    x[:, 2] = x[:, 2].sign() * (0.5 + x[:, 2].abs())  # separable with a margin
    sae = identity_sae(4)
    acts = sae.encode(x).detach()
    labels = (x[:, 2] > 0).long()
    out = labelled_metrics(acts, x, sae.W_dec.detach(), {"c2": labels}, BenchConfig(ks=(1,)))
    assert out == {
        "probe_c2_k1": 1.0,
        "probe_balanced_c2_k1": 1.0,
        "probe_balanced_c2_input": 1.0,  # the reference probe on x: coordinate 2 separates it too
        "absorption_c2": 0.0,
        "false_negative_c2": 0.0,
    }


def test_bench_result_groups_table_plot_and_save(tmp_path):
    rows = [
        {"name": "a_s0", "group": "a", "metrics": {"l0": 4.0, "fvu": 0.2}},
        {"name": "a_s1", "group": "a", "metrics": {"l0": 6.0, "fvu": 0.4}},
        {"name": "b_s0", "group": "b", "metrics": {"l0": 10.0, "fvu": 0.1}},
    ]
    res = BenchResult.from_rows(rows)
    assert res.groups["a"]["fvu"]["mean"] == pytest.approx(0.3)
    assert res.groups["a"]["fvu"]["sd"] == pytest.approx(statistics.stdev([0.2, 0.4]))
    assert res.groups["b"]["l0"]["n"] == 1
    md = res.markdown().splitlines()
    assert md[0] == "| SAE | seeds | l0 | fvu |"
    assert md[2].startswith("| a | 2 | 5 ± 1.4 (CV 28.3%) | 0.3 ± 0.14 (CV 47.1%) |")
    assert md[3] == "| b | 1 | 10 ± 0 | 0.1 ± 0 |"
    fig = res.plot("fvu")
    assert list(fig.data[0].x) == [5.0, 10.0] and list(fig.data[0].error_y.array)[1] == 0.0
    res.save(tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["kind"] == "sae_eval" and doc["groups"]["a"]["fvu"]["n"] == 2
    assert (tmp_path / "bench.md").read_text() == res.markdown()
    assert (tmp_path / "frontier_fvu.html").exists()


def test_bench_saes_groups_reseeds_and_plugs_in_extra_metrics(tiny_model):
    batches = token_batches(2)
    saes = {
        f"s{seed}": ("topk", create_sae(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name=HOOK),
                                        seed=seed))
        for seed in range(3)
    }  # fmt: skip
    extra = {"planted": lambda name, sae: {"autointerp": float(name[1:])}}
    res = bench_saes(tiny_model, saes, batches, extra=extra)
    assert [r["name"] for r in res.rows] == ["s0", "s1", "s2"]
    assert res.groups["topk"]["autointerp"]["mean"] == 1.0 and res.groups["topk"]["autointerp"]["sd"] == 1.0
    assert_close(res.groups["topk"]["l0"]["mean"], 4.0)  # TopK: exactly k on every token
    fvus = [r["metrics"]["fvu"] for r in res.rows]
    assert_close(res.groups["topk"]["fvu"]["sd"], statistics.stdev(fvus))


def test_cli_bench_end_to_end_with_reseeds(tmp_path, monkeypatch):
    """Two seeds of a k sweep trained from one cache, then `sae bench` on both runs: one row per SAE, one
    group per sweep point with n=2 seeds, the table, the JSON and the frontier."""
    import random

    from typer.testing import CliRunner

    from interplab.cli.main import app
    from interplab.model import ModelConfig, Transformer

    runner = CliRunner()

    def ok(args):
        res = runner.invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res.output

    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    for var in ("INTERPLAB_LLM_LOCAL", "INTERPLAB_LLM_BASE_URL", "INTERPLAB_LLM_MODEL"):
        monkeypatch.delenv(var, raising=False)
    tok = CharTokenizer("abcdefghijklmnopqrstuvwxyz()=:+ \n")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=tok.vocab_size, n_ctx=32, d_mlp=32)
    )
    model.tokenizer = tok
    model.save(tmp_path / "model")
    rng = random.Random(0)
    (tmp_path / "corpus").mkdir()
    words = ["def", "f", "(x):", "return", "x", "+", "y", "if", "else", "for", "in", "a", "=", "b"]
    for i in range(12):
        lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(20)]
        (tmp_path / "corpus" / f"{i}.py").write_text("\n".join(lines))
    corpus = ["--corpus", tmp_path / "corpus"]
    ok(["sae", "cache", tmp_path / "model", "--hook", HOOK, "--out", tmp_path / "acts", "--tokens", 2000,
        "--seq-len", 32, "--batch", 8, "--dtype", "float32", *corpus])  # fmt: skip
    for seed in (0, 1):
        ok(["sae", "train", "--cache", tmp_path / "acts", "--hook", HOOK, "--out", tmp_path / f"seed{seed}",
            "--steps", 15, "--batch", 128, "--expansion", 2, "--sweep", "k=2,4", "--seed", seed])  # fmt: skip
    out = ok(["sae", "bench", tmp_path / "seed0", tmp_path / "seed1", "--model", tmp_path / "model", "--out",
              tmp_path / "bench", "--batches", 2, "--seq-len", 32, "--split", "train", "--ks", "1,2", "--saebench-core", *corpus])  # fmt: skip
    doc = json.loads((tmp_path / "bench" / "report.json").read_text())
    names = sorted(r["name"] for r in doc["saes"])
    assert names == [f"seed{s}/{HOOK.replace('.', '_')}__k_{k}" for s in (0, 1) for k in (2, 4)]
    groups = doc["groups"]
    assert sorted(groups) == [f"{HOOK.replace('.', '_')}__k_{k}" for k in (2, 4)]
    for g, ms in groups.items():
        assert ms["l0"]["n"] == 2 and ms["l0"]["mean"] == pytest.approx(float(g[-1]))
        for m in ("fvu", "ce_loss_recovered", "kl_div", "probe_first_letter_k1", "probe_python_token_k2",
                  "absorption_first_letter", "autointerp_baseline"):  # fmt: skip
            vals = [r["metrics"][m] for r in doc["saes"] if r["group"] == g]
            assert ms[m]["mean"] == pytest.approx(statistics.fmean(vals))
            assert ms[m]["sd"] == pytest.approx(statistics.stdev(vals))
    for r in doc["saes"]:  # SAEBench's definitions beside interplab's: a TopK L0 is k on any token set
        assert r["metrics"]["saebench_l0"] == pytest.approx(r["metrics"]["l0"])
        assert 0 <= r["metrics"]["saebench_frac_alive"] <= 1 and "saebench_ce_loss_score" in r["metrics"]
    assert (tmp_path / "bench" / "bench.md").read_text().splitlines()[0].startswith("| SAE | seeds | l0 |")
    assert (tmp_path / "bench" / "frontier_fvu.html").exists()
    assert "CV" in out and "no LLM configured" in out
    assert len(list((tmp_path / "bench" / "autointerp").glob("*.db"))) == 4  # one browsable DB per SAE
    bad = runner.invoke(app, ["sae", "bench", str(tmp_path / "seed0"), "--model", str(tmp_path / "model"),
                              "--out", str(tmp_path / "b2"), "--properties", "colour"])  # fmt: skip
    assert bad.exit_code != 0 and "colour" in bad.output and "first_letter" in bad.output
