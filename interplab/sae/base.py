"""`SAE`: the base class every architecture subclasses, and `SAEOutput`, what a forward or loss returns.

An SAE reads x [..., d_in] at ``cfg.hook_name`` and reconstructs it (or, for a transcoder, the activation
at ``cfg.hook_name_out``) as a sparse combination of decoder rows::

    x_in  = x * act_scale - b_dec                     (b_dec only if cfg.apply_b_dec_to_input)
    acts  = activation(x_in @ W_enc + b_enc)          [..., d_sae]   (the architecture's non-linearity)
    recon = (acts @ W_dec + b_dec) / act_scale        [..., d_in]

>>> from interplab.sae import SAEConfig, create_sae
>>> sae = create_sae(SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4))
>>> sae(torch.randn(3, 16)).feature_acts.shape
torch.Size([3, 64])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab.sae.config import Architecture, Reshape, SAEConfig


@dataclass(frozen=True)
class SAEOutput:
    """What `SAE.forward` and `SAE.loss` return. Loss fields are None after a plain forward; ``feature_acts``
    is None after a sparse training step (TopK computes only the k active latents)."""

    reconstruction: Tensor
    """[..., d_in (or d_out)] the SAE's reconstruction, in the input's units"""
    feature_acts: Tensor | None
    """[..., d_sae] latent activations"""
    loss: Tensor | None = None
    """scalar total loss (mse + coefficient * sparsity + aux)"""
    mse: Tensor | None = None
    """scalar: squared error summed over d_in, mean over tokens (normalised units)"""
    sparsity: Tensor | None = None
    """scalar: the architecture's sparsity penalty before its coefficient (L1, L0 or 0 for TopK)"""
    aux: Tensor | None = None
    """scalar: auxiliary loss (AuxK for TopK, the gate reconstruction for Gated, else 0)"""
    latent_counts: Tensor | None = None
    """[d_sae] how many tokens each latent fired on in this batch"""


@dataclass(frozen=True)
class TrainStep:
    """What an architecture's `SAE.train_forward` computes on one batch, in normalised units (the input already
    multiplied by ``act_scale``); `SAE.loss` weighs and sums it into the loss."""

    reconstruction: Float[Tensor, "batch d_in"]
    """float32 reconstruction of the (scaled) target"""
    feature_acts: Float[Tensor, "batch d_sae"] | None
    """latent activations; None when the architecture never forms them densely (sparse TopK)"""
    sparsity: Tensor
    """scalar sparsity penalty before its coefficient (L1 or L0; 0 for TopK/BatchTopK)"""
    aux: Tensor
    """scalar auxiliary loss before its weight (AuxK, Gated's gate reconstruction; else 0)"""
    latent_counts: Tensor | None = None
    """[d_sae] tokens each latent fired on, when the architecture has them for free; None lets `SAE.loss`
    count the non-zero ``feature_acts``"""
    extra_loss: Tensor | None = None
    """scalar added to the loss as it is (Matryoshka's inner prefix reconstruction losses); None: nothing"""


class SAE(nn.Module):
    """Base sparse autoencoder. Subclasses set ``architecture`` and implement `activation`."""

    architecture: ClassVar[Architecture]
    #: whether decoder rows are kept at unit norm during training
    unit_norm_decoder: ClassVar[bool] = False
    #: default weight of the auxiliary loss (AuxK: 1/32 as in Gao et al.; Gated's gate reconstruction: 1)
    aux_weight: ClassVar[float] = 0.0
    #: every parameter that holds one slice per latent, and the axis of that slice: resampling a latent resets
    #: all of them (and their optimizer moments). An architecture with more per-latent parameters extends it.
    latent_axes: ClassVar[dict[str, int]] = {"W_enc": 1, "b_enc": 0, "W_dec": 0}
    act_scale: Tensor  # buffer [], registered in __init__: activations are multiplied by it before encoding

    def __init__(self, cfg: SAEConfig, *, seed: int = 0) -> None:
        super().__init__()
        if cfg.architecture is not self.architecture:
            raise ValueError(
                f"{type(self).__name__} is {self.architecture.value}, cfg says {cfg.architecture.value}"
            )
        self.cfg = cfg
        d_out = cfg.d_in  # a transcoder reconstructs another site of the same width
        dtype = cfg.dtype.torch
        self.W_enc = nn.Parameter(torch.empty(cfg.d_in, cfg.d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.empty(cfg.d_sae, d_out, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype))
        self.register_buffer("act_scale", torch.ones((), dtype=torch.float32))
        self.reset_parameters(seed)

    # ---- initialisation ------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Random unit decoder rows (scaled to 0.1 when not kept at unit norm); encoder = decoder transpose.
        The draw comes from its own generator seeded with ``seed`` (never the global RNG), so the same config
        and seed give bit-identical SAEs."""
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(self.cfg.d_sae, self.cfg.d_in, generator=g)
        w = w / w.norm(dim=-1, keepdim=True)
        if not self.unit_norm_decoder:
            w = w * 0.1
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    def latent_reset_values(self) -> dict[str, float]:
        """The value each per-latent vector parameter (every ``latent_axes`` entry but W_enc and W_dec) of a
        resampled latent is reset to."""
        return {"b_enc": 0.0}

    @torch.no_grad()
    def init_b_dec(self, x: Float[Tensor, "n d_in"], method: str = "geometric_median") -> None:
        """Set b_dec to the mean or geometric median (Weiszfeld iterations) of sample activations."""
        x = x.float() * self.act_scale
        if method == "mean":
            center = x.mean(0)
        elif method == "geometric_median":
            center = x.mean(0)
            for _ in range(50):
                w = 1.0 / (x - center).norm(dim=-1).clamp_min(1e-8)
                new = (w[:, None] * x).sum(0) / w.sum()
                if (new - center).norm() < 1e-6 * center.norm().clamp_min(1e-8):
                    center = new
                    break
                center = new
        else:
            raise ValueError(f"unknown b_dec init {method!r}; valid: mean, geometric_median")
        self.b_dec.copy_(center)

    @torch.no_grad()
    def set_scale_from(self, x: Float[Tensor, "n d_in"]) -> None:
        """Estimate the input scale (mean squared norm -> d_in) when cfg.normalize_activations asks for it."""
        if self.cfg.normalize_activations.value != "none":
            self.act_scale.fill_((self.cfg.d_in / x.float().pow(2).sum(-1).mean()).sqrt().item())

    # ---- the forward pass ----------------------------------------------------------------------
    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """``(x * act_scale - b_dec) @ W_enc + b_enc`` as one ``addmm`` over the flattened positions: the bias
        is added in the product's kernel (no second [n, d_sae] pass), as ``train_forward`` computes it, so
        inference and training give the same pre-activations to the bit."""
        x_in = self._center(x)
        pre = torch.addmm(
            self.b_enc.to(x_in.dtype), x_in.reshape(-1, x_in.shape[-1]), self.W_enc.to(x_in.dtype)
        )
        return pre.view(*x_in.shape[:-1], pre.shape[-1])

    def activation(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        raise NotImplementedError

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Latent activations; a hook_z SAE also takes per-head input [..., n_heads, d_head]."""
        return self.activation(self.pre_acts(self.flat_input(x)))

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        if acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"decode expects [..., d_sae={self.cfg.d_sae}], got {tuple(acts.shape)}")
        out = acts @ self.W_dec.to(acts.dtype) + self.b_dec.to(acts.dtype)
        return out / self.act_scale.to(out.dtype)

    def forward(self, x: Float[Tensor, "... d_in"]) -> SAEOutput:
        """Encode and decode; the reconstruction has the input's shape (per-head for per-head input)."""
        acts = self.encode(x)
        recon = self.decode(acts)
        if x.shape[-1] != recon.shape[-1]:  # per-head input of a hook_z SAE: give it back per head
            recon = recon.unflatten(-1, x.shape[-2:])
        return SAEOutput(reconstruction=recon, feature_acts=acts)

    def loss(
        self,
        x: Float[Tensor, "batch d_in"],
        target: Float[Tensor, "batch d_in"] | None = None,
        *,
        coefficient: float = 0.0,
        dead_mask: Tensor | None = None,
        aux_coefficient: float | None = None,
        with_counts: bool = True,
    ) -> SAEOutput:
        """The training loss on a batch (``target`` is the transcoder's output activation, else x).

        ``coefficient`` weights the sparsity penalty (L1 or L0); ``dead_mask`` [d_sae] marks latents that
        have not fired for a while (used by TopK's AuxK loss); ``aux_coefficient`` overrides the
        architecture's default ``aux_weight``. ``with_counts=False`` skips the per-latent firing counts
        of dense architectures (a full pass over [batch, d_sae]; the trainer samples them)."""
        x = self.flat_input(x)
        target = x if target is None else self.flat_input(target)
        x_s = x.to(self.W_enc.dtype) * self.act_scale.to(self.W_enc.dtype)
        tgt = target.float() * self.act_scale
        step = self.train_forward(x_s, tgt, dead_mask)
        acts, counts = step.feature_acts, step.latent_counts
        if counts is None and with_counts and acts is not None:
            counts = (acts.detach() > 0).sum(0, dtype=torch.int32)
        mse = (step.reconstruction - tgt).pow(2).sum(-1).mean()
        aux_w = self.aux_weight if aux_coefficient is None else aux_coefficient
        total = mse + coefficient * step.sparsity + aux_w * step.aux
        if step.extra_loss is not None:
            total = total + step.extra_loss
        return SAEOutput(
            reconstruction=step.reconstruction / self.act_scale,
            feature_acts=acts,
            loss=total,
            mse=mse,
            sparsity=step.sparsity,
            aux=step.aux,
            latent_counts=counts,
        )

    def train_forward(self, x_s: Tensor, target: Tensor, dead_mask: Tensor | None) -> TrainStep:
        """One training forward from the scaled input ``x_s`` (b_dec not yet subtracted) towards the scaled
        ``target``; ``dead_mask`` [d_sae] marks dead latents (for AuxK). Default: dense, no penalty."""
        x_in = self._sub_b_dec(x_s)
        acts = self.activation(torch.addmm(self.b_enc, x_in, self.W_enc))
        recon = torch.addmm(self.b_dec, acts, self.W_dec).float()
        zero = recon.new_zeros(())
        return TrainStep(reconstruction=recon, feature_acts=acts, sparsity=zero, aux=zero)

    # ---- helpers -------------------------------------------------------------------------------
    def _center(self, x: Tensor) -> Tensor:
        return self._sub_b_dec(x.to(self.W_enc.dtype) * self.act_scale.to(self.W_enc.dtype))

    def _sub_b_dec(self, x_s: Tensor) -> Tensor:
        return x_s - self.b_dec if self.cfg.apply_b_dec_to_input else x_s

    def _encoder_input_and_bias(self, x_s: Tensor) -> tuple[Tensor, Tensor]:
        """(x_s - b_dec with b_dec detached, b_enc + (b_dec.detach() - b_dec) @ W_enc): the same pre-activations
        as ``_sub_b_dec(x_s) @ W_enc + b_enc`` (the added term is exactly 0), but b_dec's gradient through the
        input arrives as a [d_in, d_sae] matrix-vector product instead of a [batch, d_sae] x [d_sae, d_in]
        matmul for the input's gradient."""
        if not self.cfg.apply_b_dec_to_input:
            return x_s, self.b_enc
        b = self.b_dec.detach()
        return x_s - b, self.b_enc + (b - self.b_dec) @ self.W_enc

    def flat_input(self, x: Tensor) -> Float[Tensor, "... d_in"]:
        """``x`` as [..., d_in]. A hook_z SAE (``cfg.reshape_activations == "hook_z"``) also takes per-head
        input [..., n_heads, d_head] with n_heads * d_head = d_in, flattened here as SAELens does; any other
        width raises, naming the hook."""
        d_in = self.cfg.d_in
        if x.shape[-1] == d_in:
            return x
        per_head = self.cfg.reshape_activations is Reshape.HOOK_Z
        if per_head and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == d_in:
            return x.flatten(-2)
        where = f" (hook {self.cfg.hook_name})" if self.cfg.hook_name else ""
        also = " or [..., n_heads, d_head] with n_heads * d_head = d_in" if per_head else ""
        raise ValueError(f"SAE expects inputs [..., d_in={d_in}]{also}{where}, got shape {tuple(x.shape)}")

    def decoder_norms(self) -> Float[Tensor, " d_sae"]:
        return self.W_dec.norm(dim=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale decoder rows to unit norm."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def apply_constraints(self) -> None:
        """Project the parameters back onto their allowed set after an optimizer step: unit decoder rows when
        ``unit_norm_decoder``; architectures with other constraints (JumpReLU's threshold >= 0) extend it."""
        if self.unit_norm_decoder:
            self.normalize_decoder()

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the gradient component along each decoder row (keeps rows on the unit sphere)."""
        if self.W_dec.grad is not None:
            w = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            self.W_dec.grad.sub_((self.W_dec.grad * w).sum(-1, keepdim=True) * w)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def save(self, path: str | Path) -> Path:
        """Write SAELens' layout: ``cfg.json`` + ``sae_weights.safetensors`` (see `interplab.sae.io`)."""
        from interplab.sae.io import save_sae  # here, not at the top: sae.io imports this module

        return save_sae(self, path)

    def __repr__(self) -> str:
        c = self.cfg
        extra = f", k={c.k}" if c.k else ""
        site = f", hook={c.hook_name!r}" if c.hook_name else ""
        out = f" -> {c.hook_name_out!r}" if c.hook_name_out else ""
        return f"{type(self).__name__}(d_in={c.d_in}, d_sae={c.d_sae}{extra}{site}{out})"
