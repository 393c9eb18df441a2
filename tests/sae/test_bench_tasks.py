"""Sparse probing on the ground-truth variables of interplab's algorithmic tasks (`Task.variables`,
`task_labellers`, ``interplab sae bench --corpus task:NAME``): the variables by hand, a latent that equals a
variable (k = 1 probe accuracy 1) against the same labels shuffled (chance), a hand computation of the probe on
a tiny case, and the CLI end to end on a planted model and SAE."""

import json
import math
import shlex

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.model import Transformer
from interplab.sae import create_sae
from interplab.sae.activations import TokenFilter, corpus_token_batches, task_token_batches
from interplab.sae.bench import BenchConfig, bench_sae, labelled_metrics, task_labellers
from interplab.sae.config import Architecture, SAEConfig
from interplab.sae.evaluate import evaluate_sae
from interplab.tasks import get_task


def test_task_variables_by_hand():
    ind = get_task("induction", d_vocab=5, half_len=3)
    v = ind.variables(torch.tensor([[0, 1, 2, 1, 1, 2, 1]]))
    assert v["repeat"].tolist() == [[0, 0, 0, 0, 1, 1, 1]]
    assert v["seen_before"].tolist() == [[0, 0, 0, 1, 1, 1, 1]]  # the 1 at position 3 repeats by chance
    srt = get_task("sorting", n_values=4, list_len=3)
    v = srt.variables(torch.tensor([[2, 0, 2, 4, 0, 2, 2]]))
    assert v["segment"].tolist() == [[0, 0, 0, 1, 2, 2, 2]]
    assert v["duplicate"].tolist() == [[1, 0, 1, -1, 0, 1, 1]]
    mod = get_task("modadd", p=5)
    v = mod.variables(torch.tensor([[3, 4, 5], [1, 0, 5]]))
    assert v["answer"].tolist() == [[-1, -1, 2], [-1, -1, 1]]
    assert v["a"].tolist() == [[-1, -1, 3], [-1, -1, 1]] and v["b"].tolist() == [[-1, -1, 4], [-1, -1, 0]]
    assert get_task("parens").variables(torch.zeros(1, 42, dtype=torch.long)) == {}
    with pytest.raises(ValueError, match=r"\[batch, 7\]"):
        ind.variables(torch.zeros(2, 5, dtype=torch.long))


def test_task_variables_agree_with_the_generated_examples():
    ind = get_task("induction", d_vocab=16, half_len=6)
    b = ind.generate(50, seed=1)
    v = ind.variables(b.tokens)
    assert (v["seen_before"][:, 7:] == 1).all()  # the second copy: every token is a repeat
    # the loss positions (the repeat after its first token) lie inside the variable
    assert (v["repeat"][b.loss_mask] == 1).all()
    srt = get_task("sorting", n_values=6, list_len=5)
    b = srt.generate(50, seed=0)
    v = srt.variables(b.tokens)
    for row, dup in zip(b.tokens.tolist(), v["duplicate"].tolist(), strict=True):
        xs = row[:5]
        assert dup[:5] == [int(xs.count(t) > 1) for t in xs] and dup[6:] == [
            int(xs.count(t) > 1) for t in row[6:]
        ]
    assert ind.variable_names() == ["repeat", "seen_before"]
    assert list(task_labellers(get_task("modadd", p=7))) == ["answer", "a", "b"]
    with pytest.raises(ValueError, match="defines no variables"):
        task_labellers(get_task("parens"))


def _planted_acts(labels: torch.Tensor, latent: int, d_sae: int = 8, seed: int = 0) -> torch.Tensor:
    """SAE-like activations: uniform noise latents, latent ``latent`` equal to the 0/1 variable."""
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(len(labels), d_sae, generator=g) * 0.5
    acts[:, latent] = labels.float()
    return acts


def test_a_latent_equal_to_a_task_variable_is_found_and_shuffled_labels_read_chance():
    task = get_task("induction", d_vocab=16, half_len=8)
    tokens = task.generate(300, seed=0).tokens
    keep = TokenFilter().mask(tokens)
    props = {p: fn(tokens)[keep] for p, fn in task_labellers(task).items()}
    acts = _planted_acts(props["seen_before"], latent=5)
    x = torch.randn(len(acts), 4, generator=torch.Generator().manual_seed(1))
    cfg = BenchConfig(ks=(1, 2))
    got = labelled_metrics(acts, x, torch.randn(8, 4), props, cfg)
    assert got["probe_seen_before_k1"] == 1.0 and got["probe_balanced_seen_before_k1"] == 1.0
    shuffled = {
        "seen_before": props["seen_before"][
            torch.randperm(len(acts), generator=torch.Generator().manual_seed(2))
        ]
    }
    control = labelled_metrics(acts, x, torch.randn(8, 4), shuffled, cfg)
    assert_close(control["probe_balanced_seen_before_k1"], 0.5, atol=0.04, rtol=0)
    assert_close(control["probe_balanced_seen_before_k2"], 0.5, atol=0.04, rtol=0)
    # the reference probe reads the SAE input x, which here is noise: chance
    assert_close(got["probe_balanced_seen_before_input"], 0.5, atol=0.06, rtol=0)
    # `repeat` is not what latent 5 carries: the two overlap only through the second copy
    assert got["probe_balanced_repeat_k1"] < 0.95


def test_probe_on_a_task_variable_by_hand_on_a_tiny_case():
    """40 induction examples (d_vocab 5, half 3), position 0 dropped: 240 tokens labelled `seen_before`; the
    latent equals the variable except on 12 flipped tokens. A one-latent logistic probe of a 0/1 latent that
    agrees with the label on most rows predicts the latent itself, so its held-out accuracy is the share of
    held-out tokens where latent == label, for both classes (one vs rest), by hand."""
    task = get_task("induction", d_vocab=5, half_len=3)
    tokens = task.generate(40, seed=3).tokens
    labels = task.variables(tokens)["seen_before"][:, 1:].flatten()
    n = len(labels)
    assert n == 240
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))  # k_sparse_probe's split
    test = perm[: int(n * 0.3)]
    latent = labels.clone()
    flipped = perm[::20]  # 12 tokens, in both splits
    latent[flipped] = 1 - latent[flipped]
    acts = torch.zeros(n, 3)
    acts[:, 1] = latent.float()
    acts[:, 0] = (torch.arange(n) % 3 == 0).float()  # an uninformative latent
    agree = (latent[test] == labels[test]).float()
    hand_acc = float(agree.mean())
    pos, neg = labels[test] == 1, labels[test] == 0
    hand_bal = (float(agree[pos].mean()) + float(agree[neg].mean())) / 2
    assert hand_acc < 1.0  # some flips fall in the held-out split
    got = labelled_metrics(acts, torch.randn(n, 2), torch.randn(3, 2), {"seen_before": labels},
                           BenchConfig(ks=(1,), min_positives=5))  # fmt: skip
    assert_close(got["probe_seen_before_k1"], hand_acc)
    assert_close(got["probe_balanced_seen_before_k1"], hand_bal)


def test_undefined_positions_are_left_out():
    """modadd's variables exist only at the `=` position: the other tokens (label -1) are not probed."""
    task = get_task("modadd", p=3)
    tokens = task.generate(600, seed=0).tokens
    keep = TokenFilter().mask(tokens)
    labels = task.variables(tokens)["answer"][keep]  # positions 1 (-1) and 2 (the answer)
    acts = torch.rand(len(labels), 6, generator=torch.Generator().manual_seed(0))
    eq = labels >= 0
    acts[eq, 4] = 1.0 + labels[eq].float()  # latent 4 codes the answer at '=' and is noise elsewhere
    x, w_dec = torch.randn(len(labels), 2), torch.randn(6, 2)
    got = labelled_metrics(acts, x, w_dec, {"answer": labels}, BenchConfig(ks=(1,)))
    alone = labelled_metrics(acts[eq], x[eq], w_dec, {"answer": labels[eq]}, BenchConfig(ks=(1,)))
    assert got == alone


def _planted_induction_model_and_sae(tmp_path):
    """The default induction task's model with learned positions whose embedding dimension 0 is 1 exactly on
    the second copy (and token embeddings 0 there), and a ReLU SAE on hook_pos_embed whose latent 0 reads
    that dimension: latent 0 == the task's `repeat` variable."""
    task = get_task("induction")
    model = Transformer(task.model_config(d_model=8, n_layers=1, n_heads=2, positional="learned"))
    h = task.half_len
    with torch.no_grad():
        model.W_pos.normal_(generator=torch.Generator().manual_seed(0))
        model.W_pos[:, 0] = 0.0
        model.W_pos[h + 1 :, 0] = 1.0
        model.W_E[:, 0] = 0.0
    model.save(tmp_path / "model")
    sae = create_sae(SAEConfig(d_in=8, d_sae=8, architecture=Architecture.RELU, hook_name="hook_pos_embed"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8))
        sae.W_dec.copy_(torch.eye(8))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.save(tmp_path / "sae")
    return model, sae


def test_bench_sae_on_task_batches_finds_the_planted_latent(tmp_path):
    model, sae = _planted_induction_model_and_sae(tmp_path)
    data = corpus_token_batches(model, "task:induction", split="validation", batch_size=8, n_batches=3)
    assert [tuple(b.shape) for b in data.batches] == [(8, 65)] * 3 and data.source["task"][
        "name"
    ] == "induction"
    again = task_token_batches(model, get_task("induction"), split="validation", batch_size=8, n_batches=3)
    train = task_token_batches(model, get_task("induction"), split="train", batch_size=8, n_batches=3)
    assert all(torch.equal(a, b) for a, b in zip(data.batches, again.batches, strict=True))
    assert not torch.equal(data.batches[0], train.batches[0])  # the splits draw different examples
    got = bench_sae(model, sae, data.batches, token_filter=data.token_filter,
                    labellers=task_labellers(get_task("induction")), cfg=BenchConfig(ks=(1,)))  # fmt: skip
    assert got["probe_repeat_k1"] == 1.0 and got["probe_balanced_repeat_k1"] == 1.0
    assert got["probe_balanced_repeat_input"] == 1.0  # the SAE input's dimension 0 is the variable too
    assert 0.0 <= got["absorption_repeat"] <= got["false_negative_repeat"] <= 1.0


def test_task_batches_refuse_a_model_or_task_they_do_not_fit(tmp_path):
    model, _ = _planted_induction_model_and_sae(tmp_path)
    with pytest.raises(ValueError, match=r"unknown task 'nope'.*induction, ioi, modadd, parens, sorting"):
        corpus_token_batches(model, "task:nope")
    with pytest.raises(ValueError, match=r"task 'parens' pads.*induction, modadd, sorting"):
        corpus_token_batches(model, "task:parens")
    with pytest.raises(ValueError, match=r"d_vocab 64.*task 'sorting' \(d_vocab 65"):
        corpus_token_batches(model, "task:sorting")


def test_cli_bench_on_a_task(tmp_path):
    _planted_induction_model_and_sae(tmp_path)
    runner = CliRunner()
    base = ["sae", "bench", str(tmp_path / "sae"), "--model", str(tmp_path / "model"), "--batches", "2",
            "--ks", "1", "--autointerp", "0"]  # fmt: skip
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "bench"), "--corpus", "task:induction"])
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "bench" / "report.json").read_text())
    metrics = doc["saes"][0]["metrics"]
    assert metrics["probe_balanced_repeat_k1"] == 1.0 and "probe_balanced_seen_before_k1" in metrics
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "b2"), "--corpus", "task:induction",
                              "--properties", "colour"])  # fmt: skip
    assert bad.exit_code != 0 and "colour" in bad.output and "repeat, seen_before" in bad.output
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "b3"), "--corpus", "task:nope"])
    assert bad.exit_code != 0 and "unknown task 'nope'" in bad.output and "modadd" in bad.output
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "b4"), "--corpus", "task:parens"])
    assert (
        bad.exit_code != 0
        and "pads its examples" in bad.output
        and "induction, modadd, sorting" in bad.output
    )


def test_task_losses_are_read_where_the_task_is_trained():
    """On a task corpus the CE metrics are the task's loss (its targets at its loss mask), by hand: for modular
    addition that is the answer at the `=` position, which is not a next token at all, so the next-token CE
    (reading b from a and `=` from b) is a different number. Errors name the mismatch."""
    task = get_task("modadd")
    torch.manual_seed(0)
    model = Transformer(task.model_config(d_model=32, n_layers=1, n_heads=2, d_mlp=64))
    hook = "blocks.0.hook_resid_post"
    sae = create_sae(SAEConfig(d_in=32, d_sae=16, architecture=Architecture.RELU, hook_name=hook))
    data = corpus_token_batches(model, "task:modadd", split="validation", batch_size=8, n_batches=3)
    assert data.targets is not None and len(data.targets) == 3
    rep = evaluate_sae(model, sae, data.batches, token_filter=data.token_filter, targets=data.targets)
    assert rep.loss_positions == "task"
    sums, n = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}, 0
    with torch.no_grad():
        for tokens, (target, mask) in zip(data.batches, data.targets, strict=True):
            assert mask.sum() == len(tokens) and bool(mask[:, 2].all())  # one answer per example, at `=`
            _, cache = model.run_with_cache(tokens, names=[hook])
            recon = sae(cache[hook]).reconstruction
            runs = {
                "clean": model(tokens),
                "spliced": model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, s, r=recon: r)]),
                "zero": model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, s: torch.zeros_like(a))]),
            }
            for key, logits in runs.items():
                sums[key] += float(F.cross_entropy(logits[mask], target[mask], reduction="sum"))
            n += int(mask.sum())
    assert_close(rep.ce_clean, sums["clean"] / n)
    assert_close(rep.ce_spliced, sums["spliced"] / n)
    assert_close(rep.ce_zero_ablation, sums["zero"] / n)
    assert_close(rep.ce_loss_recovered, (sums["zero"] - sums["spliced"]) / (sums["zero"] - sums["clean"]))
    with pytest.raises(ValueError, match="predicts 113 classes but the tokens hold id 113 as a next token"):
        evaluate_sae(model, sae, data.batches, token_filter=data.token_filter)  # `=` is no class
    # induction: the next-token CE also reads the first copy, random tokens its model is never trained on
    ind = get_task("induction")
    model = Transformer(ind.model_config(d_model=32, n_layers=1, n_heads=2))
    sae = create_sae(SAEConfig(d_in=32, d_sae=16, architecture=Architecture.RELU, hook_name=hook))
    data = corpus_token_batches(model, "task:induction", split="validation", batch_size=4, n_batches=2)
    task_rep = evaluate_sae(model, sae, data.batches, token_filter=data.token_filter, targets=data.targets)
    every = evaluate_sae(model, sae, data.batches, token_filter=data.token_filter)
    assert every.loss_positions == "next_token" and abs(every.ce_clean - task_rep.ce_clean) > 1e-3
    assert every.l0 == task_rep.l0 and every.fvu == task_rep.fvu  # reconstruction: the same positions
    with torch.no_grad():
        logits = torch.cat([model(t) for t in data.batches])
    target, mask = (torch.cat(x) for x in zip(*data.targets, strict=True))
    assert_close(task_rep.ce_clean, float(F.cross_entropy(logits[mask], target[mask])))
    with pytest.raises(ValueError, match="2 \\(targets, loss_mask\\) pairs for 1 token batches"):
        evaluate_sae(model, sae, data.batches[:1], targets=data.targets)
    with pytest.raises(ValueError, match="more token batches than the 1"):
        evaluate_sae(model, sae, data.batches, targets=data.targets[:1])
    with pytest.raises(ValueError, match="must match the tokens"):
        evaluate_sae(model, sae, data.batches[:1], targets=[(data.targets[0][0][:, :2], data.targets[0][1])])


def test_sae_train_prints_an_eval_command_that_runs_on_the_task(tmp_path):
    """`sae train --model M --corpus task:modadd` prints its next command with that model and corpus (it printed
    a MODEL placeholder), and that command runs as printed: `sae eval` reads modular addition's answers at the
    `=` position (it stopped with an IndexError) and its report says so."""
    task = get_task("modadd")
    torch.manual_seed(0)
    Transformer(task.model_config(d_model=32, n_layers=1, n_heads=2, d_mlp=64)).save(tmp_path / "model dir")
    runner = CliRunner()
    res = runner.invoke(app, ["sae", "train", "--model", str(tmp_path / "model dir"), "--corpus", "task:modadd",
                              "--hook", "blocks.0.hook_resid_post", "--steps", "2", "--batch", "64",
                              "--out", str(tmp_path / "run")])  # fmt: skip
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "next: " in x)
    printed = shlex.split(line.split("next: ", 1)[1])
    assert printed[1:] == ["sae", "eval", str(tmp_path / "run"), "--model", str(tmp_path / "model dir"),
                           "--corpus", "task:modadd"]  # fmt: skip
    res = runner.invoke(app, printed[1:])
    assert res.exit_code == 0, res.output
    (report,) = (tmp_path / "run" / "eval").glob("*/report.json")
    doc = json.loads(report.read_text())
    assert doc["loss_positions"] == "task" and math.isfinite(doc["ce_loss_recovered"])
