import pytest
import torch
from torch.testing import assert_close

from interplab.sae import Architecture, SAEConfig, create_sae, register_architecture, registered_architectures
from interplab.sae.architectures import JumpReLUSAE, ReLUSAE
from interplab.sae.kernels import scatter_latents, sparse_decode, topk_encode
from interplab.sae.train import SAETrainConfig, train_saes

ARCHS = ["relu", "topk", "batchtopk", "jumprelu", "gated"]


def make(arch: str, **kw) -> torch.nn.Module:
    k = 4 if "topk" in arch else None
    return create_sae(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=k, **kw))


def test_every_architecture_is_registered():
    assert set(registered_architectures()) == set(Architecture)


def test_registry_refuses_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_architecture(type("Again", (ReLUSAE,), {}))


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_gradients(arch):
    sae = make(arch)
    x = torch.randn(2, 5, 16)
    out = sae(x)
    assert out.reconstruction.shape == (2, 5, 16)
    assert out.feature_acts.shape == (2, 5, 64)
    assert_close(sae.decode(sae.encode(x)), out.reconstruction)
    loss = sae.loss(x.reshape(-1, 16), coefficient=1e-2, dead_mask=torch.ones(64, dtype=torch.bool))
    loss.loss.backward()
    for name, p in sae.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert loss.latent_counts.shape == (64,)


def test_topk_keeps_exactly_k():
    sae = make("topk")
    with torch.no_grad():
        sae.b_enc.fill_(10.0)  # every pre-activation positive, so exactly k survive the ReLU
    acts = sae.encode(torch.randn(7, 16))
    assert ((acts != 0).sum(-1) == 4).all()


def test_topk_sparse_kernels_match_dense_autograd():
    x = torch.randn(33, 16)
    W_enc = torch.randn(16, 64, requires_grad=True)
    b_enc = torch.randn(64, requires_grad=True)
    W_dec = torch.randn(64, 16, requires_grad=True)
    params = [W_enc, b_enc, W_dec]
    g = torch.randn(33, 16)
    vals, idx = topk_encode(x, W_enc, b_enc, 5)
    sparse = sparse_decode(vals, idx, W_dec)
    sparse_grads = torch.autograd.grad((sparse * g).sum(), params)
    v, i = (x @ W_enc + b_enc).topk(5, dim=-1)
    dense = scatter_latents(v.relu(), i, 64) @ W_dec
    dense_grads = torch.autograd.grad((dense * g).sum(), params)
    assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    for got, want in zip(sparse_grads, dense_grads, strict=False):
        assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_topk_input_gradient_matches_dense():
    x = torch.randn(9, 16, requires_grad=True)
    W_enc, b_enc = torch.randn(16, 64), torch.randn(64)
    vals, idx = topk_encode(x, W_enc, b_enc, 3)
    (vals * torch.arange(3.0)).sum().backward()
    got = x.grad.clone()
    x.grad = None
    v, _ = (x @ W_enc + b_enc).topk(3, dim=-1, sorted=False)
    (v.relu() * torch.arange(3.0)).sum().backward()
    assert_close(got, x.grad)


def test_jumprelu_thresholds_and_ste():
    sae = make("jumprelu")
    assert isinstance(sae, JumpReLUSAE)
    with torch.no_grad():
        sae.threshold.fill_(0.3)
    pre = torch.tensor([[0.1, 0.29, 0.31, 2.0] + [0.0] * 60])
    acts = sae.activation(pre)
    assert acts[0, :4].tolist() == pytest.approx([0.0, 0.0, 0.31, 2.0])
    # the L0 penalty reaches the threshold through the straight-through estimator
    x = torch.randn(64, 16)
    g = torch.autograd.grad(sae.loss(x, coefficient=1.0).sparsity, sae.threshold)[0]
    assert g.abs().sum() > 0 and (g <= 0).all()  # raising a threshold can only lower L0


def test_unit_norm_decoder_kept():
    sae = make("topk")
    assert_close(sae.decoder_norms(), torch.ones(64))
    opt = torch.optim.SGD(sae.parameters(), lr=0.5)
    for _ in range(3):
        sae.loss(torch.randn(32, 16)).loss.backward()
        sae.remove_parallel_grad()
        opt.step()
        sae.normalize_decoder()
        opt.zero_grad()
    assert_close(sae.decoder_norms(), torch.ones(64))


def test_batchtopk_inference_threshold():
    sae = make("batchtopk")
    x = torch.randn(256, 16)
    for _ in range(50):
        sae.loss(x)
    assert float(sae.threshold) > 0
    acts = sae.encode(x)
    assert ((acts == 0) | (acts > sae.threshold)).all()


def test_normalisation_scales_in_and_out():
    sae = make("relu", normalize_activations="expected_average_only_in")
    x = torch.randn(100, 16) * 7
    sae.set_scale_from(x)
    assert_close(float((x * sae.act_scale).pow(2).sum(-1).mean()), 16.0, rtol=1e-4, atol=0)
    assert_close(sae(x).reconstruction, sae.decode(sae.encode(x)))


def test_geometric_median_init():
    sae = make("relu")
    x = torch.randn(500, 16) * 0.1 + 3.0
    x[:5] = 1000.0  # outliers move the mean, not the median
    sae.init_b_dec(x, "geometric_median")
    assert_close(sae.b_dec, torch.full((16,), 3.0), atol=0.05, rtol=0)
    with pytest.raises(ValueError, match="unknown b_dec init"):
        sae.init_b_dec(x, "median")


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"d_in": 0}, "d_in must be a positive int"),
        ({"architecture": "topk"}, "needs 0 < k"),
        ({"architecture": "matching_pursuit"}, "unsupported SAE architecture 'matching_pursuit'"),
        ({"hook_name": "blocks.0.hook_nope"}, "hook_nope"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(**{"d_in": 16, "d_sae": 64, **kw})


def test_wrong_d_in_names_the_hook():
    sae = create_sae(SAEConfig(d_in=16, d_sae=32, hook_name="blocks.1.hook_resid_post"))
    with pytest.raises(ValueError, match=r"d_in=16.*blocks.1.hook_resid_post.*\(4, 12\)"):
        sae.encode(torch.randn(4, 12))


def test_config_round_trip():
    cfg = SAEConfig(
        d_in=8,
        d_sae=32,
        architecture="topk",
        k=3,
        hook_name="blocks.0.hook_mlp_out",
        hook_name_out="blocks.0.hook_resid_post",
    )
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.is_transcoder


@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_training_loss_gradients_match_the_plain_formula(arch):
    """The fast training path (sparse TopK kernels, b_dec's input gradient as a matrix-vector product) gives
    the gradients of the textbook loss."""
    sae = make(arch)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    x = torch.randn(50, 16)
    params = list(sae.parameters())
    fast = torch.autograd.grad(sae.loss(x, coefficient=0.3).loss, params)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if arch == "topk":
        v, i = pre.topk(4, dim=-1)
        acts = scatter_latents(v.relu(), i, 64)
    else:
        acts = pre.relu()
    recon = acts @ sae.W_dec + sae.b_dec
    loss = (recon - x).pow(2).sum(-1).mean()
    if arch == "relu":
        loss = loss + 0.3 * (acts @ sae.W_dec.norm(dim=-1)).mean()
    ref = torch.autograd.grad(loss, params)
    for (name, _), got, want in zip(sae.named_parameters(), fast, ref, strict=True):
        assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "batchtopk"])
@pytest.mark.parametrize("d_in", [16, 768])
def test_inference_latents_equal_the_training_forwards(arch, d_in):
    """``encode`` (feature DBs, evaluation, hooks) and the training forward compute the same latents to the
    bit, at a width (768) where ``x @ W + b`` and the fused ``addmm`` round differently, and through the
    input scale and b_dec. Under no_grad and with autograd recording (ReLU's in-place activation). BatchTopK
    is left out by design: it trains on the batch's top k x batch and infers with its learned threshold."""
    k = 4 if "topk" in arch else None
    sae = create_sae(
        SAEConfig(
            d_in=d_in, d_sae=96, architecture=arch, k=k, normalize_activations="expected_average_only_in"
        )
    )
    x = torch.randn(3, 7, d_in)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.set_scale_from(x.reshape(-1, d_in))
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
        train = sae.loss(x.reshape(-1, d_in)).feature_acts
        if arch == "topk":  # its training path keeps the k (value, index) pairs of topk_encode only
            x_in, b_enc = sae._encoder_input_and_bias(x.reshape(-1, d_in) * sae.act_scale)
            vals, idx = topk_encode(x_in, sae.W_enc, b_enc, 4)
            train = scatter_latents(vals.relu(), idx, 96)
        inference = sae.encode(x)
    torch.testing.assert_close(inference.reshape(-1, 96), train, rtol=0, atol=0)
    recorded = sae.encode(x)
    assert recorded.requires_grad
    torch.testing.assert_close(recorded.detach(), inference, rtol=0, atol=0)
    recorded.sum().backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("n_heads", "d_head"), [(4, 4), (2, 8)])
def test_hook_z_sae_takes_per_head_input(arch, n_heads, d_head):
    """As sae_lens' hook_z SAEs: [..., n_heads, d_head] is flattened before encoding and the reconstruction
    comes back per head; flat rows give the same numbers."""
    sae = make(arch, hook_name="blocks.2.attn.hook_z")
    assert sae.cfg.reshape_activations.value == "hook_z"  # the default on an attn.hook_z site
    x = torch.randn(2, 5, n_heads, d_head)
    out = sae(x)
    flat = sae(x.flatten(-2))
    assert out.reconstruction.shape == x.shape and out.feature_acts.shape == (2, 5, 64)
    assert_close(out.feature_acts, flat.feature_acts)
    assert_close(out.reconstruction.flatten(-2), flat.reconstruction)
    assert_close(sae.loss(x.reshape(10, n_heads, d_head)).mse, sae.loss(x.reshape(10, 16)).mse)
    plain = make(arch, hook_name="blocks.2.attn.hook_z", reshape_activations="none")
    with pytest.raises(
        ValueError, match=r"SAE expects inputs \[\.\.\., d_in=16\] \(hook blocks.2.attn.hook_z\)"
    ):
        plain.encode(x)


def test_hook_z_reshape_needs_a_hook_z_sae():
    assert make("relu").cfg.reshape_activations.value == "none"
    t = make("relu", hook_name="blocks.0.attn.hook_z", hook_name_out="blocks.0.hook_attn_out")
    assert t.cfg.reshape_activations.value == "none"  # transcoders read flat rows (as sae_lens' do)
    for kw in (
        {"hook_name": "blocks.0.hook_resid_post"},
        {"hook_name": "blocks.0.attn.hook_z", "hook_name_out": "blocks.0.hook_attn_out"},
    ):
        with pytest.raises(ValueError, match="reshape_activations='hook_z' needs an SAE"):
            make("relu", reshape_activations="hook_z", **kw)


@pytest.mark.parametrize("arch", ["jumprelu", "batchtopk"])
def test_threshold_inference_is_saelens_jumprelu(arch):
    """SAELens' JumpReLU: ReLU(z) * (z > threshold), for any stored threshold (a file may hold 0 or less)."""
    sae = make(arch)
    pre = torch.linspace(-2, 2, 64 * 9).reshape(9, 64)
    thresholds = [torch.full((64,), 0.3), torch.zeros(64), torch.linspace(-1, 1, 64)]
    for t in thresholds if arch == "jumprelu" else [torch.tensor(0.3), torch.tensor(0.0)]:
        with torch.no_grad():
            sae.threshold.copy_(t)
        want = torch.where(pre > t, pre.clamp_min(0), torch.zeros(()))
        got = sae.activation(pre)
        assert_close(got, want, rtol=0, atol=0)
        assert (got >= 0).all()


@pytest.mark.parametrize("init", [0.0, 0.001])
def test_jumprelu_threshold_stays_non_negative_and_trains_from_zero(init):
    """The reconstruction pulls thresholds down (coefficient 0, large lr): before, they went negative and
    encode returned negative activations; the projection keeps them >= 0. With an L0 penalty a threshold
    that starts at 0 still rises (its gradient does not vanish there)."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    for coefficient, check in ((0.0, "non_negative"), (0.5, "rises")):
        sae = make("jumprelu", jumprelu_init_threshold=init)
        cfg = SAETrainConfig(total_steps=40, lr=0.05, warmup_steps=1, coefficient=coefficient, autocast=False)
        train_saes(sae, [{"x": x}] * 40, cfg)
        assert float(sae.threshold.detach().min()) >= 0.0
        assert float(sae.encode(x).detach().min()) >= 0.0
        if check == "rises":
            assert float(sae.threshold.detach().mean()) > init + 0.01


def test_batchtopk_auxk_revives_dead_latents():
    """BatchTopK gets TopK's AuxK loss: 0 without dead latents, > 0 with them, and its gradient reaches the
    dead latents' encoder columns."""
    sae = make("batchtopk")
    x = torch.randn(128, 16)
    assert float(sae.loss(x).aux) == 0.0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:20] = True
    out = sae.loss(x, dead_mask=dead)
    assert float(out.aux) > 0
    (g,) = torch.autograd.grad(out.aux, sae.W_enc)
    assert g[:, :20].abs().sum() > 0 and g[:, 20:].abs().sum() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_latent_axes_cover_every_per_latent_parameter(arch):
    """Resampling resets what `latent_axes` lists: it must name every parameter with a d_sae axis."""
    sae = make(arch)  # d_in 16 != d_sae 64, so a 64-sized axis is a latent axis
    for name, p in sae.named_parameters():
        axes = [i for i, n in enumerate(p.shape) if n == 64]
        assert axes == ([sae.latent_axes[name]] if name in sae.latent_axes else []), name
    assert set(sae.latent_reset_values()) == set(sae.latent_axes) - {"W_enc", "W_dec"}


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_sae_other_seed_differs(arch):
    a, b = make(arch), make(arch)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    k = 4 if "topk" in arch else None
    c = create_sae(SAEConfig(d_in=16, d_sae=64, architecture=arch, k=k), seed=1)
    assert not torch.equal(a.W_dec, c.W_dec)
