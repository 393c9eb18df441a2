"""Attribution graphs of a half-precision model (docs/graphs.md "Half precision"): the bf16/fp16 forward fixes
the patterns, scales, activations and errors; the linear attribution runs in float32.

- the replacement model with errors reproduces the half-precision model's own logits up to the rounding of
  ``ln_final`` and the unembedding (a bound computed per logit from the unit roundoff), so every layer's
  rounding is held by the error terms and the ``resid_mid`` constants;
- its edges are the exact linear effects of the frozen float32 replacement model (finite differences);
- against the float32 graph of the same weights, the edges differ (relative to the largest edge) by at most
  twice what the half-precision model's logits differ from the float32 model's (relative to the largest
  logit): the graph is as faithful to float32 as the model itself is. Measured ratios on these models:
  0.3-1.5. Features active in one graph only sit at their threshold to within the rounding;
- interventions, QK attribution and ``interplab graph build --dtype``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from typer.testing import CliRunner

from interplab.cli.main import app
from interplab.graphs import AttributionGraph, Intervention, attribute, intervene, qk_attribution
from interplab.graphs.replacement import ReplacementModel
from interplab.sae.clt import save_clt
from tests.graphs.helpers import random_clt, variant_model

ARCHS = ["gpt2", "rotary_neox_rms_gated_gqa", "rotary_gptj_partial_parallel", "gemma_like", "olmo_like"]
DTYPES = [torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _models(name: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = variant_model(name)
    clt = random_clt(model, 16)
    half = copy.deepcopy(model).to(dtype)
    return half, copy.deepcopy(half).float(), clt  # the float32 model has the half model's weights


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ARCHS)
def test_with_errors_reproduces_the_half_precision_logits(name, dtype):
    half, _, clt = _models(name, dtype)
    tokens = torch.randint(0, half.cfg.d_vocab, (2, 9))
    rm = ReplacementModel(half, clt)
    run = rm.run(tokens)
    assert run.logits.dtype == run.acts.dtype == torch.float32 and run.original_logits.dtype == dtype
    # the half model rounds ln_final's output (to within u of each element) and the logits (u, then u again
    # adding b_U); the float32 linear forward does neither: per logit, |diff| <= 2u (sum_i |final_i W_U[i, v]|
    # + |b_U| + |logit|), u the unit roundoff. Everything upstream must be exact for this bound to hold.
    u = UNIT_ROUNDOFF[dtype] / 2
    lin = rm.forward(run.tokens, run.frozen, run.embed, lambda layer, _x: run.mlp_out[:, :, layer])
    W_U, b_U = rm.weight(half.W_U), rm.weight(half.unembed.b_U)
    bound = 2 * u * (lin.final.abs() @ W_U.abs() + b_U.abs() + run.logits.abs()) + 1e-5
    diff = (run.logits - run.original_logits.float()).abs()
    assert (diff <= bound).all(), float((diff / bound).max())
    torch.testing.assert_close(lin.logits, run.logits)
    torch.testing.assert_close(run.recon + run.errors, run.mlp_out)
    # the linear forward's CLT inputs are the half model's (the activations re-encode to themselves)
    torch.testing.assert_close(lin.feature_inputs, run.feature_inputs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ARCHS)
def test_graph_is_as_close_to_the_float32_graph_as_the_model_is(name, dtype):
    half, full, clt = _models(name, dtype)
    tokens = torch.randint(0, half.cfg.d_vocab, (10,))
    graph_h = attribute(half, clt, tokens, targets=[1, 2, 3])
    graph_f = attribute(full, clt, tokens, targets=[1, 2, 3])
    assert graph_h.adjacency.dtype == torch.float32
    with torch.no_grad():
        logits_h, logits_f = half(tokens[None]).float(), full(tokens[None])
    model_rel = float((logits_h - logits_f).abs().max() / logits_f.abs().max())

    def keys(graph):
        return {(n.kind, n.layer, n.position, n.feature): i for i, n in enumerate(graph.nodes)}

    kh, kf = keys(graph_h), keys(graph_f)
    common = [k for k in kf if k in kh]
    assert len(common) >= 0.97 * len(kf)
    # a feature active in one graph only is at its threshold (0) to within the rounding of its pre-activation
    run_f = ReplacementModel(full, clt).run(tokens[None])
    pre = clt.pre_acts(run_f.feature_inputs)[0].detach()
    for kind, layer, pos, feat in set(kh) ^ set(kf):
        assert kind.value == "feature"
        assert abs(float(pre[pos, layer, feat])) < 50 * UNIT_ROUNDOFF[dtype] * float(pre.abs().max())
    ih, i_f = torch.tensor([kh[k] for k in common]), torch.tensor([kf[k] for k in common])
    a, b = graph_h.adjacency[ih][:, ih], graph_f.adjacency[i_f][:, i_f]
    graph_rel = float((a - b).abs().max() / b.abs().max())
    assert graph_rel <= 2 * model_rel, (graph_rel, model_rel)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
def test_edges_are_the_linear_effects_of_the_frozen_float32_replacement(dtype):
    half, _, clt = _models("rotary_neox_rms_gated_gqa", dtype)
    tokens = torch.randint(0, half.cfg.d_vocab, (7,))
    graph = attribute(half, clt, tokens, targets=[4])
    rm = ReplacementModel(half, clt)
    run = rm.run(tokens[None])

    def readout(acts):
        recon = rm.decode(acts)
        out = rm.forward(
            run.tokens, run.frozen, run.embed, lambda m, _x: recon[:, :, m] + run.errors[:, :, m]
        )
        t = graph.targets[0]
        return out.logits[0, -1, t.token] - out.logits[0, -1].mean()

    base = readout(run.acts)
    for i in range(0, graph.n_features, max(1, graph.n_features // 6)):
        node = graph.nodes[i]
        acts = run.acts.clone()
        acts[0, node.position, node.layer, node.feature] *= 2.0  # the logit is linear in each activation
        effect = readout(acts) - base
        torch.testing.assert_close(effect, graph.adjacency[graph.logit_slice.start, i], atol=2e-5, rtol=1e-4)


def test_interventions_and_qk_attribution_in_bf16():
    half, _, clt = _models("gpt2", torch.bfloat16)
    tokens = torch.randint(0, half.cfg.d_vocab, (8,))
    graph = attribute(half, clt, tokens, targets=3)
    f = graph.nodes[0]
    for mode in ("replacement", "model"):
        same = intervene(
            half,
            clt,
            tokens,
            [Intervention(f.layer, f.position, f.feature, scale=1.0)],
            mode=mode,
            graph=graph,
        )
        torch.testing.assert_close(same.after, same.before, atol=1e-5, rtol=0)
    small = intervene(
        half, clt, tokens, [Intervention(f.layer, f.position, f.feature, scale=1.01)], graph=graph
    )
    torch.testing.assert_close(small.actual, small.predicted, atol=1e-4, rtol=0.05)
    qk = qk_attribution(half, clt, tokens, layer=1, head=1, query_pos=7, key_pos=3, graph=graph)
    # the parts sum (in float32) to the bf16 model's score up to its bf16 rounding of q, k and the score
    torch.testing.assert_close(qk.total, torch.tensor(qk.score), atol=0.05, rtol=2 * 2.0**-8)


def test_cli_builds_a_bf16_graph(tmp_path):
    half, _, clt = _models("gpt2", torch.float32)  # stored in float32, loaded in bf16 by --dtype
    half.save(tmp_path / "model")
    save_clt(clt, tmp_path / "clt")
    out = tmp_path / "g"
    args = ["graph", "build", "--model", tmp_path / "model", "--clt", tmp_path / "clt"]
    args += ["--tokens", "1,5,7,3,9", "--targets", "2", "--out", out, "--dtype", "bf16"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    graph = AttributionGraph.load(out)
    assert graph.meta["model_dtype"] == "bfloat16" and graph.adjacency.dtype == torch.float32
    args = ["graph", "intervene", "--model", tmp_path / "model", "--clt", tmp_path / "clt", "--graph", out]
    args += [
        "--set",
        f"{graph.nodes[0].layer}:{graph.nodes[0].position}:{graph.nodes[0].feature}*1",
        "--dtype",
        "bf16",
    ]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    bad = CliRunner().invoke(app, [str(a) for a in args[:-1]] + ["int8"])
    assert bad.exit_code != 0 and "int8" in bad.output


def test_a_weight_edited_between_runs_is_read_again():
    # the float32 copies of a half model's weights are cached: an edit (in place under no_grad, which bumps the
    # version counter, or through .data, which does not) must reach the next run as a fresh model's would
    half, _, clt = _models("gpt2", torch.bfloat16)
    tokens = torch.randint(0, half.cfg.d_vocab, (1, 7))
    rm = ReplacementModel(half, clt)
    rm.run(tokens)
    for edit in ("no_grad", "data"):
        with torch.no_grad():
            if edit == "no_grad":
                half.blocks[0].attn.W_O.mul_(-1.5)
            else:
                half.unembed.W_U.data.mul_(0.5)
        edited = rm.run(tokens)
        fresh = ReplacementModel(half, clt).run(tokens)
        torch.testing.assert_close(edited.logits, fresh.logits, rtol=0, atol=0)
        torch.testing.assert_close(rm.weight(half.W_U), half.W_U.float(), rtol=0, atol=0)
