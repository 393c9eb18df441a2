"""Recording projected per-example gradients during training (or afterwards, at checkpoints).

A recording folder holds ``config.json`` (`Kind.GRADIENTS`: parameter group + projection), ``index.json``
(`Kind.GRADIENT_INDEX`: one entry per recorded step: step, learning rate, number of examples, shard file,
checkpoint and a checksum of the recorded weights) and
one safetensors shard per step (``ids`` [n] and ``grads`` [n, dim]). Writes are atomic and recording resumes:
a step already in the index is skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from interplab.data_attribution.params import ParamGroup, param_group
from interplab.data_attribution.per_example import Objective, lm_loss, per_example_grads
from interplab.data_attribution.projection import ProjectionKind, Projector
from interplab.io import save_tensors
from interplab.runs import CONFIG, GRADIENT_INDEX, Kind, read_json, write_json


@dataclass(frozen=True, kw_only=True)
class RecordConfig:
    """What to record."""

    group: str = "all"
    """parameter group spec (see `interplab.data_attribution.params`)"""
    dim: int = 1024
    """projection dimension"""
    seed: int = 0
    """projection seed"""
    kind: ProjectionKind = ProjectionKind.SPARSE
    """projection kind"""
    precondition: bool = True
    """divide gradients by Adam's sqrt(v_hat) + eps (the per-example share of an Adam step) when recording with an
    Adam/AdamW optimiser; momentum is ignored (a first-order approximation, stated in reports)"""
    half: bool = False
    """store float16 instead of float32 (halves storage)"""
    memory_budget: float = 5e8
    """bytes of per-example gradients held at once"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ProjectionKind(self.kind))
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")


def weights_checksum(model: nn.Module, group: ParamGroup) -> str:
    h = hashlib.sha256()
    params = dict(model.named_parameters())
    for name in group.param_names:
        h.update(params[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class GradientRecorder:
    """Writes projected per-example gradients of one parameter group, step by step, to a folder."""

    def __init__(self, folder: str | Path, model: nn.Module, cfg: RecordConfig | None = None) -> None:
        self.folder = Path(folder)
        config_file = self.folder / CONFIG
        if config_file.is_file():
            saved = read_json(config_file, Kind.GRADIENTS)
            if cfg is not None and saved["record"] != _cfg_dict(cfg):
                raise ValueError(
                    f"{self.folder} already holds a recording with another config: {saved['record']}"
                )
            cfg = RecordConfig(**saved["record"])
        self.cfg = cfg or RecordConfig()
        self.group = param_group(model, self.cfg.group)
        self.projector = Projector(
            d_in=self.group.numel, dim=self.cfg.dim, seed=self.cfg.seed, kind=self.cfg.kind
        )
        if not config_file.is_file():
            write_json(
                config_file,
                Kind.GRADIENTS,
                {
                    "record": _cfg_dict(self.cfg),
                    "projector": self.projector.to_dict(),
                    "group_numel": self.group.numel,
                },
            )
        self.index: list[dict] = self._read_index()

    def _read_index(self) -> list[dict]:
        f = self.folder / GRADIENT_INDEX
        if not f.is_file():
            return []
        entries = read_json(f, Kind.GRADIENT_INDEX)["entries"]
        # a shard written but not indexed (interrupted) is simply redone; an indexed one must exist
        return [e for e in entries if (self.folder / e["file"]).is_file()]

    @property
    def steps(self) -> list[int]:
        return [e["step"] for e in self.index]

    def record(
        self,
        model: nn.Module,
        examples: Tensor | tuple[Tensor, ...],
        example_ids: Tensor,
        *,
        step: int,
        lr: float,
        objective: Objective = lm_loss,
        optimizer: torch.optim.Optimizer | None = None,
        checkpoint: str | None = None,
        batch_size: int | None = None,
    ) -> bool:
        """Record one step's examples; returns False if the step was already recorded (resume)."""
        if step in self.steps:
            return False
        n = (examples[0] if isinstance(examples, tuple) else examples).shape[0]
        if example_ids.shape != (n,):
            raise ValueError(f"example_ids must have shape ({n},), got {tuple(example_ids.shape)}")
        denom = (
            self._adam_denominator(model, optimizer)
            if self.cfg.precondition and optimizer is not None
            else None
        )

        def project(grads: Tensor) -> Tensor:  # chunk by chunk: the [n, numel] gradients are never held
            return self.projector.project(grads if denom is None else grads / denom)

        feats = per_example_grads(
            model, objective, examples, self.group, memory_budget=self.cfg.memory_budget, transform=project
        ) / (batch_size or n)
        name = f"step_{step:08d}.safetensors"
        save_tensors(
            self.folder / name,
            {"ids": example_ids.long().cpu(), "grads": feats.half() if self.cfg.half else feats},
        )
        self.index.append(
            {
                "step": step,
                "lr": float(lr),
                "n": n,
                "file": name,
                "checkpoint": checkpoint,
                "weights": weights_checksum(model, self.group),
                "preconditioned": bool(self.cfg.precondition and optimizer is not None),
            }
        )
        self.index.sort(key=lambda e: e["step"])
        write_json(self.folder / GRADIENT_INDEX, Kind.GRADIENT_INDEX, {"entries": self.index})
        return True

    def _adam_denominator(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Tensor:
        params = dict(model.named_parameters())
        parts = {}
        for name in self.group.param_names:
            p = params[name]
            state = optimizer.state.get(p, {})
            group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
            if "exp_avg_sq" not in state:
                parts[name] = torch.ones_like(p)
                continue
            step = float(state["step"])
            beta2, eps = group["betas"][1], group["eps"]
            parts[name] = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt() + eps
        return self.group.flatten(parts)

    def load(self, step: int) -> tuple[Tensor, Tensor, dict]:
        """(ids [n], grads [n, dim] float32, index entry) of one recorded step."""
        from safetensors.torch import load_file

        entry = next((e for e in self.index if e["step"] == step), None)
        if entry is None:
            raise ValueError(f"step {step} was not recorded; recorded steps: {_span(self.steps)}")
        data = load_file(str(self.folder / entry["file"]))
        return data["ids"], data["grads"].float(), entry

    def window(self, start: int, stop: int) -> list[int]:
        """Recorded steps in [start, stop]; an error if none (naming what was recorded)."""
        steps = [s for s in self.steps if start <= s <= stop]
        if not steps:
            raise ValueError(
                f"no recorded step in the window [{start}, {stop}]; recorded steps: {_span(self.steps)}"
            )
        return steps


def _cfg_dict(cfg: RecordConfig) -> dict:
    return {
        "group": cfg.group,
        "dim": cfg.dim,
        "seed": cfg.seed,
        "kind": cfg.kind.value,
        "precondition": cfg.precondition,
        "half": cfg.half,
        "memory_budget": cfg.memory_budget,
    }


def _span(steps: list[int]) -> str:
    if not steps:
        return "none"
    return f"{len(steps)} steps from {steps[0]} to {steps[-1]}"


class RecordingCallback:
    """An opt-in trainer callback: records projected per-example gradients of the examples in each chosen step's
    batch, at the weights that step's gradient was taken at (before the optimiser update), with Adam
    preconditioning from the optimiser's state.

    >>> from interplab.train import train
    >>> from interplab.train.sources import CorpusSource
    >>> from interplab.train.trainer import build_model
    >>> model = build_model(cfg, CorpusSource(cfg))     # the run's architecture, to resolve the group
    >>> cb = RecordingCallback("runs/x-gradients", model, RecordConfig(group="head:0.1", dim=32), steps=range(4, 12, 4))
    >>> result = train(cfg, "runs/x", callbacks=[cb])
    """

    def __init__(
        self,
        folder: str | Path,
        model: nn.Module,
        cfg: RecordConfig | None = None,
        *,
        steps: range | list[int] | None = None,
        every: int | None = None,
    ) -> None:
        if (steps is None) == (every is None):
            raise ValueError(
                "give exactly one of steps= (which steps to record) or every= (record every n-th step)"
            )
        self.recorder = GradientRecorder(folder, model, cfg)
        self.steps = set(steps) if steps is not None else None
        self.every = every

    def wants(self, step: int) -> bool:
        return step in self.steps if self.steps is not None else step % self.every == 0  # type: ignore[operator]

    def __call__(
        self,
        *,
        step: int,
        model: nn.Module,
        tokens: Tensor,
        example_ids: Tensor,
        lr: float,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if self.wants(step):
            self.recorder.record(model, tokens, example_ids, step=step, lr=lr, optimizer=optimizer)
