"""Factorised (LoGra-style) per-example gradient projections: the [n, numel] gradient is never formed.

For a linear layer ``out_t = W x_t (+ b)`` applied at positions t, one example's weight gradient is
``G = sum_t g_t x_t^T`` (g_t: the loss gradient at the layer's output). With a Kronecker-structured projection
``P = P_out (x) P_in``, the projected gradient is ``P_out^T G P_in = sum_t (P_out^T g_t)(P_in^T x_t)^T``: project
the captured inputs and output gradients separately, then sum their outer products over positions. Cost and
memory per example are ``T (d_in k_in + d_out k_out) + T k_in k_out`` instead of ``d_out d_in``; one batched
forward and backward (no parameter gradients, only activation gradients) serves a whole chunk of examples.

Biases are folded in as one extra input coordinate equal to 1 (the homogeneous-coordinate convention of K-FAC).
The token embedding is a linear map of the one-hot token (``linear_sites(model, embedding=True)``): its
projected input is the token's row of ``P_in``. Where only dot products with a few fixed vectors are needed (a
target's gradient, as in TracIn), `factored_dots` computes them exactly from the same captured factors,
``<G, V> = sum_t g_t . (V x_t)``, with no projection; `gain_sites` adds the norms' gains and biases and the
key-smearing gates to it (``<grad w, v> = sum_t (dy_t * xhat_t) . v`` from the norm's input and output gradient).

>>> sites = linear_sites(model)                      # every linear weight of an interplab Transformer
>>> proj = FactoredProjector(sites, dim_in=16, dim_out=16)
>>> feats = factored_grads(model, lm_losses, tokens, proj)   # [n, proj.dim]
>>> feats.shape == (len(tokens), proj.dim)
True

`FactoredProjector.project_grads` applies the same projection to exact per-example gradients (the reference
the tests hold this to, to 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn

from interplab.data_attribution.per_example import logits_of
from interplab.model.config import Norm
from interplab.model.norms import Normalization
from interplab.model.transformer import Transformer

#: a batched objective: (model, batched example tensors...) -> per-example losses [n]
BatchObjective = Callable[..., Tensor]


def lm_losses(model: nn.Module, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy of each sequence of ``tokens [n pos]``: [n] (`lm_loss`, batched)."""
    return next_token_losses(logits_of(model, tokens), tokens)


def next_token_losses(logits: Tensor, tokens: Tensor) -> Tensor:
    """``F.cross_entropy`` of ``logits [n pos vocab]`` at positions ``0..pos-2`` against ``tokens[:, 1:]``,
    averaged per sequence: [n]. The same numbers as slicing, flattening and ``F.cross_entropy`` (float32), but
    it keeps the softmax from the forward and its backward is one multiply, ``softmax * w`` with the one-hot
    targets subtracted in place (``w = 1 / (pos - 1)``, 0 at the last position): two passes over ``[n pos
    vocab]`` instead of the ten of the sliced path (copies of the slice, zero-filled gradient buffers, the log
    softmax's backward), which dominate a small model's backward at long sequences."""
    return _NextTokenCE.apply(logits, tokens)


class _NextTokenCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, tokens: Tensor) -> Tensor:
        x = logits.float()
        probs = torch.softmax(x, dim=-1)  # [n, T, V]; the last position's row is unused
        target = tokens[:, 1:, None]
        logp = probs[:, :-1].gather(-1, target)[..., 0].log()  # [n, T-1]
        tiny = logp.isinf()
        if bool(tiny.any()):  # a target probability below float32's range: log-sum-exp for those rows alone
            rows = x[:, :-1][tiny]
            logp[tiny] = rows.gather(-1, target[tiny]).squeeze(-1) - torch.logsumexp(rows, dim=-1)
        ctx.save_for_backward(probs, tokens)
        ctx.in_dtype = logits.dtype
        return -logp.mean(1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        probs, tokens = ctx.saved_tensors
        n, t, _ = probs.shape
        w = torch.zeros(n, t, 1, dtype=probs.dtype, device=probs.device)
        w[:, :-1] = (grad / (t - 1)).to(probs.dtype)[:, None, None]  # the last position has no target
        g = probs * w
        g[:, :-1].scatter_add_(-1, tokens[:, 1:, None], -w[:, :-1])  # minus the one-hot targets
        return g.to(ctx.in_dtype), None


@dataclass(frozen=True)
class LinearSite:
    """One linear map of a model, seen as ``W [d_out, d_in]`` (plus an optional bias ``[d_out]``).

    ``weight`` / ``bias`` name the parameters; ``to_matrix`` turns the weight's gradient (any layout, with a
    leading batch dim) into ``[n, d_out, d_in]`` and ``bias_to_vec`` the bias's into ``[n, d_out]``."""

    name: str
    weight: str
    bias: str | None
    d_in: int
    d_out: int
    to_matrix: Callable[[Tensor], Tensor] = field(repr=False)
    bias_to_vec: Callable[[Tensor], Tensor] = field(repr=False)
    #: (model, put_input, put_output) -> a context manager that hands over the site's input ``[n, T, d_in]``
    #: (detached) and its output ``[n, T, d_out]`` (in the autograd graph, to take the gradient at)
    capture: Callable[..., AbstractContextManager[object]] = field(repr=False)
    #: the input is token ids ``[n, T]`` standing for one-hot rows times ``input_scale`` (an embedding
    #: ``W [vocab, d]`` seen as a linear map of the one-hot token): its projection is a row lookup of ``P_in``
    one_hot: bool = False
    input_scale: float = 1.0

    @property
    def d_in_aug(self) -> int:
        return self.d_in + (1 if self.bias is not None else 0)

    @property
    def params(self) -> tuple[str, ...]:
        return (self.weight,) if self.bias is None else (self.weight, self.bias)


def _tensor_capture(x: Tensor, put: Callable[[Tensor], None]) -> None:
    # the output itself (in the graph): `capture_factors` asks autograd for the gradient at it
    if x.requires_grad:
        put(x)


@contextmanager
def _module_io(
    module: nn.Module, put_in: Callable[[Tensor], None] | None, put_out: Callable[[Tensor], None] | None
) -> Iterator[None]:
    """Capture a module's first input (value) and its output (in the graph)."""
    handles = []
    if put_in is not None:
        handles.append(module.register_forward_pre_hook(lambda m, args: put_in(args[0].detach())))
    if put_out is not None:
        handles.append(module.register_forward_hook(lambda m, args, out: _tensor_capture(out, put_out)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _point_hooks(
    model: Transformer,
    values: Sequence[tuple[str, Callable[[Tensor], None]]],
    grads: Sequence[tuple[str, Callable]],
) -> AbstractContextManager[None]:
    """Read hook points' values (detached) and outputs (in the graph); the hooks return nothing, so the
    activations are unchanged."""

    def value_fn(put: Callable[[Tensor], None]) -> Callable[[Tensor, object], None]:
        return lambda x, site: put(x.detach())

    def grad_fn(put: Callable[[Tensor], None]) -> Callable[[Tensor, object], None]:
        return lambda x, site: _tensor_capture(x, put)

    hooks = [(n, value_fn(p)) for n, p in values] + [(n, grad_fn(p)) for n, p in grads]
    return model.hooks(fwd_hooks=hooks)


def _nn_linear_site(name: str, module: nn.Linear) -> LinearSite:
    pre = f"{name}." if name else ""

    @contextmanager
    def capture(model: nn.Module, put_in: Callable, put_out: Callable) -> Iterator[None]:
        # the module of the model given (by name), not the one the site was built from: a projector serves
        # every checkpoint of a run
        with _module_io(model.get_submodule(name) if name else model, put_in, put_out):
            yield

    return LinearSite(
        name=name or "linear",
        weight=f"{pre}weight",
        bias=f"{pre}bias" if module.bias is not None and module.bias.requires_grad else None,
        d_in=module.in_features,
        d_out=module.out_features,
        to_matrix=lambda g: g,
        bias_to_vec=lambda g: g,
        capture=capture,
    )


def _input_then_point(module: str, point: str) -> Callable[[Transformer, Callable, Callable], ExitStack]:
    """A site whose input is `module`'s input and whose output gradient is the hook point `point`'s (q/k/v, W_in)."""

    def capture(model: Transformer, put_in: Callable, put_out: Callable) -> ExitStack:
        stack = ExitStack()
        stack.enter_context(_module_io(model.get_submodule(module), put_in, None))
        stack.enter_context(_point_hooks(model, [], [(point, put_out)]))
        return stack

    return capture


def _point_then_output(
    point: str, module: str, flatten_heads: bool = False
) -> Callable[[Transformer, Callable, Callable], ExitStack]:
    """A site whose input is the hook point `point`'s value (hook_z with its heads flattened, hook_post) and whose
    output gradient is `module`'s output's (W_O, W_out)."""

    def capture(model: Transformer, put_in: Callable, put_out: Callable) -> ExitStack:
        stack = ExitStack()
        put = (lambda z: put_in(z.reshape(*z.shape[:2], -1))) if flatten_heads else put_in
        stack.enter_context(_point_hooks(model, [(point, put)], []))
        stack.enter_context(_module_io(model.get_submodule(module), None, put_out))
        return stack

    return capture


def _transformer_sites(model: Transformer) -> list[LinearSite]:
    cfg = model.cfg
    params = dict(model.named_parameters())
    h, dh, d = cfg.n_heads, cfg.d_head, cfg.d_model

    def has(name: str) -> str | None:
        p = params.get(name)
        return name if p is not None and p.requires_grad else None

    sites: list[LinearSite] = []
    for layer, block in enumerate(model.blocks):
        pre = f"blocks.{layer}.attn."
        attn = block.attn
        if getattr(block, "ln1_post", None) is None:
            kv_ok = getattr(cfg, "n_kv_heads", h) in (None, h)
            for w, point in (("Q", attn.hook_q), ("K", attn.hook_k), ("V", attn.hook_v)):
                if (w != "Q" and not kv_ok) or has(pre + f"W_{w}") is None:
                    continue

                sites.append(
                    LinearSite(
                        name=f"{pre}{w.lower()}",
                        weight=pre + f"W_{w}",
                        bias=has(pre + f"b_{w}"),
                        d_in=d,
                        d_out=h * dh,
                        to_matrix=lambda g: g.permute(0, 1, 3, 2).reshape(g.shape[0], h * dh, d),
                        bias_to_vec=lambda g: g.reshape(g.shape[0], h * dh),
                        capture=_input_then_point(pre[:-1], point.name),
                    )
                )
            if has(pre + "W_O") is not None:
                sites.append(
                    LinearSite(
                        name=f"{pre}o",
                        weight=pre + "W_O",
                        bias=has(pre + "b_O"),
                        d_in=h * dh,
                        d_out=d,
                        to_matrix=lambda g: g.reshape(g.shape[0], h * dh, d).transpose(1, 2),
                        bias_to_vec=lambda g: g,
                        capture=_point_then_output(attn.hook_z.name, pre[:-1], flatten_heads=True),
                    )
                )
        mlp = getattr(block, "mlp", None)
        if mlp is not None and getattr(block, "ln2_post", None) is None and hasattr(mlp, "W_in"):
            mpre = f"blocks.{layer}.mlp."
            m = mlp.W_in.shape[1]
            gated = hasattr(mlp, "W_gate")
            ins = [("W_in", "b_in", mlp.hook_pre_linear if gated else mlp.hook_pre)]
            if gated:
                ins.append(("W_gate", "b_gate" if mlp.gate_bias else "", mlp.hook_pre))
            for w, b, point in ins:
                if has(mpre + w) is None:
                    continue

                sites.append(
                    LinearSite(
                        name=f"{mpre}{w[2:]}",
                        weight=mpre + w,
                        bias=has(mpre + b) if b else None,
                        d_in=d,
                        d_out=m,
                        to_matrix=lambda g: g.transpose(1, 2),
                        bias_to_vec=lambda g: g,
                        capture=_input_then_point(mpre[:-1], point.name),
                    )
                )
            if has(mpre + "W_out") is not None:
                sites.append(
                    LinearSite(
                        name=f"{mpre}out",
                        weight=mpre + "W_out",
                        bias=has(mpre + "b_out"),
                        d_in=m,
                        d_out=d,
                        to_matrix=lambda g: g.transpose(1, 2),
                        bias_to_vec=lambda g: g,
                        capture=_point_then_output(mlp.hook_post.name, mpre[:-1]),
                    )
                )
    if has("unembed.W_U") is not None and cfg.logit_softcap is None:
        un = model.unembed

        def cap_u(model: Transformer, put_in: Callable, put_out: Callable):  # noqa: ANN202
            return _point_hooks(model, [(un.hook_in.name, put_in)], [(un.hook_out.name, put_out)])

        v = params["unembed.W_U"].shape[1]
        sites.append(
            LinearSite(
                name="unembed",
                weight="unembed.W_U",
                bias=has("unembed.b_U"),
                d_in=d,
                d_out=v,
                to_matrix=lambda g: g.transpose(1, 2),
                bias_to_vec=lambda g: g,
                capture=cap_u,
            )
        )
    return sites


def embedding_site(model: Transformer) -> LinearSite:
    """The token embedding ``W_E [vocab, d_model]`` as a linear map of the one-hot token (times the
    config's ``embed_scale``): its per-example gradient is ``sum_t onehot(token_t) g_t^T`` with ``g_t`` the
    gradient at ``hook_embed``, so the projected input is the token's row of ``P_in`` (no one-hot is formed).
    Needs untied embeddings (a tied ``W_E`` is also the unembedding: two uses of one matrix)."""
    cfg = model.cfg
    if cfg.tie_embeddings:
        raise ValueError(
            "the embedding of a model with tie_embeddings=True is also its unembedding (one matrix used twice); "
            "factorised projection needs each matrix applied once: use per_example_grads for embed.W_E"
        )

    @contextmanager
    def capture(model: Transformer, put_in: Callable, put_out: Callable) -> Iterator[None]:
        # the token ids reach the embedding through `embed_tokens` (the forward and `logits_of` both call it)
        original = model.embed_tokens

        def embed_tokens(tokens: Tensor, ctx: object) -> Tensor:
            put_in(tokens.detach())
            return original(tokens, ctx)  # type: ignore[arg-type]

        model.embed_tokens = embed_tokens  # type: ignore[method-assign]
        try:
            with _point_hooks(model, [], [(model.hook_embed.name, put_out)]):
                yield
        finally:
            del model.embed_tokens  # the class's method again

    return LinearSite(
        name="embed",
        weight="embed.W_E",
        bias=None,
        d_in=cfg.d_vocab,
        d_out=cfg.d_model,
        to_matrix=lambda g: g.transpose(1, 2),
        bias_to_vec=lambda g: g,
        capture=capture,
        one_hot=True,
        input_scale=1.0 if cfg.embed_scale is None else float(cfg.embed_scale),
    )


@dataclass(frozen=True)
class GainSite:
    """Parameters a Transformer applies elementwise, not as a matrix: a norm's gain and bias (``y = w * xhat +
    b``) or a key-smearing gate (``k' = gate * k + (1 - gate) * k_prev``). ``capture`` hands over what the
    per-example gradient needs beside the output gradient (the norm's input; the smear's ``k - k_prev``) and
    the output (in the graph); ``dots(model, x, g, vector)`` is each example's exact ``<grad, vector>`` over
    ``params`` from them: ``[n]``."""

    name: str
    params: tuple[str, ...]
    capture: Callable[..., AbstractContextManager[object]] = field(repr=False)
    dots: Callable[[nn.Module, Tensor, Tensor, dict[str, Tensor]], Tensor] = field(repr=False)


def _norm_site(name: str, module: nn.Module, params: dict[str, nn.Parameter]) -> GainSite:
    pre = f"{name}."
    names = tuple(p for p in (pre + "w", pre + "b") if p in params and params[p].requires_grad)

    @contextmanager
    def capture(model: nn.Module, put_in: Callable, put_out: Callable) -> Iterator[None]:
        with _module_io(model.get_submodule(name), put_in, put_out):
            yield

    def dots(model: nn.Module, x: Tensor, g: Tensor, vector: dict[str, Tensor]) -> Tensor:
        norm: Any = model.get_submodule(name)
        dims = norm.dims
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        if norm.kind is Norm.LAYERNORM:
            xf = xf - xf.mean(dims, keepdim=True)
        xhat = xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + norm.eps)  # what the gain multiplies
        g = g.to(xhat.dtype)
        n, lead = g.shape[0], tuple(range(1, g.dim() - len(dims)))
        out = g.new_zeros(n)
        for p in names:
            prod = g * xhat if p.endswith(".w") else g
            per = prod.sum(lead) if lead else prod  # [n, *trailing]
            v = vector[p].to(per.dtype)
            if per.shape[1:] != v.shape:  # a full-width key norm repeated per query head: sum the copies
                per = per.view(n, v.shape[0], -1, *v.shape[1:]).sum(2)
            out += (per * v).flatten(1).sum(1)
        return out

    return GainSite(name=name, params=names, capture=capture, dots=dots)


def _smear_site(name: str) -> GainSite:
    """Key smearing of the attention module ``name``: ``d k' / d gate = k - k_prev`` per key head."""

    @contextmanager
    def capture(model: nn.Module, put_in: Callable, put_out: Callable) -> Iterator[None]:
        attn: Any = model.get_submodule(name)
        original = attn._smear

        def smear(k: Tensor, ctx: Any, cache: object) -> Tensor:
            if cache is not None:
                raise ValueError("per-example gradients of a smear gate are taken without a key/value cache")
            shifted = torch.cat([torch.zeros_like(k[:, :1]), k[:, :-1]], dim=1)
            if ctx.key_valid is not None:  # as `_smear`: a left-padded row's first token has no previous key
                shifted = shifted * (ctx.positions > 0)[:, :, None, None].to(k.dtype)
            put_in((k - shifted).detach())
            out = original(k, ctx, cache)
            _tensor_capture(out, put_out)
            return out

        attn._smear = smear
        try:
            yield
        finally:
            del attn._smear  # the class's method again

    def dots(model: nn.Module, x: Tensor, g: Tensor, vector: dict[str, Tensor]) -> Tensor:
        s = cast(Tensor, model.get_submodule(name).smear).detach().float()
        gate = torch.sigmoid(s)
        # [n, heads]: <dL/dk'_h, k_h - k_prev_h> summed over positions
        per = (g.float() * x.float()).sum((1, 3))
        per = per.view(per.shape[0], s.shape[0], -1).sum(2)  # one key per query head: each group's gate
        return per @ (gate * (1 - gate) * vector[f"{name}.smear"].float())

    return GainSite(name=f"{name}.smear", params=(f"{name}.smear",), capture=capture, dots=dots)


def gain_sites(model: Transformer) -> list[GainSite]:
    """The norm gains and biases and the key-smearing gates of an interplab `Transformer` (what
    `linear_sites` leaves out besides learned positions): with `linear_sites(model, embedding=True)`,
    `factored_dots` covers every parameter of such a model."""
    params = dict(model.named_parameters())
    sites = []
    for name, module in model.named_modules():
        if isinstance(module, Normalization):
            site = _norm_site(name, module, params)
            if site.params:
                sites.append(site)
        smear = params.get(f"{name}.smear")
        if smear is not None and smear.requires_grad:
            sites.append(_smear_site(name))
    return sites


def linear_sites(
    model: nn.Module, include: str | None = None, *, embedding: bool = False
) -> list[LinearSite]:
    """The linear maps of ``model`` that factorised projection covers: every ``nn.Linear`` of a plain module, or
    for an interplab `Transformer` the attention's W_Q/W_K/W_V/W_O, the MLP's W_in/W_gate/W_out and the unembedding,
    and with ``embedding=True`` also the token embedding first (`embedding_site`; norms and key-smearing gates
    are `gain_sites`, learned positions are not covered: leave them to `per_example_grads`).
    ``include``: a regular expression on the site names (e.g. ``blocks\\.1\\.`` or ``attn``)."""
    import re

    if isinstance(model, Transformer):
        sites = _transformer_sites(model)
        if embedding and model.embed.W_E.requires_grad:
            sites = [embedding_site(model), *sites]
    else:
        sites = [_nn_linear_site(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        sites = [s for s in sites if dict(model.named_parameters())[s.weight].requires_grad]
    if include is not None:
        pattern = re.compile(include)
        sites = [s for s in sites if pattern.search(s.name)]
    if not sites:
        raise ValueError(
            f"no linear site of {type(model).__name__} matches {include!r}"
            if include
            else f"{type(model).__name__} has no linear layer that factorised projection can cover"
        )
    return sites


class FactoredProjector:
    """Per site, seeded Gaussian ``P_in [d_in(+1), k_in]`` and ``P_out [d_out, k_out]`` (entries N(0, 1/k));
    a side whose size is at most its ``dim`` is not projected (identity), so ``dim_in = dim_out = inf``-like
    sizes give exact per-example gradients. Features are concatenated site by site: ``[n, dim]``."""

    def __init__(
        self, sites: Sequence[LinearSite], *, dim_in: int = 16, dim_out: int = 16, seed: int = 0
    ) -> None:
        if dim_in <= 0 or dim_out <= 0:
            raise ValueError(f"projection sizes must be positive, got dim_in={dim_in}, dim_out={dim_out}")
        self.sites = tuple(sites)
        #: the seed the Gaussians were drawn with; None for `from_matrices`
        self.seed: int | None = seed
        gen = torch.Generator().manual_seed(seed)
        p_in: list[Tensor | None] = []
        p_out: list[Tensor | None] = []
        for s in self.sites:
            p_in.append(_gaussian(s.d_in_aug, dim_in, gen))
            p_out.append(_gaussian(s.d_out, dim_out, gen))
        self._set(p_in, p_out)

    @classmethod
    def from_matrices(
        cls,
        sites: Sequence[LinearSite],
        p_in: Sequence[Tensor | None],
        p_out: Sequence[Tensor | None],
    ) -> FactoredProjector:
        """A projector with given matrices instead of seeded Gaussians (another tool's projections, or a
        structured one of your own): per site ``P_in [d_in(+1), k_in]`` and ``P_out [d_out, k_out]``, ``None``
        for a side left unprojected. A ``P_in`` of only ``d_in`` rows at a site with a bias gets a zero bias
        row: the bias's gradient is left out of the features (what LogIX and bergson do).

        >>> lin = nn.Linear(3, 2)
        >>> proj = FactoredProjector.from_matrices(linear_sites(lin), [torch.eye(3)[:, :1]], [None])
        >>> proj.shapes, proj.dim
        (((2, 1),), 2)
        """
        sites = tuple(sites)
        if len(p_in) != len(sites) or len(p_out) != len(sites):
            raise ValueError(
                f"one P_in and one P_out per site: {len(sites)} site(s), got {len(p_in)} P_in and "
                f"{len(p_out)} P_out"
            )
        ins: list[Tensor | None] = []
        outs: list[Tensor | None] = []
        for s, pi, po in zip(sites, p_in, p_out, strict=True):
            if pi is not None:
                rows = (s.d_in, s.d_in_aug)
                if pi.ndim != 2 or pi.shape[0] not in rows:
                    raise ValueError(
                        f"P_in of site {s.name} must be [d_in, k_in] with d_in in {sorted(set(rows))} "
                        f"(the input{' and its bias coordinate' if s.bias is not None else ''}), got "
                        f"{tuple(pi.shape)}"
                    )
                pi = pi.detach().float()
                if pi.shape[0] < s.d_in_aug:
                    pi = torch.cat([pi, pi.new_zeros(s.d_in_aug - pi.shape[0], pi.shape[1])])
                pi = pi.contiguous()
            if po is not None:
                if po.ndim != 2 or po.shape[0] != s.d_out:
                    raise ValueError(
                        f"P_out of site {s.name} must be [d_out={s.d_out}, k_out], got {tuple(po.shape)}"
                    )
                po = po.detach().float().contiguous()
            ins.append(pi)
            outs.append(po)
        proj = cls.__new__(cls)
        proj.sites, proj.seed = sites, None
        proj._set(ins, outs)
        return proj

    def _set(self, p_in: list[Tensor | None], p_out: list[Tensor | None]) -> None:
        self.p_in, self.p_out = p_in, p_out
        self.shapes = tuple(
            (s.d_out if po is None else po.shape[1], s.d_in_aug if pi is None else pi.shape[1])
            for s, pi, po in zip(self.sites, self.p_in, self.p_out, strict=True)
        )
        self.dim = sum(a * b for a, b in self.shapes)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p for s in self.sites for p in s.params)

    def project_grads(self, grads: dict[str, Tensor]) -> Tensor:
        """The same projection applied to exact gradients ``{param: [n, *param.shape]}``: ``[n, dim]``. The
        reference the factorised path equals, and how a target's gradient is projected (pass ``v[None]``)."""
        parts = []
        for s, pi, po in zip(self.sites, self.p_in, self.p_out, strict=True):
            mat = s.to_matrix(grads[s.weight].float())
            if s.bias is not None:
                mat = torch.cat([mat, s.bias_to_vec(grads[s.bias].float())[..., None]], dim=2)
            if po is not None:
                mat = torch.einsum("nod,ok->nkd", mat, po)
            if pi is not None:
                mat = mat @ pi
            parts.append(mat.flatten(1))
        return torch.cat(parts, dim=1)

    def project_factors(
        self, i: int, x: Tensor, g: Tensor, s_in: Tensor | None = None, s_out: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Site ``i``'s captured input ``[n, T, d_in]`` (token ids ``[n, T]`` for a one-hot site) and output
        gradient ``[n, T, d_out]``, optionally rescaled (``s_in`` over the bias-augmented input, ``s_out`` over
        the output gradient), projected: ``([n, T, k_in], [n, T, k_out])`` float32. Equal to ``(x_aug * s_in) @
        P_in`` and ``(g * s_out) @ P_out`` with ``x_aug`` the input with a bias coordinate 1 appended; the bias
        row and the scales are folded into the ``[d, k]`` matrices instead (no ``[n, T, d_in + 1]`` copy)."""
        s, pi, po = self.sites[i], self.p_in[i], self.p_out[i]
        g = g.float().reshape(g.shape[0], -1, s.d_out)
        if po is None:
            pg = g if s_out is None else g * s_out
        else:
            pg = g @ (po if s_out is None else s_out[:, None] * po)
        if s.one_hot:
            rows = torch.eye(s.d_in) if pi is None else pi  # the projection of each one-hot input
            if s_in is not None:
                rows = s_in[:, None] * rows
            px = rows[x.reshape(x.shape[0], -1)]
            return (px if s.input_scale == 1.0 else px * s.input_scale), pg
        x = x.float().reshape(x.shape[0], -1, s.d_in)
        if pi is None:
            if s.bias is not None:
                x = torch.cat([x, x.new_ones(*x.shape[:2], 1)], dim=2)
            return (x if s_in is None else x * s_in), pg
        w = pi if s_in is None else s_in[:, None] * pi
        px = x @ w[: s.d_in]
        return (px + w[s.d_in] if s.bias is not None else px), pg


def _gaussian(d: int, k: int, gen: torch.Generator) -> Tensor | None:
    if d <= k:
        return None
    return torch.randn(d, k, generator=gen) / math.sqrt(k)


def capture_factors(
    model: nn.Module,
    objective: BatchObjective,
    examples: tuple[Tensor, ...],
    sites: Sequence[LinearSite | GainSite],
) -> tuple[list[Tensor], list[Tensor]]:
    """One batched forward and backward of ``sum_i objective(model, examples)_i``: each site's inputs ``[n, T,
    d_in]`` and output gradients ``[n, T, d_out]`` (the gradient of example i's own loss: examples do not
    interact in the forward). The backward asks autograd for the gradients at the sites' outputs only, so it
    computes no parameter gradient and stops at the lowest site (nothing below layer 0's q/k/v is run)."""
    xs: list[list[Tensor]] = [[] for _ in sites]
    outs: list[list[Tensor]] = [[] for _ in sites]
    n = examples[0].shape[0]
    # every parameter's flag is restored afterwards, also those `_grad_roots` switches on
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    with ExitStack() as stack:
        for i, s in enumerate(sites):
            stack.enter_context(s.capture(model, xs[i].append, outs[i].append))
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.enable_grad():
                examples = tuple(e.detach() for e in examples)
                _grad_roots(model, examples, sites)
                losses = objective(model, *examples)
                if losses.shape != (n,):
                    raise ValueError(
                        f"a batch objective must return [n={n}] losses, got {tuple(losses.shape)}"
                    )
                if not losses.requires_grad:
                    raise ValueError("the objective does not depend on the linear sites' outputs")
                for i, s in enumerate(sites):
                    if len(xs[i]) != 1 or len(outs[i]) != 1:
                        raise ValueError(
                            f"site {s.name} was used {len(xs[i])} time(s) in the forward with {len(outs[i])} "
                            "output(s) in the graph; factorised projection needs each linear map applied once "
                            "per forward"
                        )
                wanted = [o[0] for o in outs]
                gs = torch.autograd.grad(losses.sum(), wanted, allow_unused=True)
        finally:
            for p, r in zip(params, saved, strict=True):
                p.requires_grad_(r)
    # a site the objective does not reach has a zero output gradient
    grads = [torch.zeros_like(o) if g is None else g for o, g in zip(wanted, gs, strict=True)]
    return [x[0] for x in xs], grads


def _grad_roots(
    model: nn.Module, examples: tuple[Tensor, ...], sites: Sequence[LinearSite | GainSite]
) -> None:
    """Make every site's output part of the autograd graph (with the parameters frozen, nothing is): a floating
    input made a leaf, else a Transformer's token embedding, else the sites' weights. No gradient is taken at
    them: they only mark the forward for autograd."""
    if examples[0].is_floating_point():
        examples[0].requires_grad_(True)
        return
    params = dict(model.named_parameters())
    names = ["embed.W_E"] if isinstance(model, Transformer) else [s.params[0] for s in sites]
    for n in names:
        params[n].requires_grad_(True)


#: positions per batched forward/backward of token sequences (measured on induction-2l at 32-256 tokens, one
#: CPU thread: 2048 positions ran 10-15% faster than 8192 at 256 tokens and as fast at 32;
#: benchmarks/bench_attribution.py)
TOKENS_PER_CHUNK = 2048


def default_chunk_size(first: Tensor) -> int:
    """Examples per chunk: ``TOKENS_PER_CHUNK // pos`` for integer token sequences ``[n pos]``, else 256."""
    if not first.is_floating_point() and first.ndim >= 2:
        return max(1, TOKENS_PER_CHUNK // max(first.shape[1], 1))
    return 256


def _chunked_factors(
    model: nn.Module,
    objective: BatchObjective,
    examples: Tensor | tuple[Tensor, ...],
    sites: Sequence[LinearSite | GainSite],
    chunk_size: int | None,
) -> Iterator[tuple[list[Tensor], list[Tensor]]]:
    """`capture_factors` chunk by chunk (``chunk_size`` examples, by default `default_chunk_size`)."""
    examples = examples if isinstance(examples, tuple) else (examples,)
    if isinstance(model, Transformer) and not examples[0].is_floating_point():
        model.check_tokens(examples[0], None)
    n = examples[0].shape[0]
    if chunk_size is None:
        chunk_size = default_chunk_size(examples[0])
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of examples, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield capture_factors(model, objective, tuple(e[start : start + chunk_size] for e in examples), sites)


def factored_grads(
    model: nn.Module,
    objective: BatchObjective,
    examples: Tensor | tuple[Tensor, ...],
    projector: FactoredProjector,
    *,
    chunk_size: int | None = None,
    scales: Sequence[tuple[Tensor | None, Tensor | None]] | None = None,
) -> Tensor:
    """Projected per-example gradients of ``objective`` at the projector's sites, never forming [n, numel]:
    ``[n, projector.dim]``, equal to ``projector.project_grads(exact per-example gradients)``. ``scales``: per
    site an optional rescaling of the (bias-augmented) inputs and of the output gradients before projection
    (a rank-1 elementwise preconditioner, see `interplab.data_attribution.precondition`).

    ``chunk_size``: examples per batched forward and backward; by default `default_chunk_size` (about
    ``TOKENS_PER_CHUNK`` positions for token sequences, so memory is bounded by the chunk, not by ``n``)."""
    out = []
    for xs, gs in _chunked_factors(model, objective, examples, projector.sites, chunk_size):
        parts = []
        for i, (x, g) in enumerate(zip(xs, gs, strict=True)):
            px, pg = projector.project_factors(i, x, g, *(scales[i] if scales is not None else ()))
            parts.append(torch.einsum("ntk,ntj->nkj", pg, px).flatten(1))
        out.append(torch.cat(parts, dim=1))
    return torch.cat(out)


def factored_dots(
    model: nn.Module,
    objective: BatchObjective,
    examples: Tensor | tuple[Tensor, ...],
    sites: Sequence[LinearSite | GainSite],
    vectors: Sequence[dict[str, Tensor]],
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact dot products of every example's gradient at ``sites`` with each of ``vectors`` (one dict per
    vector: parameter name -> a tensor shaped like the parameter, e.g. a target's gradient): ``[n,
    len(vectors)]``, with no projection and no per-example gradient formed. Per site and position,
    ``<g_t x_t^T, V> = g_t . (V x_t)``: one ``[d_in] x [d_in, d_out]`` product per position and vector (a row
    of ``V^T`` for an embedding), the weight-gradient matmul's arithmetic without its [n, d_out, d_in] result."""
    if not vectors:
        raise ValueError("factored_dots needs at least one vector (a dict of parameter name -> tensor)")
    mats: list[tuple[Tensor, Tensor | None] | None] = []
    for s in sites:
        missing = [p for p in s.params if any(p not in v for v in vectors)]
        if missing:
            raise ValueError(f"every vector needs an entry for {', '.join(missing)} (site {s.name})")
        if isinstance(s, GainSite):
            mats.append(None)
            continue
        w = torch.stack([s.to_matrix(v[s.weight][None].float())[0] for v in vectors])  # [m, d_out, d_in]
        if s.one_hot:
            w = w.transpose(1, 2).contiguous()  # [m, vocab, d_out]: one row per token
        b = torch.stack([s.bias_to_vec(v[s.bias][None].float())[0] for v in vectors]) if s.bias else None
        mats.append((w, b))
    out = []
    for xs, gs in _chunked_factors(model, objective, examples, sites, chunk_size):
        n = gs[0].shape[0]
        total = torch.zeros(n, len(vectors))
        for s, mat, x, g in zip(sites, mats, xs, gs, strict=True):
            if isinstance(s, GainSite):
                for j, v in enumerate(vectors):
                    total[:, j] += s.dots(model, x, g, v)
                continue
            assert mat is not None  # every linear site has its matrices
            w, b = mat
            g = g.float().reshape(n, -1, s.d_out)  # [n, T, d_out]
            x = x.reshape(n, -1) if s.one_hot else x.float().reshape(-1, s.d_in)
            for j in range(len(vectors)):
                if s.one_hot:  # V x_t is the token's row of V^T
                    total[:, j] += (w[j][x] * g).sum((1, 2)) * s.input_scale
                elif s.d_out > s.d_in:  # the narrower side: g_t V [d_in] against x_t (the unembedding)
                    total[:, j] += ((g.reshape(-1, s.d_out) @ w[j]).view(n, -1) * x.view(n, -1)).sum(1)
                else:  # V x_t [d_out] against g_t
                    total[:, j] += ((x @ w[j].T).view(n, -1) * g.view(n, -1)).sum(1)
            if b is not None:
                total += g.sum(1) @ b.T
        out.append(total)
    return torch.cat(out)
