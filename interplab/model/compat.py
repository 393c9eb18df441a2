"""TransformerLens' calling habits on a `Transformer`: what its forward's ``return_type`` returns (the
next-token loss included), the stacked weight views (``model.W_Q`` [layer n_heads d_model d_head] ...), and,
for TransformerLens arguments and attributes interplab spells differently, errors that say what to write.

>>> loss = model(tokens, return_type="loss")
>>> logits, loss = model(tokens, return_type="both")
>>> model.W_Q.shape
torch.Size([2, 4, 64, 16])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from interplab.model.transformer import Transformer

ReturnType = Literal["logits", "loss", "both"] | None
RETURN_TYPES = ("logits", "loss", "both", None)

# TransformerLens keyword arguments interplab does not take, and what to write instead
_ARGUMENT_HINTS = {
    "names_filter": "names=... (a name, a list of names or a filter over names)",
    "past_kv_cache": "kv_cache=model.new_kv_cache()",
    "prepend_bos": "model.to_tokens(text, prepend_bos=True), then pass the tokens",
    "padding_side": "model.to_tokens(texts, padding_side='left'), then pass the tokens and attention_mask",
    "start_at_layer": (
        "ctx = model.context(tokens); model.unembed_resid(model.run_blocks(resid, ctx, start=layer))"
    ),
    "shortformer_pos_embed": "nothing: interplab has no shortformer positions",
    "incl_bwd": (
        "model.hooks(bwd_hooks=[(name, fn)]) around a forward and backward (gradients reach fn(grad, site))"
    ),
    "pos_slice": "run_with_cache(...) then index the cached tensors at the positions you want",
    "return_cache_object": "nothing: run_with_cache always returns an ActivationCache (a mapping)",
    "reset_hooks_end": "nothing: interplab's hooks are scoped to the call and always removed",
    "clear_contexts": "nothing: interplab's hooks are scoped to the call and always removed",
}
# TransformerLens attributes interplab does not have, and what to use instead
_ATTRIBUTE_HINTS = {
    "set_use_attn_result": "nothing: hook_result is computed whenever a hook or the cache asks for it",
    "set_use_split_qkv_input": "nothing: hook_q_input/k_input/v_input exist whenever a hook asks for them",
    "set_use_attn_in": "nothing: hook_attn_in exists whenever a hook asks for it",
    "set_use_hook_mlp_in": "nothing: hook_mlp_in exists whenever a hook asks for it",
    "add_hook": "with model.hooks(fwd_hooks=[(name, fn)]): ... (hooks are scoped, and removed on exit)",
    "add_perma_hook": "with model.hooks(fwd_hooks=[(name, fn)]): ... around the code that needs the hook",
    "reset_hooks": "nothing (scoped hooks remove themselves); model.hook_registry.clear() removes any left",
    "hook_dict": "model.hook_points (name -> HookPoint)",
    "mod_dict": "dict(model.named_modules())",
    "process_weights_": "interplab.model.process.process_weights(model, fold_ln=True, ...)",
    "fold_layer_norm": "interplab.model.process.fold_layer_norm(model)",
    "QK": "model.W_Q and model.W_K (stacked [layer n_heads d_model d_head]); W_Q[l, h] @ W_K[l, h].T",
    "OV": "model.W_V and model.W_O (stacked); W_V[l, h] @ W_O[l, h]",
}


def refuse_arguments(kwargs: dict[str, Any], where: str) -> None:
    """Raise a TypeError for keyword arguments ``where`` does not take, saying what to write instead."""
    if not kwargs:
        return
    name = next(iter(kwargs))
    hint = _ARGUMENT_HINTS.get(name)
    if hint is None:
        raise TypeError(f"{where} got an unexpected keyword argument {name!r}")
    raise TypeError(f"{where} has no argument {name!r} (a TransformerLens argument); write instead: {hint}")


def attribute_hint(model: Transformer, name: str) -> str | None:
    """Why ``model`` has no attribute ``name`` and what to use instead, for TransformerLens' names."""
    cfg = model.cfg
    if name in _ATTRIBUTE_HINTS:
        return f"Transformer has no {name!r} (a TransformerLens name); use instead: {_ATTRIBUTE_HINTS[name]}"
    if name == "W_pos":
        return f"the model has no W_pos: it uses {cfg.positional.value} positions, not learned ones"
    if name in ("W_in", "W_out", "b_in", "b_out", "W_gate") and cfg.attn_only:
        return f"the model has no {name}: it is attention-only"
    if name == "W_gate":
        return "the model has no W_gate: only gated MLPs have one"
    return None


class StackedWeight:
    """One per-layer weight under TransformerLens' model-level name, stacked over layers: ``model.W_Q`` is
    [layer n_heads d_model d_head]. A new tensor (gradients flow back to the weights) that reads the weights at
    call time; writing it is refused (write ``model.blocks[l].attn.W_Q`` instead). Under grouped-query
    attention, K and V are repeated to one per query head, as in TransformerLens."""

    def __init__(self, module: Literal["attn", "mlp"], leaf: str) -> None:
        self.module, self.leaf = module, leaf
        self.name = leaf

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, model: Transformer | None, owner: type) -> Any:
        if model is None:
            return self
        cfg = model.cfg
        if self.module == "mlp" and not cfg.has_mlp or self.leaf == "W_gate" and not cfg.gated_mlp:
            raise AttributeError(self.name)  # Transformer.__getattr__ says why
        parts = [getattr(getattr(block, self.module), self.leaf) for block in model.blocks]
        stacked = torch.stack(parts)
        if self.leaf in ("W_K", "W_V", "b_K", "b_V") and cfg.n_groups > 1:
            stacked = stacked.repeat_interleave(cfg.n_groups, dim=1)
        return stacked

    def __set__(self, model: Transformer, value: Any) -> None:
        raise AttributeError(
            f"model.{self.name} is a read-only stack of every layer's weight; write "
            f"model.blocks[layer].{self.module}.{self.leaf} instead"
        )


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab_out"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None = None,
    *,
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Cross-entropy of predicting each next token, as TransformerLens' ``return_type="loss"``: the mean over
    [batch, pos - 1] predictions (computed in float32), counting only predictions whose position and target are
    both real tokens when ``attention_mask`` is given; ``per_token`` gives the [batch, pos - 1] losses
    (0 where masked)."""
    if tokens.shape[1] < 2:
        raise ValueError(
            f"the next-token loss needs at least 2 positions, got tokens of shape {tuple(tokens.shape)}"
        )
    if tokens.numel() and int(tokens[:, 1:].max()) >= logits.shape[-1]:
        raise ValueError(
            f"the next-token loss needs an output per token id, but the model has d_vocab_out={logits.shape[-1]} "
            f"and the tokens go up to {int(tokens[:, 1:].max())} (a classifier: take its loss from the logits)"
        )
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    losses = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
    if attention_mask is None:
        return losses if per_token else losses.mean()
    mask = attention_mask.to(device=logits.device, dtype=torch.bool)
    mask = mask[:, :-1] & mask[:, 1:]
    losses = losses.masked_fill(~mask, 0.0)
    return losses if per_token else losses.sum() / mask.sum().clamp(min=1)


def finish(
    logits: Tensor,
    tokens: Tensor,
    return_type: ReturnType,
    attention_mask: Tensor | None,
    per_token: bool,
) -> Tensor | tuple[Tensor, Tensor] | None:
    """What the forward returns for ``return_type`` (see `Transformer.forward`)."""
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    loss = next_token_loss(logits, tokens, attention_mask, per_token=per_token)
    return loss if return_type == "loss" else (logits, loss)


def check_return_type(return_type: Any, stop_at_layer: int | None) -> None:
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type={return_type!r} is not one of: 'logits', 'loss', 'both', None")
    if stop_at_layer is not None and return_type != "logits":
        raise ValueError(
            f"return_type={return_type!r} with stop_at_layer={stop_at_layer}: stopping early returns the residual "
            "stream, there are no logits to take a loss of"
        )
