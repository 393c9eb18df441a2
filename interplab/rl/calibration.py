"""The calibration curve of a decision transformer: achieved against target return (`Calibration`, made by
`interplab.rl.evaluate.evaluate_dt`), with per-target 95% Student-t intervals of the mean return and the
least-squares slope of achieved on target return with its 95% t interval (`Slope`).

>>> cal = Calibration(env="MiniGrid-Empty-5x5-v0", targets=(0.2, 0.8), episode_targets=(0.2, 0.2, 0.8, 0.8),
...                   episode_returns=(0.1, 0.3, 0.7, 0.9), episode_lengths=(90, 70, 30, 10),
...                   episode_seeds=(0, 1, 0, 1))
>>> cal.counts, cal.mean_returns
((2, 2), (0.2, 0.8))
>>> round(cal.slope().estimate, 6)
1.0
>>> cal.save("eval").name  # calibration.json + calibration.html
'calibration.json'
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from interplab.io import atomic_write_text
from interplab.plots import figure_html
from interplab.rl.trajectories import Trajectories, load_trajectories
from interplab.runs import CALIBRATION_HTML, CALIBRATION_JSON, ROLLOUTS, Kind, read_json, write_json
from interplab.scrub.estimate import t975


@dataclass(frozen=True)
class Slope:
    """The least-squares slope of achieved on target return, over episodes, with its 95% Student-t interval
    (``n - 2`` degrees of freedom; episodes taken as independent, which the shared seeds across targets make
    conservative: their positive correlation lowers the slope's true variance)."""

    estimate: float
    stderr: float
    ci_low: float
    ci_high: float
    intercept: float
    n: int
    """episodes in the fit"""

    @classmethod
    def fit(cls, x: Sequence[float], y: Sequence[float]) -> Slope:
        """Ordinary least squares of ``y`` on ``x`` (at least 3 points and 2 distinct ``x``)."""
        xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValueError(
                f"x and y must be two 1-d sequences of one length, got {xs.shape} and {ys.shape}"
            )
        n = xs.size
        sxx = float(((xs - xs.mean()) ** 2).sum()) if n else 0.0
        if n < 3 or sxx == 0:
            raise ValueError(
                f"a slope with an interval needs >= 3 episodes at >= 2 distinct targets, got {n}"
            )
        b = float(((xs - xs.mean()) * (ys - ys.mean())).sum()) / sxx
        a = float(ys.mean()) - b * float(xs.mean())
        residual = ys - a - b * xs
        se = math.sqrt(float((residual**2).sum()) / (n - 2) / sxx)
        half = t975(n - 2) * se
        return cls(estimate=b, stderr=se, ci_low=b - half, ci_high=b + half, intercept=a, n=n)

    def to_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in ("estimate", "stderr", "ci_low", "ci_high", "intercept", "n")}


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """The mean of ``values`` and its 95% Student-t interval (NaN bounds for a single value)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        raise ValueError("the mean of no values")
    mean = float(v.mean())
    if v.size == 1:
        return mean, math.nan, math.nan
    half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
    return mean, mean - half, mean + half


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Achieved against target return of a decision transformer in its environment (`evaluate_dt`).

    The episodes are kept (``episode_*``, targets major); the per-target statistics are derived from them:
    ``counts``, ``mean_returns`` and the 95% Student-t interval ``ci_low``/``ci_high``, and `slope` (achieved on
    target by least squares over all episodes, with its 95% t interval)."""

    env: str
    targets: tuple[float, ...]
    """the distinct target returns, in the order evaluated"""
    episode_targets: tuple[float, ...]
    episode_returns: tuple[float, ...]
    episode_lengths: tuple[int, ...]
    episode_seeds: tuple[int, ...]
    """the environment seed of each episode (``rollout(model, env, [target], 1, seed=s)`` replays it)"""
    temperature: float = 0.0
    max_return: float | None = None
    """the environment's best return (drawn as a guide)"""
    data_range: tuple[float, float] | None = None
    """the lowest and highest episode return of the model's training data, when known"""
    rollouts: Trajectories | None = field(default=None, repr=False, compare=False)
    """the episodes themselves (`save` keeps them in ``rollouts/``)"""

    def __post_init__(self) -> None:
        n = len(self.episode_targets)
        if not (len(self.episode_returns) == len(self.episode_lengths) == len(self.episode_seeds) == n):
            raise ValueError(
                "episode_targets, episode_returns, episode_lengths and episode_seeds differ in length"
            )
        if set(self.episode_targets) != set(self.targets) or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets {self.targets} must be distinct and be the episodes' targets")

    def _returns_of(self, target: float) -> list[float]:
        return [r for t, r in zip(self.episode_targets, self.episode_returns, strict=True) if t == target]

    @property
    def counts(self) -> tuple[int, ...]:
        """episodes per target"""
        return tuple(len(self._returns_of(t)) for t in self.targets)

    @property
    def mean_returns(self) -> tuple[float, ...]:
        return tuple(mean_interval(self._returns_of(t))[0] for t in self.targets)

    @property
    def ci_low(self) -> tuple[float, ...]:
        """the lower end of each target's 95% t interval of the mean return (NaN with one episode)"""
        return tuple(mean_interval(self._returns_of(t))[1] for t in self.targets)

    @property
    def ci_high(self) -> tuple[float, ...]:
        return tuple(mean_interval(self._returns_of(t))[2] for t in self.targets)

    def slope(self) -> Slope:
        """Achieved on target return (least squares over episodes) with its 95% t interval: > 0 with the
        interval above 0 when the model follows its conditioning."""
        return Slope.fit(self.episode_targets, self.episode_returns)

    def outside_data(self) -> tuple[float, ...]:
        """the targets outside the training data's return range (none when it is unknown)"""
        if self.data_range is None:
            return ()
        lo, hi = self.data_range
        return tuple(t for t in self.targets if not lo <= t <= hi)

    def __repr__(self) -> str:
        try:
            s = self.slope()
            slope = f"slope {s.estimate:.3f} [{s.ci_low:.3f}, {s.ci_high:.3f}]"
        except ValueError:
            slope = "no slope"
        points = ", ".join(f"{t:g}->{m:.3f}" for t, m in zip(self.targets, self.mean_returns, strict=True))
        return (
            f"Calibration({self.env}: {len(self.episode_targets)} episodes, {slope}; target->mean return "
            f"{points})"
        )

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td>{t:g}</td><td>{c}</td><td>{m:.3f}</td><td>[{lo:.3f}, {hi:.3f}]</td></tr>"
            for t, c, m, lo, hi in zip(
                self.targets, self.counts, self.mean_returns, self.ci_low, self.ci_high, strict=True
            )
        )
        return (
            f"<p>{html.escape(repr(self))}</p><table><tr><th>target</th><th>episodes</th><th>mean return</th>"
            f"<th>95% CI (t)</th></tr>{rows}</table>"
        )

    def plot(self) -> Any:
        """The calibration curve: the mean achieved return per target with its 95% interval, the fitted line,
        y = x (perfect calibration), the environment's best return and the data's return range shaded."""
        import plotly.graph_objects as go

        means = self.mean_returns
        lows = [m if math.isnan(lo) else lo for m, lo in zip(means, self.ci_low, strict=True)]
        highs = [m if math.isnan(hi) else hi for m, hi in zip(means, self.ci_high, strict=True)]
        fig = go.Figure()
        if self.data_range is not None:
            fig.add_vrect(x0=self.data_range[0], x1=self.data_range[1], fillcolor="#888", opacity=0.15,
                          line_width=0, annotation_text="data returns", annotation_position="top left")  # fmt: skip
        span = [min(*self.targets, *lows, 0.0), max(*self.targets, *highs)]
        fig.add_trace(go.Scatter(x=span, y=span, mode="lines", name="y = x", hoverinfo="skip",
                                 line={"dash": "dash", "color": "grey"}))  # fmt: skip
        title = f"calibration on {self.env}"
        try:
            s = self.slope()
            xs = [min(self.targets), max(self.targets)]
            fig.add_trace(go.Scatter(x=xs, y=[s.intercept + s.estimate * x for x in xs], mode="lines",
                                     name="least squares", line={"color": "#2166ac"}, hoverinfo="skip"))  # fmt: skip
            title += f": slope {s.estimate:.3f} (95% CI {s.ci_low:.3f} to {s.ci_high:.3f})"
        except ValueError:
            pass
        fig.add_trace(
            go.Scatter(
                x=list(self.targets),
                y=list(means),
                mode="markers",
                name="mean return (95% CI)",
                marker={"color": "#b2182b", "size": 9},
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": [h - m for h, m in zip(highs, means, strict=True)],
                    "arrayminus": [m - lo for m, lo in zip(means, lows, strict=True)],
                },
                text=[f"{c} episodes" for c in self.counts],
                hovertemplate="target %{x:.3g}: mean return %{y:.3f}<br>%{text}<extra></extra>",
            )
        )
        if self.max_return is not None:
            fig.add_hline(
                y=self.max_return, line_dash="dot", line_color="#888", annotation_text="best return"
            )
        fig.update_layout(title=title, xaxis_title="target return (return-to-go at the first step)",
                          yaxis_title="achieved return", template="plotly_white")  # fmt: skip
        return fig

    def to_dict(self) -> dict[str, Any]:
        """The ``calibration.json`` document (`Kind.DT_EVAL`): ``env``, ``temperature``, ``max_return``,
        ``data_range``, ``targets`` with per target ``counts``, ``mean_returns``, ``ci_low``, ``ci_high``
        (95% Student-t; null with one episode), ``interval`` (how they were computed), ``slope`` (or null),
        ``outside_data`` and the ``episodes`` (``target``, ``return``, ``length``, ``seed``)."""
        try:
            slope: dict[str, Any] | None = self.slope().to_dict()
        except ValueError:
            slope = None

        def finite(values: tuple[float, ...]) -> list[float | None]:
            return [None if math.isnan(v) else v for v in values]

        return {
            "env": self.env,
            "temperature": self.temperature,
            "max_return": self.max_return,
            "data_range": list(self.data_range) if self.data_range is not None else None,
            "targets": list(self.targets),
            "counts": list(self.counts),
            "mean_returns": list(self.mean_returns),
            "ci_low": finite(self.ci_low),
            "ci_high": finite(self.ci_high),
            "interval": "95% Student-t (per target: n - 1 df; slope: least squares, n - 2 df)",
            "slope": slope,
            "outside_data": list(self.outside_data()),
            "episodes": {
                "target": list(self.episode_targets),
                "return": list(self.episode_returns),
                "length": list(self.episode_lengths),
                "seed": list(self.episode_seeds),
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], rollouts: Trajectories | None = None) -> Calibration:
        ep = d["episodes"]
        return cls(
            env=d["env"],
            targets=tuple(float(t) for t in d["targets"]),
            episode_targets=tuple(float(t) for t in ep["target"]),
            episode_returns=tuple(float(r) for r in ep["return"]),
            episode_lengths=tuple(int(n) for n in ep["length"]),
            episode_seeds=tuple(int(s) for s in ep["seed"]),
            temperature=float(d["temperature"]),
            max_return=d["max_return"],
            data_range=(float(d["data_range"][0]), float(d["data_range"][1]))
            if d["data_range"] is not None
            else None,
            rollouts=rollouts,
        )

    def save(self, folder: str | Path) -> Path:
        """Write ``calibration.html`` (the curve), ``rollouts/`` (the episodes, when kept) and then
        ``calibration.json`` (`to_dict`) into ``folder``; returns the JSON's path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / CALIBRATION_HTML, figure_html(self.plot(), folder))
        if self.rollouts is not None:
            self.rollouts.save(folder / ROLLOUTS)
        return write_json(folder / CALIBRATION_JSON, Kind.DT_EVAL, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """The inverse of `save`: ``path`` is the folder or its ``calibration.json``."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        data = read_json(folder / CALIBRATION_JSON if path.is_dir() else path, Kind.DT_EVAL, strip=True)
        rollouts = load_trajectories(folder / ROLLOUTS) if (folder / ROLLOUTS).is_dir() else None
        return cls.from_dict(data, rollouts)
