"""`SAETrainConfig`: how one SAE trains (learning-rate and sparsity schedules, dead-latent handling, logging and
checkpoint intervals), and the default sparsity coefficients, rescaled to the data (`default_coefficient`).

>>> cfg = SAETrainConfig(total_steps=1000, lr=1e-3)
>>> cfg.lr_at(0), cfg.lr_at(500)  # linear warm-up over 100 steps, then flat until the last 20% decay to 0
(1e-05, 0.001)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from interplab.sae.config import Architecture


class DeadHandling(str, Enum):
    AUTO = "auto"  # AuxK for TopK/BatchTopK, resampling for the others
    AUXK = "auxk"
    RESAMPLE = "resample"
    NONE = "none"


class BDecInit(str, Enum):
    GEOMETRIC_MEDIAN = "geometric_median"
    MEAN = "mean"
    ZEROS = "zeros"


@dataclass(frozen=True, kw_only=True)
class SAETrainConfig:
    """How to train one SAE (every SAE in a joint run may have its own)."""

    total_steps: int
    """optimizer steps (the run also stops when the activations run out)"""
    lr: float = 3e-4
    """Adam learning rate after warm-up"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas"""
    warmup_steps: int = 100
    """linear learning-rate warm-up from 0"""
    decay_fraction: float = 0.2
    """the last fraction of steps decays the learning rate linearly to 0"""
    coefficient: float | None = None
    """sparsity coefficient: L1 weight for ReLU/Gated, L0 weight for JumpReLU (TopK/BatchTopK ignore it).
    None: the architecture's `DEFAULT_COEFFICIENTS` entry, given for inputs of unit mean square per dimension
    and rescaled to the training data (see `default_coefficient`)"""
    coefficient_warmup_steps: int = 0
    """linear warm-up of the sparsity coefficient from 0"""
    dead_handling: DeadHandling = DeadHandling.AUTO
    """how to treat latents that stop firing"""
    dead_after_tokens: int | None = None
    """a latent that has not fired for this many tokens counts as dead. None: the tokens of a tenth of the run
    (``total_steps // 10`` batches), at most 10M"""
    dense_threshold: float = 0.1
    """a latent firing on more than this fraction of tokens (over the log window) counts as dense"""
    stats_every: int = 4
    """steps between firing-count samples for dead/dense tracking and logged metrics (counting non-zero
    latents of a dense [batch, d_sae] costs ~1/6 of a ReLU step on CPU; TopK counts are free and exact).
    A latent counts as firing between two samples if it fired on the sampled batch."""
    resample_every: int | None = None
    """steps between resamplings (with dead_handling=resample). None: ``total_steps // 4``, at most 2500.
    No resampling happens in the final stretch (see `resamples_at`)"""
    b_dec_init: BDecInit = BDecInit.GEOMETRIC_MEDIAN
    """initial decoder bias from the first batch"""
    autocast: bool = True
    """bfloat16 matmuls with float32 master weights"""
    log_every: int = 50
    """steps between log rows (and progress callbacks)"""
    checkpoint_every: int | None = None
    """steps between checkpoints in the run folder (None: only the final SAE)"""
    seed: int = 0
    """seed of the resampling draws (the SAE's initial weights come from ``create_sae(cfg, seed=...)``)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dead_handling", DeadHandling(self.dead_handling))
        object.__setattr__(self, "b_dec_init", BDecInit(self.b_dec_init))
        if self.total_steps <= 0:
            raise ValueError(f"total_steps must be > 0, got {self.total_steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.stats_every < 1:
            raise ValueError(f"stats_every must be >= 1, got {self.stats_every}")
        if self.coefficient is not None and self.coefficient < 0:
            raise ValueError(f"coefficient must be >= 0 (or None for the default), got {self.coefficient}")
        if self.dead_after_tokens is not None and self.dead_after_tokens < 1:
            raise ValueError(f"dead_after_tokens must be >= 1 (or None), got {self.dead_after_tokens}")
        if self.resample_every is not None and self.resample_every < 1:
            raise ValueError(f"resample_every must be >= 1 (or None), got {self.resample_every}")

    def lr_at(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        decay_start = self.total_steps * (1 - self.decay_fraction)
        decay = (
            1.0
            if step < decay_start
            else max(0.0, (self.total_steps - step) / max(self.total_steps - decay_start, 1))
        )
        return self.lr * warm * decay

    def coefficient_at(self, step: int, base: float | None = None) -> float:
        """The sparsity coefficient at ``step`` (``base`` stands in for a ``coefficient`` of None)."""
        c = self.coefficient if self.coefficient is not None else base
        if c is None:
            raise ValueError(
                "coefficient is None: pass the resolved default as base (see default_coefficient)"
            )
        if not self.coefficient_warmup_steps:
            return c
        return c * min(1.0, (step + 1) / self.coefficient_warmup_steps)

    @property
    def resample_interval(self) -> int:
        """``resample_every``, or its default ``total_steps // 4`` capped at 2500."""
        if self.resample_every is not None:
            return self.resample_every
        return max(1, min(2500, self.total_steps // 4))

    def resamples_at(self, steps_done: int) -> bool:
        """Whether dead latents are resampled after ``steps_done`` optimizer steps: every
        ``resample_interval`` steps, but never in the final stretch, the last ``resample_interval`` steps or
        the last 10% of the run, whichever is longer, so that resampled latents train before the SAE is
        returned."""
        every = self.resample_interval
        final_stretch = max(every, math.ceil(0.1 * self.total_steps))
        return steps_done % every == 0 and self.total_steps - steps_done >= final_stretch

    def dead_after(self, tokens_per_step: int) -> int:
        """``dead_after_tokens``, or its default: a tenth of the run's tokens, at most 10M (and at least one
        batch)."""
        if self.dead_after_tokens is not None:
            return self.dead_after_tokens
        return max(tokens_per_step, min(10_000_000, (self.total_steps // 10) * tokens_per_step))


#: default sparsity coefficients for inputs whose mean square per dimension around b_dec is 1, rescaled to the
#: data by `default_coefficient`: L1 for ReLU and Gated, L0 for JumpReLU; measured on planted features
#: (docs/sae.md, "Defaults"). TopK and BatchTopK fix the sparsity through k instead.
DEFAULT_COEFFICIENTS: dict[Architecture, float] = {
    Architecture.RELU: 2.0,
    Architecture.GATED: 5.0,
    Architecture.JUMPRELU: 1.0,
    Architecture.TOPK: 0.0,
    Architecture.BATCHTOPK: 0.0,
    Architecture.MATRYOSHKA: 0.0,
}


def default_coefficient(architecture: Architecture, mean_square: float) -> float:
    """The default sparsity coefficient for inputs (already multiplied by the SAE's ``act_scale``) whose mean
    square per dimension is ``mean_square``. The loss is squared error + coefficient * penalty: scaling the
    inputs by c scales the squared error by c^2 and an L1 penalty by c (an L0 penalty not at all), so the same
    trade-off needs the coefficient scaled by c (c^2 for L0). The trainer measures the mean square around the
    initial b_dec (the part the latents must explain) on the first batch."""
    base = DEFAULT_COEFFICIENTS[architecture]
    return base * (mean_square if architecture is Architecture.JUMPRELU else math.sqrt(mean_square))
