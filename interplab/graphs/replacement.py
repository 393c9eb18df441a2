"""The replacement model: the original model with each MLP replaced by a (cross-layer) transcoder's
reconstruction plus an error term, and the attention patterns and norm scales frozen from the original forward
on one prompt, so that the forward is an affine function of the feature activations, the error vectors and the
token embeddings (the local replacement model of Anthropic's "Circuit Tracing", 2025).

Per block, with ``P`` the frozen patterns and ``s`` the frozen scales (``N_s(x) = centre(x) / s * w + b``)::

    attn_out   = sum_h P_h (N_s1(resid) W_V[h] + b_V[h]) W_O[h] + b_O        (then N_s1post with post norms)
    resid_mid  = resid + attn_out                                              (parallel blocks: no resid_mid)
    mlp_out_l  = sum_{l' <= l} acts_l' W_dec[l' -> l] + b_dec[l] + error_l      (the CLT's reconstruction)
    resid_post = resid_mid + mlp_out_l

`ReplacementModel.run` records the frozen quantities, the CLT's inputs, activations and errors from one
ordinary forward (`ReplacementRun`); `ReplacementModel.forward` runs the linear forward from them, with the MLP
outputs given per layer by a callback, which is what attribution (given MLP outputs) and interventions
(features re-encoded from the new residual stream) need.

**Half precision** (a model loaded in bfloat16 or float16): the ordinary forward runs in the model's dtype and
fixes the patterns, the norm scales, the CLT's inputs and the MLP outputs; the linear forward, its transpose
and everything the graph is made of are computed in float32 (`compute_dtype`; the weights they read are upcast,
exactly, once). The float32 linear forward would round differently from the half-precision one, so the
difference is absorbed where the model computed it: each layer's error term is what the block added to the
residual stream beyond the frozen attention and the CLT's reconstruction (the MLP's error plus the block's
rounding), and the attention output's rounding is a constant at ``resid_mid`` (like a bias: no node, no
effect on any edge). The linear forward's residual stream is then the model's own (to float32 precision) and
its logits differ from the model's only by the half-precision rounding of ``ln_final`` and the unembedding.

>>> from interplab.sae.clt import CLTConfig, CrossLayerTranscoder
>>> clt = CrossLayerTranscoder(CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model, d_sae=64))
>>> run = ReplacementModel(model, clt).run(tokens)
>>> torch.testing.assert_close(run.logits, model(tokens))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.hooks.site import Site, SiteKind
from interplab.model.config import Norm, Positional
from interplab.model.transformer import Transformer

# the CLT inputs a replacement model can read, and its one output site
_INPUT_KINDS = (SiteKind.RESID_MID, SiteKind.MLP_IN, SiteKind.LN2_NORMALIZED)
_OUTPUT_KIND = SiteKind.MLP_OUT


class CLTLike(Protocol):
    """What the graphs read of a cross-layer transcoder (`interplab.sae.clt.CrossLayerTranscoder`): its config
    (``n_layers``, ``d_model``, ``d_sae``, ``hook_in``, ``hook_out``, ``model_name``), the encoder weights
    ``W_enc`` [layer d_model d_sae], ``encode`` (activations of every layer from every layer's input) and
    ``encode_layer``,
    ``decoder(src, dst)`` [d_sae d_model] and ``b_dec`` [layer d_model]."""

    @property
    def cfg(self) -> Any: ...

    @property
    def W_enc(self) -> Tensor: ...

    @property
    def b_dec(self) -> Tensor: ...

    def encode(self, x: Tensor) -> Tensor: ...

    def encode_layer(self, layer: int, x: Tensor) -> Tensor: ...

    def decoder(self, src: int, dst: int) -> Tensor: ...


def writes_to(clt: CLTLike, layer: int) -> range:
    """The layers whose MLP output the latents of ``layer`` write (every later one for a cross-layer
    transcoder, its own for per-layer transcoders)."""
    if getattr(clt.cfg, "cross_layer", True):
        return range(layer, clt.cfg.n_layers)
    return range(layer, layer + 1)


def clt_sites(clt: CLTLike, layer: int) -> tuple[Site, Site]:
    """The input and output `Site` of the CLT at ``layer``."""
    return Site.parse(clt.cfg.hook_in.format(layer=layer)), Site.parse(clt.cfg.hook_out.format(layer=layer))


def check_clt(model: Transformer, clt: CLTLike) -> None:
    """A clear error when ``clt`` was not trained on ``model``'s shape and hook points (or cannot be frozen
    linearly): the model and the CLT are both named."""
    cfg, ccfg = model.cfg, clt.cfg
    model_name = cfg.name or cfg.architecture or "the model"
    clt_model = getattr(ccfg, "model_name", None) or "its model"
    if cfg.attn_only:
        raise ValueError(f"{model_name} is attention-only: it has no MLPs for a transcoder to replace")
    if ccfg.d_model != cfg.d_model or ccfg.n_layers != cfg.n_layers:
        raise ValueError(
            f"the CLT was trained on {clt_model} (d_model {ccfg.d_model}, {ccfg.n_layers} layers), not on "
            f"{model_name} (d_model {cfg.d_model}, {cfg.n_layers} layers)"
        )
    for layer in range(cfg.n_layers):
        site_in, site_out = clt_sites(clt, layer)
        if site_out.kind is not _OUTPUT_KIND:
            raise ValueError(
                f"the CLT writes {site_out.name}; a replacement model replaces MLP outputs "
                f"({Site(_OUTPUT_KIND, layer).name})"
            )
        if site_in.kind not in _INPUT_KINDS:
            valid = ", ".join(Site(k, layer).name for k in _INPUT_KINDS)
            raise ValueError(f"the CLT reads {site_in.name}; a replacement model reads one of: {valid}")
        if site_in.layer != layer or site_out.layer != layer:
            raise ValueError(f"the CLT's layer {layer} reads {site_in.name} and writes {site_out.name}")
        if site_in.name not in model.hook_points:
            raise ValueError(
                f"the CLT was trained on hook {site_in.name}, which {model_name} does not have "
                f"({model.hook_registry._unknown(site_in.name)})"
            )


@dataclass(frozen=True)
class Frozen:
    """What the original forward fixes (per layer lists; None where the model has no such norm)."""

    patterns: list[Tensor]
    """[batch n_heads q k] attention patterns"""
    ln1_scale: list[Tensor | None]
    """[batch pos 1] what ln1 divides by"""
    ln2_scale: list[Tensor | None]
    ln_final_scale: Tensor | None
    ln1_post_scale: list[Tensor | None]
    """post norms (Gemma 2): computed in the first linear forward, where every input is the original"""
    ln2_post_scale: list[Tensor | None]
    resid_mid_offset: list[Tensor | None] = field(default_factory=list)
    """half precision: the model's ``resid_mid`` minus the float32 linear forward's (the attention output's
    rounding), a constant added there; empty or None where there is none"""


@dataclass(frozen=True)
class LinearOutputs:
    """What the linear forward computes."""

    feature_inputs: Float[Tensor, "batch pos layer d_model"]
    """the CLT's input at every layer"""
    final: Float[Tensor, "batch pos d_model"]
    """ln_final's output (what the unembedding reads)"""
    logits: Float[Tensor, "batch pos d_vocab_out"]
    mlp_out: Float[Tensor, "batch pos layer d_model"]


@dataclass(frozen=True)
class ReplacementRun:
    """One prompt through the replacement model: the frozen quantities and every vector the graph is made of.
    ``logits`` come from the linear forward with the error terms, so they equal the original model's."""

    tokens: Int[Tensor, "batch pos"]
    frozen: Frozen
    embed: Float[Tensor, "batch pos d_model"]
    """the token embeddings (``hook_embed``: the embedding scale applied, positions not added)"""
    feature_inputs: Float[Tensor, "batch pos layer d_model"]
    acts: Float[Tensor, "batch pos layer d_sae"]
    """the CLT's feature activations"""
    recon: Float[Tensor, "batch pos layer d_model"]
    """the CLT's reconstruction of every MLP output (b_dec included)"""
    mlp_out: Float[Tensor, "batch pos layer d_model"]
    """the original MLP outputs (half precision: what each block added to the residual stream beyond the frozen
    attention, the MLP output plus the block's rounding; see the module docstring)"""
    logits: Float[Tensor, "batch pos d_vocab_out"]
    original_logits: Float[Tensor, "batch pos d_vocab_out"]

    @property
    def errors(self) -> Float[Tensor, "batch pos layer d_model"]:
        """MLP output minus the CLT's reconstruction (the error nodes)."""
        return self.mlp_out - self.recon


MLPOutFn = Callable[[int, Tensor], Tensor]
"""``fn(layer, feature_input [batch pos d_model]) -> mlp_out [batch pos d_model]``"""

HALF = (torch.bfloat16, torch.float16)


def model_dtype(model: Transformer) -> torch.dtype:
    """The dtype ``model`` runs in (that of its unembedding; norm weights may be float32 in a bf16 model)."""
    return model.W_U.dtype


def compute_dtype(model: Transformer) -> torch.dtype:
    """The dtype of the replacement model's linear forward and of the graph: float32 for a half-precision
    model, the model's own otherwise (float32, float64)."""
    return torch.promote_types(model_dtype(model), torch.float32)


class ReplacementModel:
    """``model`` with its MLPs replaced by ``clt`` (see the module docstring). Nothing of ``model`` is changed."""

    def __init__(self, model: Transformer, clt: CLTLike) -> None:
        check_clt(model, clt)
        self.model = model
        self.clt = clt
        self.cfg = model.cfg
        self.sites_in = [clt_sites(clt, layer)[0] for layer in range(model.cfg.n_layers)]
        self.dtype = compute_dtype(model)
        """the dtype of the linear forward (`compute_dtype`)"""
        self.half = model_dtype(model) in HALF
        self._upcast: dict[tuple, tuple[Tensor, int, Tensor]] = {}

    def weight(self, t: Tensor) -> Tensor:
        """``t`` (a weight of the model or the CLT) in the linear forward's dtype: itself, or its upcast copy
        (half precision: only the weights the linear forward reads are copied, never the MLPs'). A copy is
        kept while its source is unchanged: until the next `run` (which starts afresh, so weights edited in
        between through ``.data``, which autograd does not count, are read again) and while the source's
        version counter stays the same (an in-place edit under ``no_grad`` bumps it)."""
        if t.dtype == self.dtype:
            return t
        base = t if t._base is None else t._base  # held, so its memory (the key) is never reused meanwhile
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)
        hit = self._upcast.get(key)
        if hit is None or hit[0] is not base or hit[1] != t._version:
            hit = (base, t._version, t.detach().to(self.dtype))
            self._upcast[key] = hit
        return hit[2]

    # ---- recording ----------------------------------------------------------------------------
    def run(self, tokens: Tensor) -> ReplacementRun:
        """The original forward on ``tokens`` ([pos] or [batch pos]) recorded, then the linear forward with
        the CLT's reconstructions plus errors (equal to the original logits to float precision)."""
        model, cfg = self.model, self.cfg
        tokens = model.check_tokens(tokens)
        self._upcast.clear()  # weights may have been edited since the last run (`weight`)
        n = cfg.n_layers
        names = [Site(SiteKind.PATTERN, layer).name for layer in range(n)]
        names += [site.name for site in self.sites_in]
        names += [Site(SiteKind.MLP_OUT, layer).name for layer in range(n)]
        names.append(Site(SiteKind.EMBED).name)
        if self.half:  # the residual stream the linear forward is to reproduce
            names += [Site(SiteKind.RESID_POST, layer).name for layer in range(n)]
            if not cfg.parallel_attn_mlp:
                names += [Site(SiteKind.RESID_MID, layer).name for layer in range(n)]
        if cfg.normalization is not Norm.NONE:
            if cfg.pre_norms:  # without them (OLMo-2) ln1 and ln2 are the identity: no scale to freeze
                names += [Site(SiteKind.LN1_SCALE, layer).name for layer in range(n)]
                names += [Site(SiteKind.LN2_SCALE, layer).name for layer in range(n)]
            names.append(Site(SiteKind.LN_FINAL_SCALE).name)
        dt = self.dtype
        with torch.no_grad():
            original, cache = model.run_with_cache(tokens, names=names)

            def get(kind: SiteKind, layer: int | None) -> Tensor | None:
                name = Site(kind, layer).name
                return cache[name].to(dt) if name in cache else None

            def stack(kind: SiteKind) -> Tensor:
                return torch.stack([cache[Site(kind, layer).name].to(dt) for layer in range(n)], dim=2)

            frozen = Frozen(
                patterns=[cache[Site(SiteKind.PATTERN, layer).name].to(dt) for layer in range(n)],
                ln1_scale=[get(SiteKind.LN1_SCALE, layer) for layer in range(n)],
                ln2_scale=[get(SiteKind.LN2_SCALE, layer) for layer in range(n)],
                ln_final_scale=get(SiteKind.LN_FINAL_SCALE, None),
                ln1_post_scale=[None] * n,
                ln2_post_scale=[None] * n,
                resid_mid_offset=[None] * n,
            )
            feature_inputs = torch.stack([cache[site.name].to(dt) for site in self.sites_in], dim=2)
            mlp_out = stack(SiteKind.MLP_OUT)
            acts = self.clt.encode(feature_inputs).to(dt)
            recon = self.decode(acts)
            embed = cache[Site(SiteKind.EMBED).name].to(dt)
            reference = None
            if self.half:
                mids = None if cfg.parallel_attn_mlp else stack(SiteKind.RESID_MID)
                reference = (mids, stack(SiteKind.RESID_POST))
            out = self.forward(
                tokens,
                frozen,
                embed,
                lambda layer, _x: mlp_out[:, :, layer],
                record=True,
                reference=reference,
            )
            if self.half:
                mlp_out = out.mlp_out
        return ReplacementRun(
            tokens=tokens,
            frozen=frozen,
            embed=embed,
            feature_inputs=feature_inputs,
            acts=acts,
            recon=recon,
            mlp_out=mlp_out,
            logits=out.logits,
            original_logits=original,
        )

    def decode(self, acts: Float[Tensor, "... layer d_sae"]) -> Float[Tensor, "... layer d_model"]:
        """The CLT's reconstruction of every layer's MLP output (b_dec included) from the activations."""
        n = self.cfg.n_layers
        out = [self.weight(self.clt.b_dec[dst]).expand(*acts.shape[:-2], -1) for dst in range(n)]
        for src in range(n):
            for dst in writes_to(self.clt, src):
                out[dst] = out[dst] + acts[..., src, :] @ self.weight(self.clt.decoder(src, dst))
        return torch.stack(out, dim=-2)

    # ---- the linear forward -------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        frozen: Frozen,
        embed: Float[Tensor, "batch pos d_model"],
        mlp_out: MLPOutFn,
        *,
        record: bool = False,
        reference: tuple[Tensor | None, Tensor] | None = None,
    ) -> LinearOutputs:
        """The linear forward: ``embed`` (the token embeddings; positions are added here) through the blocks
        with ``frozen`` patterns and scales, each MLP output given by ``mlp_out(layer, feature_input)``.
        ``record``: the first forward, which fills in the post-norm scales (from its own, original, values).
        ``reference`` (half precision, with ``record``): the model's ``resid_mid`` (None for parallel blocks)
        and ``resid_post`` [batch pos layer d_model], which fix the ``resid_mid`` offsets and the MLP outputs
        (then returned in ``mlp_out``) so that this forward's residual stream is the model's."""
        model, cfg = self.model, self.cfg
        resid = embed
        if cfg.positional is Positional.LEARNED:
            resid = resid + self.weight(model.pos_embed.W_pos)[: tokens.shape[1]]
        inputs: list[Tensor] = []
        outs: list[Tensor] = []
        for layer, block in enumerate(model.blocks):
            x = _frozen_norm(block.ln1, resid, frozen.ln1_scale[layer])
            attn_out = self._attention(block, x, frozen.patterns[layer])
            if cfg.post_norms:
                attn_out = self._post_norm(block.ln1_post, attn_out, frozen.ln1_post_scale, layer, record)
            mid = resid if cfg.parallel_attn_mlp else resid + attn_out
            offsets = frozen.resid_mid_offset
            if reference is not None and reference[0] is not None:
                offsets[layer] = reference[0][:, :, layer] - mid
            offset = offsets[layer] if offsets else None
            if offset is not None:
                mid = mid + offset
            normalized = _frozen_norm(block.ln2, mid, frozen.ln2_scale[layer], weight=False)
            feature_input = normalized if self.sites_in[layer].kind is SiteKind.LN2_NORMALIZED else mid
            if (
                reference is not None
            ):  # what the block added beyond attention: the MLP output and the rounding
                out = reference[1][:, :, layer] - mid - (attn_out if cfg.parallel_attn_mlp else 0)
            else:
                out = mlp_out(layer, feature_input)
            inputs.append(feature_input)
            outs.append(out)
            resid = mid + out + (attn_out if cfg.parallel_attn_mlp else 0)
        final = _frozen_norm(model.ln_final, resid, frozen.ln_final_scale)
        logits = final @ self.weight(model.W_U) + self.weight(model.unembed.b_U)
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        return LinearOutputs(torch.stack(inputs, dim=2), final, logits, torch.stack(outs, dim=2))

    # ---- its transpose ------------------------------------------------------------------------
    def backward(
        self,
        frozen: Frozen,
        cot_inputs: Callable[[int], Tensor | None],
        cot_final: Tensor | None,
        on_mlp_out: Callable[[int, Tensor], None],
        resid_pre: tuple[int, Tensor] | None = None,
    ) -> Float[Tensor, "row pos d_model"]:
        """The transpose of the linear forward (its vector-Jacobian product), for a batch of rows at once:
        ``cot_inputs(layer)`` [row pos d_model] (or None) is each row's cotangent at that layer's feature input,
        ``cot_final`` [row pos d_model] at ln_final's output. Calls ``on_mlp_out(layer, g)`` with the gradient at
        each MLP output below the deepest read-out (top layer first; those above get none: it is zero) and
        returns the gradient at the token embeddings. ``resid_pre=(layer, g)`` starts instead from a cotangent
        at that layer's ``resid_pre`` (QK attribution). Only the frozen
        linear maps are involved (patterns, scales, W_V, W_O, norm weights): no forward is needed."""
        model, cfg = self.model, self.cfg
        grad = None
        top = cfg.n_layers - 1
        if resid_pre is not None:  # a cotangent at resid_pre of a layer: what the blocks below it wrote
            top, grad = resid_pre[0] - 1, resid_pre[1]
        elif cot_final is not None:
            grad = _norm_transpose(model.ln_final, cot_final, frozen.ln_final_scale)
        else:  # nothing above the deepest read-out reaches it: start there (as circuit-tracer does)
            top = max((layer for layer in range(cfg.n_layers) if cot_inputs(layer) is not None), default=-1)
            if top < 0:
                raise ValueError("backward needs a cotangent at some feature input or at ln_final's output")
        for layer in range(top, -1, -1):
            block = model.blocks[layer]
            read = cot_inputs(layer)
            if grad is None:  # the deepest read-out's layer: its MLP output comes after what it reads
                assert read is not None
                grad = torch.zeros_like(read)
            else:
                on_mlp_out(layer, grad)
            if read is not None and self.sites_in[layer].kind is SiteKind.LN2_NORMALIZED:
                read = _norm_transpose(block.ln2, read, frozen.ln2_scale[layer], weight=False)
            if cfg.parallel_attn_mlp:
                # resid_post = resid_pre + attn(resid_pre) + mlp_out, and the MLP reads resid_pre
                through = self._attention_transpose(block, grad, frozen, layer)
                grad = grad + through + (read if read is not None else 0)
            else:
                mid = grad + read if read is not None else grad
                grad = mid + self._attention_transpose(block, mid, frozen, layer)
        assert grad is not None
        return grad

    def _attention_transpose(self, block: Any, g: Tensor, frozen: Frozen, layer: int) -> Tensor:
        """The transpose of ``x -> attn_out`` (frozen pattern, post norm and ln1 scales; no biases)."""
        attn, n_groups = block.attn, self.cfg.n_groups
        if self.cfg.post_norms:
            g = _norm_transpose(block.ln1_post, g, frozen.ln1_post_scale[layer])
        g_z = torch.einsum("bqd,hed->bqhe", g, self.weight(attn.W_O))
        g_v = torch.einsum("hqk,bqhe->bkhe", frozen.patterns[layer][0].to(g.dtype), g_z)
        if n_groups > 1:  # query heads of a group share their key/value head
            g_v = g_v.unflatten(2, (-1, n_groups)).sum(3)
        g_x = torch.einsum("bkhe,hde->bkd", g_v, self.weight(attn.W_V))
        return _norm_transpose(block.ln1, g_x, frozen.ln1_scale[layer])

    def _attention(self, block: Any, x: Tensor, pattern: Tensor) -> Tensor:
        """``sum_h P_h (x W_V[h] + b_V[h]) W_O[h] + b_O`` (key/value heads shared by their query group)."""
        attn, g = block.attn, self.cfg.n_groups
        v = torch.einsum("bpd,hde->bphe", x, self.weight(attn.W_V)) + self.weight(attn.b_V)
        if g > 1:
            v = v.repeat_interleave(g, dim=2)
        z = torch.einsum("bhqk,bkhe->bqhe", pattern.to(v.dtype), v)
        return torch.einsum("bqhe,hed->bqd", z, self.weight(attn.W_O)) + self.weight(attn.b_O)

    def _post_norm(
        self, norm: Any, x: Tensor, scales: list[Tensor | None], layer: int, record: bool
    ) -> Tensor:
        if scales[layer] is None:
            if not record:
                raise RuntimeError("the post-norm scales are recorded by ReplacementModel.run")
            centred = x - x.mean(-1, keepdim=True) if norm.kind is Norm.LAYERNORM else x
            scales[layer] = (centred.detach().pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        return _frozen_norm(norm, x, scales[layer])


def _frozen_norm(norm: Any, x: Tensor, scale: Tensor | None, *, weight: bool = True) -> Tensor:
    """``norm`` with a frozen ``scale``: centred (LayerNorm), divided by the scale, then (``weight``) times the
    weight plus the bias; the identity for ``normalization="none"``."""
    if scale is None:
        return x
    out = norm.divide_by_scale(x, scale)
    if not weight:
        return out
    out = out * norm.w
    return out + norm.b if norm.kind is Norm.LAYERNORM else out


def _norm_transpose(norm: Any, g: Tensor, scale: Tensor | None, *, weight: bool = True) -> Tensor:
    """The transpose of `_frozen_norm`'s linear part (``centre(x) / s * w``): ``centre(g * w / s)``."""
    if scale is None:
        return g
    out = g * norm.w / scale if weight else g / scale
    return out - out.mean(-1, keepdim=True) if norm.kind is Norm.LAYERNORM else out
