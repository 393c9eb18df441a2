"""`Block`: one transformer block, its residual stream written as the maths (``resid_mid = resid_pre +
attn(ln1(resid_pre))``, ``resid_post = resid_mid + mlp(ln2(resid_mid))``), with the seam that chooses shared or
per-head attention inputs."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor, nn

from interplab.hooks.points import HookPoint
from interplab.hooks.site import SiteKind
from interplab.model.attention import Attention, AttnContext, HeadInputs
from interplab.model.config import ModelConfig
from interplab.model.kv_cache import LayerKV
from interplab.model.layers import MLP, Need, _hp, need, value_of
from interplab.model.norms import identity_norm, make_norm


class Block(nn.Module):
    """One transformer block, as nanoGPT writes it::

            resid_mid  = resid_pre + attn(ln1(resid_pre))
            resid_post = resid_mid + mlp(ln2(resid_mid))

        Parallel blocks (GPT-J, NeoX): ``resid_post = resid_pre + attn(ln1(resid_pre)) + mlp(ln2(resid_pre))``;
        attention-only: ``resid_post = resid_pre + attn(ln1(resid_pre))``; post norms (Gemma 2) normalise each
        sublayer's output before it is added (``ln1_post``, ``ln2_post``); without pre norms (OLMo-2) ``ln1`` and
    ``ln2`` are the identity: ``resid_mid = resid_pre + ln1_post(attn(resid_pre))``. Every named tensor passes its hook
        point. `forward` is `attend` (the attention half, which mixes positions) then `finish` (the rest, position
        by position)."""

    # hook points made in __init__ by name (the MLP's, hook_attn_in and hook_resid_mid where the block has them)
    hook_resid_pre: HookPoint
    hook_q_input: HookPoint
    hook_k_input: HookPoint
    hook_v_input: HookPoint
    hook_attn_out: HookPoint
    hook_resid_post: HookPoint

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        pre = cfg.pre_norms  # without pre-norms (OLMo-2) ln1 and ln2 are the identity, without hook points
        self.ln1 = (
            make_norm(cfg, _hp(SiteKind.LN1_SCALE, layer), _hp(SiteKind.LN1_NORMALIZED, layer))
            if pre
            else identity_norm()
        )
        self.attn = Attention(cfg, layer)
        if cfg.post_norms:
            self.ln1_post = make_norm(cfg)
        if cfg.has_mlp:
            self.ln2 = (
                make_norm(cfg, _hp(SiteKind.LN2_SCALE, layer), _hp(SiteKind.LN2_NORMALIZED, layer))
                if pre
                else identity_norm()
            )
            self.mlp = MLP(cfg, layer)
            if cfg.post_norms:
                self.ln2_post = make_norm(cfg)
            self.hook_mlp_in = _hp(SiteKind.MLP_IN, layer)
            self.hook_mlp_out = _hp(SiteKind.MLP_OUT, layer)
        if (
            cfg.n_kv_heads == cfg.n_heads
        ):  # GQA/MQA share K and V between heads: no input per head feeds all three
            self.hook_attn_in = _hp(SiteKind.ATTN_IN, layer)
        for kind in (
            SiteKind.RESID_PRE,
            SiteKind.Q_INPUT,
            SiteKind.K_INPUT,
            SiteKind.V_INPUT,
            SiteKind.ATTN_OUT,
            SiteKind.RESID_POST,
        ):
            setattr(self, kind.value, _hp(kind, layer))
        if cfg.has_mlp and not cfg.parallel_attn_mlp:
            self.hook_resid_mid = _hp(SiteKind.RESID_MID, layer)

    def hook_points(self) -> list[HookPoint]:
        return [v for m in self.modules() for v in vars(m).values() if isinstance(v, HookPoint)]

    def forward(
        self, resid_pre: Float[Tensor, "batch pos d_model"], ctx: AttnContext, cache: LayerKV | None = None
    ) -> Float[Tensor, "batch pos d_model"]:
        """``resid_post`` of the block: `attend`, then `finish`."""
        resid_pre, attn_out = self.attend(resid_pre, ctx, cache)
        return self.finish(resid_pre, attn_out)

    def attend(
        self, resid_pre: Float[Tensor, "batch pos d_model"], ctx: AttnContext, cache: LayerKV | None = None
    ) -> tuple[Float[Tensor, "batch pos d_model"], Float[Tensor, "batch pos d_model"]]:
        """The attention half: ``(resid_pre, attn_out)`` with ``attn_out = attn(ln1(resid_pre))`` (then
        ``ln1_post`` with post norms), each after its hook."""
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self._attn(resid_pre, ctx, cache)
        if self.cfg.post_norms:
            attn_out = self.ln1_post(attn_out)
        return resid_pre, self.hook_attn_out(attn_out)

    def finish(
        self, resid_pre: Float[Tensor, "batch k d_model"], attn_out: Float[Tensor, "batch k d_model"]
    ) -> Float[Tensor, "batch k d_model"]:
        """The rest of the block, position by position: ``resid_mid = resid_pre + attn_out``,
        ``resid_post = resid_mid + mlp(ln2(resid_mid))`` (parallel blocks: ``resid_pre + attn_out +
        mlp(ln2(resid_pre))``; attention-only: ``resid_pre + attn_out``). Attention is the only part of a block
        that mixes positions, so this may be given a subset of the positions (gathered from both), e.g. to
        compute the last block only where a metric reads (``analysis.patching`` does)."""
        if not self.cfg.has_mlp:
            return self.hook_resid_post(resid_pre + attn_out)
        if self.cfg.parallel_attn_mlp:
            # the two outputs summed first, as Hugging Face's NeoX does (the same bf16 rounding)
            return self.hook_resid_post(resid_pre + (attn_out + self._mlp(resid_pre)))
        resid_mid = self.hook_resid_mid(resid_pre + attn_out)
        return self.hook_resid_post(resid_mid + self._mlp(resid_mid))

    def _attn(self, resid_pre: Tensor, ctx: AttnContext, cache: LayerKV | None) -> Tensor:
        """``attn(ln1(resid_pre))``. The seam for the per-head inputs (``hook_attn_in``, ``hook_q_input`` ...):
        nobody asks for them, or only reads them: every head reads ln1's one output (read hooks see broadcast
        views of the residual stream, no copies); a forward hook may rewrite them: each head reads its own
        normalised copy (`HeadInputs`; ln1's hooks still see ln1's output, but a replacement made at ln1 is not
        used: patch hook_q_input etc. instead); backward hooks only: ln1's values, the gradient through the
        per-head copies."""
        inputs = self._head_input_points()
        wanted = need(*inputs)
        if wanted is Need.REPLACE:
            heads = self._split_inputs(resid_pre)
            if need(self.ln1.hook_normalized, self.ln1.hook_scale) is not Need.NOTHING:
                self.ln1(resid_pre)  # observed for caches
            return self.attn(heads, ctx, cache)
        if wanted is Need.GRAD:
            heads = self._split_inputs(resid_pre)
            shared = self.attn.project(self.ln1(resid_pre))
            q, k, v = map(value_of, shared, self.attn.project(heads))
            return self.attn.output(self.attn.attend(q, k, v, ctx, cache))
        if wanted is Need.READ:
            b, p, d = resid_pre.shape
            for point in inputs:
                if point.active:
                    point(resid_pre[:, :, None, :].expand(b, p, self._n_inputs(point), d))
        return self.attn(self.ln1(resid_pre), ctx, cache)

    def _mlp(self, resid: Tensor) -> Tensor:
        """``mlp(ln2(resid))`` (then ``ln2_post`` with post norms), with ``hook_mlp_in`` and ``hook_mlp_out``."""
        if self.hook_mlp_in.intervened:  # a copy, so that patching mlp_in leaves resid_mid alone
            resid = self.hook_mlp_in(resid.clone())
        elif self.hook_mlp_in.active:
            self.hook_mlp_in(resid)
        out = self.mlp(self.ln2(resid))
        if self.cfg.post_norms:
            out = self.ln2_post(out)
        return self.hook_mlp_out(out)

    def _head_input_points(self) -> tuple[HookPoint, ...]:
        """``hook_attn_in`` (where the model has it), then ``hook_q_input``, ``hook_k_input``, ``hook_v_input``."""
        qkv = (self.hook_q_input, self.hook_k_input, self.hook_v_input)
        return qkv if getattr(self, "hook_attn_in", None) is None else (self.hook_attn_in, *qkv)

    def _n_inputs(self, point: HookPoint) -> int:
        kv = point is self.hook_k_input or point is self.hook_v_input
        return self.cfg.n_kv_heads if kv else self.cfg.n_heads

    def _split_inputs(self, resid: Tensor) -> HeadInputs:
        """Per-head copies of the residual stream feeding Q, K and V, each normalised separately
        (ln1's own hooks do not fire on this path). ``hook_attn_in`` (one copy per head, feeding its Q, K and V)
        comes first; ``hook_q_input`` etc. are copies of it."""
        b, p, d = resid.shape
        norm = self.ln1.normalize  # ln1's own hooks do not fire on this path
        source = resid[:, :, None, :]
        attn_in = getattr(self, "hook_attn_in", None)
        if attn_in is not None and attn_in.active:
            source = attn_in(source.expand(b, p, self.cfg.n_heads, d).clone())
        out = []
        for point in (self.hook_q_input, self.hook_k_input, self.hook_v_input):
            copies = source.expand(b, p, self._n_inputs(point), d).clone()
            out.append(norm(point(copies)))
        return HeadInputs(out[0], out[1], out[2])
