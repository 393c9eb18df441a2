"""Crosscoders: forward and loss equal a hand computation, planted cross-layer features are recovered,
files round-trip, activation batches of several sites stack into crosscoder input."""

import pytest
import torch
from torch.testing import assert_close

from interplab.sae.activations import model_activations
from interplab.sae.crosscoder import (
    Crosscoder,
    CrosscoderConfig,
    CrosscoderTrainConfig,
    fvu,
    load_crosscoder,
    multi_model_activations,
    shuffled_batches,
    stack_sources,
    train_crosscoder,
)

SOURCES = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post")


def randomised(n=3, d_in=6, d_sae=20, k=3, seed=0) -> Crosscoder:
    cc = Crosscoder(CrosscoderConfig(d_in=d_in, d_sae=d_sae, k=k, sources=SOURCES[:n]), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in cc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return cc


def hand(cc: Crosscoder, x: torch.Tensor, *, train: bool):
    """The crosscoder written out with loops over sources and latents."""
    W_enc, b_enc, W_dec, b_dec = (t.detach() for t in (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec))
    n, m = cc.cfg.n_sources, cc.cfg.d_sae
    pre = b_enc.expand(x.shape[0], m).clone()
    for s in range(n):
        pre = pre + (x[:, s] - b_dec[s]) @ W_enc[s]
    acts = pre.clamp_min(0)
    norm_sum = torch.stack([W_dec[:, s].norm(dim=-1) for s in range(n)]).sum(0)
    score = acts * norm_sum
    if train:
        cut = score.flatten().sort(descending=True).values[cc.cfg.k * x.shape[0] - 1]
        acts = torch.where(score >= cut, acts, torch.zeros_like(acts))
    else:
        acts = torch.where(score > cc.threshold, acts, torch.zeros_like(acts))
    recon = torch.stack([acts @ W_dec[:, s] + b_dec[s] for s in range(n)], dim=1)
    mse = sum(((recon[:, s] - x[:, s]) ** 2).sum(-1) for s in range(n)).mean()
    return acts, recon, mse


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [2, 3])
def test_forward_and_loss_equal_hand_computation(seed, n):
    cc = randomised(n=n, seed=seed)
    cc.threshold.fill_(0.3)
    x = torch.randn(12, n, 6, generator=torch.Generator().manual_seed(seed))
    acts, recon, _ = hand(cc, x, train=False)
    out = cc(x)
    assert_close(out.feature_acts, acts)
    assert_close(out.reconstruction, recon)
    acts, recon, mse = hand(cc, x, train=True)
    out = cc.loss(x)
    assert_close(out.feature_acts, acts)
    assert_close(out.reconstruction, recon)
    assert_close(out.mse, mse)
    assert_close(out.loss, mse)  # no dead latents: AuxK is 0
    assert int((out.feature_acts > 0).sum()) <= cc.cfg.k * 12


def test_auxk_only_with_dead_latents_and_reaches_them():
    cc = randomised()
    x = torch.randn(16, 3, 6, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(20, dtype=torch.bool)
    dead[5:10] = True
    out = cc.loss(x, dead_mask=dead)
    assert float(out.aux.detach()) > 0
    assert_close(out.loss, out.mse + out.aux / 32)
    out.aux.backward()
    assert cc.W_dec.grad[5:10].abs().sum() > 0 and cc.W_dec.grad[:5].abs().sum() == 0


def test_bad_shapes_and_configs_are_named():
    cc = randomised()
    with pytest.raises(ValueError, match="n_sources=3"):
        cc(torch.randn(4, 2, 6))
    with pytest.raises(ValueError, match="two distinct sources"):
        CrosscoderConfig(d_in=4, d_sae=8, k=2, sources=("a", "a"))
    with pytest.raises(ValueError, match="k <= d_sae"):
        CrosscoderConfig(d_in=4, d_sae=8, k=9, sources=("a", "b"))


def planted_cross_layer(n_tokens: int, d=16, n_feat=24, seed=0):
    """Each feature writes a (different, random unit) direction into each of 3 layers; ~2 features per token."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_feat, 3, d, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    on = (torch.rand(n_tokens, n_feat, generator=g) < 2 / n_feat).float() * (
        1 + torch.rand(n_tokens, n_feat, generator=g)
    )
    return torch.einsum("tf,fnd->tnd", on, dirs), dirs


def test_planted_cross_layer_features_recovered():
    x, dirs = planted_cross_layer(16_384)
    cc = Crosscoder(CrosscoderConfig(d_in=16, d_sae=48, k=2, sources=SOURCES), seed=0)
    train_crosscoder(
        cc, shuffled_batches(x, 512), CrosscoderTrainConfig(steps=1200, lr=3e-3, dead_after_tokens=20_000)
    )
    W = cc.W_dec.detach().flatten(1)  # [d_sae, 3 * d]: a latent's decoder into all layers
    cos = (dirs.flatten(1) / dirs.flatten(1).norm(dim=-1, keepdim=True)) @ (
        W / W.norm(dim=-1, keepdim=True)
    ).T
    assert float(cos.max(1).values.min()) > 0.9, cos.max(1).values
    assert fvu(cc, x[:2048]) < 0.1


def test_save_load_round_trip(tmp_path):
    cc = randomised()
    cc.threshold.fill_(0.25)
    cc.save(tmp_path / "cc")
    back = load_crosscoder(tmp_path / "cc")
    assert back.cfg == cc.cfg
    x = torch.randn(8, 3, 6, generator=torch.Generator().manual_seed(9))
    assert_close(back(x).feature_acts, cc(x).feature_acts)
    assert_close(back(x).reconstruction, cc(x).reconstruction)
    with pytest.raises(FileNotFoundError, match="not a crosscoder folder"):
        load_crosscoder(tmp_path)


def test_activation_pipeline_sites_and_models(tiny_model):
    """Several sites of one model through the activation pipeline, and one site of two models on the same
    tokens, stack into [tokens, n_sources, d] in source order."""
    tokens = torch.randint(0, tiny_model.cfg.d_vocab, (2, 8), generator=torch.Generator().manual_seed(0))
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(tiny_model.cfg.n_layers)]
    batch = model_activations(tiny_model, tokens, hooks)
    stacked = stack_sources(batch, hooks)
    assert stacked.shape == (batch[hooks[0]].shape[0], len(hooks), tiny_model.cfg.d_model)
    for i, h in enumerate(hooks):
        assert_close(stacked[:, i], batch[h])
    with pytest.raises(KeyError, match="not in the batch"):
        stack_sources(batch, ["blocks.9.hook_resid_post"])
    pair = next(multi_model_activations([tiny_model, tiny_model], [tokens], hooks[0]))
    assert_close(pair[:, 0], batch[hooks[0]])
    assert_close(pair[:, 1], batch[hooks[0]])


class Interrupt(RuntimeError):
    pass


def test_training_resumes_bit_exactly_from_a_checkpoint(tmp_path):
    """Train 30 steps straight; train the same again with a checkpoint every 10 steps, killed at step 25, then
    call it again: it resumes from step 20 and ends with exactly the same weights, threshold and log."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64 * 6, 2, 6, generator=g)
    batches = shuffled_batches(rows, 64, seed=0)  # 6 batches: cycled 5 times
    cfg = CrosscoderTrainConfig(steps=30, log_every=5, checkpoint_every=10, dead_after_tokens=128)

    def fresh() -> Crosscoder:
        return Crosscoder(CrosscoderConfig(d_in=6, d_sae=16, k=2, sources=SOURCES[:2]), seed=0)

    ref = fresh()
    want = train_crosscoder(ref, batches, cfg)

    def die(step, row):
        if step == 25:
            raise Interrupt

    cc = fresh()
    with pytest.raises(Interrupt):
        train_crosscoder(cc, batches, cfg, progress=die, checkpoints=tmp_path, data_identity={"rows": 384})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000010", "step_000020"]
    cc = fresh()  # a new process: nothing of the killed one but its checkpoints
    got = train_crosscoder(cc, batches, cfg, checkpoints=tmp_path, data_identity={"rows": 384})
    for a, b in zip(ref.state_dict().values(), cc.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    drop = lambda h: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h]  # noqa: E731
    assert drop(got) == drop(want) and len(got) == 6
    # a checkpoint of another run is refused, naming what differs
    with pytest.raises(
        ValueError, match=r"identity\.data\.rows: the checkpoint has 384, this run asks for 99"
    ):
        train_crosscoder(fresh(), batches, cfg, checkpoints=tmp_path, data_identity={"rows": 99})
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0, got -1"):
        CrosscoderTrainConfig(checkpoint_every=-1)
