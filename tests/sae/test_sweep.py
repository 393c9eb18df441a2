"""The sweep library behind `interplab sae train`: names, widths and schedules derived once; the CLI's defaults
are the configs'; `load_sae` on a run folder; `TrainStep` from every architecture; one-process distributed
helpers."""

import dataclasses

import pytest
import torch

from interplab.sae import (
    SAEConfig,
    SAESweepConfig,
    SAETrainConfig,
    TrainStep,
    create_sae,
    load_sae,
    parse_sweep,
    plan_sweep,
    registered_architectures,
    sae_name,
    train_sweep,
)
from interplab.sae.sweep import ActivationSource
from interplab.train import distributed

HOOK = "blocks.0.hook_resid_post"


def test_parse_sweep_is_the_product_of_the_lists():
    assert parse_sweep([]) == ({},)
    assert parse_sweep(["k=16,32", "lr=1e-3"]) == ({"k": 16.0, "lr": 1e-3}, {"k": 32.0, "lr": 1e-3})


@pytest.mark.parametrize(
    ("item", "named"),
    [
        ("alpha=1", "alpha=1"),
        ("k=1.5", "'1.5'"),
        ("lr=nan", "'nan'"),
        ("coefficient=1,x", "'x'"),
        ("k=", "k="),
    ],
)
def test_parse_sweep_names_a_bad_item(item, named):
    with pytest.raises(ValueError, match=named):
        parse_sweep([item])


def test_sae_names_are_derived_in_one_place():
    assert sae_name(HOOK) == "blocks_0_hook_resid_post"
    assert (
        sae_name("blocks.0.hook_resid_post", {"k": 16.0, "lr": 0.001})
        == "blocks_0_hook_resid_post__k_16__lr_0.001"
    )


def test_the_sweep_defaults_are_the_training_configs():
    train = {f.name: f.default for f in dataclasses.fields(SAETrainConfig)}
    cfg = SAESweepConfig()
    assert (cfg.lr, cfg.coefficient, cfg.autocast, cfg.seed) == (
        train["lr"],
        train["coefficient"],
        train["autocast"],
        train["seed"],
    )


def test_the_cli_defaults_are_the_sweep_configs():
    import inspect

    from interplab.cli.sae import train

    params = inspect.signature(train).parameters
    cfg = SAESweepConfig()
    assert params["lr"].default.default == cfg.lr
    assert params["steps"].default.default == cfg.steps
    assert params["batch"].default.default == cfg.batch_size
    assert params["k"].default.default == cfg.k
    assert params["expansion"].default.default == cfg.expansion
    assert params["arch"].default.default == cfg.architecture.value


def test_plan_builds_one_sae_per_hook_and_point_with_scaled_schedules():
    widths = {HOOK: 16, "blocks.1.hook_resid_post": 8}
    cfg = SAESweepConfig(steps=400, sweep=parse_sweep(["k=4,8", "d_sae=64"]), lr=1e-3)
    plan = plan_sweep(widths, cfg, model_name="m")
    assert list(plan.saes) == [sae_name(h, p) for h in widths for p in cfg.sweep]
    sae = plan.saes[sae_name(HOOK, {"k": 8.0, "d_sae": 64.0})]
    assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k, sae.cfg.model_name) == (16, 64, 8, "m")
    t = plan.train[sae_name(HOOK, {"k": 4.0, "d_sae": 64.0})]
    assert (t.total_steps, t.lr, t.coefficient_warmup_steps, t.warmup_steps) == (400, 1e-3, 20, 41)
    assert (t.log_every, t.checkpoint_every) == (20, 40)
    relu = plan_sweep({HOOK: 16}, SAESweepConfig(architecture="relu", steps=10, expansion=2))
    only = relu.saes[sae_name(HOOK)]
    assert (only.cfg.k, only.cfg.d_sae) == (None, 32)
    assert relu.train[sae_name(HOOK)].checkpoint_every == 1


def test_sweep_config_refuses_bad_values():
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        SAESweepConfig(steps=0)
    with pytest.raises(ValueError, match="unknown sweep keys"):
        SAESweepConfig(sweep=({"alpha": 1.0},))


def _source(n: int = 6) -> ActivationSource:
    g = torch.Generator().manual_seed(0)
    batches = [{HOOK: torch.randn(32, 8, generator=g)} for _ in range(n)]
    return ActivationSource(batches=batches, widths={HOOK: 8}, model_name=None, data={"test": 1})


def test_load_sae_reads_a_run_folder(tmp_path):
    one = SAESweepConfig(steps=4, batch_size=32, k=2)
    train_sweep(plan_sweep({HOOK: 8}, one), _source(), one, tmp_path / "one")
    assert load_sae(tmp_path / "one").cfg.k == 2  # the only SAE in the run
    assert (tmp_path / "one" / "training_fvu.html").is_file()
    two = SAESweepConfig(steps=4, batch_size=32, sweep=parse_sweep(["k=2,4"]))
    train_sweep(plan_sweep({HOOK: 8}, two), _source(), two, tmp_path / "two")
    with pytest.raises(ValueError, match="holds 2 SAEs .*blocks_0_hook_resid_post__k_2"):
        load_sae(tmp_path / "two")
    assert load_sae(tmp_path / "two", name=sae_name(HOOK, {"k": 4.0})).cfg.k == 4


def test_a_stopped_sweep_says_so_and_draws_nothing(tmp_path):
    cfg = SAESweepConfig(steps=6, batch_size=32, k=2)
    result = train_sweep(plan_sweep({HOOK: 8}, cfg), _source(), cfg, tmp_path / "r", stop_after=3)
    assert result.stopped and result.steps == 3
    assert not list((tmp_path / "r").glob("training_*.html"))


@pytest.mark.parametrize("arch", registered_architectures())
def test_every_architecture_returns_a_train_step(arch):
    k = 4 if arch.value in ("topk", "batchtopk", "matryoshka_batchtopk") else None
    sae = create_sae(SAEConfig(d_in=8, d_sae=16, architecture=arch, k=k))
    step = sae.train_forward(torch.randn(5, 8), torch.randn(5, 8), torch.zeros(16, dtype=torch.bool))
    assert isinstance(step, TrainStep)
    assert step.reconstruction.shape == (5, 8) and step.sparsity.shape == () and step.aux.shape == ()
    assert step.feature_acts is not None or step.latent_counts is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.aux = step.sparsity  # type: ignore[misc]


def test_distributed_helpers_are_no_ops_in_one_process():
    assert distributed.world_size() == 1 and distributed.is_main()
    assert distributed.from_rank0(7) == 7
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and distributed.all_reduce_mean(t).tolist() == [1.0, 2.0]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    distributed.all_reduce_grads([p])
    assert p.grad.tolist() == [3.0, 3.0]
    info = distributed.init_distributed(torch.device("cpu"))
    assert info == distributed.DistInfo() and info.main
    distributed.shutdown(info)


def _initial_saes(seed: int, sweep: tuple[dict[str, float], ...] = ({},)) -> list:
    return list(plan_sweep({HOOK: 8}, SAESweepConfig(steps=4, k=2, seed=seed, sweep=sweep)).saes.values())


def test_the_seed_draws_the_saes_initial_weights():
    (zero,), (again,), (one,) = (_initial_saes(s) for s in (0, 0, 1))
    assert torch.equal(zero.W_dec, again.W_dec)  # the same seed: bit-identical
    assert not torch.allclose(zero.W_dec, one.W_dec)  # another seed: other weights
    # a single SAE draws with the seed itself (bit-identical to what it drew before the seed reached it)
    assert torch.equal(zero.W_dec, create_sae(zero.cfg, seed=0).W_dec)
    assert torch.equal(one.W_dec, create_sae(one.cfg, seed=1).W_dec)
    # SAEs of one sweep never start from the same weights (the i-th draws with seed + i)
    first, second = _initial_saes(0, parse_sweep(["coefficient=1,2"]))
    assert torch.equal(first.W_dec, zero.W_dec) and not torch.allclose(first.W_dec, second.W_dec)


def test_the_seed_draws_the_order_of_streamed_activations(tmp_path):
    from interplab.data import CharTokenizer
    from interplab.model import ModelConfig, Transformer
    from interplab.sae.sweep import model_source

    tok = CharTokenizer("abcdefgh \n")
    model = Transformer(
        ModelConfig(d_model=8, n_layers=1, n_heads=2, d_vocab=tok.vocab_size, n_ctx=8, d_mlp=16)
    )
    model.tokenizer = tok
    for i in range(4):
        (tmp_path / f"{i}.txt").write_text("".join("abcdefgh \n"[(i * j * 7 + j) % 10] for j in range(4000)))

    def first_batch(seed: int) -> torch.Tensor:
        source = model_source(model, "m", [HOOK], corpus=str(tmp_path), seq_len=8, batch_size=32, seed=seed)
        return next(iter(source.batches))[HOOK]

    assert torch.equal(first_batch(0), first_batch(0))
    assert not torch.equal(first_batch(0), first_batch(1))
