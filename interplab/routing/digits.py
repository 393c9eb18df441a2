"""The split autoencoder (a scaled-down version of the MNIST experiment of Cloud et al. 2024) on sklearn's
bundled 8x8 digits: route digits 0-4 into the first half of the latent code and 5-9 into the second, with
the paper's L1 and correlation penalties; then certify the split by training fresh decoders on each detached
half and measuring what they reconstruct per digit group. The no-routing control is trained by the same code.

>>> result = run_digits_split(DigitsSplitConfig(seeds=(0,), steps=20, certificate_steps=10))  # the default: 2000 steps, 3 seeds
>>> result.summary()["routed"]["ratio_mean"] > 0  # error on the other group / error on its own group (> 1: split)
True
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from interplab.plots import save_figure, write_image
from interplab.routing.routes import Route, Router
from interplab.runs import REPORT, Kind, write_json

N_PIXELS = 64


@dataclass(frozen=True, kw_only=True)
class DigitsSplitConfig:
    """Split-autoencoder experiment on sklearn's 8x8 digits."""

    latent: int = 32
    """latent width; the first half is routed digits 0-4, the second 5-9"""
    hidden: int = 128
    """hidden width of encoder and decoder"""
    steps: int = 2000
    """training steps of the autoencoder"""
    certificate_steps: int = 800
    """training steps of each certificate decoder"""
    batch_size: int = 128
    """examples per step"""
    lr: float = 2e-3
    """Adam learning rate"""
    l1: float = 0.02
    """L1 penalty on the latent code"""
    correlation: float = 0.1
    """penalty on the mean absolute correlation between the two halves' latent dimensions"""
    outside_weight: float = -0.1
    """gradient weight of the other half for each group (0 blocks; negative pushes the other half to forget)"""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """one routed and one control run per seed"""
    test_fraction: float = 0.3
    """held-out digits for every reported error (a fixed split)"""

    def __post_init__(self) -> None:
        for name in ("latent", "hidden", "steps", "certificate_steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.latent % 2:
            raise ValueError(f"latent must be even (two halves), got {self.latent}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        object.__setattr__(self, "seeds", tuple(self.seeds))
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        for name in ("lr", "l1", "correlation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    @classmethod
    def preset(
        cls, *, n_seeds: int | None = None, steps: int | None = None, quick: bool = False
    ) -> DigitsSplitConfig:
        """``interplab route --preset digits-split``: seeds ``0 .. n_seeds-1`` and ``steps`` (None: the
        defaults); ``quick`` is a try in a minute: seeds 0 and 1, 300 steps, 200 certificate steps."""
        changes: dict[str, Any] = {} if n_seeds is None else {"seeds": tuple(range(n_seeds))}
        if steps is not None:
            changes["steps"] = steps
        if quick:
            changes.update(seeds=(0, 1), steps=300, certificate_steps=200)
        return cls(**changes)


class SplitAutoencoder(nn.Module):
    def __init__(self, latent: int, hidden: int) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(N_PIXELS, hidden), nn.ReLU(), nn.Linear(hidden, latent), nn.ReLU()
        )
        self.code = nn.Identity()  # the routed point: the code as the decoder reads it
        self.decoder = make_decoder(latent, hidden)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encoder(x)
        return z, self.decoder(self.code(z))


def make_decoder(latent: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, N_PIXELS), nn.Sigmoid())


def load_digit_split(test_fraction: float = 0.3) -> dict[str, Tensor]:
    """sklearn's digits scaled to [0, 1] and a fixed train/test split (seed 0)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(len(x) * (1 - test_fraction))
    tr, te = order[:cut], order[cut:]
    return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}


def correlation_penalty(z: Tensor) -> Tensor:
    """Mean absolute correlation (over the batch) between dims of the first and the second half of ``z``."""
    half = z.shape[1] // 2
    zs = (z - z.mean(0)) / (z.std(0) + 1e-6)
    corr = zs[:, :half].T @ zs[:, half:] / z.shape[0]
    return corr.abs().mean()


def train_autoencoder(
    cfg: DigitsSplitConfig, data: dict[str, Tensor], *, seed: int, routed: bool
) -> SplitAutoencoder:
    """The autoencoder trained with (``routed``) or without the route; everything else identical."""
    torch.manual_seed(seed)
    model = SplitAutoencoder(cfg.latent, cfg.hidden)
    half = cfg.latent // 2
    # The reconstruction loss is routed (through `code`); the penalties read the unrouted code, so they
    # push every latent dimension towards zero on every digit, which silences each half on the other group.
    route = Route.from_regions("code", width=cfg.latent, regions={0: range(half), 1: range(half, cfg.latent)},
                               outside=cfg.outside_weight)  # fmt: skip
    router = Router([route])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed)
    x_all, groups_all = data["x_train"], (data["y_train"] >= 5).long()
    for _ in range(cfg.steps):
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=gen)
        x, groups = x_all[idx], groups_all[idx]
        if routed:
            with router.apply(model, groups):
                z, recon = model(x)
        else:
            z, recon = model(x)
        loss = (recon - x).pow(2).sum(1).mean() + cfg.l1 * z.abs().sum(1).mean()
        loss = loss + cfg.correlation * correlation_penalty(z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def certificate_decoder(
    cfg: DigitsSplitConfig, model: SplitAutoencoder, data: dict[str, Tensor], dims: slice, *, seed: int
) -> nn.Module:
    """A fresh decoder trained on all training digits to reconstruct them from ``z[:, dims]`` (detached)."""
    torch.manual_seed(seed + 1000)
    with torch.no_grad():
        z_all = model.encoder(data["x_train"])[:, dims]
    decoder = make_decoder(z_all.shape[1], cfg.hidden)
    opt = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(seed + 1000)
    for _ in range(cfg.certificate_steps):
        idx = torch.randint(0, len(z_all), (cfg.batch_size,), generator=gen)
        loss = (decoder(z_all[idx]) - data["x_train"][idx]).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return decoder


@dataclass(frozen=True, kw_only=True)
class DigitsSplitRun:
    """One seed, one condition: test reconstruction error (summed squared error per image) of each
    certificate decoder on each digit group."""

    seed: int
    routed: bool
    error_first_half: dict[str, float]
    """the decoder reading latent dims 0..latent/2-1: error on digits '0-4' and '5-9'"""
    error_second_half: dict[str, float]
    """the decoder reading the second half"""
    autoencoder_error: float
    """the trained autoencoder's own test error"""

    @property
    def ratio(self) -> float:
        """Certificate ratio: each half's error on the other group over its error on its own group (geometric
        mean of the two halves). ~1 when nothing is split."""
        first = self.error_first_half["5-9"] / self.error_first_half["0-4"]
        second = self.error_second_half["0-4"] / self.error_second_half["5-9"]
        return math.sqrt(first * second)


def _group_errors(decoder: nn.Module, z: Tensor, x: Tensor, y: Tensor) -> dict[str, float]:
    with torch.no_grad():
        err = (decoder(z) - x).pow(2).sum(1)
    return {"0-4": float(err[y < 5].mean()), "5-9": float(err[y >= 5].mean())}


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a Student-t confidence interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, mean, mean
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


@dataclass(frozen=True, kw_only=True)
class DigitsSplitResult:
    """Routed and control runs over seeds, and reconstructions for the picture."""

    config: DigitsSplitConfig
    runs: list[DigitsSplitRun]
    examples: dict[str, Any] = field(default_factory=dict, repr=False)
    """'original' [10 64] (one test digit per class) and, per condition, reconstructions from each half"""

    def summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for condition, routed in (("routed", True), ("control", False)):
            runs = [r for r in self.runs if r.routed is routed]
            if not runs:
                continue
            mean, lo, hi = mean_ci([r.ratio for r in runs])
            out[condition] = {
                "ratio_mean": mean,
                "ratio_ci_low": lo,
                "ratio_ci_high": hi,
                "n_seeds": len(runs),
            }
            for key, attr in (("first_half", "error_first_half"), ("second_half", "error_second_half")):
                for group in ("0-4", "5-9"):
                    out[condition][f"error_{key}_on_{group}"] = sum(
                        getattr(r, attr)[group] for r in runs
                    ) / len(runs)
            out[condition]["autoencoder_error"] = sum(r.autoencoder_error for r in runs) / len(runs)
        return out

    def table(self) -> list[list[str]]:
        """Rows for printing: condition, ratio (mean [CI]), each half's error on each group."""
        rows = []
        for condition, s in self.summary().items():
            rows.append([
                condition,
                f"{s['ratio_mean']:.2f} [{s['ratio_ci_low']:.2f}, {s['ratio_ci_high']:.2f}]",
                f"{s['error_first_half_on_0-4']:.2f} / {s['error_first_half_on_5-9']:.2f}",
                f"{s['error_second_half_on_0-4']:.2f} / {s['error_second_half_on_5-9']:.2f}",
                f"{s['autoencoder_error']:.2f}",
            ])  # fmt: skip
        return rows

    def plot(self):
        """Test digits 0-9 (top row) and their reconstructions from each latent half, routed and control."""
        from plotly.subplots import make_subplots

        rows = [("original", self.examples["original"])]
        for condition in ("routed", "control"):
            for half in ("first", "second"):
                key = f"{condition}_{half}"
                if key in self.examples:
                    rows.append((f"{condition}: {half} half", self.examples[key]))
        fig = make_subplots(rows=len(rows), cols=10, horizontal_spacing=0.01, vertical_spacing=0.03)
        for r, (_label, images) in enumerate(rows, 1):
            for c in range(10):
                img = torch.as_tensor(images[c]).reshape(8, 8).flip(0)
                fig.add_heatmap(
                    z=img.tolist(), colorscale="gray_r", showscale=False, zmin=0, zmax=1, row=r, col=c + 1
                )
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        for r, (label, _) in enumerate(rows, 1):
            fig.update_yaxes(
                title_text=label, visible=True, showticklabels=False, showgrid=False, row=r, col=1
            )
        ratio = self.summary().get("routed", {}).get("ratio_mean", float("nan"))
        fig.update_layout(
            title=f"Split autoencoder on 8x8 digits: reconstructions from each latent half (routed ratio {ratio:.1f}x)",
            width=900, height=75 * len(rows) + 80, margin=dict(l=150, r=10, t=60, b=10),
        )  # fmt: skip
        return fig

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` of this experiment (`Kind.ROUTING`, ``experiment: "digits-split"``): ``config``,
        ``summary`` (per condition: ratio mean and interval, each half's error on each digit group),
        ``runs`` (every seed's numbers)."""
        return {
            "experiment": "digits-split",
            "config": {**asdict(self.config), "seeds": list(self.config.seeds)},
            "summary": self.summary(),
            "runs": [{**asdict(r), "ratio": r.ratio} for r in self.runs],
        }

    def save(self, path: str | Path) -> Path:
        """``reconstructions.html`` / ``.png`` and then ``report.json`` (`to_dict`; ``png_error`` says why there
        is no PNG when no static renderer works) in folder ``path``."""
        path = Path(path)
        fig = self.plot()
        save_figure(fig, path / "reconstructions.html")
        error = write_image(fig, path / "reconstructions.png")
        write_json(path / REPORT, Kind.ROUTING, {**self.to_dict(), "png_error": error})
        return path

    def __repr__(self) -> str:
        return f"DigitsSplitResult({json.dumps(self.summary(), indent=1)})"


def run_digits_split(
    cfg: DigitsSplitConfig = DigitsSplitConfig(), *, progress: Callable[[str], None] | None = None
) -> DigitsSplitResult:
    """Train routed and control autoencoders for every seed and certify each latent half."""
    data = load_digit_split(cfg.test_fraction)
    half = cfg.latent // 2
    halves = {"first": slice(0, half), "second": slice(half, cfg.latent)}
    x_te, y_te = data["x_test"], data["y_test"]
    picks = torch.tensor([int((y_te == d).nonzero()[0]) for d in range(10)])
    examples: dict[str, Any] = {"original": x_te[picks].tolist()}
    runs = []
    for seed in cfg.seeds:
        for routed in (True, False):
            if progress is not None:
                progress(f"seed {seed} {'routed' if routed else 'control'}")
            model = train_autoencoder(cfg, data, seed=seed, routed=routed)
            with torch.no_grad():
                z_te, recon = model(x_te)
            errors = {}
            for name, dims in halves.items():
                decoder = certificate_decoder(cfg, model, data, dims, seed=seed)
                errors[name] = _group_errors(decoder, z_te[:, dims], x_te, y_te)
                if seed == cfg.seeds[0]:
                    with torch.no_grad():
                        examples[f"{'routed' if routed else 'control'}_{name}"] = decoder(
                            z_te[picks][:, dims]
                        ).tolist()
            runs.append(
                DigitsSplitRun(
                    seed=seed,
                    routed=routed,
                    error_first_half=errors["first"],
                    error_second_half=errors["second"],
                    autoencoder_error=float((recon - x_te).pow(2).sum(1).mean()),
                )  # fmt: skip
            )
    return DigitsSplitResult(config=cfg, runs=runs, examples=examples)
