"""Training and evaluating CLTs: the shared activation pass, planted recovery on a model whose MLPs are exactly
sparse in a known basis, bit-exact resume, torchrun, evaluation metrics against hand computations, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from interplab.model import ModelConfig, Transformer
from interplab.runs import Kind, detect, read_log
from interplab.sae.activations import model_activations
from interplab.sae.clt import CLTActivation, CLTConfig, CrossLayerTranscoder, jumprelu_train, load_clt
from interplab.sae.clt_train import (
    CLTTrainConfig,
    clt_activations,
    clt_hooks,
    evaluate_clt,
    replacement_logits,
    stack_layers,
    train_clt,
)

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
import clt_ddp_worker  # noqa: E402

sys.path.pop(0)


def planted_model(n_feat: int = 8, d: int = 32, vocab: int = 512, seed: int = 0):
    """Two layers, attention and positions off, no norms, ReLU MLPs with d_mlp = n_feat: MLP l's neuron i
    reads input direction ``enc[l][i]`` (bias -0.5) and writes ``dec[l][i]`` (times l + 1). Every token embeds
    2 of each layer's input directions with coefficients in [1, 2], so each MLP output is exactly a sum of 2
    known directions per token. All 4 * n_feat directions are orthonormal."""
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(
        d_model=d,
        n_layers=2,
        n_heads=1,
        d_vocab=vocab,
        n_ctx=16,
        d_mlp=n_feat,
        act_fn="relu",
        normalization="none",
        positional="none",
    )
    model = Transformer(cfg)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    dirs = q.T[: 4 * n_feat]
    enc = [dirs[:n_feat], dirs[n_feat : 2 * n_feat]]
    dec = [dirs[2 * n_feat : 3 * n_feat], dirs[3 * n_feat :]]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = torch.zeros(vocab, d)
        for layer in range(2):
            for t in range(vocab):
                idx = torch.randperm(n_feat, generator=g)[:2]
                emb[t] += ((1 + torch.rand(2, generator=g))[:, None] * enc[layer][idx]).sum(0)
        model.embed.W_E.copy_(emb)
        for layer, block in enumerate(model.blocks):
            block.mlp.W_in.copy_(enc[layer].T)
            block.mlp.b_in.fill_(-0.5)
            block.mlp.W_out.copy_(dec[layer] * (layer + 1))
        model.unembed.W_U.copy_(torch.randn(d, vocab, generator=g) * 0.1)
    return model, enc, dec


def _recovery(clt: CrossLayerTranscoder, dec: list[torch.Tensor]) -> list[float]:
    """Per planted feature (layer l, direction i): the best cosine between dec[l][i] and a decoder into layer
    l (from any source layer that writes there)."""
    best = []
    for dst, dirs in enumerate(dec):
        srcs = range(dst + 1) if clt.cfg.cross_layer else (dst,)
        cos = torch.cat([F.normalize(clt.decoder(s, dst), dim=-1) @ dirs.T for s in srcs])  # [latents, n]
        best += cos.max(0).values.tolist()
    return best


def _tiny_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(d_model=16, n_layers=2, n_heads=2, d_vocab=20, n_ctx=16, d_mlp=32, name="tiny")
    return Transformer(ModelConfig(**{**cfg, **kw}))


@pytest.mark.parametrize("cross_layer", [False, True])
def test_planted_sparse_mlps_are_recovered(cross_layer):
    """TopK (k = the 2 active features per layer): per-layer transcoders and a CLT, trained jointly on both
    layers in one pass, find every planted output direction at cosine > 0.99."""
    model, _, dec = planted_model()
    steps = 600
    toks = torch.randint(0, 512, (steps * 256 // 8 + 64, 9), generator=torch.Generator().manual_seed(1))
    cfg = CLTTrainConfig(
        clt=CLTConfig(n_layers=2, d_model=32, d_sae=16, activation="topk", k=2, cross_layer=cross_layer),
        total_steps=steps,
        batch_size=256,
        lr=1e-2,
        log_every=100,
    )
    result = train_clt(model, toks, cfg)
    assert result.steps == steps
    best = _recovery(result.clt, dec)
    assert min(best) > 0.99, best
    rep = evaluate_clt(model, result.clt, toks[:32])
    assert max(rep.fvu) < 0.02 and rep.l0 == [2.0, 2.0]


def test_the_shared_pass_equals_per_layer_caching():
    """One forward reading every layer's hook_in and hook_out gives what one forward per hook gives, and the
    streamed rows stay aligned across layers (each row's MLP output is the MLP of its own resid_mid)."""
    model, _, _ = planted_model()
    cfg = CLTTrainConfig(clt=CLTConfig(n_layers=2, d_model=32, d_sae=8), total_steps=1, batch_size=64)
    toks = torch.randint(0, 512, (32, 9), generator=torch.Generator().manual_seed(2))
    shared = model_activations(model, toks, clt_hooks(cfg.clt))
    for hook in clt_hooks(cfg.clt):
        assert torch.equal(shared[hook], model_activations(model, toks, [hook])[hook]), hook
    for batch in clt_activations(model, toks.split(4), cfg):
        x, y = stack_layers(batch, cfg.clt)
        for layer, block in enumerate(model.blocks):
            assert_close(y[:, layer], block.mlp(x[:, layer]), rtol=0, atol=1e-6)


def _cfg(**kw) -> CLTTrainConfig:
    base = dict(
        clt=CLTConfig(n_layers=2, d_model=16, d_sae=24), total_steps=30, batch_size=64, log_every=5, lr=3e-3
    )
    return CLTTrainConfig(**{**base, **kw})


def reference_loss(self, x_s, y_s, step):
    """`_CLTTrainer.loss` as first written, on all layers at once ([rows, n_layers, d_sae]; ``self`` a
    trainer): the slower reference it is tested against."""
    clt, cfg = self.clt, self.clt.cfg
    pre = clt.pre_acts(x_s).float()
    norms = clt.decoder_norms().float()  # [n_layers, d_sae]
    zero = pre.new_zeros(())
    sparsity, pre_act = zero, zero
    if cfg.activation is CLTActivation.JUMPRELU:
        with torch.no_grad():
            clt.threshold.clamp_(min=0.0)
        t = clt.threshold.float()
        acts = jumprelu_train(pre, t, cfg.jumprelu_bandwidth)
        sparsity = torch.tanh(self.cfg.tanh_scale * acts * norms).sum((-2, -1)).mean()
        pre_act = ((t - pre).relu() * norms).sum((-2, -1)).mean()
    elif cfg.activation is CLTActivation.TOPK:
        acts = clt.activation(pre)
    else:
        acts = pre.relu()
        sparsity = (acts * norms).sum((-2, -1)).mean()
    recon = clt.decode(acts.to(clt.W_enc.dtype)).float()
    err = (recon - y_s.float()).pow(2).sum(-1)  # [rows, n_layers]
    mse = err.sum(-1).mean()
    loss = mse + self.schedule.coefficient_at(step) * sparsity + self.cfg.pre_act_coefficient * pre_act
    active = acts.detach() != 0
    return loss, {
        "mse": mse,
        "err": err.detach(),
        "fired": active.sum(0),
        "l0": active.sum(-1),
        "sparsity": sparsity.detach(),
    }


@pytest.mark.parametrize("cross_layer", [True, False])
@pytest.mark.parametrize("activation", ["jumprelu", "topk", "relu"])
def test_layer_at_a_time_loss_equals_the_batched_reference(activation, cross_layer):
    """The trainer's loss (one layer at a time, in cache) equals the batched form: the loss, its parts and
    every parameter's gradient (float32: they differ only in the order of additions)."""
    from interplab.sae.clt_train import _CLTTrainer

    cfg = CLTTrainConfig(
        clt=CLTConfig(n_layers=3, d_model=8, d_sae=16, activation=activation, k=4 if activation == "topk" else None,
                      cross_layer=cross_layer,
                      jumprelu_init_threshold=0.3),
        total_steps=10, batch_size=32, pre_act_coefficient=0.5,  # large: the pre-activation loss counts
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, generator=g), torch.randn(32, 3, 8, generator=g)
    thresholds = torch.rand(3, 16, generator=g) * 0.6  # near the pre-activations: the kernel is nonzero
    grads = []
    for loss_of in (_CLTTrainer.loss, reference_loss):
        trainer = _CLTTrainer(CrossLayerTranscoder(cfg.clt, seed=1), cfg)
        with torch.no_grad():
            if activation == "jumprelu":
                trainer.clt.threshold.copy_(thresholds)
        loss, parts = loss_of(trainer, x, y, step=8)
        loss.backward()
        grads.append((loss, parts, {k: p.grad for k, p in trainer.clt.named_parameters()}))
    (loss, parts, grad), (ref, ref_parts, ref_grad) = grads
    assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for key in ("mse", "err", "sparsity"):
        assert_close(parts[key], ref_parts[key], rtol=1e-5, atol=1e-6)
    for key in ("fired", "l0"):  # which latents fire: exactly the same
        assert torch.equal(parts[key], ref_parts[key]), key
    assert grad.keys() == ref_grad.keys() and all(v is not None for v in grad.values())
    for key in grad:
        assert_close(grad[key], ref_grad[key], rtol=1e-4, atol=1e-5)
    if activation == "jumprelu":
        assert ref_grad["threshold"].abs().sum() > 0


@pytest.mark.parametrize("activation", ["jumprelu", "topk"])
def test_resume_is_bit_exact(tmp_path, activation):
    model = _tiny_model()
    toks = torch.randint(0, 20, (160, 16), generator=torch.Generator().manual_seed(0))
    clt = CLTConfig(
        n_layers=2, d_model=16, d_sae=24, activation=activation, k=3 if activation == "topk" else None
    )
    cfg = _cfg(clt=clt, checkpoint_every=10)
    whole = train_clt(model, toks, cfg, tmp_path / "whole")
    part = train_clt(model, toks, cfg, tmp_path / "part", stop_after=20)
    assert part.stopped and part.steps == 20 and detect(tmp_path / "part") is Kind.CLT_TRAIN
    assert not (tmp_path / "part" / "clt").exists()
    # a checkpoint's CLT loads (scales folded in)
    assert load_clt(tmp_path / "part" / "checkpoints" / "step_000020" / "clt").cfg == whole.clt.cfg
    rest = train_clt(model, toks, cfg, tmp_path / "part")
    assert rest.resumed_from == 20 and rest.steps == 30
    for a, b in zip(whole.clt.state_dict().values(), rest.clt.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for name in ("W_enc_0.safetensors", "W_dec_0.safetensors", "cfg.json"):
        assert (tmp_path / "whole" / "clt" / name).read_bytes() == (
            tmp_path / "part" / "clt" / name
        ).read_bytes()
    rows = lambda run: [r for r in read_log(run) if "loss" in r]  # noqa: E731
    assert rows(tmp_path / "whole") == rows(tmp_path / "part")
    assert whole.history == rest.history
    with pytest.raises(ValueError, match="another run"):
        train_clt(model, toks, _cfg(clt=clt, lr=1e-3), tmp_path / "whole")


@torch.no_grad()
def test_eval_metrics_equal_hand_computations():
    model = _tiny_model(1)
    for block in model.blocks:
        block.mlp.W_out.mul_(20)  # MLPs that matter, so that replacing them changes the logits
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=16, d_sae=24, activation="relu"), seed=3)
    with torch.no_grad():
        for p in clt.parameters():
            p.mul_(3.0)
        clt.b_enc.fill_(-0.2)
    toks = torch.randint(0, 20, (3, 10), generator=torch.Generator().manual_seed(5))
    rep = evaluate_clt(model, clt, toks)
    names = [
        f"blocks.{layer}.{h}"
        for layer in range(2)
        for h in ("hook_resid_mid", "hook_mlp_out", "hook_resid_post")
    ]
    logits, cache = model.run_with_cache(toks, names=names)
    keep = torch.ones_like(toks, dtype=torch.bool)
    keep[:, 0] = False
    fvu, l0, dead, efrac, err_means = [], [], [], [], []
    acts = [
        torch.relu(cache[f"blocks.{m}.hook_resid_mid"][keep] @ clt.W_enc[m] + clt.b_enc[m]) for m in range(2)
    ]
    for m in range(2):
        y = cache[f"blocks.{m}.hook_mlp_out"][keep].double()
        recon = clt.b_dec[m] + sum(acts[s] @ clt.W_dec[s][:, m - s] for s in range(m + 1))
        e = recon.double() - y
        fvu.append(float(e.pow(2).sum() / (y - y.mean(0)).pow(2).sum()))
        l0.append(float((acts[m] > 0).sum(-1).double().mean()))
        dead.append(float((acts[m] > 0).sum(0).eq(0).double().mean()))
        resid = cache[f"blocks.{m}.hook_resid_post"][keep].double()
        err_means.append(float(e.norm(dim=-1).mean()))
        efrac.append(err_means[-1] / float(resid.norm(dim=-1).mean()))
    assert rep.tokens == 27
    assert_close(torch.tensor(rep.fvu), torch.tensor(fvu), rtol=1e-5, atol=1e-7)
    assert_close(torch.tensor(rep.l0), torch.tensor(l0))
    assert_close(torch.tensor(rep.dead_fraction), torch.tensor(dead))
    assert_close(torch.tensor(rep.error_norm_fraction), torch.tensor(efrac), rtol=1e-5, atol=1e-7)
    last_resid = float(cache["blocks.1.hook_resid_post"][keep].double().norm(dim=-1).mean())
    assert_close(rep.residual_explained, 1 - sum(err_means) / last_resid, rtol=1e-5, atol=1e-7)
    # the replacement model, built layer by layer: pass m reads resid_mid m with MLPs < m replaced
    recons: list[torch.Tensor] = []
    pre_acts: list[torch.Tensor] = []
    for m in range(3):
        hooks = [(f"blocks.{j}.hook_mlp_out", lambda a, s, r=r: r) for j, r in enumerate(recons)]
        out, c = model.run_with_cache(
            toks, names=["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"], fwd_hooks=hooks
        )
        if m == 2:
            rep_logits = out
            break
        pre_acts.append(torch.relu(c[f"blocks.{m}.hook_resid_mid"] @ clt.W_enc[m] + clt.b_enc[m]))
        recons.append(clt.b_dec[m] + sum(pre_acts[s] @ clt.W_dec[s][:, m - s] for s in range(m + 1)))
    assert_close(replacement_logits(model, clt, toks), rep_logits, rtol=1e-5, atol=1e-5)
    lp = logits[:, :-1].double().log_softmax(-1)
    lq = rep_logits[:, :-1].double().log_softmax(-1)
    tgt = toks[:, 1:]
    assert_close(rep.ce_clean, float(-lp.gather(-1, tgt[..., None]).mean()), rtol=1e-6, atol=1e-8)
    assert_close(rep.ce_replaced, float(-lq.gather(-1, tgt[..., None]).mean()), rtol=1e-5, atol=1e-6)
    assert_close(rep.kl_div, float((lp.exp() * (lp - lq)).sum(-1).mean()), rtol=1e-4, atol=1e-7)
    assert rep.kl_div > 1e-3 and rep.ce_replaced != rep.ce_clean  # the replacement did change the model


@torch.no_grad()
def test_eval_on_a_task_reads_the_losses_where_the_task_is_trained():
    """With a task's targets and loss mask the CE and KL are read at the masked positions only (by hand)."""
    model = _tiny_model(1)
    for block in model.blocks:
        block.mlp.W_out.mul_(20)
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=16, d_sae=24, activation="relu"), seed=3)
    toks = torch.randint(0, 20, (3, 10), generator=torch.Generator().manual_seed(5))
    target = torch.randint(0, 20, (3, 10), generator=torch.Generator().manual_seed(6))
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[:, 6:9] = True
    rep = evaluate_clt(model, clt, [toks], targets=[(target, mask)])
    lp = model(toks)[mask].double().log_softmax(-1)
    lq = replacement_logits(model, clt, toks)[mask].double().log_softmax(-1)
    assert_close(rep.ce_clean, float(F.nll_loss(lp, target[mask])), rtol=1e-6, atol=1e-8)
    assert_close(rep.ce_replaced, float(F.nll_loss(lq, target[mask])), rtol=1e-5, atol=1e-6)
    assert_close(rep.kl_div, float((lp.exp() * (lp - lq)).sum(-1).mean()), rtol=1e-4, atol=1e-7)
    assert rep.ce_clean != evaluate_clt(model, clt, [toks]).ce_clean
    with pytest.raises(ValueError, match="2 \\(targets, loss_mask\\) pairs for 1 token batches"):
        evaluate_clt(model, clt, [toks], targets=[(target, mask)] * 2)


def test_eval_save_and_plot(tmp_path):
    model = _tiny_model()
    clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=16, d_sae=8, activation="topk", k=2))
    rep = evaluate_clt(model, clt, torch.randint(0, 20, (2, 8)))
    rep.save(tmp_path / "e")
    data = json.loads((tmp_path / "e" / "report.json").read_text())
    assert data["kind"] == "clt_eval" and data["fvu"] == rep.fvu
    assert (tmp_path / "e" / "layers.html").is_file()
    assert "FVU" in repr(rep)


def test_a_clt_for_another_model_is_refused_naming_both():
    model = _tiny_model()
    with pytest.raises(ValueError, match=r"3 layers, d_model 16.*'tiny' \(2 layers, d_model 16\)"):
        train_clt(
            model, torch.zeros(4, 8, dtype=torch.long), _cfg(clt=CLTConfig(n_layers=3, d_model=16, d_sae=8))
        )
    other = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, d_sae=8))
    with pytest.raises(ValueError, match="d_model 8.*d_model 16"):
        evaluate_clt(model, other, torch.zeros(2, 8, dtype=torch.long))
    attn_only = _tiny_model(attn_only=True)
    with pytest.raises(ValueError, match="hook_resid_mid, which the model 'tiny'"):
        train_clt(attn_only, torch.zeros(4, 8, dtype=torch.long), _cfg())
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 0"):
        _cfg(batch_size=0)


def test_train_config_round_trips():
    cfg = _cfg(checkpoint_every=3)
    assert CLTTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.slow
def test_torchrun_data_parallel_equals_one_process(tmp_path):
    """2 CPU processes (gloo), each on half of every activation batch, end where one process ends."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    worker = ROOT / "tests" / "sae" / "clt_ddp_worker.py"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
    ]
    done = subprocess.run([*cmd, str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    ddp = load_clt(tmp_path / "ddp" / "clt")
    single = train_clt(None, clt_ddp_worker.batches(rank=0, world=1), clt_ddp_worker.CFG).clt
    for (name, p), q in zip(single.named_parameters(), ddp.parameters(), strict=True):
        assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
