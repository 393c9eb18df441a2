"""Cross-layer transcoders (CLTs) and per-layer transcoders as one family: an encoder per layer reading the
residual stream before the MLP (``hook_in``, ``resid_mid`` by default) and decoders from each layer's latents
to the output of its own MLP and of every later one (``hook_out``, ``hook_mlp_out``)::

    pre[l]   = x[l] @ W_enc[l] + b_enc[l]                       [..., d_sae]   (x[l]: layer l's hook_in)
    acts[l]  = activation(pre[l])                               JumpReLU, TopK (per layer and token) or ReLU
    recon[m] = sum over l <= m of acts[l] @ W_dec[l][:, m - l] + b_dec[m]       (layer m's MLP output)

``cross_layer=False`` keeps only the decoder into the own layer (``W_dec[l]: [d_sae, 1, d_model]``): a set of
per-layer transcoders, which is what `from_transcoders` builds from interplab's transcoder SAEs, so everything
downstream (`interplab.graphs`) takes either. The weights have circuit-tracer's in-memory layout (``W_dec`` a
ParameterList of ``[d_sae, n_layers - l, d_model]``) except ``W_enc``, kept ``[n_layers, d_model, d_sae]`` as
SAELens' ``[d_in, d_sae]``; `save_clt` writes circuit-tracer 0.5's file layout too (``W_enc_{l}`` transposed).

>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=2, d_model=8, d_sae=16, activation="topk", k=2))
>>> clt(torch.randn(3, 2, 8)).recon.shape
torch.Size([3, 2, 8])
"""

from __future__ import annotations

import dataclasses
import html
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.hooks import Site, SiteKind
from interplab.integrity import record_checksums, verify_checksums
from interplab.io import load_tensors, save_tensors
from interplab.runs import Kind, RunError, read_json, write_json
from interplab.runs.names import CLT_CFG
from interplab.sae.architectures.jumprelu import _JumpReLU
from interplab.sae.base import SAE
from interplab.sae.config import Architecture, DType

if TYPE_CHECKING:
    from interplab.model import Transformer

CLT_CONFIG_VERSION = 1
#: the weight files of a CLT folder, beside its cfg.json (`interplab.runs.names.CLT_CFG`): circuit-tracer 0.5's
CLT_ENC = "W_enc_{layer}.safetensors"
CLT_DEC = "W_dec_{layer}.safetensors"
PLT_FILE = "layer_{layer}.safetensors"
#: hook sites a CLT may read (``hook_in``) and reconstruct (``hook_out``), as ``blocks.{layer}.<site>``
IN_SITES = (SiteKind.RESID_MID, SiteKind.LN2_NORMALIZED, SiteKind.MLP_IN)
OUT_SITES = (SiteKind.MLP_OUT,)


class CLTActivation(str, Enum):
    """The latent non-linearity of a CLT."""

    JUMPRELU = "jumprelu"  # ReLU(z) * (z > threshold), trained through straight-through estimators
    TOPK = "topk"  # the k largest pre-activations per layer and token (ReLU'd)
    RELU = "relu"  # plain ReLU (what `from_transcoders` gives a ReLU transcoder)


@dataclass(frozen=True, kw_only=True)
class CLTConfig:
    """Shape and forward pass of a cross-layer (or per-layer) transcoder; JSON round trip with a version."""

    n_layers: int
    """number of layers (one encoder per layer; the model's n_layers)"""
    d_model: int
    """width of every layer's ``hook_in`` and ``hook_out`` (the model's d_model)"""
    d_sae: int
    """latents per layer (the CLT has n_layers * d_sae latents in all)"""
    activation: CLTActivation = CLTActivation.JUMPRELU
    """the latent non-linearity (see `CLTActivation`)"""
    k: int | None = None
    """active latents per layer and token for TopK (required there, must be None elsewhere)"""
    cross_layer: bool = True
    """True: layer l's latents write into every MLP output m >= l; False: per-layer transcoders (own layer)"""
    hook_in: str = "blocks.{layer}.hook_resid_mid"
    """the site each encoder reads, with ``{layer}``: hook_resid_mid, ln2.hook_normalized or hook_mlp_in"""
    hook_out: str = "blocks.{layer}.hook_mlp_out"
    """the site each layer's reconstruction replaces, with ``{layer}`` (the MLP output)"""
    jumprelu_bandwidth: float = 0.1
    """width of the rectangle kernel of JumpReLU's straight-through estimators (circuit-tracer's 0.1)"""
    jumprelu_init_threshold: float = 0.03
    """initial JumpReLU threshold (inputs are trained at unit mean square per dimension)"""
    dtype: DType = DType.FLOAT32
    """dtype of the stored weights"""
    model_name: str | None = None
    """the model the CLT was trained on (informational; shapes and hooks are what is checked)"""
    version: int = CLT_CONFIG_VERSION
    """config format version"""

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        for name in ("n_layers", "d_model", "d_sae"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"CLTConfig.{name} must be a positive int, got {value!r}")
        try:
            set_("activation", CLTActivation(str(getattr(self.activation, "value", self.activation)).lower()))
        except ValueError:
            valid = ", ".join(a.value for a in CLTActivation)
            raise ValueError(f"CLTConfig.activation {self.activation!r} is unknown; valid: {valid}") from None
        set_("dtype", DType(self.dtype))
        if self.activation is CLTActivation.TOPK:
            if type(self.k) is not int or not 0 < self.k <= self.d_sae:
                raise ValueError(
                    f"CLTConfig.k must be an int in 1..d_sae={self.d_sae} for topk, got {self.k!r}"
                )
        elif self.k is not None:
            raise ValueError(f"CLTConfig.k is only for topk, got k={self.k!r} with {self.activation.value}")
        if not self.jumprelu_bandwidth > 0:
            raise ValueError(f"CLTConfig.jumprelu_bandwidth must be > 0, got {self.jumprelu_bandwidth}")
        if not self.jumprelu_init_threshold >= 0:
            raise ValueError(
                f"CLTConfig.jumprelu_init_threshold must be >= 0, got {self.jumprelu_init_threshold}"
            )
        if self.version > CLT_CONFIG_VERSION:
            raise ValueError(
                f"CLTConfig.version {self.version} was written by a newer interplab (this one reads up to "
                f"{CLT_CONFIG_VERSION}): upgrade interplab"
            )
        set_("hook_in", _template(self.hook_in, "hook_in", IN_SITES))
        set_("hook_out", _template(self.hook_out, "hook_out", OUT_SITES))

    def hook_in_at(self, layer: int) -> str:
        """The canonical site layer ``layer``'s encoder reads (``blocks.1.hook_resid_mid``)."""
        return self.hook_in.format(layer=self._layer(layer))

    def hook_out_at(self, layer: int) -> str:
        """The canonical site layer ``layer``'s reconstruction replaces (``blocks.1.hook_mlp_out``)."""
        return self.hook_out.format(layer=self._layer(layer))

    @property
    def hooks_in(self) -> list[str]:
        return [self.hook_in_at(layer) for layer in range(self.n_layers)]

    @property
    def hooks_out(self) -> list[str]:
        return [self.hook_out_at(layer) for layer in range(self.n_layers)]

    def _layer(self, layer: int) -> int:
        if type(layer) is not int or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an int in 0..{self.n_layers - 1}, got {layer!r}")
        return layer

    def n_out(self, layer: int) -> int:
        """How many MLP outputs layer ``layer``'s latents write (n_layers - layer, or 1 per-layer)."""
        return self.n_layers - self._layer(layer) if self.cross_layer else 1

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        return {k: v.value if isinstance(v, Enum) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown CLTConfig fields {unknown}; valid: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> CLTConfig:
        return dataclasses.replace(self, **changes)


def _template(value: str, name: str, kinds: Sequence[SiteKind]) -> str:
    """``value`` as ``blocks.{layer}.<site>`` with a canonical site (a short name like ``hook_resid_mid`` or
    ``resid_mid`` is accepted), refusing a site that is not one of ``kinds``."""
    valid = ", ".join(k.value for k in kinds)
    try:
        site = Site.parse(value.format(layer=0)) if "{layer}" in value else Site.parse(value, layer=0)
    except (ValueError, KeyError, IndexError):
        site = None
    if site is None or site.kind not in kinds:
        raise ValueError(f"CLTConfig.{name} {value!r} is not a per-layer site the CLT takes; valid: {valid}")
    return "blocks.{layer}." + site.kind.value


@dataclass(frozen=True)
class CLTOutput:
    """What `CrossLayerTranscoder.forward` returns."""

    acts: Float[Tensor, "... n_layers d_sae"]
    """latent activations of every layer"""
    recon: Float[Tensor, "... n_layers d_model"]
    """the reconstruction of every layer's MLP output"""


class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder (or, with ``cfg.cross_layer=False``, a set of per-layer transcoders); see the
    module docstring for the forward pass. Parameters: ``W_enc [n_layers, d_model, d_sae]``, ``b_enc
    [n_layers, d_sae]``, ``threshold [n_layers, d_sae]`` (JumpReLU only), ``W_dec`` (ParameterList, ``W_dec[l]:
    [d_sae, n_out(l), d_model]``), ``b_dec [n_layers, d_model]``. The initial weights come from a generator
    seeded with ``seed`` (never the global RNG)."""

    threshold: Tensor  # JumpReLU: [n_layers, d_sae] parameter; others: an empty buffer

    def __init__(self, cfg: CLTConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        L, D, S = cfg.n_layers, cfg.d_model, cfg.d_sae
        dt = cfg.dtype.torch
        self.W_enc = nn.Parameter(torch.empty(L, D, S, dtype=dt))
        self.b_enc = nn.Parameter(torch.zeros(L, S, dtype=dt))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(S, cfg.n_out(layer), D, dtype=dt)) for layer in range(L)]
        )
        self.b_dec = nn.Parameter(torch.zeros(L, D, dtype=dt))
        if cfg.activation is CLTActivation.JUMPRELU:
            self.threshold = nn.Parameter(torch.full((L, S), cfg.jumprelu_init_threshold, dtype=dt))
        else:
            self.register_buffer("threshold", torch.zeros(0, dtype=dt))
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Random unit encoder directions per layer; each latent's decoder starts along its encoder direction
        in every layer it writes, its concatenated decoder norm 1 (TopK) or 0.1 (the others, whose sparsity
        penalty grows with the decoder norm)."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.cfg
        for layer in range(cfg.n_layers):
            w = torch.randn(cfg.d_sae, cfg.d_model, generator=g)
            w = w / w.norm(dim=-1, keepdim=True)
            self.W_enc[layer].copy_(w.T)
            n_out = cfg.n_out(layer)
            scale = (1.0 if cfg.activation is CLTActivation.TOPK else 0.1) / n_out**0.5
            self.W_dec[layer].copy_(w[:, None, :].expand(-1, n_out, -1) * scale)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if cfg.activation is CLTActivation.JUMPRELU:
            self.threshold.fill_(cfg.jumprelu_init_threshold)

    # ---- the forward pass ----------------------------------------------------------------------
    def _check(self, x: Tensor, what: str, width: int) -> None:
        L = self.cfg.n_layers
        if x.ndim < 2 or x.shape[-2] != L or x.shape[-1] != width:
            raise ValueError(f"{what} expects [..., n_layers={L}, {width}], got shape {tuple(x.shape)}")

    def pre_acts(self, x: Float[Tensor, "... n_layers d_model"]) -> Float[Tensor, "... n_layers d_sae"]:
        """Encoder pre-activations of every layer (b_enc included)."""
        self._check(x, "pre_acts", self.cfg.d_model)
        x = x.to(self.W_enc.dtype)
        return torch.einsum("...ld,lds->...ls", x, self.W_enc) + self.b_enc

    def activation(self, pre: Tensor, layer: int | None = None) -> Tensor:
        """The non-linearity on pre-activations of every layer ``[..., n_layers, d_sae]``, or of one layer
        ``[..., d_sae]`` when ``layer`` is given."""
        act = self.cfg.activation
        if act is CLTActivation.RELU:
            return pre.relu()
        if act is CLTActivation.TOPK:
            assert self.cfg.k is not None  # CLTConfig requires k for topk
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        t = self.threshold if layer is None else self.threshold[layer]
        return pre.relu() * (pre > t.to(pre.dtype)).to(pre.dtype)

    def encode(self, x: Float[Tensor, "... n_layers d_model"]) -> Float[Tensor, "... n_layers d_sae"]:
        """Latent activations of every layer from every layer's ``hook_in``."""
        return self.activation(self.pre_acts(x))

    def encode_layer(self, layer: int, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        """Latent activations of layer ``layer`` alone, from its ``hook_in`` ``x``."""
        self.cfg._layer(layer)
        if x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"encode_layer expects [..., d_model={self.cfg.d_model}], got shape {tuple(x.shape)}"
            )
        x = x.to(self.W_enc.dtype)
        return self.activation(x @ self.W_enc[layer] + self.b_enc[layer], layer)

    def decoder(self, src: int, dst: int) -> Float[Tensor, "d_sae d_model"]:
        """The decoder from layer ``src``'s latents into layer ``dst``'s MLP output (``dst >= src``; only
        ``dst == src`` for per-layer transcoders)."""
        self.cfg._layer(src)
        self.cfg._layer(dst)
        if dst < src or (not self.cfg.cross_layer and dst != src):
            what = "dst >= src" if self.cfg.cross_layer else "dst == src (per-layer transcoders)"
            raise ValueError(f"no decoder from layer {src} to layer {dst}: need {what}")
        return self.W_dec[src][:, dst - src]

    def decode_layer(
        self, acts: Float[Tensor, "... n_layers d_sae"], dst: int
    ) -> Float[Tensor, "... d_model"]:
        """Layer ``dst``'s reconstruction from the activations of every layer (only those <= dst are read)."""
        srcs = range(dst + 1) if self.cfg.cross_layer else (dst,)
        out = self.b_dec[dst].to(acts.dtype).expand(*acts.shape[:-2], -1)
        for src in srcs:
            out = out + acts[..., src, :] @ self.decoder(src, dst).to(acts.dtype)
        return out

    def decode(self, acts: Float[Tensor, "... n_layers d_sae"]) -> Float[Tensor, "... n_layers d_model"]:
        """The reconstruction of every layer's MLP output: one matmul per source layer."""
        self._check(acts, "decode", self.cfg.d_sae)
        cfg = self.cfg
        out = self.b_dec.to(acts.dtype).expand(*acts.shape[:-2], -1, -1).clone()
        for src in range(cfg.n_layers):
            n_out = cfg.n_out(src)
            w = self.W_dec[src].to(acts.dtype).reshape(cfg.d_sae, n_out * cfg.d_model)
            contrib = (acts[..., src, :] @ w).unflatten(-1, (n_out, cfg.d_model))
            out[..., src : src + n_out, :] += contrib
        return out

    def forward(self, x: Float[Tensor, "... n_layers d_model"]) -> CLTOutput:
        acts = self.encode(x)
        return CLTOutput(acts=acts, recon=self.decode(acts))

    # ---- helpers -------------------------------------------------------------------------------
    def decoder_norms(self) -> Float[Tensor, "n_layers d_sae"]:
        """Each latent's concatenated decoder norm (over every layer it writes)."""
        return torch.stack([w.pow(2).sum((1, 2)).sqrt() for w in self.W_dec])

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale each latent's concatenated decoder to unit norm."""
        for w in self.W_dec:
            w.div_(w.pow(2).sum((1, 2), keepdim=True).sqrt().clamp_min(1e-8))

    @torch.no_grad()
    def fold_scales(self, scale_in: Tensor, scale_out: Tensor) -> None:
        """Fold per-layer input and output scales into the weights, in place: a CLT trained on ``x * scale_in``
        towards ``y * scale_out`` becomes one that reads x and reconstructs y. Exact (bit for bit) when the
        scales are powers of two, as the trainer's are."""
        for layer in range(self.cfg.n_layers):
            self.W_enc[layer].mul_(scale_in[layer].to(self.W_enc.dtype))
            out = scale_out[layer : layer + self.cfg.n_out(layer)].to(self.W_enc.dtype)
            self.W_dec[layer].div_(out[None, :, None])
        self.b_dec.div_(scale_out.to(self.b_dec.dtype)[:, None])

    def check_model(self, model: Transformer, what: str = "the CLT") -> None:
        """Raise naming both when the CLT does not fit ``model``: its layer count, width or hook sites."""
        check_fits(self.cfg, model, what)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def __repr__(self) -> str:
        c = self.cfg
        kind = "CrossLayerTranscoder" if c.cross_layer else "CrossLayerTranscoder(per-layer)"
        k = f", k={c.k}" if c.k else ""
        return (
            f"{kind}(n_layers={c.n_layers}, d_model={c.d_model}, d_sae={c.d_sae}, {c.activation.value}{k}, "
            f"{c.hook_in} -> {c.hook_out})"
        )

    def _repr_html_(self) -> str:
        c = self.cfg
        rows = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
            for k, v in c.to_dict().items()
        )
        n_params = sum(p.numel() for p in self.parameters())
        return (
            f"<div><b>{html.escape(repr(self))}</b><br>{c.n_layers * c.d_sae:,} latents, {n_params:,} "
            f"parameters<table>{rows}</table></div>"
        )


def check_fits(cfg: CLTConfig, model: Transformer, what: str = "the CLT") -> None:
    """Raise naming both when a CLT of config ``cfg`` does not fit ``model``: layer count, width or hooks."""
    mc = model.cfg
    ours = f"{what} ({cfg.n_layers} layers, d_model {cfg.d_model}, hook_in {cfg.hook_in})"
    name = f" {mc.name!r}" if getattr(mc, "name", None) else ""
    theirs = f"the model{name} ({mc.n_layers} layers, d_model {mc.d_model})"
    if mc.n_layers != cfg.n_layers or mc.d_model != cfg.d_model:
        raise ValueError(f"{ours} does not fit {theirs}: it was trained on another model's shape")
    for hook in (*cfg.hooks_in, *cfg.hooks_out):
        if hook not in model.hook_points:
            raise ValueError(f"{ours} reads or writes {hook}, which {theirs} does not have")


# ---- per-layer transcoders --------------------------------------------------------------------------------
_ACT_OF_ARCH = {
    Architecture.JUMPRELU: CLTActivation.JUMPRELU,
    Architecture.BATCHTOPK: CLTActivation.JUMPRELU,
    Architecture.MATRYOSHKA: CLTActivation.JUMPRELU,  # BatchTopK encodes as JumpReLU at inference
    Architecture.TOPK: CLTActivation.TOPK,
    Architecture.RELU: CLTActivation.RELU,
}


@torch.no_grad()
def from_transcoders(saes: Sequence[SAE], *, model_name: str | None = None) -> CrossLayerTranscoder:
    """Wrap per-layer interplab transcoders (SAEs with ``hook_name_out``, one per layer 0..n-1 in order) as a
    ``cross_layer=False`` CLT that encodes and decodes exactly as they do (their input scale folded in)."""
    saes = list(saes)
    if not saes:
        raise ValueError("from_transcoders needs one transcoder per layer, got none")
    first = saes[0].cfg
    arch = first.architecture
    if arch not in _ACT_OF_ARCH:
        raise ValueError(
            f"from_transcoders takes {sorted(a.value for a in _ACT_OF_ARCH)} SAEs, got {arch.value}"
        )
    sites_in, sites_out = [], []
    for i, sae in enumerate(saes):
        c = sae.cfg
        if not c.is_transcoder:
            raise ValueError(f"SAE {i} ({c.hook_name}) is not a transcoder (no hook_name_out)")
        if (c.architecture, c.d_in, c.d_sae, c.k) != (arch, first.d_in, first.d_sae, first.k):
            raise ValueError(
                f"transcoder {i} is {c.architecture.value} d_in={c.d_in} d_sae={c.d_sae} k={c.k}; transcoder 0 is "
                f"{arch.value} d_in={first.d_in} d_sae={first.d_sae} k={first.k}: they must all be alike"
            )
        s_in, s_out = Site.parse(c.hook_name), Site.parse(c.hook_name_out or "")
        if s_in.layer != i or s_out.layer != i:
            raise ValueError(
                f"transcoder {i} reads {c.hook_name} and writes {c.hook_name_out}: give one transcoder per "
                "layer, in layer order"
            )
        sites_in.append(s_in.kind)
        sites_out.append(s_out.kind)
    if len(set(sites_in)) > 1 or len(set(sites_out)) > 1:
        raise ValueError("the transcoders must all read the same site and write the same site of their layer")
    cfg = CLTConfig(
        n_layers=len(saes),
        d_model=first.d_in,
        d_sae=first.d_sae,
        activation=_ACT_OF_ARCH[arch],
        k=first.k if arch is Architecture.TOPK else None,
        cross_layer=False,
        hook_in="blocks.{layer}." + sites_in[0].value,
        hook_out="blocks.{layer}." + sites_out[0].value,
        jumprelu_bandwidth=first.jumprelu_bandwidth,
        jumprelu_init_threshold=first.jumprelu_init_threshold,
        dtype=first.dtype,
        model_name=model_name or first.model_name,
    )
    clt = CrossLayerTranscoder(cfg)
    for layer, sae in enumerate(saes):
        s = sae.act_scale.to(sae.W_enc.dtype)
        # the SAE computes ((x * s) @ W_enc + b_enc) and (acts @ W_dec + b_dec) / s: the same numbers are
        # x * s first (kept as a multiplication of the input by the scale when s != 1, see encode_layer)
        clt.W_enc[layer].copy_(sae.W_enc * s if float(s) != 1.0 else sae.W_enc)
        clt.b_enc[layer].copy_(sae.b_enc)
        clt.W_dec[layer][:, 0].copy_(sae.W_dec / s if float(s) != 1.0 else sae.W_dec)
        clt.b_dec[layer].copy_(sae.b_dec / s if float(s) != 1.0 else sae.b_dec)
        if cfg.activation is CLTActivation.JUMPRELU:
            thr = cast(Tensor, sae.threshold).to(clt.threshold.dtype)
            clt.threshold[layer].copy_(thr.expand(cfg.d_sae))
    warn_negative_thresholds(clt, "the transcoders given")
    return clt


def warn_negative_thresholds(clt: CrossLayerTranscoder, where: object) -> int:
    """Warn (and return how many) where a JumpReLU CLT has negative thresholds: interplab's JumpReLU is
    ``ReLU(pre) * (pre > threshold)`` (as SAELens), so pre-activations in ``(threshold, 0]`` are inactive,
    where circuit-tracer 0.5's ``pre * (pre > threshold)`` keeps them as active features with negative
    activations: graphs of such a CLT differ from circuit-tracer's in exactly those (docs/graphs.md).
    interplab's training keeps thresholds >= 0; files trained elsewhere may not."""
    if clt.cfg.activation is not CLTActivation.JUMPRELU:
        return 0
    negative = int((clt.threshold.detach() < 0).sum())
    if negative:
        layers = sorted({int(i) for i in (clt.threshold.detach() < 0).nonzero()[:, 0]})
        warnings.warn(
            f"{where}: {negative} of {clt.threshold.numel()} JumpReLU thresholds are negative (layers "
            f"{layers}); interplab computes ReLU(pre) * (pre > threshold), so pre-activations in "
            "(threshold, 0] are inactive here but active (negative) in circuit-tracer 0.5: graphs differ in "
            "exactly those features (docs/graphs.md, parity with circuit-tracer)",
            stacklevel=3,
        )
    return negative


# ---- files ------------------------------------------------------------------------------------------------
def _weights(clt: CrossLayerTranscoder) -> dict[str, dict[str, Tensor]]:
    """The weight files of ``clt`` by name, in circuit-tracer 0.5's layout: a CLT as ``W_enc_{l}`` (W_enc_l
    [d_sae, d_model], b_enc_l, b_dec_l, threshold_l) + ``W_dec_{l}`` (W_dec_l [d_sae, n_layers - l, d_model]);
    per-layer transcoders as ``layer_{l}`` (W_enc [d_sae, d_model], W_dec [d_sae, d_model], b_enc, b_dec,
    activation_function.threshold)."""
    cfg = clt.cfg
    jump = cfg.activation is CLTActivation.JUMPRELU
    files: dict[str, dict[str, Tensor]] = {}
    for l in range(cfg.n_layers):  # noqa: E741
        enc = clt.W_enc[l].detach().T.contiguous()
        if cfg.cross_layer:
            part = {
                f"W_enc_{l}": enc,
                f"b_enc_{l}": clt.b_enc[l].detach(),
                f"b_dec_{l}": clt.b_dec[l].detach(),
            }
            if jump:
                part[f"threshold_{l}"] = clt.threshold[l].detach()
            files[CLT_ENC.format(layer=l)] = part
            files[CLT_DEC.format(layer=l)] = {f"W_dec_{l}": clt.W_dec[l].detach()}
        else:
            part = {
                "W_enc": enc,
                "W_dec": clt.W_dec[l].detach()[:, 0],
                "b_enc": clt.b_enc[l].detach(),
                "b_dec": clt.b_dec[l].detach(),
            }
            if jump:
                part["activation_function.threshold"] = clt.threshold[l].detach()
            files[PLT_FILE.format(layer=l)] = part
    return files


def save_clt(clt: CrossLayerTranscoder, path: str | Path) -> Path:
    """Write ``clt`` to folder ``path`` (atomically: written beside it, then swapped in): ``cfg.json`` (kind
    ``clt``: the `CLTConfig`, plus circuit-tracer's ``feature_input_hook``/``feature_output_hook``) and the
    weights in circuit-tracer 0.5's layout (see `_weights`; a CLT's ``W_enc_{l}``/``W_dec_{l}``, per-layer
    transcoders' ``layer_{l}``), with checksums. `load_clt` is its exact inverse."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file: save_clt writes a folder")
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = _weights(clt)
    for name, tensors in files.items():
        save_tensors(tmp / name, tensors)
    cfg = clt.cfg
    doc = {
        **cfg.to_dict(),
        "model_kind": "cross_layer_transcoder" if cfg.cross_layer else "transcoder_set",
        "feature_input_hook": cfg.hook_in.split("{layer}.", 1)[1],
        "feature_output_hook": cfg.hook_out.split("{layer}.", 1)[1],
    }
    write_json(tmp / CLT_CFG, Kind.CLT, doc)
    record_checksums(tmp, [*files, CLT_CFG])
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def load_clt(path: str | Path, *, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Read a folder `save_clt` wrote (checksums verified); a damaged or foreign folder raises naming it."""
    path = Path(path)
    if not (path / CLT_CFG).is_file():
        raise RunError(f"{path} holds no {CLT_CFG}: it is not a CLT folder (save_clt writes one)")
    doc = read_json(path / CLT_CFG, Kind.CLT)
    verify_checksums(path)  # raises IntegrityError naming a damaged file
    fields = {f.name for f in dataclasses.fields(CLTConfig)}
    cfg = CLTConfig.from_dict({k: v for k, v in doc.items() if k in fields})
    clt = CrossLayerTranscoder(cfg)
    with torch.no_grad():
        want = _weights(clt)
        for name, tensors in want.items():
            got = load_tensors(path / name, device="cpu")
            for key, ref in tensors.items():
                if key not in got or got[key].shape != ref.shape:
                    found = tuple(got[key].shape) if key in got else "missing"
                    raise RunError(f"{path / name}: {key} should be {tuple(ref.shape)}, found {found}")
        for l in range(cfg.n_layers):  # noqa: E741
            if cfg.cross_layer:
                enc = load_tensors(path / CLT_ENC.format(layer=l), device="cpu")
                dec = load_tensors(path / CLT_DEC.format(layer=l), device="cpu")
                clt.W_enc[l].copy_(enc[f"W_enc_{l}"].T)
                clt.b_enc[l].copy_(enc[f"b_enc_{l}"])
                clt.b_dec[l].copy_(enc[f"b_dec_{l}"])
                clt.W_dec[l].copy_(dec[f"W_dec_{l}"])
                if cfg.activation is CLTActivation.JUMPRELU:
                    clt.threshold[l].copy_(enc[f"threshold_{l}"])
            else:
                t = load_tensors(path / PLT_FILE.format(layer=l), device="cpu")
                clt.W_enc[l].copy_(t["W_enc"].T)
                clt.W_dec[l][:, 0].copy_(t["W_dec"])
                clt.b_enc[l].copy_(t["b_enc"])
                clt.b_dec[l].copy_(t["b_dec"])
                if cfg.activation is CLTActivation.JUMPRELU:
                    clt.threshold[l].copy_(t["activation_function.threshold"])
    warn_negative_thresholds(clt, path)
    return clt.to(device)


def jumprelu_train(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU activations ``pre * (pre > threshold)`` [..., n_layers, d_sae] with the straight-through
    estimator of interplab's JumpReLU SAE (`interplab.sae.architectures.jumprelu`): exact gradient in ``pre``,
    rectangle-kernel gradient in the threshold [n_layers, d_sae]."""
    shape = pre.shape
    flat = _JumpReLU.apply(pre.reshape(-1, threshold.numel()), threshold.reshape(-1), bandwidth)
    return flat.reshape(shape)


__all__ = [
    "CLTActivation",
    "CLTConfig",
    "CLTOutput",
    "CrossLayerTranscoder",
    "check_fits",
    "from_transcoders",
    "jumprelu_train",
    "load_clt",
    "save_clt",
]
