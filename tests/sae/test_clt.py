"""The cross-layer transcoder: config, decoder layout, encode/decode against per-layer loops, per-layer
transcoders from interplab SAEs, files (bit-exact round trip, circuit-tracer's layout), bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from interplab.model import ModelConfig, Transformer
from interplab.runs import Kind, RunError, detect
from interplab.sae import SAEConfig, create_sae
from interplab.sae.clt import (
    CLTActivation,
    CLTConfig,
    CrossLayerTranscoder,
    from_transcoders,
    load_clt,
    save_clt,
)

ACTS = [("jumprelu", None), ("topk", 3), ("relu", None)]


def _clt(activation: str = "jumprelu", k: int | None = None, cross_layer: bool = True, seed: int = 0):
    cfg = CLTConfig(n_layers=3, d_model=8, d_sae=12, activation=activation, k=k, cross_layer=cross_layer)
    clt = CrossLayerTranscoder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # non-trivial biases and thresholds, so every term is tested
        for p in clt.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        if activation == "jumprelu":
            clt.threshold.abs_()
    return clt


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="hook_resid_post"):
        CLTConfig(n_layers=2, d_model=4, d_sae=8, hook_in="blocks.{layer}.hook_resid_post")
    with pytest.raises(ValueError, match="k must be an int .* got None"):
        CLTConfig(n_layers=2, d_model=4, d_sae=8, activation="topk")
    with pytest.raises(ValueError, match="k is only for topk, got k=4"):
        CLTConfig(n_layers=2, d_model=4, d_sae=8, k=4)
    with pytest.raises(ValueError, match="d_sae must be a positive int, got 0"):
        CLTConfig(n_layers=2, d_model=4, d_sae=0)
    with pytest.raises(ValueError, match="activation 'gelu' is unknown"):
        CLTConfig(n_layers=2, d_model=4, d_sae=8, activation="gelu")
    cfg = CLTConfig(n_layers=2, d_model=4, d_sae=8, hook_in="ln2.hook_normalized", activation="TOPK", k=2)
    assert cfg.hook_in == "blocks.{layer}.ln2.hook_normalized"
    assert cfg.hook_in_at(1) == "blocks.1.ln2.hook_normalized"
    assert cfg.activation is CLTActivation.TOPK
    assert CLTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown CLTConfig fields"):
        CLTConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_shapes_and_decoder_layout_on_hand_set_weights():
    cfg = CLTConfig(n_layers=3, d_model=2, d_sae=1, activation="relu")
    clt = CrossLayerTranscoder(cfg)
    assert [tuple(w.shape) for w in clt.W_dec] == [(1, 3, 2), (1, 2, 2), (1, 1, 2)]
    assert tuple(clt.W_enc.shape) == (3, 2, 1) and tuple(clt.b_dec.shape) == (3, 2)
    with torch.no_grad():
        for src in range(3):
            for j in range(3 - src):
                clt.W_dec[src][0, j] = torch.tensor([10.0 * src + (src + j), 1.0])
        clt.b_dec.zero_()
    for src in range(3):
        for dst in range(src, 3):
            torch.testing.assert_close(clt.decoder(src, dst), torch.tensor([[10.0 * src + dst, 1.0]]))
    with pytest.raises(ValueError, match="no decoder from layer 2 to layer 1"):
        clt.decoder(2, 1)
    acts = torch.tensor([[[1.0], [2.0], [3.0]]])  # [batch 1, layers 3, d_sae 1]
    recon = clt.decode(acts)
    # recon[m] = sum over src <= m of acts[src] * (10 src + m, 1)
    want = torch.tensor([[[0.0, 1.0], [1 + 2 * 11, 3.0], [2 + 2 * 12 + 3 * 22, 6.0]]])
    torch.testing.assert_close(recon, want)
    per_layer = CrossLayerTranscoder(cfg.replace(cross_layer=False))
    assert [tuple(w.shape) for w in per_layer.W_dec] == [(1, 1, 2)] * 3
    with pytest.raises(ValueError, match="per-layer"):
        per_layer.decoder(0, 1)


@pytest.mark.parametrize("activation,k", ACTS)
@pytest.mark.parametrize("cross_layer", [True, False])
def test_encode_decode_equal_a_per_layer_loop(activation, k, cross_layer):
    clt = _clt(activation, k, cross_layer)
    x = torch.randn(4, 5, 3, 8, generator=torch.Generator().manual_seed(3))
    out = clt(x)
    assert out.acts.shape == (4, 5, 3, 12) and out.recon.shape == (4, 5, 3, 8)
    for layer in range(3):
        torch.testing.assert_close(out.acts[..., layer, :], clt.encode_layer(layer, x[..., layer, :]))
        pre = x[..., layer, :] @ clt.W_enc[layer] + clt.b_enc[layer]
        torch.testing.assert_close(clt.pre_acts(x)[..., layer, :], pre)
    if activation == "topk":
        assert int((out.acts != 0).sum(-1).max()) <= k
    if activation == "jumprelu":
        assert bool(((out.acts == 0) | (clt.pre_acts(x) > clt.threshold)).all())
    for dst in range(3):
        want = clt.b_dec[dst].expand(4, 5, 8)
        for src in range(dst + 1) if cross_layer else (dst,):
            want = want + out.acts[..., src, :] @ clt.decoder(src, dst)
        torch.testing.assert_close(out.recon[..., dst, :], want)
        torch.testing.assert_close(clt.decode_layer(out.acts, dst), want)
    with pytest.raises(ValueError, match=r"n_layers=3, 8\], got shape \(4, 8\)"):
        clt(torch.randn(4, 8))


@pytest.mark.parametrize("arch,k", [("jumprelu", None), ("topk", 3), ("relu", None)])
def test_from_transcoders_equals_the_saes_exactly(arch, k):
    saes = []
    for layer in range(3):
        cfg = SAEConfig(
            d_in=8,
            d_sae=12,
            architecture=arch,
            k=k,
            hook_name=f"blocks.{layer}.ln2.hook_normalized",
            hook_name_out=f"blocks.{layer}.hook_mlp_out",
        )
        sae = create_sae(cfg, seed=layer)
        with torch.no_grad():
            sae.b_enc.normal_(0, 0.3)
            sae.b_dec.normal_(0, 0.3)
            if arch == "jumprelu":
                sae.threshold.uniform_(0, 0.3)
        saes.append(sae)
    clt = from_transcoders(saes)
    assert not clt.cfg.cross_layer and clt.cfg.hook_in == "blocks.{layer}.ln2.hook_normalized"
    x = torch.randn(6, 3, 8, generator=torch.Generator().manual_seed(0))
    out = clt(x)
    for layer, sae in enumerate(saes):
        ref = sae(x[:, layer])
        assert torch.equal(out.acts[:, layer], ref.feature_acts)
        assert torch.equal(out.recon[:, layer], ref.reconstruction)
    with pytest.raises(ValueError, match="not a transcoder"):
        from_transcoders([create_sae(SAEConfig(d_in=8, d_sae=12, hook_name="blocks.0.hook_resid_mid"))])
    with pytest.raises(ValueError, match="one transcoder per layer, in layer order"):
        from_transcoders(saes[::-1])


@pytest.mark.parametrize("activation,k", ACTS)
@pytest.mark.parametrize("cross_layer", [True, False])
def test_save_load_round_trip_is_bit_exact(tmp_path, activation, k, cross_layer):
    clt = _clt(activation, k, cross_layer)
    save_clt(clt, tmp_path / "c")
    back = load_clt(tmp_path / "c")
    assert back.cfg == clt.cfg
    sd, sd2 = clt.state_dict(), back.state_dict()
    assert list(sd) == list(sd2)
    for key in sd:
        assert torch.equal(sd[key], sd2[key]), key
    x = torch.randn(5, 3, 8)
    assert torch.equal(clt(x).recon, back(x).recon)
    assert detect(tmp_path / "c") is Kind.CLT
    save_clt(back, tmp_path / "c")  # saving over an existing CLT replaces it whole
    assert not list(tmp_path.glob(".c.*"))


def test_files_are_circuit_tracers_layout(tmp_path):
    clt = _clt("jumprelu")
    save_clt(clt, tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "cfg.json").read_text())
    assert cfg["kind"] == "clt" and cfg["feature_input_hook"] == "hook_resid_mid"
    assert cfg["feature_output_hook"] == "hook_mlp_out" and cfg["model_kind"] == "cross_layer_transcoder"
    enc = load_file(str(tmp_path / "c" / "W_enc_1.safetensors"))
    dec = load_file(str(tmp_path / "c" / "W_dec_1.safetensors"))
    assert torch.equal(enc["W_enc_1"], clt.W_enc[1].T) and enc["W_enc_1"].shape == (12, 8)
    assert set(enc) == {"W_enc_1", "b_enc_1", "b_dec_1", "threshold_1"}
    assert dec["W_dec_1"].shape == (12, 2, 8)
    plt = _clt("jumprelu", cross_layer=False)
    save_clt(plt, tmp_path / "p")
    layer = load_file(str(tmp_path / "p" / "layer_2.safetensors"))
    assert set(layer) == {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold"}
    assert torch.equal(layer["W_dec"], plt.W_dec[2][:, 0])


def test_load_refuses_damaged_or_foreign_folders(tmp_path):
    save_clt(_clt(), tmp_path / "c")
    (tmp_path / "c" / "W_dec_0.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="W_dec_0.safetensors is corrupt or truncated"):
        load_clt(tmp_path / "c")
    (tmp_path / "x").mkdir()
    with pytest.raises(RunError, match="not a CLT folder"):
        load_clt(tmp_path / "x")


def test_check_model_names_both_shapes_and_hooks():
    model = Transformer(ModelConfig(d_model=8, n_layers=2, n_heads=2, d_vocab=10, n_ctx=8, name="tiny"))
    CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, d_sae=4)).check_model(model)
    with pytest.raises(ValueError, match=r"3 layers, d_model 8.*'tiny' \(2 layers, d_model 8\)"):
        _clt().check_model(model)
    wide = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=16, d_sae=4))
    with pytest.raises(ValueError, match="d_model 16.*d_model 8"):
        wide.check_model(model)
    attn_only = Transformer(
        ModelConfig(d_model=8, n_layers=2, n_heads=2, d_vocab=10, n_ctx=8, attn_only=True)
    )
    with pytest.raises(ValueError, match="hook_resid_mid, which the model"):
        CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, d_sae=4)).check_model(attn_only)


def test_repr():
    clt = _clt("topk", 3)
    assert "k=3" in repr(clt) and "hook_resid_mid" in repr(clt)
    assert "36 latents" in clt._repr_html_()


@pytest.mark.parametrize("cross_layer", [True, False])
def test_loading_negative_jumprelu_thresholds_warns_where_graphs_differ(tmp_path, cross_layer, recwarn):
    clt = _clt("jumprelu", cross_layer=cross_layer)
    save_clt(clt, tmp_path / "ok")
    load_clt(tmp_path / "ok")
    assert not [w for w in recwarn if "threshold" in str(w.message)]
    with torch.no_grad():
        clt.threshold[1, :5] = -0.1
    save_clt(clt, tmp_path / "neg")
    with pytest.warns(UserWarning, match=r"5 of 36 JumpReLU thresholds are negative \(layers \[1\]\)"):
        back = load_clt(tmp_path / "neg")
    assert torch.equal(back.threshold, clt.threshold)  # read as they are, only flagged
