"""`DecisionTransformer`: a return-conditioned trajectory model on interplab's `Transformer`.

A window of K steps is the token sequence ``[R_1, s_1, a_1, ..., R_K, s_K, a_K]`` (3K tokens): the return to
go, the observation (MiniGrid's egocentric [7, 7, 3] view) and the action of each step. The action logits of
step t are read at the state token ``s_t``, so causal attention lets them see ``R_<=t, s_<=t, a_<t`` and never
``a_t``.

The blocks, the final norm and the action head are an ordinary interplab `Transformer` (``.transformer``), so
every TransformerLens hook name works (``blocks.0.hook_resid_pre``, ``blocks.1.attn.hook_pattern``,
``ln_final.hook_normalized``, ...) and `ActivationCache` tools (``decompose_resid``, DLA onto ``W_U``) read it
as they read a language model. Its pieces mean:

- ``embed.W_E`` [n_actions + 1, d_model]: the action embedding (the last row, index ``n_actions``, is the
  "no action yet / padding" token);
- ``hook_embed`` [batch 3T d_model]: the interleaved token embeddings (return, state, action), before time;
- ``pos_embed.W_pos`` [n_ctx, d_model]: the *timestep* table (a token's position is its step's timestep in
  the episode, shared by the three tokens of a step), shown at ``hook_pos_embed``;
- ``unembed.W_U`` [d_model, n_actions]: the action head (``hook_unembed_out``: logits at every token; the
  model returns those at the state tokens).

The return and state embeddings are the DT's own modules (``rtg_embed``; ``state_embed``: a linear map of the
one-hot grid, the default, or a small conv net).

>>> model = DecisionTransformer(DTConfig(env="MiniGrid-MemoryS7-v0", context=4, max_timestep=245))
>>> rtg, obs = torch.ones(2, 4), torch.zeros(2, 4, 7, 7, 3, dtype=torch.uint8)
>>> actions, timesteps = torch.zeros(2, 4, dtype=torch.long), torch.arange(4).expand(2, 4)
>>> model(rtg, obs, actions, timesteps).shape  # action logits of every step
torch.Size([2, 4, 7])
>>> _, cache = model.run_with_cache(rtg, obs, actions, timesteps, names=["blocks.0.attn.hook_pattern"])
>>> cache["blocks.0.attn.hook_pattern"].shape  # [batch, head, query token, key token]
torch.Size([2, 4, 12, 12])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from interplab import runs
from interplab.hooks.cache import ActivationCache
from interplab.hooks.points import HookFn, HookTarget
from interplab.integrity import forget_checksums, record_checksums, verify_checksums
from interplab.io import load_tensors, save_tensors
from interplab.model.attention import AttnContext
from interplab.model.config import Activation, ModelConfig, Norm, Positional
from interplab.model.kv_cache import KVCache, LayerKV
from interplab.model.transformer import Transformer

__all__ = [
    "DT_MODEL_KIND",
    "TOKEN_KINDS",
    "DTConfig",
    "DecisionTransformer",
    "StateEmbedding",
    "StepCache",
    "load_dt",
    "save_dt",
    "token_index",
]

DT_CONFIG_VERSION = 1
DT_MODEL_KIND = runs.Kind.DT_MODEL.value
"""``config.json``'s ``kind`` in a decision-transformer folder"""

TOKEN_KINDS = ("rtg", "state", "action")
"""the three tokens of a step, in sequence order"""

MINIGRID_OBS_VALUES = (11, 6, 3)
"""values of each channel of MiniGrid's view: 11 object types, 6 colours, 3 door states"""


def token_index(step: int, kind: str) -> int:
    """The sequence position of step ``step``'s ``kind`` token (kind in `TOKEN_KINDS`).

    >>> token_index(0, "state"), token_index(2, "action")
    (1, 8)
    """
    if kind not in TOKEN_KINDS:
        raise ValueError(f"token kind {kind!r} is not one of {TOKEN_KINDS}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return 3 * step + TOKEN_KINDS.index(kind)


class StateEmbedding(str, Enum):
    """How an observation becomes a state token."""

    LINEAR = "linear"
    """a linear map of the one-hot grid (every cell x channel value has its own d_model vector, summed)"""
    CONV = "conv"
    """a small conv net (two 3x3 convolutions with ReLU) over the one-hot grid, then a linear map"""


@dataclass(frozen=True, kw_only=True)
class DTConfig:
    """Architecture of a `DecisionTransformer`."""

    env: str
    """the environment the model acts in (informational; `interplab.rl.envs` names)"""
    context: int
    """K: timesteps per window (the sequence is 3K tokens)"""
    max_timestep: int
    """the largest timestep the model embeds (the environment's max_steps)"""
    n_actions: int = 7
    """discrete actions (MiniGrid: 7); the action table has one more row, the "no action yet / pad" token"""
    obs_shape: tuple[int, int, int] = (7, 7, 3)
    """the observation grid (height, width, channels)"""
    obs_values: tuple[int, ...] = MINIGRID_OBS_VALUES
    """number of values of each observation channel (one-hot sizes; MiniGrid: objects, colours, states)"""
    d_model: int = 64
    """width of the residual stream"""
    n_layers: int = 2
    """number of transformer blocks"""
    n_heads: int = 4
    """attention heads per block"""
    d_head: int = None  # type: ignore[assignment]  # None: derived in __post_init__
    """width of each head; defaults to d_model // n_heads"""
    d_mlp: int = None  # type: ignore[assignment]  # None: derived in __post_init__
    """MLP hidden width; defaults to 4 * d_model"""
    attn_only: bool = False
    """no MLPs"""
    act_fn: Activation = Activation.GELU
    """MLP non-linearity"""
    normalization: Norm = Norm.LAYERNORM
    """norm before attention, MLP and the action head"""
    state_embedding: StateEmbedding = StateEmbedding.LINEAR
    """how observations are embedded"""
    conv_channels: int = 32
    """channels of the conv state embedding (unused by the linear one)"""
    rtg_scale: float = 1.0
    """the return to go enters its embedding as rtg / rtg_scale (MiniGrid returns are at most 1)"""
    init_range: float = 0.02
    """standard deviation of the initial weights"""

    def __post_init__(self) -> None:
        for name, enum in (
            ("act_fn", Activation),
            ("normalization", Norm),
            ("state_embedding", StateEmbedding),
        ):
            value = getattr(self, name)
            if not isinstance(value, enum):
                try:
                    object.__setattr__(self, name, enum(value))
                except ValueError:
                    valid = ", ".join(e.value for e in enum)
                    raise ValueError(f"{name}={value!r} is not one of: {valid}") from None
        object.__setattr__(self, "obs_shape", tuple(self.obs_shape))
        object.__setattr__(self, "obs_values", tuple(self.obs_values))
        if not isinstance(self.env, str) or not self.env:
            raise ValueError(f"env must be a non-empty environment name, got {self.env!r}")
        for name in (
            "context",
            "max_timestep",
            "n_actions",
            "d_model",
            "n_layers",
            "n_heads",
            "conv_channels",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if len(self.obs_shape) != 3 or any(not isinstance(v, int) or v <= 0 for v in self.obs_shape):
            raise ValueError(
                f"obs_shape must be three positive ints (height, width, channels), got {self.obs_shape}"
            )
        if len(self.obs_values) != self.obs_shape[2] or any(
            not isinstance(v, int) or v <= 0 for v in self.obs_values
        ):
            raise ValueError(
                f"obs_values must give a positive count for each of the {self.obs_shape[2]} observation channels, "
                f"got {self.obs_values}"
            )
        if not self.rtg_scale > 0:
            raise ValueError(f"rtg_scale must be positive, got {self.rtg_scale}")
        if not self.init_range > 0:
            raise ValueError(f"init_range must be positive, got {self.init_range}")
        # derive d_head / d_mlp and validate the transformer's part through ModelConfig
        model_cfg = self._model_config()
        object.__setattr__(self, "d_head", model_cfg.d_head)
        object.__setattr__(self, "d_mlp", model_cfg.d_mlp)

    def _model_config(self) -> ModelConfig:
        return ModelConfig(
            d_model=self.d_model,
            n_layers=self.n_layers,
            n_heads=self.n_heads,
            d_head=self.d_head,
            d_mlp=self.d_mlp,
            attn_only=self.attn_only,
            act_fn=self.act_fn,
            normalization=self.normalization,
            d_vocab=self.n_actions + 1,
            d_vocab_out=self.n_actions,
            n_ctx=max(3 * self.context, self.max_timestep + 1),
            positional=Positional.LEARNED,
            init_range=self.init_range,
            name=f"dt:{self.env}",
            architecture="decision_transformer",
        )

    @property
    def model_config(self) -> ModelConfig:
        """The inner `Transformer`'s config: d_vocab = n_actions + 1 (the action table), d_vocab_out = n_actions
        (the action head), learned positions indexed by timestep (n_ctx covers max_timestep and 3 * context)."""
        return self._model_config()

    @property
    def pad_action(self) -> int:
        """The action id of "no action yet" (the last step of a prediction) and of padding steps."""
        return self.n_actions

    @property
    def n_tokens(self) -> int:
        """Tokens in a full window (3 * context)."""
        return 3 * self.context

    def replace(self, **changes: Any) -> DTConfig:
        return dataclasses.replace(self, **changes)

    # ---- files ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": DT_CONFIG_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DTConfig:
        data = dict(data)
        kind = data.pop("kind", DT_MODEL_KIND)
        if kind != DT_MODEL_KIND:
            raise ValueError(
                f"this is a {kind!r} document, not a decision-transformer config ({DT_MODEL_KIND!r})"
            )
        version = data.pop("version", DT_CONFIG_VERSION)
        if not isinstance(version, int) or version > DT_CONFIG_VERSION:
            raise ValueError(
                f"DT config version {version!r} is newer than this interplab ({DT_CONFIG_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown DTConfig fields {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


class _ConvStateEmbed(nn.Module):
    def __init__(self, cfg: DTConfig) -> None:
        super().__init__()
        h, w, _ = cfg.obs_shape
        c = cfg.conv_channels
        self.conv1 = nn.Conv2d(sum(cfg.obs_values), c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.out = nn.Linear(c * h * w, cfg.d_model)

    def forward(self, onehot: Float[Tensor, "n channels h w"]) -> Float[Tensor, "n d_model"]:
        x = torch.relu(self.conv1(onehot))
        x = torch.relu(self.conv2(x))
        return self.out(x.flatten(1))


class DecisionTransformer(nn.Module):
    """A decision transformer whose blocks are an interplab `Transformer` (see the module docstring)."""

    _onehot_base: Tensor  # [h w c]: the one-hot index of value 0 of each cell's channel
    _obs_limits: Tensor  # [c]: values per channel

    def __init__(self, cfg: DTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg.model_config)
        self.rtg_embed = nn.Linear(1, cfg.d_model)
        h, w, c = cfg.obs_shape
        offsets = torch.tensor([0, *cfg.obs_values[:-1]]).cumsum(0)  # each channel's first one-hot index
        # the one-hot index of (cell, channel, value) is cell * sum(obs_values) + offsets[channel] + value
        cells = torch.arange(h * w).view(h, w, 1) * sum(cfg.obs_values)
        self.register_buffer("_onehot_base", (cells + offsets.view(1, 1, c)).long(), persistent=False)
        self.register_buffer("_obs_limits", torch.tensor(cfg.obs_values), persistent=False)
        self.state_embed: nn.Module
        if cfg.state_embedding is StateEmbedding.LINEAR:
            self.state_embed = nn.EmbeddingBag(h * w * sum(cfg.obs_values), cfg.d_model, mode="sum")
            self.state_bias = nn.Parameter(torch.zeros(cfg.d_model))
        else:
            self.state_embed = _ConvStateEmbed(cfg)
        for name, p in self.named_parameters():
            if name.startswith(("rtg_embed", "state_embed")):
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                else:
                    nn.init.normal_(p, std=cfg.init_range)
        self.eval()

    # ---- inputs --------------------------------------------------------------------------------
    def check_inputs(
        self,
        rtg: Tensor,
        obs: Tensor,
        actions: Tensor,
        timesteps: Tensor,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """The inputs on the model's device, padding steps neutralised, or a clear error (wrong shapes,
        a window longer than ``context``, an action, timestep or observation value out of range)."""
        device = self.rtg_embed.weight.device
        if obs.dim() != 5 or tuple(obs.shape[2:]) != self.cfg.obs_shape:
            raise ValueError(
                f"obs must be [batch, T, {', '.join(map(str, self.cfg.obs_shape))}], got shape {tuple(obs.shape)}"
            )
        b, t = obs.shape[:2]
        for name, x in (("rtg", rtg), ("actions", actions), ("timesteps", timesteps)):
            if tuple(x.shape) != (b, t):
                raise ValueError(
                    f"{name} must be [batch, T] = [{b}, {t}] like obs, got shape {tuple(x.shape)}"
                )
        if t == 0 or t > self.cfg.context:
            raise ValueError(f"a window has 1..context={self.cfg.context} steps, got T={t}")
        if actions.is_floating_point() or timesteps.is_floating_point():
            raise TypeError("actions and timesteps must be integer tensors")
        rtg = rtg.to(device=device, dtype=self.rtg_embed.weight.dtype)
        actions, timesteps = (x.to(device=device, dtype=torch.long) for x in (actions, timesteps))
        obs = obs.to(device)  # kept in its (small) dtype: the one-hot index widens it
        mask = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (b, t):
                raise ValueError(
                    f"attention_mask must be [batch, T] = [{b}, {t}], got shape {tuple(attention_mask.shape)}"
                )
            mask = attention_mask.to(device=device, dtype=torch.bool)
            if bool(mask.all()):
                mask = None
            else:  # padding steps hold anything (NaN returns, out-of-range ids): make them neutral
                rtg = torch.where(mask, rtg, 0.0)
                obs = obs * mask[..., None, None, None].to(obs.dtype)
                actions = torch.where(mask, actions, self.cfg.pad_action)
                timesteps = torch.where(mask, timesteps, 0)
        self._check_range("actions", actions, 0, self.cfg.pad_action)
        self._check_range("timesteps", timesteps, 0, self.cfg.max_timestep)
        if obs.numel():
            channels = obs.reshape(-1, obs.shape[-1])
            high = channels.amax(0)
            low = channels.amin(0) if obs.dtype.is_signed else torch.zeros_like(high)
            if bool(((high >= self._obs_limits) | (low < 0)).any()):
                bad = (obs < 0) | (obs >= self._obs_limits)
                where = [int(i) for i in bad.nonzero()[0]]
                raise ValueError(
                    f"observation value {int(obs[tuple(where)])} at {tuple(where)} is out of range: channel "
                    f"{where[-1]} has {self.cfg.obs_values[where[-1]]} values (obs_values={self.cfg.obs_values})"
                )
        return rtg, obs, actions, timesteps, mask

    @staticmethod
    def _check_range(name: str, x: Tensor, lo: int, hi: int) -> None:
        if x.numel():
            low, high = (int(v) for v in torch.aminmax(x))
            if low < lo or high > hi:
                raise ValueError(f"{name} must lie in {lo}..{hi}, got {low if low < lo else high}")

    # ---- the forward pass ----------------------------------------------------------------------
    def token_embeddings(
        self,
        rtg: Float[Tensor, "batch T"],
        obs: Int[Tensor, "batch T h w c"],
        actions: Int[Tensor, "batch T"],
    ) -> Float[Tensor, "batch 3T d_model"]:
        """The interleaved return, state and action embeddings (no time), on checked inputs."""
        b, t = rtg.shape
        r = self.rtg_embed((rtg / self.cfg.rtg_scale)[..., None])
        s = self._embed_states(obs.flatten(0, 1)).view(b, t, -1)
        a = F.embedding(actions, self.transformer.embed.W_E)
        return torch.stack([r, s, a], dim=2).flatten(1, 2)

    def _embed_states(self, obs: Int[Tensor, "n h w c"]) -> Float[Tensor, "n d_model"]:
        index = (self._onehot_base + obs.long()).flatten(1)  # n, h*w*c one-hot indices
        if isinstance(self.state_embed, nn.EmbeddingBag):
            return self.state_embed(index) + self.state_bias
        h, w, _ = self.cfg.obs_shape
        onehot = torch.zeros(obs.shape[0], h * w * sum(self.cfg.obs_values), device=obs.device)
        onehot = onehot.scatter_(1, index, 1.0).view(obs.shape[0], h, w, -1).permute(0, 3, 1, 2)
        return self.state_embed(onehot.to(self.rtg_embed.weight.dtype))

    def _embed(
        self, rtg: Tensor, obs: Tensor, actions: Tensor, timesteps: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, AttnContext]:
        tf = self.transformer
        positions = timesteps.repeat_interleave(3, dim=1)  # the three tokens of a step share its timestep
        key_valid = None if mask is None else mask.repeat_interleave(3, dim=1)
        ctx = AttnContext(positions=positions, key_valid=key_valid)
        resid = tf.hook_embed(self.token_embeddings(rtg, obs, actions))
        resid = resid + tf.hook_pos_embed(F.embedding(positions, tf.pos_embed.W_pos))
        return resid, ctx

    def embed(
        self,
        rtg: Float[Tensor, "batch T"],
        obs: Int[Tensor, "batch T h w c"],
        actions: Int[Tensor, "batch T"],
        timesteps: Int[Tensor, "batch T"],
        attention_mask: Bool[Tensor, "batch T"] | None = None,
    ) -> Float[Tensor, "batch 3T d_model"]:
        """The residual stream entering block 0: token embeddings (``hook_embed``) + timestep embeddings
        (``hook_pos_embed``), interleaved ``[R_1, s_1, a_1, ...]`` (see `token_index`)."""
        return self._embed(*self.check_inputs(rtg, obs, actions, timesteps, attention_mask))[0]

    def forward(
        self,
        rtg: Float[Tensor, "batch T"],
        obs: Int[Tensor, "batch T h w c"],
        actions: Int[Tensor, "batch T"],
        timesteps: Int[Tensor, "batch T"],
        attention_mask: Bool[Tensor, "batch T"] | None = None,
    ) -> Float[Tensor, "batch T n_actions"]:
        """Action logits of every step, read at its state token. ``attention_mask`` marks real steps (True)
        and padding (False; left padding of windows shorter than ``context``)."""
        return self.forward_checked(*self.check_inputs(rtg, obs, actions, timesteps, attention_mask))

    def forward_checked(
        self,
        rtg: Float[Tensor, "batch T"],
        obs: Int[Tensor, "batch T h w c"],
        actions: Int[Tensor, "batch T"],
        timesteps: Int[Tensor, "batch T"],
        mask: Bool[Tensor, "batch T"] | None,
    ) -> Float[Tensor, "batch T n_actions"]:
        """`forward` on inputs as `check_inputs` returns them (on the model's device, padding neutral, ``mask``
        None when every step is real), skipping the checks: for a loop over inputs validated once (training
        batches cut from a data set checked at setup)."""
        resid, ctx = self._embed(rtg, obs, actions, timesteps, mask)
        resid = self.transformer.run_blocks(resid, ctx)
        if not self.transformer.hook_registry.any_active:  # nobody looks: the head runs at state tokens only
            return self.transformer.unembed_resid(resid[:, 1::3])
        # hooks see every token (ln_final and unembed points are [batch 3T ...], as for a language model)
        return self.transformer.unembed_resid(resid)[:, 1::3]

    def predict(
        self,
        rtg: Float[Tensor, "batch T"],
        obs: Int[Tensor, "batch T h w c"],
        actions: Int[Tensor, "batch T"],
        timesteps: Int[Tensor, "batch T"],
        attention_mask: Bool[Tensor, "batch T"] | None = None,
    ) -> Float[Tensor, "batch n_actions"]:
        """Logits of the action at the last step (its action is not known yet: whatever ``actions[:, -1]``
        holds is replaced by the "no action yet" token, which the state token cannot see anyway).

        Without active hooks only what those logits depend on is computed: the last action token (which no
        earlier token attends to) is left out, and the last block runs at the last state token alone, on the
        keys and values of every token before it (`Block.finish` is position by position); equal to
        ``forward(...)[:, -1]`` to float precision. With hooks, the full `forward` (every hook sees every
        token)."""
        actions = actions.clone()
        actions[:, -1] = self.cfg.pad_action
        if self.transformer.hook_registry.any_active:
            return self(rtg, obs, actions, timesteps, attention_mask)[:, -1]
        return self._predict_checked(*self.check_inputs(rtg, obs, actions, timesteps, attention_mask))

    def _predict_checked(
        self, rtg: Tensor, obs: Tensor, actions: Tensor, timesteps: Tensor, mask: Tensor | None
    ) -> Float[Tensor, "batch n_actions"]:
        """`predict` without hooks, on checked inputs (see `predict`)."""
        resid, ctx = self._embed(rtg, obs, actions, timesteps, mask)
        resid = resid[:, :-1]  # [R_1, s_1, a_1, ..., R_T, s_T]: the last token is the state predicting a_T
        key_valid = None if ctx.key_valid is None else ctx.key_valid[:, :-1]
        return self._window_logits(resid, ctx.positions[:, :-1], key_valid, start=0)

    def _window_logits(
        self, resid: Tensor, positions: Tensor, key_valid: Tensor | None, start: int
    ) -> Float[Tensor, "batch n_actions"]:
        """The logits at the last token of a window whose residual stream enters block ``start``: blocks
        ``start`` .. L-2 on every token, then the last block at the last token alone, on the keys and values of
        the tokens before it (their queries are never read: only K and V are projected for them)."""
        tf = self.transformer
        ctx = AttnContext(positions=positions, key_valid=key_valid)
        resid = tf.run_blocks(resid, ctx, start=start, stop=self.cfg.n_layers - 1)
        last = tf.blocks[-1]
        past = resid.shape[1] - 1
        k, v = _project_kv(last.attn, last.ln1(resid[:, :past]))  # the keys and values of the earlier tokens
        ctx = AttnContext(positions=positions[:, past:], key_valid=key_valid, past_len=past)
        out = last(resid[:, past:], ctx, LayerKV(k, v))
        return tf.unembed_resid(out[:, 0])

    # ---- incremental prediction (rollouts) -------------------------------------------------------
    def step_cache(self, n: int) -> StepCache:
        """An empty `StepCache` of ``n`` rows (one per parallel episode) for `predict_step`."""
        return StepCache(self, n)

    def predict_step(
        self,
        cache: StepCache,
        rows: Int[Tensor, " b"],
        rtg: Float[Tensor, " b"],
        obs: Int[Tensor, "b h w c"],
        prev_action: Int[Tensor, " b"],
        timestep: Int[Tensor, " b"],
    ) -> Float[Tensor, "b n_actions"]:
        """`predict`'s logits for the next step of the episodes in ``cache``'s ``rows``, computing only what
        the new step changes (its tokens: the previous step's now known action, the return to go and the
        state); the cache then holds this step too. Equal to `predict` on the episode's window (its last
        ``context`` steps, left-padded while shorter) to float precision at every step.

        While a row holds fewer than ``context`` steps (`StepCache.fits`), and at every step of a one-layer
        model, the new tokens run through every layer against the cached keys and values of the earlier ones
        (incremental decoding). Once the window is full it drops its first step at each new one, and every
        later token of the layers after the first attended to that step: their keys and values are no longer
        the window's. What stays exact is what depends on a token alone: its embedding (the timestep table is
        indexed by the episode's timestep, not by the slot in the window) and layer 0's queries, keys and
        values. So a row past the context takes those of the earlier tokens from the cache, recomputes layer
        0's attention and the blocks after it on the window, and the last block at the last token only (as
        `predict` does). A row's first step (after `StepCache.clear`) ignores ``prev_action``. The inputs are
        not range-checked as `forward`'s are (an out-of-range index fails in the embedding); hooks see the new
        tokens (layer 0's q, k, v and, incrementally, every layer) or the window (what a row past the context
        recomputes)."""
        cfg, tf = self.cfg, self.transformer
        rows = torch.as_tensor(rows, dtype=torch.long)
        device, b = cache.valid.device, rows.shape[0]
        steps = cache.steps[rows]
        first = steps == 0
        rows_dev = rows.to(device)
        everyone = b == cache.n and bool((rows == cache.arange).all())
        pick = (lambda x: x) if everyone else (lambda x: x[rows_dev])  # noqa: E731  (all rows: no gather)
        first_dev = first.to(device)
        times = torch.stack(
            [torch.where(first, 0, cache.timestep[rows]), torch.as_tensor(timestep).long()], 1
        )
        times = times.to(device)
        prev = torch.where(first_dev, cfg.pad_action, torch.as_tensor(prev_action).to(device))
        rtg = torch.as_tensor(rtg).to(device=device, dtype=self.rtg_embed.weight.dtype)
        tokens = torch.stack(
            [
                F.embedding(prev, tf.embed.W_E),
                self.rtg_embed((rtg / cfg.rtg_scale)[:, None]),
                self._embed_states(torch.as_tensor(obs).to(device)),
            ],
            dim=1,
        )
        positions = times[:, [0, 1, 1]]  # the action of the step before, then R and s of this one
        resid = tf.hook_embed(tokens) + tf.hook_pos_embed(F.embedding(positions, tf.pos_embed.W_pos))
        # layer 0's inputs of the new tokens, and the window's (one step left, the new three at the end)
        block0 = tf.blocks[0]
        attn = block0.attn
        resid = block0.hook_resid_pre(resid)
        q, k, v = attn.project(block0.ln1(resid))
        q, k, v = attn.hook_q(q), attn.hook_k(k), attn.hook_v(v)  # (a DT has no q/k norms, smearing, rotary)
        valid = torch.cat([pick(cache.valid)[:, 3:], ~first_dev[:, None], first_dev.new_ones(b, 2)], dim=1)
        win_k = torch.cat([pick(cache.k[0])[:, 3:], k], 1)
        win_v = torch.cat([pick(cache.v[0])[:, 3:], v], 1)
        win_pos = torch.cat([pick(cache.positions)[:, 3:], positions], 1)
        slide = not cache.slides
        win_resid = win_q = None
        if slide:
            win_resid = torch.cat([pick(cache.resid0)[:, 3:], resid], 1)
            win_q = torch.cat([pick(cache.q0)[:, 3:], q], 1)
        incremental = steps < cfg.context if slide else torch.ones(b, dtype=torch.bool)
        n_inc = int(incremental.sum())
        out = torch.empty(b, cfg.n_actions, dtype=resid.dtype, device=device)
        if n_inc:
            inc = incremental.nonzero().flatten()
            logits = self._step_incremental(
                cache, rows, inc, everyone, resid, q, win_k, win_v, valid, positions
            )
            if n_inc == b:
                out = logits
            else:
                out[inc.to(device)] = logits
        if n_inc < b:  # past the context: layer 0's attention and the later blocks on the window
            f = (~incremental).nonzero().flatten().to(device)
            part = (lambda x: x) if n_inc == 0 else (lambda x: x[f])  # noqa: E731
            ctx = AttnContext(positions=part(win_pos), key_valid=None)  # every step of a full window is real
            z = attn.hook_z(attn._attend(part(win_q), part(win_k), part(win_v), ctx))
            resid1 = block0.finish(part(win_resid), block0.hook_attn_out(attn.output(z)))
            logits = self._window_logits(resid1, part(win_pos), None, start=1)
            if n_inc == 0:
                out = logits
            else:
                out[f] = logits
        # the cache now holds the window ending at this step (layer 0's part; later layers' incrementally)
        with torch.inference_mode():  # the cache's tensors may be inference tensors of an earlier call
            self._store(cache, rows, everyone, slide, win_k, win_v, valid, win_pos, win_resid, win_q, times)
        return out

    @staticmethod
    def _store(
        cache: StepCache,
        rows: Tensor,
        everyone: bool,
        slide: bool,
        win_k: Tensor,
        win_v: Tensor,
        valid: Tensor,
        win_pos: Tensor,
        win_resid: Tensor | None,
        win_q: Tensor | None,
        times: Tensor,
    ) -> None:
        """Make ``cache`` hold the windows ending at this step (layer 0's part) for ``rows``."""
        rows_dev = rows.to(cache.valid.device)
        if everyone:  # the new tensors become the cache's (no copy)
            cache.k[0], cache.v[0], cache.valid, cache.positions = win_k, win_v, valid, win_pos
        else:
            cache.k[0][rows_dev], cache.v[0][rows_dev] = win_k, win_v
            cache.valid[rows_dev], cache.positions[rows_dev] = valid, win_pos
        if slide:
            assert win_resid is not None and win_q is not None
            if everyone:
                cache.resid0, cache.q0 = win_resid, win_q
            else:
                cache.resid0[rows_dev], cache.q0[rows_dev] = win_resid, win_q
        cache.steps[rows] += 1
        cache.timestep[rows] = times[:, 1].cpu()

    def _step_incremental(
        self,
        cache: StepCache,
        rows: Tensor,
        inc: Tensor,
        everyone: bool,
        resid: Tensor,
        q: Tensor,
        win_k: Tensor,
        win_v: Tensor,
        valid: Tensor,
        positions: Tensor,
    ) -> Tensor:
        """The logits of the new tokens of rows ``rows[inc]`` through every layer against the cached keys and
        values (layer 0's: the window's ``win_k``, ``win_v``; the later layers' read from and written to
        ``cache``)."""
        cfg, tf = self.cfg, self.transformer
        device = resid.device
        i = inc.to(device)
        some = inc.numel() != rows.numel()
        sub = (lambda x: x[i]) if some else (lambda x: x)  # noqa: E731
        past = 3 * cfg.context - 4  # the window's tokens before the new three
        ctx = AttnContext(positions=sub(positions), key_valid=sub(valid), past_len=past)
        block0 = tf.blocks[0]
        attn = block0.attn
        z = attn.hook_z(attn._attend(sub(q), sub(win_k), sub(win_v), ctx))
        x = block0.finish(sub(resid), block0.hook_attn_out(attn.output(z)))
        if cfg.n_layers > 1:
            r = rows[inc].to(device)
            whole = everyone and not some
            kv = KVCache(cfg.n_layers)
            kv.length = past
            pick = (lambda t: t[:, 3:]) if whole else (lambda t: t[r, 3:])  # noqa: E731
            kv.layers = [
                LayerKV(),
                *(LayerKV(pick(k), pick(v)) for k, v in zip(cache.k[1:], cache.v[1:], strict=True)),
            ]
            x = tf.run_blocks(x, ctx, start=1, kv_cache=kv)
            for layer in range(1, cfg.n_layers):
                lkv = kv.layers[layer]
                assert lkv.k is not None and lkv.v is not None
                if whole:  # the extended tensors become the cache's (no copy)
                    cache.k[layer], cache.v[layer] = lkv.k, lkv.v
                else:
                    with torch.inference_mode():  # (see predict_step)
                        cache.k[layer][r], cache.v[layer][r] = lkv.k, lkv.v
        return tf.unembed_resid(x[:, 2])

    # ---- hooks (the inner Transformer's) ---------------------------------------------------------
    @staticmethod
    def token_index(step: int, kind: str) -> int:
        """See the module-level `token_index`."""
        return token_index(step, kind)

    @property
    def hook_names(self) -> list[str]:
        return self.transformer.hook_names

    def hooks(
        self,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        read_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
    ) -> Any:
        """Scoped hooks on the inner transformer's points (see `Transformer.hooks`)."""
        return self.transformer.hooks(fwd_hooks, bwd_hooks, read_hooks)

    def run_with_hooks(
        self,
        rtg: Tensor,
        obs: Tensor,
        actions: Tensor,
        timesteps: Tensor,
        attention_mask: Tensor | None = None,
        *,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
    ) -> Float[Tensor, "batch T n_actions"]:
        with self.hooks(fwd_hooks, bwd_hooks):
            return self(rtg, obs, actions, timesteps, attention_mask)

    def run_with_cache(
        self,
        rtg: Tensor,
        obs: Tensor,
        actions: Tensor,
        timesteps: Tensor,
        attention_mask: Tensor | None = None,
        *,
        names: HookTarget | Sequence[HookTarget] | None = None,
        device: torch.device | str | None = None,
        grad: bool = False,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
    ) -> tuple[Float[Tensor, "batch T n_actions"], ActivationCache]:
        """The action logits and an `ActivationCache` of the named hook points (all if None), as
        `Transformer.run_with_cache`; sequence positions are tokens (see `token_index`)."""
        return self.transformer.cache_call(
            lambda: self(rtg, obs, actions, timesteps, attention_mask),
            names,
            device=device,
            grad=grad,
            fwd_hooks=fwd_hooks,
        )

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def __repr__(self) -> str:
        c = self.cfg
        return (
            f"DecisionTransformer({c.env}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads, "
            f"context {c.context}, {c.state_embedding.value} states, {self.n_params:,} params)"
        )


class StepCache:
    """What `DecisionTransformer.predict_step` keeps of up to ``n`` episodes' windows, one row per episode,
    laid out as `forward` lays out a window left-padded to ``context`` steps (the last step's action token,
    which its state token cannot see, left out; ``slots = 3 context - 1`` tokens): ``k`` and ``v``, a list of
    [n, slots, heads, d_head] per layer (layer 0's always the window's; a later layer's while the row holds at
    most ``context`` steps), ``valid`` [n, slots] (False at padding), ``positions`` [n, slots] (each token's
    timestep), ``steps`` [n] (steps cached) and ``timestep`` [n] (the last one's); with two layers or more also
    layer 0's input ``resid0`` [n, slots, d_model] and queries ``q0`` [n, slots, heads, d_head], from which a
    row past the context recomputes layer 0's attention."""

    def __init__(self, model: DecisionTransformer, n: int) -> None:
        cfg, mc = model.cfg, model.transformer.cfg
        if cfg.context < 2:
            raise ValueError(
                "a step cache needs context >= 2 (with one step every window is the new step alone)"
            )
        if n < 1:
            raise ValueError(f"a step cache needs n >= 1 rows, got {n}")
        w = model.rtg_embed.weight
        slots = 3 * cfg.context - 1
        assert mc.n_kv_heads is not None and mc.d_head is not None
        self.n = n
        self.arange = torch.arange(n)
        self.context = cfg.context
        self.slides = cfg.n_layers == 1
        """a one-layer model's cache stays incremental when the window slides past the context"""
        shape = (n, slots, mc.n_kv_heads, mc.d_head)
        self.k = [torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.valid = torch.zeros(n, slots, dtype=torch.bool, device=w.device)
        self.positions = torch.zeros(n, slots, dtype=torch.long, device=w.device)
        if not self.slides:
            self.resid0 = torch.zeros(n, slots, cfg.d_model, dtype=w.dtype, device=w.device)
            self.q0 = torch.zeros(n, slots, mc.n_heads, mc.d_head, dtype=w.dtype, device=w.device)
        self.steps = torch.zeros(n, dtype=torch.long)
        self.timestep = torch.zeros(n, dtype=torch.long)

    def clear(self, rows: Tensor | Sequence[int]) -> None:
        """Start new episodes in ``rows``."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        with torch.inference_mode():  # (predict_step under inference mode leaves inference tensors here)
            self.steps[rows] = 0
            self.valid[rows.to(self.valid.device)] = False

    def fits(self, rows: Tensor | Sequence[int]) -> Tensor:
        """bool [len(rows)]: whether `predict_step`'s next step of each row is fully incremental (it holds
        fewer than ``context`` steps, or the model has one layer); the others recompute the layers after the
        first on their window."""
        steps = self.steps[torch.as_tensor(rows, dtype=torch.long)]
        return torch.ones_like(steps, dtype=torch.bool) if self.slides else steps < self.context


def _project_kv(attn: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    """k and v [batch pos n_kv_heads d_head] of ``attn`` for the normalised input ``x``: `Attention.project`'s
    fused matmul without the query columns (for tokens whose queries nobody reads)."""
    h, kv, dh = attn.cfg.n_heads, attn.cfg.n_kv_heads, attn.cfg.d_head
    w, b = attn.fused_qkv.weights(attn)
    out = torch.addmm(b[h * dh :], x.reshape(-1, x.shape[-1]), w[:, h * dh :])
    k, v = out.view(*x.shape[:2], 2 * kv, dh).split([kv, kv], dim=2)
    return k, v


# ---- files -------------------------------------------------------------------------------------
def save_dt(model: DecisionTransformer, path: str | Path) -> Path:
    """Write ``config.json`` ({kind: dt_model, version, ...DTConfig}) and ``model.safetensors`` to a folder
    (``checksums.json`` last); `load_dt` is the exact inverse."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    forget_checksums(path)
    save_tensors(path / runs.MODEL_WEIGHTS, dict(model.state_dict()), metadata={"format": DT_MODEL_KIND})
    # config last: a folder with a config.json is a complete model
    runs.write_json(path / runs.CONFIG, runs.Kind.DT_MODEL, model.cfg.to_dict())
    record_checksums(path, [runs.MODEL_WEIGHTS, runs.CONFIG])
    return path


def load_dt(path: str | Path, *, device: str | torch.device = "cpu") -> DecisionTransformer:
    """Read a folder `save_dt` wrote (or a DT checkpoint); a DT training run stands for its ``final/`` (an
    unfinished one raises, naming its latest intact checkpoint)."""
    path = Path(path)
    if runs.detect(path) is runs.Kind.DT_TRAIN:
        path = runs.DTTrainRun.open(path).final
    if not (path / runs.CONFIG).is_file():
        raise FileNotFoundError(f"{path} is not a decision-transformer folder: it is {runs.describe(path)}")
    verify_checksums(path)
    data = runs.read_json(path / runs.CONFIG, runs.Kind.DT_MODEL)
    cfg = DTConfig.from_dict(data)
    model = DecisionTransformer(cfg)
    state = load_tensors(path / runs.MODEL_WEIGHTS, device=device)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{path / runs.MODEL_WEIGHTS} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{path}: weight {k!r} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}"
            )
    model.load_state_dict(state)
    return model.to(device).eval()
