"""What every part of a block shares, and the MLP.

The model is split by concept: `interplab.model.norms` (LayerNorm, RMSNorm), `interplab.model.attention`
(rotary, the mask, multi-head attention), `interplab.model.kv_cache` (generation's key/value cache),
`interplab.model.block` (one block's residual stream) and `interplab.model.transformer` (the whole model).

Shapes use one vocabulary: batch pos d_model n_heads n_kv_heads d_head d_mlp. Per-head tensors
(scores, pattern, per-head results, split inputs) are built only when a hook asks for them; otherwise
attention runs through ``scaled_dot_product_attention``. Each such choice is made at one seam, from
`need` (what the hooks on its points ask); `tests/model/test_fast_paths.py` checks every choice against a
plain reference forward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from interplab.hooks.points import HookPoint
from interplab.hooks.site import Site, SiteKind
from interplab.model.config import Activation, ModelConfig


def _hp(kind: SiteKind, layer: int | None) -> HookPoint:
    return HookPoint(Site(kind, layer))


class _ValueOf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, graph: Tensor) -> Tensor:
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:
        return None, grad


def value_of(value: Tensor, graph: Tensor) -> Tensor:
    """``value`` in the forward pass (bit for bit), with the gradient of ``graph`` (the same quantity computed
    another way). Backward hooks need a tensor the fast path never builds (per-head results, attention
    patterns, split inputs, norm scales): the slow path carries the gradient, the forward stays the fast one."""
    return _ValueOf.apply(value.detach(), graph)


class Need(Enum):
    """What the hooks on a group of points ask of the computation behind them (see `need`). Every fast
    path of the model (fused norm, fused QKV, SDPA, one output matmul, broadcast per-head inputs) is chosen by
    one of these, at one place each."""

    NOTHING = "nothing"
    """no hook: the fast path alone"""
    READ = "read"
    """only read hooks: the fast path's values, the hooked tensors computed beside it and shown"""
    GRAD = "grad"
    """backward hooks (and no forward hook): the fast path's values, the gradient through the hooked tensors"""
    REPLACE = "replace"
    """a forward hook may replace a value: the step-by-step computation, made of the (replaced) values"""


def need(*points: HookPoint | None) -> Need:
    """The strongest `Need` of the hooks on ``points`` (None: a point the model does not have)."""
    wanted = Need.NOTHING
    for point in points:  # a loop, not comprehensions: this runs several times per layer and forward
        if point is None or not point.active:
            continue
        if point.fwd:
            return Need.REPLACE
        wanted = Need.GRAD if point.intervened else wanted if wanted is Need.GRAD else Need.READ
    return wanted


# ---------------------------------------------------------------------------------------------------
def _gelu_new(x: Tensor) -> Tensor:
    """GPT-2's tanh GELU. In bf16/fp16 it is evaluated op by op, as transformers' ``NewGELUActivation`` (and
    TransformerLens) write it, each op rounding to the dtype; in float32 the fused kernel (equal to 1e-7)."""
    if x.dtype in (torch.bfloat16, torch.float16):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[Activation, Callable[[Tensor], Tensor]] = {
    Activation.GELU: F.gelu,
    Activation.GELU_TANH: lambda x: F.gelu(x, approximate="tanh"),
    Activation.GELU_NEW: _gelu_new,
    Activation.RELU: F.relu,
    Activation.SILU: F.silu,
    Activation.GELU_QUICK: lambda x: x * torch.sigmoid(1.702 * x),
}


class MLP(nn.Module):
    """``act(x W_in + b_in) W_out + b_out``, or gated: ``(act(x W_gate) * (x W_in + b_in)) W_out + b_out``
    (``act(x W_gate + b_gate)`` with ``cfg.gate_bias``)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        d, m = cfg.d_model, cfg.d_mlp
        assert m is not None
        self.gated = cfg.gated_mlp
        self.gate_bias = cfg.gated_mlp and cfg.gate_bias
        self.act = _ACTIVATIONS[cfg.act_fn]
        self.W_in = nn.Parameter(torch.empty(d, m))
        self.b_in = nn.Parameter(torch.zeros(m), requires_grad=cfg.mlp_bias)
        if self.gated:
            self.W_gate = nn.Parameter(torch.empty(d, m))
            if cfg.gate_bias:
                self.b_gate = nn.Parameter(torch.zeros(m), requires_grad=cfg.mlp_bias)
        self.W_out = nn.Parameter(torch.empty(m, d))
        self.b_out = nn.Parameter(torch.zeros(d), requires_grad=cfg.mlp_bias)
        self.hook_pre = _hp(SiteKind.MLP_PRE, layer)
        if self.gated:
            self.hook_pre_linear = _hp(SiteKind.MLP_PRE_LINEAR, layer)
        self.hook_post = _hp(SiteKind.MLP_POST, layer)

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        flat = x.reshape(-1, x.shape[-1])
        if self.gated:
            gate = torch.addmm(self.b_gate, flat, self.W_gate) if self.gate_bias else flat @ self.W_gate
            pre = self.hook_pre(gate.view(*x.shape[:-1], -1))
            linear = self.hook_pre_linear(torch.addmm(self.b_in, flat, self.W_in).view(*x.shape[:-1], -1))
            post = self.hook_post(self.act(pre) * linear)
        else:
            pre = self.hook_pre(torch.addmm(self.b_in, flat, self.W_in).view(*x.shape[:-1], -1))
            post = self.hook_post(self.act(pre))
        return torch.addmm(self.b_out, post.reshape(-1, post.shape[-1]), self.W_out).view(*x.shape[:-1], -1)


def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2 style: normal(0, init_range); output projections scaled by 1/sqrt(2 n_layers)."""
    out_std = cfg.init_range / math.sqrt(2 * cfg.n_layers)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("W_"):
            nn.init.normal_(p, std=out_std if leaf in ("W_O", "W_out") else cfg.init_range)
