"""interplab attribute on a real (tiny) training run made by the trainer."""

import json

import pytest
import torch

from interplab.data_attribution.run import attribute_run
from interplab.train import train
from tests.train.conftest import _tiny_config, write_corpus


@pytest.fixture
def tiny_run(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    train(_tiny_config(corpus, steps=24, checkpoints={"log_spaced": 4, "every": 6}), run)
    return run


def test_attribute_run_scores_window_sequences_and_writes_outputs(tiny_run, tmp_path):
    result = attribute_run(tiny_run, "prev:best", window=(0, 12), dim=64, max_candidates=20)
    assert result.window == (0, 12)
    assert set(result.steps) <= set(range(0, 12)) and len(result.steps) >= 2
    n = result.example_ids.numel()
    assert 0 < n <= 20 and result.scores.shape == (n,) and result.per_step.shape == (len(result.steps), n)
    torch.testing.assert_close(result.per_step.sum(0), result.scores)
    assert result.target.startswith("prev:") and len(result.curve) == len(result.curve_steps)
    paths = result.save(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["target"] == result.target and len(report["top"]) == min(20, n)
    assert report["top"][0]["score"] == max(float(s) for s in result.scores)
    assert "<mark>" in (tmp_path / "out" / "top_examples.html").read_text() or n > 0
    assert paths["html"].endswith("attribution.html")


def test_attribute_run_bad_input(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="outside the run's checkpoints"):
        attribute_run(tiny_run, "prev:0.0", window=(0, 10_000))
    with pytest.raises(ValueError, match="unknown target") as err:
        attribute_run(tiny_run, "wiggles:0.0", window=(0, 12))
    # the run-level kinds are named too, not only parse_target's
    for kind in ("feature:SAE_PATH:IDX", "loss:QUERY_FILE", ":best", "neuron:L.N", "composition:"):
        assert kind in str(err.value), err.value
    with pytest.raises(ValueError, match="head 7 does not exist"):
        attribute_run(tiny_run, "induction:0.7", window=(0, 12))
    with pytest.raises(FileNotFoundError, match="not a training run"):
        attribute_run(tmp_path, "prev:0.0")


def test_movers_per_parameter_view(tiny_run):
    from interplab.data_attribution.run import movers

    view = movers(tiny_run, "head:1.0", max_candidates=12, steps=(0, 12))
    assert view.norms.shape == (len(view.intervals), view.example_ids.numel())
    assert bool((view.norms > 0).all())
    top = view.top(0, 3)
    assert top[0][1] == float(view.norms[0].max())
    with pytest.raises(ValueError, match="head 5 does not exist"):
        movers(tiny_run, "head:1.5", steps=(0, 12))


def test_recording_callback_during_training(tmp_path, monkeypatch):
    """The recorder as a trainer callback: the recorded ids are the sequences each step trained on, and the
    shards equal per-example gradients recomputed from the checkpoint at that step."""
    from interplab.data_attribution import lm_loss, param_group, per_example_grads
    from interplab.data_attribution.record import RecordConfig, RecordingCallback
    from interplab.model.io import load_native
    from interplab.train.checkpoint import checkpoint_dir
    from interplab.train.config import TrainConfig
    from interplab.train.sources import CorpusSource

    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    corpus = write_corpus(tmp_path / "corpus")
    cfg = _tiny_config(corpus, steps=12, checkpoints={"log_spaced": 0, "every": 6})
    from interplab.train.trainer import build_model

    model_for_group = build_model(cfg, CorpusSource(cfg))
    cb = RecordingCallback(
        tmp_path / "grads",
        model_for_group,
        RecordConfig(group="head:1.0", dim=32, precondition=False),
        steps=[7],
    )
    run = tmp_path / "run"
    train(cfg, run, callbacks=[cb])
    assert cb.recorder.steps == [7]
    ids, grads, entry = cb.recorder.load(7)
    source = CorpusSource(TrainConfig.from_dict(json.loads((run / "config.json").read_text())))
    torch.testing.assert_close(ids, source.indices(6))  # step 7 trained on batch 6
    # step 7's gradient was taken at the weights after 6 updates: the step-6 checkpoint
    model = load_native(checkpoint_dir(run, 6))
    group = param_group(model, "head:1.0")
    expected = cb.recorder.projector.project(
        per_example_grads(model, lm_loss, source.batch(6, slice(None)), group)
    )
    torch.testing.assert_close(grads, expected / len(ids), atol=1e-5, rtol=1e-4)


def _grads(model, names, value):
    """The gradient of ``value`` with respect to the parameters ``names``, by one plain backward pass (unused
    parameters: 0), by name."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(value, [params[k] for k in names], allow_unused=True, materialize_grads=True)
    return dict(zip(names, grads, strict=True))


def _flat_grad(model, grp, value):
    """The gradient of ``value`` with respect to ``grp``, by one plain backward pass (unused parameters: 0)."""
    return grp.flatten(_grads(model, grp.param_names, value))


def _hand_tracin(run_dir, target, window, ids, dim, grads="exact", group="all"):
    """The checkpoint loop written out: per-example backward passes at every checkpoint of the window but the
    last, each term -lr x span / n_train <P grad target, P grad loss_i>; P the sparse JL projection of the
    flat gradient, or (``grads="factored"``) none: the exact dot product over the whole group."""
    import torch.nn.functional as F

    from interplab.data_attribution import Projector, param_group
    from interplab.model.io import load_native
    from interplab.runs import TrainRun
    from interplab.train.config import TrainConfig
    from interplab.train.sources import CorpusSource, cosine_lr

    run = TrainRun.open(run_dir)
    cfg = TrainConfig.from_dict(run.config)
    source = CorpusSource(cfg)
    tokens = source.train.sequences(ids, source.seq_len)
    ckpts = [c for c in run.checkpoints(intact=True) if window[0] <= c.step <= window[1]]
    rows = []
    for a, b in zip(ckpts[:-1], ckpts[1:], strict=True):
        model = load_native(a.path)
        grp = param_group(model, group)
        losses = [F.cross_entropy(model(t[None])[0, :-1].float(), t[1:]) for t in tokens]
        if grads == "exact":
            proj = Projector(d_in=grp.numel, dim=dim, seed=0)
            tg = proj.project(_flat_grad(model, grp, target(model))[None])[0]
            # one backward pass per training sequence
            g = proj.project(torch.stack([_flat_grad(model, grp, loss) for loss in losses]))
        else:
            tg = _flat_grad(model, grp, target(model))
            g = torch.stack([_flat_grad(model, grp, loss) for loss in losses])
        o = cfg.optim
        lr = cosine_lr(a.step, lr=o.lr, warmup=o.warmup_steps, total=cfg.steps, min_ratio=o.min_lr_ratio)
        weight = lr * (b.step - a.step) / source.n_train
        rows.append(-weight * (g @ tg))
    return torch.stack(rows)


def test_attribute_run_factored_equals_the_hand_written_loop_without_projection(tiny_run, tmp_path):
    """grads='factored' (the default: exact dot products from the layers' inputs and output gradients, never
    a per-example gradient) gives the unprojected TracIn scores of plain per-example backward passes over the
    whole group: every linear map, the embedding, the norms' gains and biases and the smear gates; a group
    of slices (one head) or of norms alone too."""
    from interplab.data_attribution import Target, param_group
    from interplab.data_attribution.run import group_sites
    from interplab.model.io import load_native
    from interplab.runs import TrainRun

    custom = Target("qk-norm:1", lambda m: (m.blocks[1].attn.W_Q * m.blocks[1].attn.W_K).sum())
    result = attribute_run(tiny_run, custom, window=(0, 12), dim=64, max_candidates=10)
    assert result.grads == "factored" and result.to_dict()["grads"] == "factored"
    assert "unprojected" in result.to_dict()["method"]
    expected = _hand_tracin(tiny_run, custom, (0, 12), result.example_ids, 64, grads="factored")
    torch.testing.assert_close(result.per_step, expected, rtol=1e-4, atol=1e-9)
    assert bool(expected.abs().sum() > 0)
    model = load_native(TrainRun.open(tiny_run).checkpoints()[0].path)
    sites, rest = group_sites(model, param_group(model, "all"))
    names = [s.name for s in sites]
    assert rest is None and names[:2] == ["embed", "blocks.0.attn.q"] and "unembed" in names
    covered = {p for s in sites for p in s.params}
    assert covered == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"blocks.0.ln1", "ln_final"} <= set(names)
    layer1, _ = group_sites(model, param_group(model, "layer:1"))
    assert {f"blocks.1.attn.{w}" for w in "qkvo"} <= {s.name for s in layer1}
    probe = torch.arange(12)[None] % model.cfg.d_vocab
    logits = Target("logits", lambda m: m(probe).float().pow(2).mean())  # depends on every parameter
    for group in ("head:1.0", "re:ln_final|smear"):
        got = attribute_run(tiny_run, logits, window=(0, 12), group=group, max_candidates=6)
        want = _hand_tracin(tiny_run, logits, (0, 12), got.example_ids, 64, grads="factored", group=group)
        torch.testing.assert_close(got.per_step, want, rtol=1e-4, atol=1e-12)
        assert bool(want.abs().sum() > 0)
    with pytest.raises(ValueError, match="grads must be one of factored, exact, got 'fast'"):
        attribute_run(tiny_run, custom, window=(0, 12), grads="fast")
    # the command line: --grads factored writes the same scores, and the report says how they were taken
    from typer.testing import CliRunner

    from interplab.cli.main import app
    from interplab.io import load_tensors

    args = ["attribute", str(tiny_run), "--target", "prev:0.0", "--window", "0:12", "--candidates", "10"]
    done = CliRunner().invoke(app, [*args, "--grads", "factored", "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert json.loads((tmp_path / "out" / "report.json").read_text())["grads"] == "factored"
    direct = attribute_run(tiny_run, "prev:0.0", window=(0, 12), max_candidates=10, grads="factored")
    torch.testing.assert_close(load_tensors(tmp_path / "out" / "scores.safetensors")["scores"], direct.scores)


def test_attribute_run_any_target_equals_the_hand_written_checkpoint_loop(tiny_run, tmp_path):
    """A custom `Target` and a loss on a query file go through attribute_run with the lr x span / N weighting
    it documents: equal to the loop written out with plain backward passes (the projected ``exact`` route
    for the first, the unprojected default for the second)."""
    from interplab.data_attribution import Target, loss_target
    from interplab.train.config import TrainConfig
    from interplab.train.sources import CorpusSource

    custom = Target("qk-norm:1", lambda m: (m.blocks[1].attn.W_Q * m.blocks[1].attn.W_K).sum())
    result = attribute_run(tiny_run, custom, window=(0, 12), dim=48, max_candidates=10, grads="exact")
    assert result.target == "qk-norm:1" and "projected" in result.to_dict()["method"]
    expected = _hand_tracin(tiny_run, custom, (0, 12), result.example_ids, 48)
    torch.testing.assert_close(result.per_step, expected, rtol=1e-4, atol=1e-9)
    assert bool(expected.abs().sum() > 0)

    queries = tmp_path / "queries.txt"
    queries.write_text("def add(a, b):\n    return a + b\n" * 8, encoding="utf-8")
    result = attribute_run(tiny_run, f"loss:{queries}", window=(0, 12), dim=48, max_candidates=10)
    assert result.target == "loss:queries.txt"
    source = CorpusSource(TrainConfig.from_dict(json.loads((tiny_run / "config.json").read_text())))
    ids = torch.tensor(source.tokenizer.encode(queries.read_text()))
    n = source.seq_len
    query = loss_target(ids[: len(ids) // n * n].view(-1, n))
    expected = _hand_tracin(tiny_run, query, (0, 12), result.example_ids, 48, grads="factored")
    torch.testing.assert_close(result.per_step, expected, rtol=1e-4, atol=1e-9)
    # the curve is the query loss at every checkpoint: it falls as the model learns
    assert result.curve[-1] < result.curve[0]


def test_attribute_run_loss_on_held_out_auto_window_and_bad_specs(tiny_run, tmp_path):
    result = attribute_run(tiny_run, "loss", dim=32, max_candidates=8)
    lo, hi = result.window  # auto: where the held-out loss falls
    assert result.target == "loss" and lo < hi
    assert result.curve[result.curve_steps.index(hi)] < result.curve[result.curve_steps.index(lo)]
    from typer.testing import CliRunner

    from interplab.cli.main import app

    args = ["attribute", str(tiny_run), "--target", "loss", "--dim", "32", "--candidates", "8"]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0 and "helped most" in done.output, done.output
    helped = int(result.example_ids[result.scores.argmin()])
    assert f"sequence {helped}: {float(result.scores.min()):.3g}" in done.output
    with pytest.raises(FileNotFoundError, match="query file .* does not exist"):
        attribute_run(tiny_run, f"loss:{tmp_path / 'nope.txt'}", window=(0, 12))
    with pytest.raises(ValueError, match="feature:SAE_PATH:IDX"):
        attribute_run(tiny_run, "feature:7", window=(0, 12))
    with pytest.raises(ValueError, match="neuron 0.1 does not exist"):  # the run's model is attention-only
        attribute_run(tiny_run, "neuron:0.1", window=(0, 12))


def test_cli_attribute_feature_spec_equals_the_feature_target(tiny_run, tmp_path):
    """``interplab attribute RUN --target feature:SAE_PATH:IDX`` reads the run's held-out sequences through the
    SAE and scores like `feature_target` given to attribute_run; its folder name is filesystem-safe."""
    from typer.testing import CliRunner

    from interplab.cli.main import app
    from interplab.data_attribution import feature_target
    from interplab.io import load_tensors
    from interplab.model.io import load_native
    from interplab.runs import TrainRun
    from interplab.sae import SAEConfig, create_sae, save_sae
    from interplab.train.config import TrainConfig
    from interplab.train.sources import CorpusSource

    torch.manual_seed(0)
    sae = create_sae(SAEConfig(d_in=32, d_sae=16, hook_name="blocks.0.hook_resid_post"))
    sae_dir = save_sae(sae, tmp_path / "sae")
    spec = f"feature:{sae_dir}:3"
    args = [
        "attribute",
        str(tiny_run),
        "--target",
        spec,
        "--window",
        "0:12",
        "--dim",
        "32",
        "--candidates",
        "8",
    ]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    folder = tiny_run / "attribution" / "feature_blocks.0.hook_resid_post_3"
    report = json.loads((folder / "report.json").read_text())
    assert report["target"] == "feature:blocks.0.hook_resid_post:3" and str(folder) in done.output.replace(
        "\n", ""
    )

    run = TrainRun.open(tiny_run)
    source = CorpusSource(TrainConfig.from_dict(run.config))
    heldout = source.val.sequences(torch.arange(16), source.seq_len)
    final = load_native(run.checkpoints(intact=True)[-1].path)
    direct = attribute_run(
        tiny_run, feature_target(final, sae, heldout, 3), window=(0, 12), dim=32, max_candidates=8
    )
    saved = load_tensors(folder / "scores.safetensors")
    torch.testing.assert_close(saved["scores"], direct.scores)
    assert bool(direct.scores.abs().sum() > 0)
    with pytest.raises(ValueError, match="feature 99 does not exist"):
        attribute_run(tiny_run, f"feature:{sae_dir}:99", window=(0, 12))


def test_loss_target_ranks_the_helpful_example_first_in_report_and_web_page(tiny_run):
    """Planted: the query is one candidate training sequence itself, so training on that sequence lowers the
    query loss most (its score is the most negative). Under the sign convention the saved report, the top
    examples page, the CLI's ranking and the web run page all list it first; a mechanism target still ranks
    by the raw score."""
    import re

    from fastapi.testclient import TestClient

    from interplab.data_attribution.run import _window_sequences
    from interplab.train.config import TrainConfig
    from interplab.train.sources import CorpusSource
    from interplab.web.app import create_app

    source = CorpusSource(TrainConfig.from_dict(json.loads((tiny_run / "config.json").read_text())))
    ids = _window_sequences(source, 0, 12, 12, 0)  # the candidates attribute_run will score
    planted = int(ids[len(ids) // 2])
    probe = source.train.sequences(torch.tensor([planted]), source.seq_len)
    result = attribute_run(tiny_run, "loss", window=(0, 12), dim=64, max_candidates=12, probe=probe)
    assert not result.rises and torch.equal(result.example_ids, ids)
    i = int((ids == planted).nonzero())
    assert int(result.scores.argmin()) == i and float(result.scores[i]) < 0  # the planted answer holds
    assert result.top(1) == [(planted, float(result.scores[i]))]
    assert [s for _, s in result.top(len(ids))] == sorted(result.scores.tolist())
    result.save(tiny_run / "attribution" / "loss")
    report = json.loads((tiny_run / "attribution" / "loss" / "report.json").read_text())
    assert report["top"][0]["sequence"] == planted and report["rises"] is False
    assert report["top"][0]["score"] == min(r["score"] for r in report["top"])
    html = (tiny_run / "attribution" / "loss" / "top_examples.html").read_text()
    assert f"#1: sequence {planted}," in html and "lowered the loss most" in html

    page = TestClient(create_app(runs=[tiny_run.parent]), base_url="http://127.0.0.1").get("/run/0").text
    table = page[page.index("Which training sequences built loss?") :]
    first = re.search(r'class="grid attribution-top">.*?</tr>\s*<tr><td>(\d+)</td>', table, re.S)
    assert first is not None and int(first.group(1)) == planted, table[:2000]
    assert "lowered the loss most (helped)" in table
    data = json.loads(re.search(r'id="run-data">(.*?)</script>', page, re.S).group(1))
    if data.get("timeline"):  # the timeline shows the same list when the run has enough to put on it
        assert data["timeline"]["top"][0]["sequence"] == planted
    # a report of the projected route (or one from before the grads field) says its ranking may be noise
    assert "random projection" not in table
    path = tiny_run / "attribution" / "loss" / "report.json"
    for grads in ("exact", None):
        body = json.loads(path.read_text())
        body.pop("grads")
        path.write_text(json.dumps(body | ({"grads": grads} if grads else {})))
        page = TestClient(create_app(runs=[tiny_run.parent]), base_url="http://127.0.0.1").get("/run/0").text
        assert "random projection of the gradients (grads=exact)" in page[page.index("Which training seq") :]

    # a mechanism target: the highest score first, as before
    prev = attribute_run(tiny_run, "prev:0.0", window=(0, 12), dim=64, max_candidates=12)
    assert prev.rises and prev.top(1)[0][1] == float(prev.scores.max())
