"""Weight processing: rewrite a model's weights into an equivalent, easier-to-read form.

Each function mutates the model in place, returns it, and leaves its log-probabilities unchanged (logits
may shift by a constant per position, which softmax ignores). As in TransformerLens:

- `fold_layer_norm`: the norms' scale (and bias) move into the weights that read them; the norms become
  the identity affine map (w = 1, b = 0) but stay in place, so ``ln*.hook_scale`` / ``hook_normalized``
  still fire. With LayerNorm the reading weights are also centred over d_model.
- `center_writing_weights`: everything that writes to the residual stream (W_E, W_pos, W_O, b_O, W_out,
  b_out) has zero mean over d_model; LayerNorm removes that mean anyway.
- `center_unembed`: W_U and b_U have zero mean over the vocabulary.
- `fold_value_biases`: b_V moves into b_O (attention patterns sum to one over keys).

>>> from interplab import load_model
>>> model = process_weights(load_model("runs/demo/final"))
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from interplab.model.config import ModelConfig, Norm
from interplab.model.transformer import Transformer

__all__ = [
    "center_unembed",
    "center_writing_weights",
    "fold_layer_norm",
    "fold_value_biases",
    "process_weights",
    "set_config",
    "untie_embeddings",
]


def set_config(model: Transformer, cfg: ModelConfig) -> None:
    """Give the model and every submodule that holds the old config the new one (configs are frozen)."""
    old = model.cfg
    for module in model.modules():
        if getattr(module, "cfg", None) is old:
            module.cfg = cfg  # type: ignore[assignment]  # a plain attribute, not a submodule


def untie_embeddings(model: Transformer) -> Transformer:
    """Give a tied model its own ``unembed.W_U`` (a copy of W_E^T), so that the embedding and the
    unembedding can be changed separately. A no-op for untied models."""
    if not model.cfg.tie_embeddings:
        return model
    w_e = model.embed.W_E
    model.unembed.W_U = nn.Parameter(w_e.detach().T.clone(), requires_grad=w_e.requires_grad)
    set_config(model, model.cfg.replace(tie_embeddings=False))
    return model


_BIAS_FLAG = {
    "b_Q": "attn_bias",
    "b_K": "attn_bias",
    "b_V": "attn_bias",
    "b_O": "attn_bias",
    "b_in": "mlp_bias",
    "b_gate": "mlp_bias",
    "b_out": "mlp_bias",
    "b_U": "unembed_bias",
}


def _mark_biases_trained(model: Transformer, **flags: bool) -> None:
    """Biases that weight processing made non-zero are real weights now: say so in the config."""
    changes = {k: True for k, v in flags.items() if v and not getattr(model.cfg, k)}
    if not changes:
        return
    set_config(model, model.cfg.replace(**changes))
    trainable = model.embed.W_E.requires_grad
    for name, p in model.named_parameters():
        if _BIAS_FLAG.get(name.rsplit(".", 1)[-1]) in changes:
            p.requires_grad_(trainable)


def _norm_params(norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    w = getattr(norm, "w", None)
    return None if w is None else (w, getattr(norm, "b", None))


@torch.no_grad()
def fold_layer_norm(model: Transformer, *, center_weights: bool = True) -> Transformer:
    """Fold each pre-norm's weight (and LayerNorm bias) into the weights that read its output.

    ``ln1`` folds into W_Q/W_K/W_V (b_Q/b_K/b_V), ``ln2`` into W_in/W_gate (b_in/b_gate), ``ln_final`` into W_U (b_U).
    Afterwards every such norm is the identity affine map (w = 1, b = 0). With LayerNorm and
    ``center_weights``, the reading weights are centred over d_model (the normalised input has zero mean).
    RMSNorm models fold their weights only; models without norms are returned unchanged. Post-norms
    (Gemma-2's norms on the attention/MLP outputs) are not folded: no linear map reads them; blocks without
    pre-norms (OLMo-2) have nothing to fold but ln_final. The q/k norms (Qwen3, Gemma-3, OLMo-2) keep their
    weights: they act after the normalisation and before rotary, where no weight before them can hold them.
    Tied embeddings are untied first (the unembedding changes, the embedding does not)."""
    cfg = model.cfg
    if cfg.normalization is Norm.NONE:
        return model
    if cfg.gated_mlp and cfg.has_mlp and not cfg.gate_bias and cfg.normalization is Norm.LAYERNORM:
        for layer, block in enumerate(model.blocks):
            if block.ln2.get_parameter("b").abs().max() > 0:  # checked before anything changes
                raise ValueError(
                    f"fold_layer_norm: blocks.{layer}.ln2.b is non-zero, but it feeds the gate of a gated MLP, "
                    "which has no bias to fold it into"
                )
    untie_embeddings(model)
    layernorm = cfg.normalization is Norm.LAYERNORM
    center = center_weights and layernorm

    def fold(
        norm: nn.Module, weights: list[torch.Tensor], biases: list[torch.Tensor | None], dim: int
    ) -> None:
        """``weights`` read the norm's output along ``dim`` (d_model); ``biases`` are their biases (None: none).
        A norm without weights (OLMo-2's missing pre-norms) leaves them alone."""
        params = _norm_params(norm)
        if params is None:
            return
        w, b = params
        for weight, bias in zip(weights, biases, strict=True):
            view = [1] * weight.dim()
            view[dim % weight.dim()] = -1
            if b is not None and bias is not None:  # a bias-free reader (the gate) only meets b = 0 here
                bias += torch.tensordot(b, weight, dims=([0], [dim % weight.dim()]))
            weight.mul_(w.reshape(view))
            if center:
                weight.sub_(weight.mean(dim, keepdim=True))
        w.fill_(1.0)
        if b is not None:
            b.zero_()

    for block in model.blocks:
        attn = block.attn
        # W_Q [n_heads d_model d_head]: d_model is dim 1; tensordot(b, W, dim 1) -> [n_heads d_head] like b_Q
        fold(block.ln1, [attn.W_Q, attn.W_K, attn.W_V], [attn.b_Q, attn.b_K, attn.b_V], dim=1)
        if cfg.has_mlp:
            mlp = block.mlp
            weights: list[torch.Tensor] = [mlp.W_in]
            biases: list[torch.Tensor | None] = [mlp.b_in]
            if cfg.gated_mlp:
                weights.append(mlp.W_gate)
                biases.append(mlp.b_gate if cfg.gate_bias else None)
            fold(block.ln2, weights, biases, dim=0)
    fold(model.ln_final, [model.unembed.W_U], [model.unembed.b_U], dim=0)
    _mark_biases_trained(
        model, attn_bias=layernorm, mlp_bias=layernorm and cfg.has_mlp, unembed_bias=layernorm
    )
    return model


def _require_layernorm(model: Transformer, what: str) -> None:
    cfg = model.cfg
    if cfg.normalization is not Norm.LAYERNORM:
        raise ValueError(
            f"{what} needs LayerNorm (it relies on the norm removing the mean), but the model uses "
            f"normalization={cfg.normalization.value!r}"
        )
    if cfg.post_norms:
        raise ValueError(
            f"{what} is not supported with post_norms: the post-norms write to the residual stream"
        )


@torch.no_grad()
def center_writing_weights(model: Transformer) -> Transformer:
    """Make every weight that writes to the residual stream zero-mean over d_model.

    Valid only for LayerNorm models: every reader of the residual stream is a LayerNorm, which subtracts
    the mean. Tied embeddings are untied first (W_U keeps the uncentred embedding)."""
    _require_layernorm(model, "center_writing_weights")
    untie_embeddings(model)

    def center(t: torch.Tensor) -> None:
        t.sub_(t.mean(-1, keepdim=True))

    center(model.embed.W_E)
    if hasattr(model, "pos_embed"):
        center(model.pos_embed.W_pos)
    for block in model.blocks:
        center(block.attn.W_O)
        center(block.attn.b_O)
        if model.cfg.has_mlp:
            center(block.mlp.W_out)
            center(block.mlp.b_out)
    return model


@torch.no_grad()
def center_unembed(model: Transformer) -> Transformer:
    """Make W_U and b_U zero-mean over the vocabulary: every logit at a position shifts by the same
    amount, so log-probabilities are unchanged. Not valid with logit soft-capping (tanh is not shift
    invariant). Tied embeddings are untied first."""
    if model.cfg.logit_softcap is not None:
        raise ValueError(
            f"center_unembed changes the logits by a constant, which logit_softcap={model.cfg.logit_softcap} "
            "does not preserve"
        )
    untie_embeddings(model)
    model.unembed.W_U.sub_(model.unembed.W_U.mean(-1, keepdim=True))
    b_u = model.unembed.b_U
    b_u.sub_(b_u.mean())
    return model


@torch.no_grad()
def fold_value_biases(model: Transformer) -> Transformer:
    """Move b_V into b_O: each head's output is pattern @ (v + b_V) W_O and every pattern row sums to one,
    so b_V contributes the constant b_V W_O (per query head; shared kv heads count once per query head)."""
    g = model.cfg.n_groups
    for block in model.blocks:
        attn = block.attn
        b_v = attn.b_V.repeat_interleave(g, dim=0)  # [n_heads d_head]
        attn.b_O.add_(torch.einsum("he,hed->d", b_v, attn.W_O))
        attn.b_V.zero_()
    _mark_biases_trained(model, attn_bias=True)
    return model


_fold_layer_norm, _center_writing, _center_unembed, _fold_value_biases = (
    fold_layer_norm,
    center_writing_weights,
    center_unembed,
    fold_value_biases,
)


def process_weights(
    model: Transformer,
    *,
    fold_ln: bool = True,
    center_writing_weights: bool | None = None,
    center_unembed: bool | None = None,
    fold_value_biases: bool = True,
) -> Transformer:
    """Apply the processing steps in TransformerLens' order. Centring the writing weights needs LayerNorm
    (without post-norms), centring the unembedding needs no logit soft-capping: ``None`` means "where it is
    valid"; ``True`` on a model where the step is not valid skips it with a warning naming the flag, as
    TransformerLens does for ``center_writing_weights`` on RMSNorm models (Llama, Mistral, Qwen2, Gemma-2), so
    TransformerLens' usual four flags work on every model (TransformerLens skips ``center_unembed`` under logit
    soft-capping the same way)."""
    cfg = model.cfg
    writing_ok = cfg.normalization is Norm.LAYERNORM and not cfg.post_norms
    unembed_ok = cfg.logit_softcap is None
    if center_writing_weights and not writing_ok:
        why = "post_norms" if cfg.post_norms else f"normalization={cfg.normalization.value!r}"
        warnings.warn(
            f"center_writing_weights=True skipped: it needs LayerNorm blocks without post-norms (LayerNorm "
            f"removes the mean it centres away), but the model has {why}; TransformerLens skips it too",
            UserWarning,
            stacklevel=2,
        )
    if center_unembed and not unembed_ok:
        warnings.warn(
            f"center_unembed=True skipped: shifting every logit by a constant changes the output of "
            f"logit_softcap={cfg.logit_softcap} (tanh is not shift invariant)",
            UserWarning,
            stacklevel=2,
        )
    center_writing_weights = (
        writing_ok if center_writing_weights is None else center_writing_weights and writing_ok
    )
    center_unembed = unembed_ok if center_unembed is None else center_unembed and unembed_ok
    if fold_ln:
        _fold_layer_norm(model)
    if center_writing_weights:
        _center_writing(model)
    if center_unembed:
        _center_unembed(model)
    if fold_value_biases:
        _fold_value_biases(model)
    return model
