"""The component graph's per-head edges on models whose heads do not simply add into the residual stream, for
methods that work with hooks and gradients (EAP, EAP-IG) rather than through the edge engine.

- Grouped-query attention: the graph gives every query head its own key and value input (``a2.1.k``), but the
  model's ``hook_k_input`` holds one copy per key/value head. `kv_per_query_head` is the same model with the
  shared key/value weights repeated per query head: the same function (its logits equal the model's), whose
  ``hook_k_input`` / ``hook_v_input`` have one copy per query head, so their gradients are the slots'.
- Post-norms (Gemma-2): a head's output enters a receiver through its layer's post-norm,
  ``ln1_post(sum of the heads)``. `post_norm_jvp` gives what a change of each head's output becomes after the
  norm, to first order (the Jacobian of the norm at the clean sum, applied to each head's change): the change
  of the receiver's input that a gradient at the receiver's input scores.

>>> split = kv_per_query_head(model)    # the same model when every head has its own keys already
>>> split is model
True
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from interplab.model.transformer import Transformer

_REPEATED = ("attn.W_K", "attn.W_V", "attn.b_K", "attn.b_V", "attn.smear")


def kv_per_query_head(model: Transformer) -> Transformer:
    """``model`` itself when ``n_kv_heads == n_heads``; otherwise an equivalent model with one key/value head per
    query head (each a copy of its group's), in eval mode. Every other parameter is shared with ``model`` (the
    same storage, no copy); the repeated key/value weights are a snapshot: build it again after changing them."""
    cfg = model.cfg
    if cfg.n_kv_heads == cfg.n_heads:
        return model
    g = cfg.n_groups
    with torch.device("meta"):  # the parameters come from `model` below: allocate nothing here
        split = Transformer(cfg.replace(n_kv_heads=cfg.n_heads), init=False)
    state = {
        name: t.repeat_interleave(g, dim=0) if name.endswith(_REPEATED) else t
        for name, t in model.state_dict(keep_vars=False).items()
    }
    split.load_state_dict(state, assign=True)
    split.tokenizer = model.tokenizer
    return split.eval()


def post_norm_jvp(
    model: Transformer,
    layer: int,
    results: Float[Tensor, "batch pos n_heads d_model"],
    deltas: Float[Tensor, "batch pos n_heads d_model"],
) -> Float[Tensor, "batch pos n_heads d_model"]:
    """For each head h of ``layer``: ``J deltas[..., h, :]``, where J is the Jacobian of the layer's attention
    post-norm at the clean attention output ``sum_h results[..., h, :] + b_O`` (``results`` as
    ``hook_result`` shows them): the first-order change of the normalised output when head h's output alone
    changes by its delta."""
    block = model.blocks[layer]
    if not model.cfg.post_norms:
        raise ValueError("post_norm_jvp needs a model with post-norms (post_norms=True)")
    pre = (results.sum(2) + block.attn.b_O)[:, :, None].expand_as(deltas).contiguous()
    out = torch.func.jvp(block.ln1_post.normalize, (pre.detach(),), (deltas.detach(),))
    return out[1].detach()  # (the norm's weight would otherwise carry autograd history into the scores)
