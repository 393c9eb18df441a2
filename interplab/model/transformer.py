"""`Transformer`: one readable implementation of decoder-only (and bidirectional) transformers with a
hook point on every activation, named as in TransformerLens.

>>> from interplab.model import ModelConfig, Transformer
>>> model = Transformer(ModelConfig(d_model=64, n_layers=2, n_heads=4, d_vocab=100, n_ctx=32))
>>> logits, cache = model.run_with_cache(torch.randint(0, 100, (2, 8)), names=["blocks.1.hook_resid_post"])
>>> cache["resid_post", 1].shape
torch.Size([2, 8, 64])
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interplab.hooks.cache import ActivationCache
from interplab.hooks.points import HookFn, HookPoint, HookRegistry, HookTarget
from interplab.hooks.site import Site, SiteKind
from interplab.hooks.transforms import is_transformed
from interplab.model import compat
from interplab.model.attention import AttnContext, rotary_tables
from interplab.model.block import Block
from interplab.model.compat import ReturnType, StackedWeight
from interplab.model.config import ModelConfig, Positional
from interplab.model.kv_cache import KVCache
from interplab.model.layers import _hp, init_weights
from interplab.model.norms import make_norm
from interplab.model.precision import check_dtype
from interplab.model.rope import RopeScaling, depends_on_length

if TYPE_CHECKING:
    from interplab.data.tokenizer import Tokenizer


class Embed(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))


class PosEmbed(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))


class Unembed(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.tie_embeddings:
            self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab_out))
        self.b_U = nn.Parameter(torch.zeros(cfg.d_vocab_out), requires_grad=cfg.unembed_bias)
        self.hook_in = _hp(SiteKind.UNEMBED_IN, None)  # [batch pos d_model]: ln_final's output
        self.hook_out = _hp(SiteKind.UNEMBED_OUT, None)  # [batch pos d_vocab_out]: before logit soft-capping


class Transformer(nn.Module):
    """A transformer whose every activation is a hook point (see `interplab.hooks.SiteKind`)."""

    if TYPE_CHECKING:
        # an nn.ModuleList at runtime; declared by its items so that `model.blocks[i].attn.W_Q` type-checks
        blocks: Sequence[Block]

    def __init__(self, cfg: ModelConfig, *, init: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.hook_embed = _hp(SiteKind.EMBED, None)
        if cfg.positional is Positional.LEARNED:
            self.pos_embed = PosEmbed(cfg)
            self.hook_pos_embed = _hp(SiteKind.POS_EMBED, None)
        self.blocks = nn.ModuleList([Block(cfg, layer) for layer in range(cfg.n_layers)])  # type: ignore[assignment]
        self.ln_final = make_norm(
            cfg, _hp(SiteKind.LN_FINAL_SCALE, None), _hp(SiteKind.LN_FINAL_NORMALIZED, None)
        )
        self.unembed = Unembed(cfg)
        points = [p for p in vars(self).values() if isinstance(p, HookPoint)]
        for module in (self.ln_final, self.unembed):
            points += [p for m in module.modules() for p in vars(m).values() if isinstance(p, HookPoint)]
        for block in self.blocks:
            points += block.hook_points()
        self.hook_registry = HookRegistry(points, describe=self._describe_missing)
        self.tokenizer: Tokenizer | None = None
        self._rotary_cache: dict[
            tuple[float, RopeScaling | None, torch.dtype, torch.device], tuple[Tensor, Tensor]
        ] = {}
        if init:
            init_weights(self, cfg)
        self.eval()

    # ---- the forward pass, in pieces ----------------------------------------------------------
    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        *,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        stop_at_layer: int | None = None,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
        **unsupported: Any,
    ) -> Any:
        """Logits for ``tokens``. ``attention_mask`` [batch pos] marks real tokens (1) and padding (0):
        padding keys are never attended to and a row's positions start at its first real token
        (`padded_positions`: right pads keep their own positions), so a left- or right-padded batch gives
        each prompt's own logits at its real positions.
        ``stop_at_layer=L`` returns the residual stream entering block L instead of logits.

        ``return_type`` as in TransformerLens: ``"logits"`` (the default), ``"loss"`` (the mean next-token
        cross-entropy, real tokens only under ``attention_mask``; [batch pos-1] with ``loss_per_token``),
        ``"both"`` (``(logits, loss)``) or ``None`` (nothing, for hooks that only collect)."""
        compat.refuse_arguments(unsupported, "the forward (model(...), run_with_hooks, run_with_cache)")
        compat.check_return_type(return_type, stop_at_layer)
        tokens = self.check_tokens(tokens, kv_cache)
        ctx = self.context(tokens, attention_mask, kv_cache)
        resid = self.embed_tokens(tokens, ctx)
        resid = self.run_blocks(resid, ctx, stop=stop_at_layer, kv_cache=kv_cache)
        if stop_at_layer is not None:
            return resid
        logits = self.unembed_resid(resid)
        if logits.device != tokens.device and return_type in ("loss", "both"):  # split across devices
            tokens = tokens.to(logits.device)
            attention_mask = None if attention_mask is None else attention_mask.to(logits.device)
        return compat.finish(logits, tokens, return_type, attention_mask, loss_per_token)

    def context(
        self, tokens: Tensor, attention_mask: Tensor | None = None, kv_cache: KVCache | None = None
    ) -> AttnContext:
        """Positions, key validity and rotary tables for a batch (shared by every layer)."""
        b, p = tokens.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None:
            if attention_mask.shape != tokens.shape:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}"
                )
            attention_mask = attention_mask.to(device=tokens.device, dtype=torch.bool)
        if kv_cache is not None:
            full = kv_cache.extend_mask(attention_mask, b, p, tokens.device)
        else:
            full = attention_mask
        if full is not None and not bool(full.all()):
            positions = self.padded_positions(full)[:, past:]
            key_valid = full
        else:
            positions = torch.arange(past, past + p, device=tokens.device).expand(b, p)
            key_valid = None
        ctx = AttnContext(positions=positions, key_valid=key_valid, past_len=past)
        if self.cfg.positional is Positional.ROTARY:
            ctx.rotary = self._rotary(self.cfg, positions, key_valid is None, past, tokens.device)
            if self.cfg.per_layer_rotary:  # layers with their own base or scaling (Gemma-3)
                by_kind: dict[tuple[float, bool], tuple[Tensor, Tensor]] = {}
                for layer in range(self.cfg.n_layers):
                    kind = (self.cfg.rotary_base_for(layer), self.cfg.rope_scaled(layer))
                    if kind not in by_kind:
                        cfg = self.cfg.rotary_config(layer)
                        by_kind[kind] = self._rotary(cfg, positions, key_valid is None, past, tokens.device)
                    ctx.layer_rotary[layer] = by_kind[kind]
        return ctx

    def _rotary(
        self, cfg: ModelConfig, positions: Tensor, unpadded: bool, past: int, device: torch.device
    ) -> tuple[Tensor, Tensor]:
        if unpadded and not depends_on_length(cfg.rope_scaling):
            # every row has positions past .. past+p: slice the cached table
            return self._rotary_range(past, positions.shape[1], device, cfg)
        if unpadded:  # frequencies that depend on this forward's length: one row's table
            return rotary_tables(cfg, positions[:1], self._rotary_dtype())
        return rotary_tables(cfg, positions, self._rotary_dtype())

    @staticmethod
    def padded_positions(mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
        """The position of every slot of a padded batch: its index minus the row's leading (left) pads.

        Left padding shifts a prompt so that its first real token is position 0 (the leading pads themselves
        get 0), which is what generating from a left-padded batch needs; right pads, and holes in the middle
        of a row, keep their own index as their position, as in TransformerLens (right padding) and
        rust_circuit: a masked slot only hides its key, it does not renumber what follows. A row with no real
        token gets position 0 everywhere.

        >>> Transformer.padded_positions(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]]))
        tensor([[0, 0, 0, 1, 2],
                [0, 1, 2, 3, 4],
                [0, 1, 2, 3, 4]])
        """
        valid = mask.to(torch.bool)
        n = valid.shape[-1]
        leading = torch.where(valid.any(-1), valid.long().argmax(-1), n)  # argmax: the first real slot
        index = torch.arange(n, device=valid.device)
        return (index - leading[:, None]).clamp(min=0)

    def _rotary_dtype(self) -> torch.dtype:
        """The rotary tables' dtype: the model's, or float32 for a half-precision ``rotary_float32`` model."""
        dtype = self.embed.W_E.dtype
        return (
            torch.float32 if self.cfg.rotary_float32 and dtype in (torch.bfloat16, torch.float16) else dtype
        )

    def _rotary_range(
        self, start: int, length: int, device: torch.device, cfg: ModelConfig | None = None
    ) -> tuple[Tensor, Tensor]:
        """cos and sin [1 pos 1 rotary_dim] for positions start .. start+length, from a table kept per rotary
        base, rope scaling, dtype and device (the same values `rotary_tables` gives for ``cfg``, by default the
        model's; `ModelConfig.rotary_config` gives a layer's own), grown by doubling up to n_ctx as longer
        sequences come (a 128k-context model does not build a 128k-position table for a 20-token prompt)."""
        cfg = self.cfg if cfg is None else cfg
        key = (cfg.rotary_base, cfg.rope_scaling, self._rotary_dtype(), device)
        table = self._rotary_cache.get(key)
        if table is None or table[0].shape[1] < start + length:
            n = min(cfg.n_ctx, max(256, 1 << (start + length - 1).bit_length()))
            table = rotary_tables(cfg, torch.arange(n, device=device)[None], key[2])
            kept = {k: v for k, v in self._rotary_cache.items() if k[2:] == key[2:] and k != key}
            self._rotary_cache = {**kept, key: table}
        return table[0][:, start : start + length], table[1][:, start : start + length]

    def embed_tokens(
        self, tokens: Int[Tensor, "batch pos"], ctx: AttnContext
    ) -> Float[Tensor, "batch pos d_model"]:
        resid = self.embed.W_E[tokens]
        if self.cfg.embed_scale is not None:
            # in the embeddings' dtype, as Hugging Face's Gemma multiplies by the rounded scale
            resid = resid * torch.tensor(self.cfg.embed_scale, dtype=resid.dtype)
        resid = self.hook_embed(resid)
        if self.cfg.positional is Positional.LEARNED:
            if ctx.key_valid is None and not self.hook_pos_embed.active:
                # positions are past .. past+pos in every row: a broadcast view of W_pos (never shown to a
                # hook, which might write into it)
                b, p, d = resid.shape
                pos_embed = self.pos_embed.W_pos[ctx.past_len : ctx.past_len + p].expand(b, p, d)
            else:
                pos_embed = self.pos_embed.W_pos[ctx.positions]
            resid = resid + self.hook_pos_embed(pos_embed)
        return resid

    def run_blocks(
        self,
        resid: Float[Tensor, "batch pos d_model"],
        ctx: AttnContext,
        start: int = 0,
        stop: int | None = None,
        kv_cache: KVCache | None = None,
    ) -> Float[Tensor, "batch pos d_model"]:
        """Run blocks ``start`` .. ``stop - 1`` on a residual stream."""
        stop = self.cfg.n_layers if stop is None else stop
        for layer in range(start, stop):
            block = self.blocks[layer]
            device = block.attn.W_Q.device
            if resid.device != device:  # a model split across devices (`interplab.model.placement`)
                resid, ctx = resid.to(device), ctx.to(device)
            resid = block(resid, ctx, kv_cache.layers[layer] if kv_cache is not None else None)
        return resid

    def unembed_resid(self, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab_out"]:
        resid = resid.to(self.unembed.b_U.device)  # (a no-op unless the model is split across devices)
        x = self.unembed.hook_in(self.ln_final(resid))
        logits = self.unembed.hook_out(x @ self.W_U + self.unembed.b_U)
        if self.cfg.logit_softcap is not None:
            logits = self.cfg.logit_softcap * torch.tanh(logits / self.cfg.logit_softcap)
        return logits

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab_out"]:
        return self.embed.W_E.T if self.cfg.tie_embeddings else self.unembed.W_U

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        if self.cfg.positional is not Positional.LEARNED:
            raise AttributeError("W_pos")  # __getattr__ says why
        return self.pos_embed.W_pos

    @property
    def b_U(self) -> Float[Tensor, " d_vocab_out"]:
        return self.unembed.b_U

    # TransformerLens' stacked views of the per-layer weights, [layer, ...] (see `compat.StackedWeight`)
    W_Q = StackedWeight("attn", "W_Q")  # [layer n_heads d_model d_head]
    W_K = StackedWeight("attn", "W_K")  # [layer n_heads d_model d_head], K repeated per query head under GQA
    W_V = StackedWeight("attn", "W_V")  # [layer n_heads d_model d_head], likewise
    W_O = StackedWeight("attn", "W_O")  # [layer n_heads d_head d_model]
    b_Q = StackedWeight("attn", "b_Q")  # [layer n_heads d_head]
    b_K = StackedWeight("attn", "b_K")
    b_V = StackedWeight("attn", "b_V")
    b_O = StackedWeight("attn", "b_O")  # [layer d_model]
    W_in = StackedWeight("mlp", "W_in")  # [layer d_model d_mlp]
    W_gate = StackedWeight("mlp", "W_gate")  # [layer d_model d_mlp], gated MLPs
    W_out = StackedWeight("mlp", "W_out")  # [layer d_mlp d_model]
    b_in = StackedWeight("mlp", "b_in")  # [layer d_mlp]
    b_out = StackedWeight("mlp", "b_out")  # [layer d_model]

    if not TYPE_CHECKING:  # hidden from the type checker, which would otherwise accept any attribute

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                hint = compat.attribute_hint(self, name)
                if hint is None:
                    raise
                raise AttributeError(hint) from None

    # ---- hooks ---------------------------------------------------------------------------------
    @property
    def hook_points(self) -> dict[str, HookPoint]:
        return self.hook_registry.points

    @property
    def hook_names(self) -> list[str]:
        return list(self.hook_registry.points)

    def hooks(
        self,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        read_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
    ) -> contextlib.AbstractContextManager[None]:
        """``with model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", fn)]): ...``; hooks are removed on exit,
        also when the block raises. ``read_hooks`` only look (their return value is ignored), which lets the
        model show views instead of rewritable copies and keep its fused paths (see docs/hooks.md)."""
        return self.hook_registry.scoped(fwd_hooks, bwd_hooks, read_hooks)

    def run_with_hooks(
        self,
        tokens: Tensor,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        **kwargs: Any,
    ) -> Any:
        """Forward with hooks attached for this call only (follows the ambient grad mode); ``kwargs`` go to
        `forward` (``attention_mask``, ``return_type`` ...)."""
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(tokens, **kwargs)

    def run_with_cache(
        self,
        tokens: Tensor,
        names: HookTarget | Sequence[HookTarget] | None = None,
        *,
        names_filter: HookTarget | Sequence[HookTarget] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        grad: bool = False,
        remove_batch_dim: bool = False,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """The forward's output (logits, or what ``return_type`` asks for) and an `ActivationCache` of the named
        hook points (all of them if ``names`` is None). ``names`` is a name, `Site`, ``(short, layer)``
        tuple, a list of them, or a filter over names; ``names_filter`` is TransformerLens' spelling of it.

        Runs under ``torch.no_grad()`` unless ``grad=True``. ``fwd_hooks`` run before caching, so the
        cache holds the (possibly patched) values the model used. ``remove_batch_dim=True`` (a batch of one
        only) caches each activation without its batch dimension, as in TransformerLens. ``dtype`` (e.g.
        ``torch.bfloat16``) stores every cached activation in that dtype, moved to ``device`` if given (None:
        as computed, so a bf16 model's cache is bf16; its norms' ``hook_scale`` and ``hook_normalized`` are
        float32, as TransformerLens reports them)."""
        if names_filter is not None:
            if names is not None:
                raise TypeError("run_with_cache got both names and names_filter (the same thing): give one")
            names = names_filter
        if remove_batch_dim:
            shape = tokens.shape if isinstance(tokens, Tensor) else torch.as_tensor(tokens).shape
            batch = shape[0] if len(shape) == 2 else 1
            if batch != 1:
                raise ValueError(
                    f"remove_batch_dim=True needs a batch of one, got {batch}; cache the batch and index it "
                    "(cache[name][i]) instead"
                )
        return self.cache_call(
            lambda: self(tokens, **kwargs),
            names,
            device=device,
            dtype=dtype,
            grad=grad,
            remove_batch_dim=remove_batch_dim,
            fwd_hooks=fwd_hooks,
        )

    def cache_call(
        self,
        run: Callable[[], Any],
        names: HookTarget | Sequence[HookTarget] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        grad: bool = False,
        remove_batch_dim: bool = False,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
    ) -> tuple[Any, ActivationCache]:
        """`run_with_cache` for any call that runs this model's hook points: ``run()``'s result and the cache
        of the named points (all if None). A model that wraps this one with its own embeddings (the decision
        transformer of `interplab.rl`) caches its forward through it."""
        if names is None:
            targets: list[HookTarget] = [lambda _name: True]
        elif isinstance(names, (str, Site, tuple)) or callable(names):
            targets = [names]
        else:
            targets = list(names)
        store: dict[str, Tensor] = {}
        dtype = check_dtype(dtype, "cache dtype")

        def save(act: Tensor, site: Site) -> None:
            if act.requires_grad and not grad:
                act = act.detach()
            if remove_batch_dim:
                act = act[0]
            if device is not None or dtype is not None:
                act = act.to(device=device, dtype=dtype if act.is_floating_point() else None)
            store[site.name] = act

        with (
            torch.set_grad_enabled(grad and torch.is_grad_enabled()),
            self.hook_registry.scoped(fwd_hooks, read_hooks=[(t, save) for t in targets]),
        ):
            out = run()
        return out, ActivationCache(store, self)

    def _describe_missing(self, name: str) -> str:
        try:
            site = Site.parse(name)
        except ValueError:
            return ""
        if site.layer is not None and site.layer >= self.cfg.n_layers:
            return f"unknown hook point {name!r}: the model has {self.cfg.n_layers} layers (0..{self.cfg.n_layers - 1})"
        reasons = {
            SiteKind.RESID_MID: "parallel or attention-only blocks have no resid_mid",
            SiteKind.POS_EMBED: f"the model uses {self.cfg.positional.value} positions, not learned ones",
            SiteKind.ROT_Q: "the model has no rotary embeddings",
            SiteKind.ROT_K: "the model has no rotary embeddings",
            SiteKind.MLP_PRE_LINEAR: "only gated MLPs have pre_linear",
            SiteKind.ATTN_IN: (
                f"the model shares keys and values between heads ({self.cfg.n_heads} query heads, "
                f"{self.cfg.n_kv_heads} key/value heads), so no per-head input feeds Q, K and V alike: "
                "use hook_q_input, hook_k_input and hook_v_input"
            ),
        }
        for kind in (
            SiteKind.Q_NORM_SCALE,
            SiteKind.Q_NORM_NORMALIZED,
            SiteKind.K_NORM_SCALE,
            SiteKind.K_NORM_NORMALIZED,
        ):
            reasons[kind] = "the model has no q/k norms (qk_norm='none')"
        if not self.cfg.pre_norms:
            why = "the model has no pre-norms (its blocks read the residual stream itself and normalise each sublayer's output, as OLMo-2)"
            for kind in (
                SiteKind.LN1_SCALE,
                SiteKind.LN1_NORMALIZED,
                SiteKind.LN2_SCALE,
                SiteKind.LN2_NORMALIZED,
            ):
                reasons[kind] = why
        mlp_kinds = {
            SiteKind.MLP_IN,
            SiteKind.MLP_PRE,
            SiteKind.MLP_POST,
            SiteKind.MLP_OUT,
            SiteKind.LN2_SCALE,
            SiteKind.LN2_NORMALIZED,
            SiteKind.MLP_PRE_LINEAR,
        }
        if site.kind in mlp_kinds and self.cfg.attn_only:
            return f"unknown hook point {name!r}: the model is attention-only"
        if site.kind in reasons:
            return f"unknown hook point {name!r}: {reasons[site.kind]}"
        return ""

    def hook_shapes(self, batch: int = 1, pos: int = 4) -> dict[str, tuple[int, ...]]:
        """The shape of every hook point for a [batch, pos] input."""
        tokens = torch.zeros(batch, pos, dtype=torch.long, device=self.embed.W_E.device)
        _, cache = self.run_with_cache(tokens)
        return {name: tuple(cache[name].shape) for name in self.hook_names if name in cache}

    # ---- misc ----------------------------------------------------------------------------------
    def check_tokens(self, tokens: Tensor, kv_cache: KVCache | None = None) -> Tensor:
        """``tokens`` as a [batch pos] long tensor, or a clear error: text instead of ids, a wrong shape or
        dtype, more positions than ``n_ctx`` (counting ``kv_cache``'s), an id outside the vocabulary."""
        if (
            isinstance(tokens, str)
            or isinstance(tokens, (list, tuple))
            and tokens
            and isinstance(tokens[0], str)
        ):
            raise TypeError(
                "the model takes token ids, not text: tokenize first, e.g. model(model.to_tokens(text)) "
                "(to_tokens(..., prepend_bos=True) adds a BOS token as TransformerLens does by default)"
            )
        if not isinstance(tokens, Tensor):
            tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        if tokens.dtype not in (torch.long, torch.int32, torch.int64, torch.int16, torch.uint8):
            raise TypeError(f"tokens must be integers, got {tokens.dtype}")
        total = tokens.shape[1] + (kv_cache.length if kv_cache is not None else 0)
        if total > self.cfg.n_ctx:
            raise ValueError(f"sequence of {total} tokens is longer than the model's n_ctx={self.cfg.n_ctx}")
        # under torch.func.vmap (e.g. SGLD chains, `interplab.dynamics`) a data-dependent check cannot run:
        # there the caller's unbatched forwards have checked the same ids
        if tokens.numel() and not is_transformed(tokens):
            lo, hi = (int(v) for v in torch.aminmax(tokens))
            if lo < 0 or hi >= self.cfg.d_vocab:
                bad = hi if hi >= self.cfg.d_vocab else lo
                raise ValueError(
                    f"token id {bad} is out of range: the vocabulary has d_vocab={self.cfg.d_vocab} ids"
                )
        return tokens.long()

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def to_tokens(
        self, text: str | list[str], *, prepend_bos: bool = False, padding_side: str = "right"
    ) -> Tensor:
        """Tokenise with the attached tokenizer (see `interplab.data.tokenizer`)."""
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer attached (load one with interplab.data.load_tokenizer)"
            )
        return self.tokenizer.to_tokens(text, prepend_bos=prepend_bos, padding_side=padding_side)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer attached")
        return self.tokenizer.decode(tokens)

    def save(self, path: str | Path) -> Path:
        """Write ``config.json``, ``model.safetensors`` (and ``tokenizer.json``) to a folder."""
        from interplab.model.io import save_model  # model.io imports this module

        return save_model(self, path)

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"Transformer({c.name or c.architecture or 'model'}: {c.n_layers} layers, d_model {c.d_model}, "
            f"{c.n_heads} heads, d_vocab {c.d_vocab}, n_ctx {c.n_ctx}, {self.n_params:,} params)"
        )
