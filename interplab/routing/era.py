"""Expand, route, ablate (ERA): learn the forget data in extra MLP units, then delete them.

Conditions, all trained by `train_lm` with the same data order, steps and optimiser:
- ``none``: no intervention, trained on everything;
- ``filter``: data filtering, the labelled forget windows removed;
- ``era``: an expanded model; labelled forget windows send gradient through the expansion with weight 1 and
  through the original MLP units with weight ``forget_original_weight`` (an activation route), and update the
  parameters outside the expansion with weight ``forget_shared_weight`` (a parameter route); retain windows
  train everything (``retain_expansion_weight`` on and through the expansion). Then the expansion is ablated
  and the model optionally fine-tuned on retain data.

interplab's defaults are the strict recipe: forget data trains only the expansion (original units 0, shared
parameters 0). `ERAConfig.paper` gives the weights of the paper's code (Cloud et al. 2024, TinyStories ERA):
forget data -0.75 through the original units and free to train the rest of the network (no parameter route).
Unlabelled forget windows are treated as retain data (they are indistinguishable), for every condition.
Each final model is then fine-tuned on 1, 4, 16, 64 forget windows to measure how fast the forget data returns.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from interplab.model import ModelConfig, Positional, Transformer
from interplab.plots import save_figure, write_image
from interplab.routing.era_data import ERAData, package_rule, stdlib_windows
from interplab.routing.expand import Expansion, ablate_expansion, expand_mlp
from interplab.routing.routes import Route, Router
from interplab.runs import REPORT, Kind, write_json


@dataclass(frozen=True, kw_only=True)
class ERAConfig:
    """Models, training and evaluation of an ERA experiment."""

    d_model: int = 128
    """residual width"""
    n_layers: int = 2
    """transformer blocks"""
    n_heads: int = 4
    """attention heads"""
    d_mlp: int = 512
    """MLP width of the original model"""
    expand_units: int = 128
    """extra MLP units per layer in the ERA model"""
    forget_original_weight: float = 0.0
    """weight of labelled forget data's gradient through the original MLP units (the activation route at
    ``mlp.hook_post``): 0 blocks it (interplab's default); negative pushes the original units away from the
    forget data (the paper's code: -0.75)"""
    forget_shared_weight: float = 0.0
    """weight of labelled forget data's gradient on every parameter outside the expansion (0: none, the
    default; 1: forget data trains the rest of the network, as in the paper's code)"""
    retain_expansion_weight: float = 1.0
    """weight of retain (and unlabelled) data's gradient on and through the expansion (1: it trains everything,
    so the expansion learns to stay quiet on retain data; 0: the expansion sees forget data only)"""
    steps: int = 600
    """training steps"""
    batch_size: int = 16
    """windows per step"""
    lr: float = 3e-3
    """AdamW learning rate (constant after a 5% warmup)"""
    retain_finetune_steps: int = 50
    """ERA: steps of fine-tuning on retain data after ablation (0: none)"""
    labelled_fractions: tuple[float, ...] = (1.0, 0.5, 0.1)
    """fractions of the forget training windows that are labelled"""
    relearn_sizes: tuple[int, ...] = (1, 4, 16, 64)
    """forget windows the final models are fine-tuned on"""
    relearn_steps: int = 20
    """fine-tuning steps of the retraining test"""
    relearn_lr: float = 1e-3
    """learning rate of the retraining test"""
    eval_windows: int = 256
    """validation windows per loss"""
    seed: int = 0
    """model initialisation, data order and labelling"""

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layers", "n_heads", "d_mlp", "expand_units", "steps", "batch_size",
                     "relearn_steps", "eval_windows"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "labelled_fractions", tuple(self.labelled_fractions))
        object.__setattr__(self, "relearn_sizes", tuple(self.relearn_sizes))
        bad = [f for f in self.labelled_fractions if not 0.0 < f <= 1.0]
        if bad or not self.labelled_fractions:
            raise ValueError(f"labelled_fractions must be in (0, 1], got {self.labelled_fractions}")
        if any(k <= 0 for k in self.relearn_sizes):
            raise ValueError(f"relearn_sizes must be positive, got {self.relearn_sizes}")
        for name in ("forget_original_weight", "forget_shared_weight", "retain_expansion_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    @classmethod
    def paper(cls, **changes: Any) -> ERAConfig:
        """The routing weights of the paper's ERA runs (Cloud et al. 2024; TinyStories, their code's
        ``bulk_runs_for_paper.py``): forget data through the expansion 1 and the original units -0.75, no
        parameter route (forget data trains attention, embeddings and the original weights through every
        other path), retain data 1 everywhere. ``changes`` override any field (sizes, steps ...). Unlike the
        paper, every expanded layer is routed (the paper routes the first 5 of 8 layers)."""
        recipe: dict[str, Any] = dict(
            forget_original_weight=-0.75, forget_shared_weight=1.0, retain_expansion_weight=1.0
        )
        return cls(**{**recipe, **changes})

    @classmethod
    def stdlib(cls, *, quick: bool = False, steps: int | None = None) -> ERAConfig:
        """``interplab route --preset era-stdlib``: a 2-layer model forgetting one stdlib package (``quick``: a
        1-layer try in about a minute); ``steps`` None: the preset's."""
        if quick:
            return cls(d_model=32, n_layers=1, n_heads=2, d_mlp=64, expand_units=32, steps=100 if steps is None else steps,
                       batch_size=8, relearn_sizes=(1, 4, 16), relearn_steps=10, eval_windows=64,
                       retain_finetune_steps=10)  # fmt: skip
        return cls(d_model=96, n_layers=2, n_heads=4, d_mlp=384, expand_units=96, steps=500 if steps is None else steps,
                   batch_size=16, eval_windows=128)  # fmt: skip

    def routing(self, expansion: Expansion) -> ERARouting:
        """This config's routes for an expanded model."""
        return ERARouting(
            expansion=expansion,
            forget_original_weight=self.forget_original_weight,
            forget_shared_weight=self.forget_shared_weight,
            retain_expansion_weight=self.retain_expansion_weight,
        )

    def model_config(self, d_vocab: int, seq_len: int) -> ModelConfig:
        return ModelConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, d_mlp=self.d_mlp,
                           d_vocab=d_vocab, n_ctx=seq_len, positional=Positional.ROTARY, name="era")  # fmt: skip


@dataclass(frozen=True, kw_only=True, eq=False)
class ERARouting:
    """The routes of the ERA condition: group 0 = retain (and unlabelled), group 1 = labelled forget (the
    weights mean what the `ERAConfig` fields of the same names say)."""

    expansion: Expansion
    forget_original_weight: float = 0.0
    forget_shared_weight: float = 0.0
    retain_expansion_weight: float = 1.0

    def router(self) -> Router:
        e = self.expansion
        retain = e.unit_mask(extra=self.retain_expansion_weight, original=1.0)
        forget = e.unit_mask(extra=1.0, original=self.forget_original_weight)
        weights = torch.stack([retain, forget])
        return Router([Route(site=s, weights=weights) for s in e.sites()])

    def param_routes(self):
        e = self.expansion
        return [
            e.param_route(extra=self.retain_expansion_weight, rest=1.0),
            e.param_route(extra=1.0, rest=self.forget_shared_weight),
        ]


def lm_loss(model: Transformer, windows: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``windows`` [n seq_len+1]."""
    logits = model(windows[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))


@torch.no_grad()
def eval_loss(model: Transformer, windows: Tensor, *, chunk: int = 64) -> float:
    was = model.training
    model.eval()
    total = sum(float(lm_loss(model, windows[i : i + chunk])) * len(windows[i : i + chunk])
                for i in range(0, len(windows), chunk))  # fmt: skip
    model.train(was)
    return total / len(windows)


def train_lm(
    model: Transformer,
    windows: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    routing: ERARouting | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Transformer:
    """AdamW with warmup and gradient clipping on random windows; with ``routing``, each step runs one forward
    and backward per label group (0 retain, 1 forget) under that group's activation and parameter routes."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator().manual_seed(seed)
    router = routing.router() if routing is not None else None
    param_routes = routing.param_routes() if routing is not None else None
    model.train()
    for step in range(steps):
        idx = torch.randint(0, len(windows), (min(batch_size, len(windows)),), generator=gen)
        opt.zero_grad(set_to_none=True)
        if router is None or param_routes is None:
            loss = lm_loss(model, windows[idx])
            loss.backward()
            value = float(loss.detach())
        else:
            value = 0.0
            for group in (0, 1):
                sub = idx[labels[idx] == group]
                if len(sub) == 0:
                    continue
                with router.apply(model, torch.full((len(sub),), group)), param_routes[group].apply(model):
                    loss = lm_loss(model, windows[sub]) * (len(sub) / len(idx))
                    loss.backward()
                value += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None:
            progress(step, value)
    model.eval()
    return model


@dataclass(frozen=True, kw_only=True)
class ERARow:
    """One condition at one labelled fraction."""

    condition: str
    """none, filter or era"""
    labelled_fraction: float
    """fraction of forget windows labelled (1.0 for none)"""
    retain_loss: float
    """validation retain loss of the final model"""
    forget_loss: float
    """validation forget loss of the final model"""
    relearn_forget_loss: dict[int, float]
    """forget loss after fine-tuning on k forget windows"""
    before_ablation: dict[str, float] = field(default_factory=dict)
    """ERA only: retain and forget loss of the expanded model before ablation"""


@dataclass(frozen=True, kw_only=True)
class ERAResult:
    config: ERAConfig
    rows: list[ERARow]
    description: str = ""

    def table(self) -> list[list[str]]:
        head = [
            "condition",
            "labelled",
            "retain",
            "forget",
            *[f"forget after {k}" for k in self.config.relearn_sizes],
        ]
        out = [head]
        for r in self.rows:
            out.append([r.condition, f"{r.labelled_fraction:.0%}", f"{r.retain_loss:.3f}", f"{r.forget_loss:.3f}",
                        *[f"{r.relearn_forget_loss[k]:.3f}" for k in self.config.relearn_sizes]])  # fmt: skip
        return out

    def row(self, condition: str, fraction: float = 1.0) -> ERARow:
        for r in self.rows:
            if r.condition == condition and abs(r.labelled_fraction - fraction) < 1e-9:
                return r
        raise KeyError(
            f"no row {condition!r} at {fraction}; rows: {[(r.condition, r.labelled_fraction) for r in self.rows]}"
        )

    def plot(self):
        """Forget loss against the number of forget windows the model was fine-tuned on, per condition."""
        import plotly.graph_objects as go

        fig = go.Figure()
        ks = list(self.config.relearn_sizes)
        for r in self.rows:
            fig.add_scatter(x=[0, *ks], y=[r.forget_loss, *[r.relearn_forget_loss[k] for k in ks]], mode="lines+markers",
                            name=f"{r.condition} ({r.labelled_fraction:.0%} labelled)")  # fmt: skip
        fig.update_layout(title="Retraining robustness: forget loss after fine-tuning on k forget examples",
                          xaxis_title="forget windows fine-tuned on (k)", yaxis_title="forget validation loss",
                          width=800, height=450)  # fmt: skip
        return fig

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` of this experiment (`Kind.ROUTING`, ``experiment: "era"``): ``description``,
        ``config``, ``rows`` (one per condition and labelled fraction), ``table`` (the printed table)."""
        return {
            "experiment": "era",
            "description": self.description,
            "config": asdict(self.config),
            "rows": [
                {**asdict(r), "relearn_forget_loss": {str(k): v for k, v in r.relearn_forget_loss.items()}}
                for r in self.rows
            ],  # fmt: skip
            "table": self.table(),
        }

    def save(self, path: str | Path) -> Path:
        """``relearning.html`` / ``.png`` and then ``report.json`` (`to_dict`; ``png_error`` says why there is
        no PNG when no static renderer works) in folder ``path``."""
        path = Path(path)
        fig = self.plot()
        save_figure(fig, path / "relearning.html")
        error = write_image(fig, path / "relearning.png")
        write_json(path / REPORT, Kind.ROUTING, {**self.to_dict(), "png_error": error})
        return path

    def __repr__(self) -> str:
        return "ERAResult(\n" + "\n".join(json.dumps(row) for row in self.table()) + "\n)"


def relearn(model: Transformer, data: ERAData, cfg: ERAConfig, forget_order: Tensor) -> dict[int, float]:
    """Forget loss after fine-tuning a copy of ``model`` on the first k forget windows (full batch)."""
    forget_windows = data.train[data.train_forget][forget_order]
    out = {}
    for k in cfg.relearn_sizes:
        copy_ = copy.deepcopy(model)
        train_lm(copy_, forget_windows[:k], torch.zeros(min(k, len(forget_windows)), dtype=torch.long),
                 steps=cfg.relearn_steps, batch_size=k, lr=cfg.relearn_lr, seed=cfg.seed)  # fmt: skip
        out[k] = eval_loss(copy_, data.val_forget[: cfg.eval_windows])
    return out


def era_stdlib_data(forget: str = "email", *, quick: bool = False) -> ERAData:
    """The data of ``interplab route --preset era-stdlib``: byte windows of the stdlib, the files of package
    ``forget`` to be forgotten (``quick``: shorter windows, less retain text)."""
    return stdlib_windows(
        forget=package_rule(forget), seq_len=48 if quick else 96, retain_bytes=400_000 if quick else 3_000_000
    )


def run_era(
    data: ERAData, cfg: ERAConfig = ERAConfig(), *, progress: Callable[[str], None] | None = None
) -> ERAResult:
    """Train no-intervention, data-filtering and ERA models (the last two per labelled fraction)."""
    say = progress or (lambda _msg: None)
    gen = torch.Generator().manual_seed(cfg.seed)
    forget_idx = data.train_forget.nonzero().flatten()
    forget_order = torch.randperm(len(forget_idx), generator=gen)
    val_r, val_f = data.val_retain[: cfg.eval_windows], data.val_forget[: cfg.eval_windows]
    model_cfg = cfg.model_config(data.d_vocab, data.seq_len)
    train_args: dict[str, Any] = dict(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed)

    def fresh() -> Transformer:
        torch.manual_seed(cfg.seed)
        return Transformer(model_cfg)

    def finish(
        condition: str, fraction: float, model: Transformer, before: dict[str, float] | None = None
    ) -> None:
        say(
            f"{condition} {fraction:.0%}: evaluating and retraining on {list(cfg.relearn_sizes)} forget windows"
        )
        rows.append(ERARow(condition=condition, labelled_fraction=fraction, retain_loss=eval_loss(model, val_r),
                           forget_loss=eval_loss(model, val_f), relearn_forget_loss=relearn(model, data, cfg, forget_order),
                           before_ablation=before or {}))  # fmt: skip

    rows: list[ERARow] = []
    say("none: training on all data")
    finish(
        "none",
        1.0,
        train_lm(fresh(), data.train, torch.zeros(len(data.train), dtype=torch.long), **train_args),
    )
    for fraction in cfg.labelled_fractions:
        labels = torch.zeros(len(data.train), dtype=torch.long)
        labelled = forget_idx[forget_order[: max(1, round(fraction * len(forget_idx)))]]
        labels[labelled] = 1
        say(f"filter {fraction:.0%}: training without the labelled forget windows")
        keep = labels == 0
        finish("filter", fraction, train_lm(fresh(), data.train[keep], labels[keep], **train_args))
        say(f"era {fraction:.0%}: expanded model, routed training")
        expanded, expansion = expand_mlp(fresh(), cfg.expand_units, seed=cfg.seed)
        train_lm(expanded, data.train, labels, routing=cfg.routing(expansion), **train_args)
        before = {"retain_loss": eval_loss(expanded, val_r), "forget_loss": eval_loss(expanded, val_f)}
        ablated = ablate_expansion(expanded, expansion)
        if cfg.retain_finetune_steps:
            keep = labels == 0
            train_lm(ablated, data.train[keep], labels[keep], steps=cfg.retain_finetune_steps,
                     batch_size=cfg.batch_size, lr=cfg.relearn_lr, seed=cfg.seed + 1)  # fmt: skip
        finish("era", fraction, ablated, before)
    return ERAResult(config=cfg, rows=rows, description=data.description)
