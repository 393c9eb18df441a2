"""Crosscoders (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model Diffing"): one
dictionary that reads several activation sources at once and writes back to each.

The sources are ``n_sources`` activations of the same width d_in taken on the same tokens: several layers of
one model (an acausal crosscoder) or the same site of two models or checkpoints (a model-diffing crosscoder)::

    pre   = sum_s (x[:, s] - b_dec[s]) @ W_enc[s] + b_enc             [batch, d_sae]   (encoder sums sources)
    acts  = BatchTopK(ReLU(pre))                                      [batch, d_sae]   (see below)
    recon[:, s] = acts @ W_dec[:, s] + b_dec[s]                       [batch, n_sources, d_in]
    loss  = sum_s || recon[:, s] - x[:, s] ||^2  (summed over d_in, mean over tokens)  + aux_weight * AuxK

Sparsity is BatchTopK (the BatchTopK crosscoder of Minder et al. 2025): the k * batch latents kept over the
batch are those with the largest ``ReLU(pre) * sum_s ||W_dec[:, s]||`` (each latent's contribution to all
sources); kept latents keep their value ``ReLU(pre)``. At inference one threshold on that score replaces the
batch selection, a running average of the smallest kept score (as `BatchTopKSAE`). Decoder rows are free
(not unit): the per-source decoder norms are what model diffing compares (`interplab.sae.diffing`).

Files: a folder with ``cfg.json`` (``kind: crosscoder``) and ``crosscoder.safetensors``; sae_lens has no
crosscoder format, so this is interplab's own.

>>> cc = Crosscoder(CrosscoderConfig(d_in=16, d_sae=64, k=4, sources=("a", "b")))
>>> cc(torch.randn(8, 2, 16)).reconstruction.shape
torch.Size([8, 2, 16])
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interplab import runs
from interplab.io import load_tensors, save_tensors
from interplab.sae.activations import model_activations
from interplab.sae.architectures.batchtopk import THRESHOLD_RATE
from interplab.sae.crosscoder_resume import TrainState, resume_crosscoder, save_crosscoder_checkpoint

CC_CFG = runs.CROSSCODER_CFG
CC_WEIGHTS = runs.CROSSCODER_WEIGHTS
CC_KIND = runs.Kind.CROSSCODER.value
CC_VERSION = runs.VERSIONS[runs.Kind.CROSSCODER]
#: AuxK weight (as TopK/BatchTopK SAEs)
AUX_WEIGHT = 1 / 32


@dataclass(frozen=True, kw_only=True)
class CrosscoderConfig:
    """Shape of a crosscoder: ``sources`` names what each of its n_sources inputs is (``"blocks.0.hook_resid_post"``
    for a multi-layer crosscoder, ``"step_000100:blocks.1.hook_resid_post"`` for a diffing one)."""

    d_in: int
    d_sae: int
    k: int
    """active latents per token, on average over a batch (BatchTopK)"""
    sources: tuple[str, ...]
    model_name: str | None = None
    meta: dict[str, Any] | None = dataclasses.field(default=None, hash=False)
    """free-form provenance (the run and steps of a diffing crosscoder, ...)"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", tuple(str(s) for s in self.sources))
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"a crosscoder needs 0 < k <= d_sae={self.d_sae}, got k={self.k!r}")
        if len(self.sources) < 2 or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"a crosscoder needs at least two distinct sources, got {list(self.sources)}")

    @property
    def n_sources(self) -> int:
        return len(self.sources)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sources"] = list(self.sources)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CrosscoderConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown CrosscoderConfig fields {unknown}; valid: {sorted(names)}")
        return cls(**data)


@dataclass(frozen=True)
class CrosscoderOutput:
    reconstruction: Float[Tensor, "batch n_sources d_in"]
    feature_acts: Float[Tensor, "batch d_sae"]
    loss: Tensor | None = None
    mse: Tensor | None = None
    """squared error summed over sources and d_in, mean over tokens"""
    aux: Tensor | None = None


class Crosscoder(nn.Module):
    """A BatchTopK crosscoder over ``cfg.n_sources`` aligned inputs [batch, n_sources, d_in]."""

    threshold: Tensor  # buffer []: inference threshold on the decoder-norm-weighted activation

    def __init__(self, cfg: CrosscoderConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        n, d, m = cfg.n_sources, cfg.d_in, cfg.d_sae
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(m, n, d, generator=g)
        w = 0.1 * w / w.norm(dim=-1, keepdim=True)  # each source's row at norm 0.1
        self.W_dec = nn.Parameter(w)
        self.W_enc = nn.Parameter(w.permute(1, 2, 0).contiguous())  # [n, d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.b_dec = nn.Parameter(torch.zeros(n, d))
        self.register_buffer("threshold", torch.zeros(()))

    # ---- forward ----------------------------------------------------------------------------------
    def _check(self, x: Tensor) -> Tensor:
        want = (self.cfg.n_sources, self.cfg.d_in)
        if x.ndim != 3 or tuple(x.shape[1:]) != want:
            raise ValueError(
                f"crosscoder expects [batch, n_sources={want[0]}, d_in={want[1]}] (sources "
                f"{list(self.cfg.sources)}), got shape {tuple(x.shape)}"
            )
        return x.float()

    def pre_acts(self, x: Float[Tensor, "batch n d_in"]) -> Float[Tensor, "batch d_sae"]:
        x = self._check(x) - self.b_dec
        return torch.einsum("bnd,nds->bs", x, self.W_enc) + self.b_enc

    def decoder_norms(self) -> Float[Tensor, "d_sae n_sources"]:
        """Norm of each latent's decoder row into each source."""
        return self.W_dec.norm(dim=-1)

    def encode(self, x: Float[Tensor, "batch n d_in"]) -> Float[Tensor, "batch d_sae"]:
        """Inference encoding: ``ReLU(pre)`` where its decoder-norm-weighted score passes the threshold."""
        acts = self.pre_acts(x).relu()
        score = acts * self.decoder_norms().sum(-1)
        return acts * (score > self.threshold)

    def decode(self, acts: Float[Tensor, "batch d_sae"]) -> Float[Tensor, "batch n d_in"]:
        return torch.einsum("bs,snd->bnd", acts, self.W_dec) + self.b_dec

    def forward(self, x: Float[Tensor, "batch n d_in"]) -> CrosscoderOutput:
        acts = self.encode(x)
        return CrosscoderOutput(reconstruction=self.decode(acts), feature_acts=acts)

    def batch_topk(self, pre: Tensor, *, update_threshold: bool = False) -> Tensor:
        """The training selection: of ``ReLU(pre)`` keep the k * batch entries with the largest
        decoder-norm-weighted score; optionally move the inference threshold towards the smallest kept score."""
        acts = pre.relu()
        score = acts * self.decoder_norms().sum(-1)
        flat = score.flatten()
        n_keep = min(self.cfg.k * pre.shape[0], flat.numel())
        vals, idx = flat.detach().topk(n_keep, sorted=False)
        mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(0, idx, True).view_as(acts)
        if update_threshold:
            with torch.no_grad():
                positive = vals[vals > 0]
                if positive.numel():
                    self.threshold.mul_(1 - THRESHOLD_RATE).add_(THRESHOLD_RATE * positive.min())
        return acts * mask

    def loss(
        self,
        x: Float[Tensor, "batch n d_in"],
        *,
        dead_mask: Tensor | None = None,
        update_threshold: bool = False,
    ) -> CrosscoderOutput:
        x = self._check(x)
        pre = self.pre_acts(x)
        acts = self.batch_topk(pre, update_threshold=update_threshold)
        recon = self.decode(acts)
        mse = (recon - x).pow(2).sum((-1, -2)).mean()
        aux = self._aux(x, pre, (x - recon).detach(), dead_mask)
        return CrosscoderOutput(recon, acts, loss=mse + AUX_WEIGHT * aux, mse=mse, aux=aux)

    def _aux(self, x: Tensor, pre: Tensor, residual: Tensor, dead_mask: Tensor | None) -> Tensor:
        """AuxK: the top k_aux = d_in / 2 dead latents of each token reconstruct the residual (all sources),
        normalised by its variance; 0 when none is dead."""
        if dead_mask is None or not bool(dead_mask.any()):
            return x.new_zeros(())
        dead = dead_mask.nonzero().squeeze(-1)
        k_aux = max(1, min(self.cfg.d_in // 2, dead.numel()))
        vals, sub = pre[:, dead].topk(k_aux, dim=-1)
        acts = torch.zeros_like(pre[:, dead]).scatter_(1, sub, vals.relu())
        est = torch.einsum("bs,snd->bnd", acts, self.W_dec[dead])
        denom = (residual - residual.mean(0)).pow(2).sum((-1, -2)).mean().clamp_min(1e-8)
        return (est - residual).pow(2).sum((-1, -2)).mean() / denom

    # ---- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` (``kind: crosscoder``) and ``crosscoder.safetensors`` into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_tensors(path / CC_WEIGHTS, tensors)
        runs.write_json(path / CC_CFG, runs.Kind.CROSSCODER, self.cfg.to_dict())
        return path


def load_crosscoder(path: str | Path, *, device: str | torch.device = "cpu") -> Crosscoder:
    """Read a folder written by `Crosscoder.save` (a model diff's folder: its ``crosscoder/``); anything else
    raises, saying what it is (`interplab.sae.load_dictionary` loads any dictionary)."""
    path = Path(path)
    if runs.detect(path) is runs.Kind.MODEL_DIFF:
        path = runs.ModelDiffRun.open(path).crosscoder
    if not (path / CC_CFG).is_file() or not (path / CC_WEIGHTS).is_file():
        raise runs.NotARunError(
            f"{path} is not a crosscoder folder: it needs {CC_CFG} and {CC_WEIGHTS} (it is {runs.describe(path)})"
        )
    raw = runs.read_json(path / CC_CFG, runs.Kind.CROSSCODER, strip=True)
    cc = Crosscoder(CrosscoderConfig.from_dict(raw))
    cc.load_state_dict(load_tensors(path / CC_WEIGHTS, device="cpu"))
    return cc.to(device)


# ---- training ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrosscoderTrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    dead_after_tokens: int = 100_000
    """a latent that has not fired for this many tokens is dead (AuxK revives it)"""
    log_every: int = 100
    seed: int = 0
    checkpoint_every: int = 0
    """with a checkpoint folder: save the full training state every this many steps (0: never)"""

    def __post_init__(self) -> None:
        for name in ("steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every!r}")


def train_crosscoder(
    cc: Crosscoder,
    batches: Iterable[Float[Tensor, "batch n d_in"]],
    cfg: CrosscoderTrainConfig = CrosscoderTrainConfig(),
    *,
    progress: Callable[[int, dict[str, float]], None] | None = None,
    checkpoints: str | Path | None = None,
    data_identity: dict[str, Any] | None = None,
) -> list[dict[str, float]]:
    """Adam on ``cc`` over ``batches`` (cycled when shorter than ``cfg.steps``; the same order on every call);
    b_dec starts at the first batch's mean. Returns the log: one row per ``log_every`` steps (step, mse, fvu,
    l0, dead, tokens_per_s). With a ``checkpoints`` folder the full state is saved there every
    ``cfg.checkpoint_every`` steps and at the end (`interplab.sae.crosscoder_resume`), and a call that finds a
    checkpoint of the same crosscoder config, training config and ``data_identity`` resumes from it
    bit-exactly (a different run's checkpoint is refused)."""
    opt = torch.optim.Adam(cc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(cc.cfg.d_sae, dtype=torch.long)
    history: list[dict[str, float]] = []
    source = _cycle(batches)
    t0, tokens, start = time.perf_counter(), 0, 1
    folder = Path(checkpoints) if checkpoints is not None else None
    identity = {
        "crosscoder": json.loads(json.dumps(cc.cfg.to_dict())),
        "train": dataclasses.asdict(cfg),
        "data": data_identity or {},
    }
    if folder is not None:
        resumed = resume_crosscoder(folder, cc, opt, identity)
        if resumed is not None:
            since_fired, history, tokens, start = (
                resumed.since_fired,
                resumed.history,
                resumed.tokens,
                resumed.step + 1,
            )
            for _ in range(resumed.step):  # the batches already trained on
                next(source)
    for step in range(start, cfg.steps + 1):
        x = next(source).float()
        if step == 1:
            with torch.no_grad():
                cc.b_dec.copy_(x.mean(0))
        lr = cfg.lr * min(1.0, 10 * (cfg.steps - step + 1) / cfg.steps)  # linear decay over the last tenth
        for group in opt.param_groups:
            group["lr"] = lr
        out = cc.loss(x, dead_mask=since_fired >= cfg.dead_after_tokens, update_threshold=True)
        opt.zero_grad(set_to_none=True)
        assert out.loss is not None
        out.loss.backward()
        opt.step()
        fired = (out.feature_acts > 0).any(0)
        since_fired = torch.where(fired, 0, since_fired + x.shape[0])
        tokens += x.shape[0]
        if step % cfg.log_every == 0 or step == cfg.steps:
            with torch.no_grad():
                var = (x - x.mean(0)).pow(2).sum((-1, -2)).mean().clamp_min(1e-12)
                row = {
                    "step": float(step),
                    "mse": float(out.mse or 0.0),
                    "fvu": float((out.mse or 0.0) / var),
                    "l0": float((out.feature_acts > 0).sum(-1).float().mean()),
                    "dead": float((since_fired >= cfg.dead_after_tokens).sum()),
                    "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
                }
            history.append(row)
            if progress is not None:
                progress(step, row)
        if folder is not None and (
            step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        ):
            state = TrainState(step=step, tokens=tokens, since_fired=since_fired, history=history)
            save_crosscoder_checkpoint(folder, state, cc, opt, identity)
    return history


def _cycle(batches: Iterable[Tensor]) -> Iterator[Tensor]:
    cached: list[Tensor] = []
    for b in batches:
        cached.append(b)
        yield b
    if not cached:
        raise ValueError("no activation batches to train the crosscoder on")
    while True:
        yield from cached


# ---- activations ------------------------------------------------------------------------------------
def stack_sources(batch: dict[str, Tensor], sources: Sequence[str]) -> Float[Tensor, "batch n d_in"]:
    """Stack an activation-store batch ``{hook: [batch, d]}`` (aligned rows, e.g. from
    `interplab.sae.activations.ActivationStream` or a disk cache) into crosscoder input for ``sources``."""
    missing = [s for s in sources if s not in batch]
    if missing:
        raise KeyError(f"sources {missing} are not in the batch; it has {sorted(batch)}")
    widths = {batch[s].shape[-1] for s in sources}
    if len(widths) != 1:
        raise ValueError(f"crosscoder sources need one width, got {[batch[s].shape[-1] for s in sources]}")
    return torch.stack([batch[s] for s in sources], dim=1)


def multi_model_activations(
    models: Sequence[Any], token_batches: Iterable[Tensor], hook: str, **kwargs: Any
) -> Iterator[Float[Tensor, "n n_models d"]]:
    """Activations at ``hook`` of each of ``models`` on the same tokens, stacked [n_tokens, n_models, d]
    (through `interplab.sae.activations.model_activations`; kwargs go to it: token_filter, dtype)."""
    for tokens in token_batches:
        yield torch.stack([model_activations(m, tokens, [hook], **kwargs)[hook] for m in models], dim=1)


def shuffled_batches(rows: Tensor, batch_size: int, *, seed: int = 0) -> list[Tensor]:
    """``rows`` [n, n_sources, d] cut into shuffled batches of ``batch_size`` (the last partial one dropped)."""
    if rows.shape[0] < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} rows, got {rows.shape[0]}")
    order = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    n = rows.shape[0] // batch_size
    return [rows[order[i * batch_size : (i + 1) * batch_size]] for i in range(n)]


def fvu(cc: Crosscoder, x: Tensor) -> float:
    """Fraction of variance unexplained of the inference forward on ``x`` [n, n_sources, d_in]."""
    with torch.no_grad():
        recon = cc(x).reconstruction
        var = (x - x.mean(0)).pow(2).sum((-1, -2)).mean().clamp_min(1e-12)
        return float((recon - x).pow(2).sum((-1, -2)).mean() / var)


__all__ = [
    "Crosscoder",
    "CrosscoderConfig",
    "CrosscoderOutput",
    "CrosscoderTrainConfig",
    "fvu",
    "load_crosscoder",
    "multi_model_activations",
    "shuffled_batches",
    "stack_sources",
    "train_crosscoder",
]
