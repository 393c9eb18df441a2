"""Training cross-layer transcoders jointly on all layers, and evaluating them in the model.

**One model forward per batch reads every layer.** `clt_activations` streams ``{hook: [rows, d_model]}``
batches of every layer's ``hook_in`` and ``hook_out`` through `interplab.sae.activations.ActivationStream`
(the forward stops after the last layer's MLP output; rows aligned across hooks), so a CLT over L layers costs
one forward where L separately trained transcoders cost L passes over their own caches or streams.

**The loss** (normalised units: every layer's input and target are multiplied by a power-of-two scale taken
from the first batch so that its mean squared norm is about d_model; the scales are folded into the returned
CLT exactly, since multiplying by a power of two is exact)::

    loss = sum over layers m of ||recon[m] - y[m]||^2  (mean over tokens)
         + coefficient(step) * sparsity + pre_act_coefficient * pre_act

- JumpReLU: Anthropic's tanh penalty (Circuit Tracing, 2025; "Dictionary learning optimization techniques",
  Jan 2025): ``sparsity = sum_{l,i} tanh(tanh_scale * a[l,i] * ||W_dec[l,i]||)``, where ``||W_dec[l,i]||`` is
  the norm of latent i's decoders into every layer it writes, concatenated. Why this form: the decoder norm
  makes the penalty invariant to trading encoder scale for decoder scale (so no decoder constraint is needed,
  as in Anthropic's CLTs), and tanh saturates, so it approximates L0 (a latent is charged about once whether
  it fires weakly or strongly) without shrinking the active latents' magnitudes as L1 does. Its gradient
  reaches the threshold through the JumpReLU straight-through estimator of interplab's JumpReLU SAE
  (rectangle kernel of width ``jumprelu_bandwidth``). ``pre_act`` is Anthropic's pre-activation loss,
  ``sum_{l,i} ReLU(threshold[l,i] - pre[l,i]) * ||W_dec[l,i]||``, which pulls latents that never fire back
  towards their threshold (their dead-latent remedy; no resampling). The coefficient ramps linearly from 0
  over ``coefficient_warmup_steps`` (Anthropic ramps it over training).
- TopK: no penalty (k fixes the sparsity); each latent's concatenated decoder is kept at unit norm
  (renormalised after every step, the gradient's radial part removed first), as TopK SAEs keep theirs.
- ReLU: L1 weighted by the concatenated decoder norm.

The run folder, checkpoints and resume are the SAE trainer's (`interplab.sae.resume`: claim, atomic
checksummed checkpoints, newest intact one resumed, log cut back), so a resumed run is bit-identical; under
torchrun each rank streams its share of the token batches and gradients are averaged
(`interplab.train.distributed`).

>>> cfg = CLTTrainConfig(clt=CLTConfig(n_layers=2, d_model=64, d_sae=256), total_steps=4, batch_size=32)
>>> result = train_clt(model, tokens, cfg)  # tokens [4, 16]: 64 rows per pass
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from interplab.integrity import tensors_fingerprint
from interplab.plots import save_figure
from interplab.runs import (
    CHECKPOINTS,
    CONFIG,
    EVAL,
    LOG,
    REPORT,
    VERSIONS,
    Kind,
    check_out,
    read_json,
    read_log,
    write_json,
)
from interplab.runs.names import CLT_DIR, CLTS_DIR
from interplab.sae import resume as resume_lib
from interplab.sae.activations import (
    ActivationBatch,
    ActivationStream,
    TokenFilter,
    _as_batch,
    corpus_token_batches,
    loss_positions,
)
from interplab.sae.clt import (
    CLTActivation,
    CLTConfig,
    CrossLayerTranscoder,
    check_fits,
    jumprelu_train,
    save_clt,
)
from interplab.sae.plots import training_curves
from interplab.sae.train_config import SAETrainConfig
from interplab.train.checkpoint import load_optimizer_state, optimizer_state
from interplab.train.distributed import (
    all_reduce_grads,
    all_reduce_sum,
    barrier,
    broadcast_,
    is_main,
    world_size,
)

if TYPE_CHECKING:
    from interplab.model import Transformer

_RUN_FILES = (CONFIG, LOG, CHECKPOINTS, CLT_DIR, EVAL)
_TRAINER = "clt"


@dataclass(frozen=True, kw_only=True)
class CLTTrainConfig:
    """What CLT to train and how (schedules as `SAETrainConfig`'s: warm-up, flat, linear decay)."""

    clt: CLTConfig
    """the CLT's shape and forward pass (n_layers and d_model must be the model's)"""
    total_steps: int
    """optimizer steps (the run also stops when the activations run out)"""
    batch_size: int = 1024
    """activation rows (tokens) per step; each row holds every layer"""
    lr: float = 1e-3
    """Adam learning rate after warm-up"""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas"""
    warmup_steps: int | None = None
    """linear learning-rate warm-up; None: 5% of the steps"""
    decay_fraction: float = 0.2
    """the last fraction of steps decays the learning rate linearly to 0"""
    coefficient: float = 1.0
    """sparsity coefficient (JumpReLU's tanh penalty, ReLU's L1; TopK ignores it), in normalised units"""
    coefficient_warmup_steps: int | None = None
    """linear ramp of the coefficient from 0; None: half of the steps"""
    tanh_scale: float = 4.0
    """c in tanh(c * a * ||W_dec||) (Anthropic's 4)"""
    pre_act_coefficient: float = 3e-6
    """weight of the pre-activation loss (JumpReLU; Anthropic's 3e-6)"""
    dead_after_tokens: int | None = None
    """a latent that has not fired for this many tokens counts as dead; None: a tenth of the run's tokens"""
    buffer_tokens: int | None = None
    """rows of the shuffle buffer of the activation stream; None: 8 batches"""
    seq_len: int = 64
    """tokens per sequence when the data is a corpus name"""
    seqs_per_forward: int = 16
    """sequences per model forward"""
    autocast: bool = False
    """bfloat16 matmuls against float32 master weights"""
    log_every: int = 50
    """steps between log rows (and progress callbacks)"""
    checkpoint_every: int | None = None
    """steps between checkpoints (None: none but the last when stopped early)"""
    seed: int = 0
    """seed of the initial weights and of the data order"""

    def __post_init__(self) -> None:
        if not isinstance(self.clt, CLTConfig):
            object.__setattr__(self, "clt", CLTConfig.from_dict(dict(self.clt)))
        for name in ("total_steps", "batch_size", "log_every", "seq_len", "seqs_per_forward"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ValueError(f"CLTTrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("coefficient", "pre_act_coefficient"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"CLTTrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.tanh_scale > 0:
            raise ValueError(f"CLTTrainConfig.tanh_scale must be > 0, got {self.tanh_scale}")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise ValueError(
                f"CLTTrainConfig.checkpoint_every must be > 0 (or None), got {self.checkpoint_every}"
            )
        if self.buffer_tokens is not None and self.buffer_tokens < 2 * self.batch_size:
            raise ValueError(
                f"CLTTrainConfig.buffer_tokens must be >= 2 * batch_size = {2 * self.batch_size}, got "
                f"{self.buffer_tokens}"
            )
        self.schedule  # noqa: B018  (validates lr, decay_fraction, ... through SAETrainConfig)

    @property
    def schedule(self) -> SAETrainConfig:
        """The learning-rate and coefficient schedules, as the SAE trainer defines them."""
        steps = self.total_steps
        return SAETrainConfig(
            total_steps=steps,
            lr=self.lr,
            betas=self.betas,
            warmup_steps=max(1, steps // 20) if self.warmup_steps is None else self.warmup_steps,
            decay_fraction=self.decay_fraction,
            coefficient=self.coefficient,
            coefficient_warmup_steps=(
                max(1, steps // 2) if self.coefficient_warmup_steps is None else self.coefficient_warmup_steps
            ),
            dead_after_tokens=self.dead_after_tokens,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "clt"}
        return {"clt": self.clt.to_dict(), **out, "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CLTTrainConfig:
        data = dict(data)
        data["clt"] = CLTConfig.from_dict(data["clt"])
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


@dataclass(frozen=True)
class CLTTrainProgress:
    """Handed to the ``progress`` callback every ``log_every`` steps."""

    step: int
    total_steps: int
    tokens: int
    metrics: dict[str, Any]


@dataclass(frozen=True)
class CLTTrainResult:
    """The trained CLT (scales folded in: it reads and writes the model's units) and its log."""

    clt: CrossLayerTranscoder
    history: list[dict[str, Any]] = field(repr=False)
    tokens: int = 0
    steps: int = 0
    resumed_from: int | None = None
    stopped: bool = False
    """stopped by ``stop_after`` before ``total_steps`` (run again to resume)"""

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def plot(self, metric: str = "fvu") -> Any:
        return training_curves([{**r, "sae": "clt"} for r in self.history if metric in r], metric)


# ---- the shared activation pass -----------------------------------------------------------------------
def clt_hooks(cfg: CLTConfig) -> list[str]:
    """Every layer's ``hook_in`` then ``hook_out``, in the order the model reaches them."""
    return [h for layer in range(cfg.n_layers) for h in (cfg.hook_in_at(layer), cfg.hook_out_at(layer))]


def token_batches(
    model: Transformer, data: str | Tensor | Sequence[Tensor], cfg: CLTTrainConfig
) -> tuple[list[Tensor], TokenFilter, dict[str, Any]]:
    """Token batches [seqs_per_forward, seq] of ``data`` (a corpus name or path, a [n_seq, seq] token tensor,
    or a list of token batches), the filter dropping BOS (and padding), and a JSON description of the data."""
    if isinstance(data, (str, Path)):
        got = corpus_token_batches(
            model, str(data), seq_len=cfg.seq_len, batch_size=cfg.seqs_per_forward, seed=cfg.seed
        )
        return got.batches, got.token_filter, got.source
    if isinstance(data, Tensor):
        toks = _as_batch(data)
        batches = list(toks.split(cfg.seqs_per_forward))
    else:
        batches = [_as_batch(t) for t in data]
    if not batches:
        raise ValueError("no token batches to train on")
    digest = torch.cat([b.reshape(-1) for b in batches])
    source = {"tokens": int(digest.numel()), "fingerprint": tensors_fingerprint({"tokens": digest})}
    return batches, TokenFilter(), source


def clt_activations(
    model: Transformer,
    batches: Iterable[Tensor],
    cfg: CLTTrainConfig,
    *,
    token_filter: TokenFilter = TokenFilter(),
) -> ActivationStream:
    """Shuffled activation batches of every layer's ``hook_in`` and ``hook_out``: one model forward per token
    batch (`ActivationStream` over `clt_hooks`)."""
    return ActivationStream(
        model,
        batches,
        clt_hooks(cfg.clt),
        batch_size=cfg.batch_size,
        buffer_tokens=cfg.buffer_tokens or 8 * cfg.batch_size,
        token_filter=token_filter,
        seed=cfg.seed,
    )


def stack_layers(batch: ActivationBatch, cfg: CLTConfig) -> tuple[Tensor, Tensor]:
    """(x [rows, n_layers, d_model], y [rows, n_layers, d_model]) from a batch holding every layer's hooks."""
    missing = [h for h in clt_hooks(cfg) if h not in batch]
    if missing:
        raise KeyError(f"the activation batches have no {missing[0]!r}; they hold {list(batch)}")
    x = torch.stack([batch[cfg.hook_in_at(layer)] for layer in range(cfg.n_layers)], 1)
    y = torch.stack([batch[cfg.hook_out_at(layer)] for layer in range(cfg.n_layers)], 1)
    return x, y


# ---- training -------------------------------------------------------------------------------------------
class _Folded:
    """What a checkpoint saves as its loadable CLT: the trained one with the scales folded in."""

    def __init__(self, trainer: _CLTTrainer) -> None:
        self.trainer = trainer

    def save(self, path: Path) -> None:
        save_clt(self.trainer.folded(), path)


class _CLTTrainer:
    """The state of one CLT's training; duck-types the SAE trainer for `interplab.sae.resume`."""

    def __init__(self, clt: CrossLayerTranscoder, cfg: CLTTrainConfig) -> None:
        self.name = _TRAINER
        self.clt, self.cfg, self.schedule = clt, cfg, cfg.schedule
        self.opt = torch.optim.Adam(clt.parameters(), lr=cfg.lr, betas=cfg.betas, foreach=True)
        L, S = clt.cfg.n_layers, clt.cfg.d_sae
        self.scale_in = torch.ones(L)
        self.scale_out = torch.ones(L)
        self.since_fired = torch.zeros(L, S, dtype=torch.long)
        self.initialised = False
        self.dead_after: int | None = cfg.dead_after_tokens
        self.sums: dict[str, Any] = {}
        self.n = 0
        self.steps_done = 0

    @property
    def sae(self) -> _Folded:
        return _Folded(self)

    @torch.no_grad()
    def folded(self) -> CrossLayerTranscoder:
        out = copy.deepcopy(self.clt)
        out.fold_scales(self.scale_in, self.scale_out)
        return out

    def state_dict(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        opt_tensors, groups = optimizer_state(self.opt)
        tensors = {f"clt.{k}": v for k, v in self.clt.state_dict().items()}
        tensors.update({f"opt.{k}": v for k, v in opt_tensors.items()})
        tensors.update(scale_in=self.scale_in, scale_out=self.scale_out, since_fired=self.since_fired)
        sums = {k: v.tolist() if isinstance(v, Tensor) else v for k, v in self.sums.items()}
        scalars = {
            "param_groups": groups,
            "initialised": self.initialised,
            "dead_after": self.dead_after,
            "sums": sums,
            "n": self.n,
            "steps_done": self.steps_done,
        }
        return tensors, scalars

    def load_state_dict(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        def part(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        self.clt.load_state_dict(part("clt."), strict=True)
        load_optimizer_state(self.opt, part("opt."), scalars["param_groups"])
        self.scale_in, self.scale_out = tensors["scale_in"].clone(), tensors["scale_out"].clone()
        self.since_fired = tensors["since_fired"].clone()
        self.initialised, self.dead_after = scalars["initialised"], scalars["dead_after"]
        self.sums = {
            k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v
            for k, v in scalars["sums"].items()
        }
        self.n, self.steps_done = scalars["n"], scalars["steps_done"]

    # ---- one step ------------------------------------------------------------------------------
    @torch.no_grad()
    def initialise(self, x: Tensor, y: Tensor) -> None:
        """Power-of-two scales per layer (mean squared norm about d_model) and b_dec = the mean target."""
        d = self.clt.cfg.d_model
        for scale, v in ((self.scale_in, x), (self.scale_out, y)):
            ms = all_reduce_sum(v.float().pow(2).sum(-1).mean(0)) / world_size()  # [n_layers]
            scale.copy_(torch.exp2(torch.round(torch.log2((d / ms.clamp_min(1e-12)).sqrt()))))
        mean = all_reduce_sum((y.float() * self.scale_out[:, None]).mean(0)) / world_size()
        self.clt.b_dec.copy_(mean.to(self.clt.b_dec.dtype))
        broadcast_([*self.clt.parameters(), *self.clt.buffers()])
        self.initialised = True
        if self.dead_after is None:
            self.dead_after = self.schedule.dead_after(x.shape[0] * world_size())

    def loss(self, x_s: Tensor, y_s: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """The training loss and its parts, one layer at a time: each layer's [rows, d_sae] pre-activations,
        activations and penalties are made and used while they are in cache (the [rows, n_layers, d_sae]
        tensors of one batched pass, 16 MB at 1,024 rows x 4 layers x 1,024 latents, are not; 15% slower at 4
        layers, benchmarks/results/clt.json). tests/sae/test_clt_train.py keeps the batched form it replaced
        (`reference_loss`); they agree to rounding."""
        clt, cfg = self.clt, self.clt.cfg
        jumprelu = cfg.activation is CLTActivation.JUMPRELU
        if jumprelu:
            with torch.no_grad():
                clt.threshold.clamp_(min=0.0)
        norms = clt.decoder_norms().float()  # [n_layers, d_sae]
        d = cfg.d_model
        zero = x_s.new_zeros((), dtype=torch.float32)
        sparsity, pre_act = zero, zero
        # each layer's reconstruction minus its target, the decoders' outputs added as they are made
        diff = [clt.b_dec[m].float() - y_s[:, m].float() for m in range(cfg.n_layers)]
        fired, l0 = [], []
        for layer in range(cfg.n_layers):
            x = x_s[:, layer].to(clt.W_enc.dtype)
            pre = torch.addmm(clt.b_enc[layer], x, clt.W_enc[layer]).float()  # [rows, d_sae]
            n = norms[layer]
            if jumprelu:
                t = clt.threshold[layer].float()
                acts = jumprelu_train(pre, t, cfg.jumprelu_bandwidth)
                sparsity = sparsity + torch.tanh(self.cfg.tanh_scale * acts * n).sum(-1).mean()
                pre_act = pre_act + ((t - pre).relu() * n).sum(-1).mean()
            elif cfg.activation is CLTActivation.TOPK:
                acts = clt.activation(pre, layer)
            else:
                acts = pre.relu()
                sparsity = sparsity + (acts * n).sum(-1).mean()
            with torch.no_grad():
                active = acts != 0
                fired.append(active.sum(0))
                l0.append(active.sum(-1))
            n_out = cfg.n_out(layer)
            w = clt.W_dec[layer].reshape(cfg.d_sae, n_out * d)
            out = (acts.to(w.dtype) @ w).float()  # [rows, n_out * d_model]
            for j in range(n_out):
                diff[layer + j] = diff[layer + j] + out[:, j * d : (j + 1) * d]
        err = torch.stack([v.pow(2).sum(-1) for v in diff], 1)  # [rows, n_layers]
        mse = err.sum(-1).mean()
        loss = mse + self.schedule.coefficient_at(step) * sparsity + self.cfg.pre_act_coefficient * pre_act
        return loss, {
            "mse": mse,
            "err": err.detach(),
            "fired": torch.stack(fired),
            "l0": torch.stack(l0, 1),
            "sparsity": sparsity.detach(),
        }

    def step(self, batch: ActivationBatch, step: int) -> None:
        clt = self.clt
        x, y = stack_layers(batch, clt.cfg)
        if not self.initialised:
            self.initialise(x, y)
        x_s = x.float() * self.scale_in[:, None]
        y_s = y.float() * self.scale_out[:, None]
        for group in self.opt.param_groups:
            group["lr"] = self.schedule.lr_at(step)
        ctx = (
            torch.autocast(x.device.type, dtype=torch.bfloat16)
            if self.cfg.autocast
            else contextlib.nullcontext()
        )
        with ctx:
            loss, parts = self.loss(x_s, y_s, step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(clt.parameters())
        topk = clt.cfg.activation is CLTActivation.TOPK
        if topk:
            _remove_radial_grad(clt)
        self.opt.step()
        with torch.no_grad():
            if topk:
                clt.normalize_decoder()
            if clt.cfg.activation is CLTActivation.JUMPRELU:
                clt.threshold.clamp_(min=0.0)
        self.steps_done = step + 1
        self.record(loss, parts, y_s)

    @torch.no_grad()
    def record(self, loss: Tensor, parts: dict[str, Tensor], y_s: Tensor) -> None:
        fired = all_reduce_sum(parts["fired"].to(torch.long))  # [n_layers, d_sae]
        n = y_s.shape[0] * world_size()
        self.since_fired = torch.where(fired > 0, 0, self.since_fired + n)
        var = (y_s - y_s.mean(0)).pow(2).sum(-1).mean(0).double()  # [n_layers]
        err = parts["err"].mean(0).double()
        rows = {
            "loss": float(loss),
            "mse": float(parts["mse"]),
            "sparsity": float(parts["sparsity"]),
            "fvu": float(err.sum() / var.sum().clamp_min(1e-12)),
            "fvu_per_layer": err / var.clamp_min(1e-12),
            "l0_per_layer": parts["l0"].double().mean(0),
        }
        for key, value in rows.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.n += 1

    def log_row(self, step: int, tokens: int) -> dict[str, Any]:
        mean = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        dead = self.since_fired >= (self.dead_after or 1)
        row: dict[str, Any] = {
            "step": step,
            "tokens": tokens,
            "lr": self.schedule.lr_at(step - 1),
            "coefficient": self.schedule.coefficient_at(step - 1),
        }
        for key, value in mean.items():
            row[key] = [round(float(v), 6) for v in value] if isinstance(value, Tensor) else value
        if "l0_per_layer" in row:
            row["l0"] = float(sum(row["l0_per_layer"]))
        row["dead_fraction"] = float(dead.float().mean())
        row["dead_per_layer"] = [float(v) for v in dead.float().mean(-1)]
        self.sums, self.n = {}, 0
        if not all(math.isfinite(row.get(k, 0.0)) for k in ("loss", "mse")):
            raise FloatingPointError(
                f"the CLT diverged at step {step}: loss={row.get('loss')}, mse={row.get('mse')}; lower lr or "
                "coefficient"
            )
        return row


def _remove_radial_grad(clt: CrossLayerTranscoder) -> None:
    """Project out each latent's gradient along its (concatenated) decoder, keeping it on the unit sphere."""
    with torch.no_grad():
        for w in clt.W_dec:
            if w.grad is not None:
                unit = w / w.pow(2).sum((1, 2), keepdim=True).sqrt().clamp_min(1e-8)
                w.grad.sub_((w.grad * unit).sum((1, 2), keepdim=True) * unit)


def _rank() -> int:
    return torch.distributed.get_rank() if world_size() > 1 else 0


def train_clt(
    model: Transformer | None,
    data: str | Tensor | Sequence[Tensor] | Iterable[ActivationBatch],
    cfg: CLTTrainConfig,
    out: str | Path | None = None,
    *,
    progress: Callable[[CLTTrainProgress], None] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    stop_after: int | None = None,
    keep_checkpoints: int | None = 2,
    model_name: str | None = None,
    source: dict[str, Any] | None = None,
) -> CLTTrainResult:
    """Train a CLT on every layer of ``model`` jointly, reading all layers in one forward per token batch.

    ``data``: a corpus name or path (tokenised with the model's tokenizer), a [n_seq, seq] token tensor, a list
    of token batches, or (``model=None``) an iterable of activation batches already holding every layer's
    hooks (`clt_hooks`; e.g. ``DiskActivationStore(cache).batches(...)``). Under torchrun each rank streams
    every world_size-th token batch. With ``out``: a run folder (config.json kind ``clt_train``, log.jsonl,
    checkpoints/step_N/ holding a loadable CLT and the trainer state, clt/ when finished) resumed bit-exactly
    from its newest intact checkpoint when it holds this same run; a different run there is refused unless
    ``overwrite``. ``stop_after=k`` stops after step k with a checkpoint. ``source`` describes activation
    batches (``model=None``) in the run's config (``data``); e.g. `train_clt_shared`'s checkpoints."""
    clt_cfg = cfg.clt
    if model is not None:
        check_fits(clt_cfg, model, "the CLT config")
        clt_cfg = clt_cfg.replace(
            model_name=clt_cfg.model_name or model_name or getattr(model.cfg, "name", None)
        )
        cfg = CLTTrainConfig(**{**vars(cfg), "clt": clt_cfg})
    if model is None:
        batches: Iterable[ActivationBatch] = data  # type: ignore[assignment]
        source = dict(source) if source is not None else {"activations": type(data).__name__}
    else:
        toks, token_filter, source = token_batches(model, data, cfg)  # type: ignore[arg-type]
        toks = toks[_rank() :: world_size()]
        batches = clt_activations(model, toks, cfg, token_filter=token_filter)
    if model_name:
        source = {**source, "model": model_name}
    clt = CrossLayerTranscoder(clt_cfg, seed=cfg.seed)
    trainer = _CLTTrainer(clt, cfg)
    run = Path(out) if out is not None else None
    identity = json.loads(
        json.dumps(
            {
                "kind": Kind.CLT_TRAIN.value,
                "version": VERSIONS[Kind.CLT_TRAIN],
                "train": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"},
                "data": source,
            },
            default=str,
        )
    )
    history: list[dict[str, Any]] = []
    start, tokens, events = resume_lib.start_run(
        run, identity, [trainer], resume=resume, overwrite=overwrite, kind=Kind.CLT_TRAIN, files=_RUN_FILES
    )
    if run is not None and is_main():
        resume_lib.restart_log(run, start)  # the rows after the checkpoint are trained again
        history = [r for r in read_log(run) if "loss" in r]
    total = cfg.total_steps
    stop = total if stop_after is None else min(stop_after, total)
    log = open(run / LOG, "a") if run is not None and is_main() else None  # noqa: SIM115
    step = start
    try:
        if log is not None:
            log.writelines(json.dumps(e) + "\n" for e in events)
        for batch in itertools.islice(batches, start, None):
            if step >= stop:
                break
            n_tok = next(iter(batch.values())).shape[0]
            trainer.step(batch, step)
            step += 1
            tokens += n_tok * world_size()
            if step % cfg.log_every == 0 or step == total:
                row = trainer.log_row(step, tokens)
                history.append(row)
                if log is not None:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if progress is not None:
                    progress(CLTTrainProgress(step, total, tokens, row))
            every = cfg.checkpoint_every
            due = (every and step % every == 0) or (step == stop < total)
            if run is not None and due:
                if is_main():
                    resume_lib.save_training_checkpoint(run, step, tokens, [trainer])  # type: ignore[list-item]
                    if keep_checkpoints is not None:
                        resume_lib.prune_checkpoints(run, keep_checkpoints)
                barrier()
        if trainer.n and step < stop:  # the activations ran out: a last row for what was trained
            row = trainer.log_row(step, tokens)
            history.append(row)
            if log is not None:
                log.write(json.dumps(row) + "\n")
    finally:
        if log is not None:
            log.close()
    if step == 0:
        raise ValueError("no activation batches: the data gave fewer rows than one batch")
    stopped = stop_after is not None and step == stop < total
    final = trainer.folded()
    if run is not None and is_main() and not stopped:
        save_clt(final, run / CLT_DIR)
        if history:
            save_figure(CLTTrainResult(final, history).plot("fvu"), run / "training_fvu.html")
    barrier()
    return CLTTrainResult(final, history, tokens, step, start or None, stopped)


def train_clt_across(
    models: dict[str, Callable[[], Transformer]],
    data: str | Tensor | Sequence[Tensor],
    cfg: CLTTrainConfig,
    out: str | Path,
    *,
    source: dict[str, Any] | None = None,
    progress: Callable[[str, CLTTrainProgress], None] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    keep_checkpoints: int | None = 2,
) -> dict[str, CLTTrainResult]:
    """One CLT per model checkpoint (item 6 of issue 17: the same CLT recipe along a training run), all in one
    run folder: ``out/config.json`` (kind clt_train, ``across: {checkpoints: [names], **source}``) and
    ``out/clts/NAME/``, each a CLT training run of its own (resumable; finished ones are kept). ``models``
    maps each checkpoint name (``step_000100``) to a function loading its model, called in order, one model in
    memory at a time; ``source`` describes where they came from (e.g. ``{"run": path}``)."""
    out = Path(check_out(out, Kind.CLT_TRAIN))
    doc = {
        "across": {**(source or {}), "checkpoints": list(models)},
        "train": {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"},
    }
    cfg_file = out / CONFIG
    if cfg_file.is_file():
        old = {k: v for k, v in read_json(cfg_file, Kind.CLT_TRAIN).items() if k not in ("kind", "version")}
        if old != json.loads(json.dumps(doc, default=str)) and not overwrite:
            raise ValueError(
                f"{out} holds another CLT run across checkpoints: use another --out, or overwrite it (--overwrite)"
            )
    out.mkdir(parents=True, exist_ok=True)
    write_json(cfg_file, Kind.CLT_TRAIN, json.loads(json.dumps(doc, default=str)))
    results = {}
    for name, load in models.items():
        report = (lambda p, n=name: progress(n, p)) if progress is not None else None
        results[name] = train_clt(
            load(),
            data,
            cfg,
            out / CLTS_DIR / name,
            progress=report,
            resume=resume,
            overwrite=overwrite,
            keep_checkpoints=keep_checkpoints,
            model_name=f"{(source or {}).get('run', '')}@{name}",
        )
    return results


# ---- evaluation -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CLTEval:
    """A CLT in its model (see `evaluate_clt` for the definitions); per-layer lists are indexed by layer."""

    tokens: int
    """positions the reconstruction statistics are over (kept by the token filter)"""
    fvu: list[float]
    """per layer: squared error of the MLP-output reconstruction / its variance around the mean"""
    fvu_total: float
    """all layers' squared error / all layers' variance"""
    l0: list[float]
    """per layer: mean number of active latents per token"""
    dead_fraction: list[float]
    """per layer: fraction of latents that never fired on the evaluated tokens"""
    error_norm_fraction: list[float]
    """per layer: mean norm of the error node (MLP output - reconstruction) / mean norm of resid_post"""
    residual_explained: float
    """1 - (sum over layers of the error nodes' mean norm) / (mean norm of the last layer's resid_post): the
    fraction of the residual stream the replacement writes without error terms"""
    ce_clean: float
    """cross-entropy of the original model (next token, every position but the last)"""
    ce_replaced: float
    """cross-entropy of the replacement model: every MLP output replaced by its reconstruction in one forward"""
    kl_div: float
    """KL(original || replacement) per predicted token"""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def plot(self) -> Any:
        """Per-layer FVU, error-norm fraction and dead fraction (Plotly)."""
        import plotly.graph_objects as go

        layers = list(range(len(self.fvu)))
        fig = go.Figure()
        for name in ("fvu", "error_norm_fraction", "dead_fraction"):
            fig.add_bar(x=layers, y=getattr(self, name), name=name)
        fig.update_layout(
            title=f"CLT: CE {self.ce_clean:.3f} -> {self.ce_replaced:.3f}, KL {self.kl_div:.4f}",
            xaxis_title="layer",
            barmode="group",
        )
        return fig

    def save(self, path: str | Path) -> Path:
        """``report.json`` (kind clt_eval) and ``layers.html`` into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / REPORT, Kind.CLT_EVAL, self.to_dict())
        save_figure(self.plot(), path / "layers.html")
        return path

    def __repr__(self) -> str:
        fvu = ", ".join(f"{v:.3f}" for v in self.fvu)
        l0 = ", ".join(f"{v:.1f}" for v in self.l0)
        return (
            f"CLTEval(FVU [{fvu}], L0 [{l0}], CE {self.ce_clean:.4f} -> {self.ce_replaced:.4f}, KL "
            f"{self.kl_div:.4f}, residual explained {self.residual_explained:.3f}, {self.tokens} tokens)"
        )


@torch.no_grad()
def replacement_logits(model: Transformer, clt: CrossLayerTranscoder, tokens: Tensor) -> Tensor:
    """The logits with every MLP output replaced by the CLT's reconstruction, in one forward: each layer's
    encoder reads its ``hook_in`` in that same (replaced) forward, and layer m's output is the sum of the
    decoders of layers <= m (no error terms)."""
    cfg = clt.cfg
    acts: dict[int, Tensor] = {}

    def read(x: Tensor, site: Any) -> None:
        acts[site.layer] = clt.encode_layer(site.layer, x.reshape(*x.shape[:2], -1))

    def write(y: Tensor, site: Any) -> Tensor:
        m = site.layer
        out = clt.b_dec[m].to(y.dtype).expand_as(y).clone()
        for src in range(m + 1) if cfg.cross_layer else (m,):
            out += (acts[src] @ clt.decoder(src, m)).to(y.dtype)
        return out

    with model.hooks(
        fwd_hooks=[(h, write) for h in cfg.hooks_out], read_hooks=[(h, read) for h in cfg.hooks_in]
    ):
        return model(tokens)


@torch.no_grad()
def evaluate_clt(
    model: Transformer,
    clt: CrossLayerTranscoder,
    tokens: Tensor | Iterable[Tensor],
    *,
    token_filter: TokenFilter = TokenFilter(),
    targets: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> CLTEval:
    """Evaluate ``clt`` on ``model`` over ``tokens`` ([batch, pos], or an iterable of such batches); the CE and
    KL at every next token, or with ``targets`` (a task's, `CorpusBatches.targets`: per batch its targets and
    loss mask) where the task is trained (`loss_positions`).

    Reconstruction statistics use the clean forward's ``hook_in``/``hook_out`` at the positions the
    ``token_filter`` keeps (BOS dropped by default); the replacement model (`replacement_logits`) replaces every
    position. Error node of layer l = MLP output - reconstruction (clean forward)."""
    clt.check_model(model)
    cfg = clt.cfg
    batches = [tokens] if isinstance(tokens, Tensor) else list(tokens)
    if targets is not None and len(targets) != len(batches):
        raise ValueError(f"{len(targets)} (targets, loss_mask) pairs for {len(batches)} token batches")
    L = cfg.n_layers
    sq_err = torch.zeros(L, dtype=torch.float64)
    sum_y = torch.zeros(L, cfg.d_model, dtype=torch.float64)
    sum_y2 = torch.zeros(L, dtype=torch.float64)
    err_norm = torch.zeros(L, dtype=torch.float64)
    resid_norm = torch.zeros(L, dtype=torch.float64)
    l0 = torch.zeros(L, dtype=torch.float64)
    fired = torch.zeros(L, cfg.d_sae, dtype=torch.bool)
    ce_clean = ce_rep = kl = 0.0
    n_tok = n_pred = 0
    resid_hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(L)]
    for i, toks in enumerate(batches):
        toks = _as_batch(toks).to(clt.device)
        keep = token_filter.mask(toks)
        logits, cache = model.run_with_cache(toks, names=[*cfg.hooks_in, *cfg.hooks_out, *resid_hooks])
        x = torch.stack([cache[h].flatten(2) for h in cfg.hooks_in], 2)[keep].float()
        y = torch.stack([cache[h] for h in cfg.hooks_out], 2)[keep].double()
        resid = torch.stack([cache[h] for h in resid_hooks], 2)[keep].double()
        out = clt(x)
        err = out.recon.double() - y
        sq_err += err.pow(2).sum((0, 2))
        sum_y += y.sum(0)
        sum_y2 += y.pow(2).sum((0, 2))
        err_norm += err.norm(dim=-1).sum(0)
        resid_norm += resid.norm(dim=-1).sum(0)
        l0 += (out.acts != 0).sum(-1).double().sum(0)
        fired |= (out.acts != 0).any(0)
        n_tok += int(keep.sum())
        rep = replacement_logits(model, clt, toks)
        mask, target = loss_positions(
            toks, None if targets is None else targets[i], n_classes=logits.shape[-1]
        )
        lp = logits[mask].double().log_softmax(-1)
        lq = rep[mask].double().log_softmax(-1)
        ce_clean += float(F.nll_loss(lp, target, reduction="sum"))
        ce_rep += float(F.nll_loss(lq, target, reduction="sum"))
        kl += float((lp.exp() * (lp - lq)).sum())
        n_pred += target.numel()
    if n_tok == 0 or n_pred == 0:
        raise ValueError("no tokens were evaluated (empty input, or every position filtered out)")
    var = sum_y2 - sum_y.pow(2).sum(-1) / n_tok
    err_mean, resid_mean = err_norm / n_tok, resid_norm / n_tok
    return CLTEval(
        tokens=n_tok,
        fvu=(sq_err / var).tolist(),
        fvu_total=float(sq_err.sum() / var.sum()),
        l0=(l0 / n_tok).tolist(),
        dead_fraction=(~fired).double().mean(-1).tolist(),
        error_norm_fraction=(err_mean / resid_mean).tolist(),
        residual_explained=float(1 - err_mean.sum() / resid_mean[-1]),
        ce_clean=ce_clean / n_pred,
        ce_replaced=ce_rep / n_pred,
        kl_div=kl / n_pred,
    )


__all__ = [
    "CLT_DIR",
    "CLTS_DIR",
    "CLTEval",
    "CLTTrainConfig",
    "CLTTrainProgress",
    "CLTTrainResult",
    "clt_activations",
    "clt_hooks",
    "evaluate_clt",
    "replacement_logits",
    "stack_layers",
    "token_batches",
    "train_clt",
    "train_clt_across",
]
