"""The LLC along a training run: `estimate_llc` at every intact checkpoint, total and per component, on the
run's own training data, written into the run (``RUN/llc/``) and joined to its formation report.

Every checkpoint's estimates go to ``llc/estimates/step_N.json`` (atomically, with their loss traces) as soon
as they exist, so an interrupted job resumes where it stopped: a checkpoint already estimated with the same
sampler settings, data and components is read back, not sampled again. `RunLLC.save` writes the curve
(``report.json``, ``llc.md``, ``llc.html``, ``llc.png``); `join_formation` draws it under the induction scores
of ``RUN/formation`` (``formation_llc.html`` / ``.png``), with the formation window of an attribution when
the run holds one.

>>> result = llc_along_run("runs/demo", SGLDConfig(draws=4, burn_in=2, chains=2), n_seqs=4, seq_len=32)
>>> result.components, len(result.steps) == len(result.llc["all"])
(('all',), True)
>>> paths = result.save("runs/demo/llc")
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from interplab import runs
from interplab.analysis.formation import FormationResult
from interplab.data import build_token_store, load_tokenizer, open_corpus
from interplab.dynamics import mcmc
from interplab.dynamics.llc import (
    Component,
    LLCEstimate,
    SGLDConfig,
    default_nbeta,
    estimate_llc,
    finite_or_none,
    head_component,
    layer_component,
    lm_loss,
)
from interplab.io import atomic_write_text
from interplab.model.io import load_native
from interplab.model.transformer import Transformer
from interplab.plots import write_figure_files
from interplab.train.config import TrainConfig

COMPONENT_FORMS = "'heads' (every head), 'layers' (every layer), 'L1H0' (one head), 'layer1' (one layer)"
_HEAD = re.compile(r"^L(\d+)H(\d+)$")
_LAYER = re.compile(r"^(?:layer ?|blocks\.)(\d+)$")


def parse_components(model: Transformer, specs: Sequence[str]) -> list[Component]:
    """The components named by ``specs`` (each one of `COMPONENT_FORMS`), in order, without repeats."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    out: dict[str, Component] = {}
    for spec in specs:
        spec = spec.strip()
        if spec == "heads":
            comps = [head_component(model, la, h) for la in range(n_layers) for h in range(n_heads)]
        elif spec == "layers":
            comps = [layer_component(model, la) for la in range(n_layers)]
        elif m := _HEAD.match(spec):
            la, h = int(m.group(1)), int(m.group(2))
            if la >= n_layers or h >= n_heads:
                raise ValueError(f"component {spec!r}: the model has {n_layers} layers of {n_heads} heads")
            comps = [head_component(model, la, h)]
        elif m := _LAYER.match(spec):
            la = int(m.group(1))
            if la >= n_layers:
                raise ValueError(f"component {spec!r}: the model has {n_layers} layers")
            comps = [layer_component(model, la)]
        else:
            raise ValueError(f"unknown component {spec!r}; valid: {COMPONENT_FORMS}")
        for c in comps:
            out.setdefault(c.name, c)
    return list(out.values())


def run_tokens(run_dir: str | Path, n_seqs: int, seq_len: int | None = None) -> Tensor:
    """``n_seqs`` windows of ``seq_len`` tokens (default the run's) evenly spread over the run's training
    split, tokenised with its tokenizer: the data every checkpoint's LLC is estimated on."""
    run = runs.TrainRun.open(run_dir)
    cfg = TrainConfig.from_dict(run.config)
    if cfg.data.task is not None:
        raise ValueError(
            f"{run.path} trains on task {cfg.data.task!r}: the run-level LLC reads a corpus run; estimate a task "
            "model's LLC with interplab.dynamics.estimate_llc on the task's batches"
        )
    if n_seqs < 2:
        raise ValueError(f"n_seqs must be >= 2, got {n_seqs}")
    seq_len = seq_len or cfg.data.seq_len
    n_ctx = cfg.model.n_ctx if cfg.model is not None else cfg.data.seq_len
    if not 2 <= seq_len <= n_ctx:
        raise ValueError(f"seq_len={seq_len} must be in 2..{n_ctx} (the model's n_ctx)")
    corpus = open_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction)
    store = build_token_store(corpus, load_tokenizer(run.path), "train")
    n = store.n_sequences(seq_len)
    if n < n_seqs:
        raise ValueError(
            f"the run's training split has {n} windows of {seq_len} tokens, fewer than n_seqs={n_seqs}"
        )
    index = torch.linspace(0, n - 1, n_seqs).round().long()
    return store.sequences(index, seq_len)


@dataclass(frozen=True)
class RunLLC:
    """The LLC of every estimated checkpoint of a run, in step order: ``llc[name]`` and ``se[name]`` per
    component (``"all"``: every parameter), one value per step, with the chains' convergence diagnostics
    ``rhat[name]``, ``ess_bulk[name]``, ``ess_tail[name]`` (NaN where unknown: a report written before they
    existed, or too few chains or draws)."""

    run_dir: str
    steps: tuple[int, ...]
    components: tuple[str, ...]
    llc: dict[str, tuple[float, ...]]
    se: dict[str, tuple[float, ...]]
    init_loss: tuple[float, ...]
    """L_n(w*) of each checkpoint on the LLC's data"""
    config: SGLDConfig
    data: dict[str, Any]
    """what the LLC was estimated on: source, split, n_seqs, seq_len"""
    estimates: dict[int, dict[str, LLCEstimate]] = field(default_factory=dict, repr=False, compare=False)
    """per step and component the full estimate (with its loss traces: `trace_plot`)"""
    resumed: tuple[int, ...] = ()
    """steps read back from an earlier job instead of sampled"""
    skipped: tuple[str, ...] = ()
    rhat: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """per component the rank-normalised split-R-hat of each step's chains (`mcmc.rhat`)"""
    ess_bulk: dict[str, tuple[float, ...]] = field(default_factory=dict)
    ess_tail: dict[str, tuple[float, ...]] = field(default_factory=dict)
    chance_loss: float = math.nan
    """ln(d_vocab): the loss of a uniform guess over the model's vocabulary, the bound `not_local` checks the
    sampled losses against (NaN in a report written before it was recorded)"""

    def _diag(self, kind: str, component: str, i: int) -> float:
        values = getattr(self, kind).get(component)
        return values[i] if values is not None and i < len(values) else math.nan

    def not_mixed(self) -> list[tuple[int, str, float]]:
        """``(step, component, rhat)`` of every estimate whose R-hat is above `mcmc.RHAT_THRESHOLD`."""
        return [
            (step, c, r)
            for i, step in enumerate(self.steps)
            for c in self.components
            if (r := self._diag("rhat", c, i)) >= mcmc.RHAT_THRESHOLD
        ]

    @property
    def nbeta(self) -> float:
        """the nbeta every estimate used: the config's, else n / log n of the ``n_seqs`` sequences"""
        return self.config.nbeta if self.config.nbeta is not None else default_nbeta(int(self.data["n_seqs"]))

    def sampled_loss(self, component: str, i: int) -> float:
        """The mean loss of the chains' draws for step index ``i``: L(w*) + LLC / nbeta."""
        return self.init_loss[i] + self.llc[component][i] / self.nbeta

    def not_local(self) -> list[tuple[int, str, float]]:
        """``(step, component, sampled loss)`` of every estimate of a checkpoint better than `chance_loss` (a
        uniform guess's) whose chains sampled a mean loss above it: they left the checkpoint's basin (too
        small an nbeta or gamma to localise them), so the value describes far worse models than the
        checkpoint. A checkpoint at or above chance (an untrained model) is not judged; nothing is when
        `chance_loss` is unknown."""
        if math.isnan(self.chance_loss):
            return []
        return [
            (step, c, loss)
            for i, step in enumerate(self.steps)
            if self.init_loss[i] < self.chance_loss
            for c in self.components
            if (loss := self.sampled_loss(c, i)) > self.chance_loss
        ]

    def locality_summary(self) -> str:
        """Empty when every estimate's chains stayed below `chance_loss`; else how many left, the worst."""
        bad = self.not_local()
        if not bad:
            return ""
        step, comp, worst = max(bad, key=lambda b: b[2])
        total = len(self.steps) * len(self.components)
        return (
            f"the chains sampled a mean loss above ln(d_vocab) = {self.chance_loss:.3f} nats (a uniform "
            f"guess's, below which the checkpoint is) for {len(bad)} of {total} estimates, worst {worst:.3f} "
            f"at step {step} ({comp}): they left the checkpoint's basin, so those LLCs describe far worse "
            f"models than the checkpoints"
        )

    def table(self) -> list[dict[str, Any]]:
        rows = []
        for i, step in enumerate(self.steps):
            row: dict[str, Any] = {"step": step, "init_loss": self.init_loss[i]}
            for c in self.components:
                row[c] = self.llc[c][i]
                row[f"{c} se"] = self.se[c][i]
                for kind in ("rhat", "ess_bulk", "ess_tail"):
                    row[f"{c} {kind}"] = self._diag(kind, c, i)
            rows.append(row)
        return rows

    def largest_rise(self, component: str = "all") -> tuple[int, int, float, float]:
        """``(step_before, step_after, rise, z)``: the consecutive pair of checkpoints where ``component``'s
        LLC rose most, the rise and its size in combined SEs (inf when the SE is 0 or unknown)."""
        if len(self.steps) < 2:
            raise ValueError("a rise needs at least 2 estimated checkpoints")
        values, ses = self.llc[component], self.se[component]
        i = max(range(1, len(values)), key=lambda j: values[j] - values[j - 1])
        rise = values[i] - values[i - 1]
        se = math.hypot(ses[i], ses[i - 1])
        z = rise / se if math.isfinite(se) and se > 0 else math.inf
        return self.steps[i - 1], self.steps[i], rise, z

    def summary(self) -> str:
        v = self.llc["all"]
        text = (
            f"LLC of {len(self.steps)} checkpoints: {v[0]:.3g} at step {self.steps[0]} -> peak {max(v):.3g} at "
            f"step {self.steps[v.index(max(v))]} -> {v[-1]:.3g} at step {self.steps[-1]}"
        )
        if len(self.steps) > 1:
            a, b, rise, z = self.largest_rise()
            text += f"; largest rise between steps {a} and {b} (+{rise:.3g}, {z:.1f} SE)"
        text += "; " + self.mixing_summary()
        local = self.locality_summary()
        return text + ("; " + local if local else "")

    def mixing_summary(self) -> str:
        """Whether the chains mixed: how many estimates have R-hat above `mcmc.RHAT_THRESHOLD`, the worst."""
        known = [
            self._diag("rhat", c, i)
            for i in range(len(self.steps))
            for c in self.components
            if not math.isnan(self._diag("rhat", c, i))
        ]
        if not known:
            return "R-hat unknown"
        bad = self.not_mixed()
        if not bad:
            return f"R-hat < {mcmc.RHAT_THRESHOLD} for all {len(known)} estimates (max {max(known):.3f})"
        step, comp, worst = max(bad, key=lambda b: b[2])
        return (
            f"R-hat > {mcmc.RHAT_THRESHOLD} (not mixed) for {len(bad)} of {len(known)} estimates, worst "
            f"{worst:.3f} at step {step} ({comp})"
        )

    def markdown(self) -> str:
        cols = ["step", "L(w*)"]
        for c in self.components:
            cols += [f"LLC {c}", f"R-hat {c}", f"ESS bulk/tail {c}"]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---:|" * len(cols)]
        for i, step in enumerate(self.steps):
            cells = [str(step), f"{self.init_loss[i]:.3f}"]
            for c in self.components:
                cells += [f"{self.llc[c][i]:.3g} ± {self.se[c][i]:.2g}", *self.diagnostic_cells(c, i)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def diagnostic_cells(self, component: str, i: int) -> tuple[str, str]:
        """``("1.004", "812/640")`` for step index ``i``; R-hat starred when above the threshold, n/a when
        unknown."""
        r = self._diag("rhat", component, i)
        if math.isnan(r):
            return "n/a", "n/a"
        star = " *" if r >= mcmc.RHAT_THRESHOLD else ""
        bulk, tail = self._diag("ess_bulk", component, i), self._diag("ess_tail", component, i)
        return f"{r:.3f}{star}", f"{bulk:.0f}/{tail:.0f}"

    def trace_plot(self, step: int, component: str = "all") -> Any:
        """The SGLD loss traces behind one value (`LLCEstimate.plot`): check they settle after burn-in."""
        if step not in self.estimates:
            raise ValueError(f"no estimate at step {step}; estimated steps: {list(self.steps)}")
        if component not in self.estimates[step]:
            raise ValueError(f"no component {component!r}; components: {list(self.components)}")
        return self.estimates[step][component].plot()

    def plot(self) -> Any:
        """The total LLC (± SE) against step, the per-component LLCs beside it, and L(w*) (Plotly)."""
        from plotly.subplots import make_subplots

        parts = [c for c in self.components if c != "all"]
        cols = 2 if parts else 1
        titles = ["LLC (all parameters) ± SE"] + (["LLC per component"] if parts else [])
        fig = make_subplots(rows=1, cols=cols, subplot_titles=titles, specs=[[{"secondary_y": True}] * cols])
        steps = list(self.steps)
        fig.add_scatter(
            x=steps,
            y=list(self.llc["all"]),
            error_y={"type": "data", "array": [0 if math.isnan(s) else s for s in self.se["all"]]},
            mode="lines+markers",
            name="LLC",
            row=1,
            col=1,
        )
        fig.add_scatter(
            x=steps,
            y=list(self.init_loss),
            mode="lines",
            line_dash="dot",
            name="L(w*)",
            row=1,
            col=1,
            secondary_y=True,
        )
        for c in parts:
            fig.add_scatter(x=steps, y=list(self.llc[c]), mode="lines+markers", name=c, row=1, col=2)
        self.mark_not_mixed(fig, lambda c: {"row": 1, "col": 1 if c == "all" else 2})
        fig.update_xaxes(title_text="step")
        fig.update_yaxes(title_text="LLC", secondary_y=False)
        fig.update_yaxes(title_text="L(w*)", secondary_y=True, row=1, col=1)
        fig.update_layout(
            title=f"{Path(self.run_dir).name}: {self.summary()}", height=450, width=550 * cols + 100
        )
        return fig

    def mark_not_mixed(self, fig: Any, place: Callable[[str], dict[str, int]]) -> None:
        """Cross out, on ``fig``, every estimate whose chains have not mixed (R-hat above
        `mcmc.RHAT_THRESHOLD`); ``place(component)`` gives the subplot (``row``, ``col``) of its curve."""
        bad = self.not_mixed()
        index = {s: i for i, s in enumerate(self.steps)}
        for c in self.components:
            where = [(step, r) for step, comp, r in bad if comp == c]
            if where:
                fig.add_scatter(
                    x=[s for s, _ in where],
                    y=[self.llc[c][index[s]] for s, _ in where],
                    mode="markers",
                    marker={"symbol": "x", "size": 11, "color": "firebrick"},
                    name=f"{c}: R-hat > {mcmc.RHAT_THRESHOLD}",
                    hovertext=[f"R-hat {r:.3f}" for _, r in where],
                    **place(c),
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir,
            "summary": self.summary(),
            "steps": list(self.steps),
            "components": list(self.components),
            "llc": {c: list(v) for c, v in self.llc.items()},
            "se": {c: [finite_or_none(s) for s in v] for c, v in self.se.items()},
            "rhat": {c: [finite_or_none(s) for s in v] for c, v in self.rhat.items()},
            "ess_bulk": {c: [finite_or_none(s) for s in v] for c, v in self.ess_bulk.items()},
            "ess_tail": {c: [finite_or_none(s) for s in v] for c, v in self.ess_tail.items()},
            "init_loss": list(self.init_loss),
            "config": asdict(self.config),
            "data": dict(self.data),
            "skipped_checkpoints": list(self.skipped),
            "chance_loss": finite_or_none(self.chance_loss),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunLLC:
        """The curve of a ``report.json`` (without the per-checkpoint estimates). A report written before the
        diagnostics existed reads with NaN R-hat and ESS."""
        nan = math.nan
        n = len(data["steps"])

        def diag(key: str) -> dict[str, tuple[float, ...]]:
            stored = data.get(key, {})
            return {
                c: tuple(nan if s is None else float(s) for s in stored.get(c, [None] * n))
                for c in data["components"]
            }

        return cls(
            run_dir=data["run_dir"],
            steps=tuple(data["steps"]),
            components=tuple(data["components"]),
            llc={c: tuple(v) for c, v in data["llc"].items()},
            se={c: tuple(nan if s is None else s for s in v) for c, v in data["se"].items()},
            init_loss=tuple(data["init_loss"]),
            config=SGLDConfig(**data["config"]),
            data=dict(data["data"]),
            skipped=tuple(data.get("skipped_checkpoints", ())),
            rhat=diag("rhat"),
            ess_bulk=diag("ess_bulk"),
            ess_tail=diag("ess_tail"),
            chance_loss=nan if data.get("chance_loss") is None else float(data["chance_loss"]),
        )

    @classmethod
    def open(cls, folder: str | Path) -> RunLLC:
        """Read ``folder/report.json`` (an ``interplab llc`` folder, or a run holding ``llc/``)."""
        folder = Path(folder)
        if (folder / runs.LLC / runs.REPORT).is_file():
            folder = folder / runs.LLC
        return cls.from_dict(runs.read_json(folder / runs.REPORT, runs.Kind.LLC))

    def save(self, folder: str | Path) -> dict[str, str | None]:
        """Write ``report.json`` (``kind: llc``), ``llc.md``, ``llc.html`` and ``llc.png`` into ``folder``;
        ``png`` is None (with ``png_error``) when no static image backend works."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        report = runs.write_json(folder / runs.REPORT, runs.Kind.LLC, self.to_dict())
        atomic_write_text(folder / "llc.md", self.summary() + "\n\n" + self.markdown() + "\n")
        pictures = write_figure_files(
            self.plot(), folder, "llc", assets=self.run_dir, fallback=self._plot_matplotlib
        )
        return {"report": str(report), "table": str(folder / "llc.md"), **pictures}

    def _plot_matplotlib(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for c in self.components:
            ax.errorbar(self.steps, self.llc[c], yerr=self.se[c], label=c, marker=".", capsize=2)
        ax.set_xlabel("step")
        ax.set_ylabel("LLC")
        ax.legend(fontsize=7)
        ax.set_title(self.summary()[:110], fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _settings(config: SGLDConfig, data: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    return {"config": asdict(config), "data": data, "components": list(names)}


def llc_along_run(
    run_dir: str | Path,
    config: SGLDConfig | None = None,
    *,
    components: Sequence[str] = (),
    n_seqs: int = 64,
    seq_len: int | None = None,
    steps: Sequence[int] | None = None,
    out: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    compile: bool = False,
) -> RunLLC:
    """Estimate the LLC of every intact checkpoint of ``run_dir`` (or of ``steps`` only) on ``n_seqs``
    training windows of the run (`run_tokens`), in total and for each of ``components`` (see
    `parse_components`), with one `SGLDConfig` (the same seed at every checkpoint).

    Each checkpoint's estimates are written to ``out/estimates/step_N.json`` (default ``RUN/llc``) as they
    finish; a checkpoint found there with the same settings is read back, not sampled again.
    ``progress(done, total)`` is called after each checkpoint. ``compile``: `estimate_llc`'s (one compile per
    architecture and set of sampled parameters, shared by the checkpoints). Raises `SGLDDivergence` (with the fix) when a
    chain diverges; what was finished stays on disk."""
    config = config or SGLDConfig()
    run = runs.TrainRun.open(run_dir)
    folder = Path(out) if out is not None else run.path / runs.LLC
    checkpoints = run.checkpoints(intact=True)
    skipped = []
    for c in run.checkpoints(intact=False):
        if c not in checkpoints:
            reason = runs.verify_checkpoint(c.path, need_optimizer=False)
            skipped.append(f"{c.path.name}: {reason}")
            warnings.warn(f"llc: skipping checkpoint {c.path}: {reason}", stacklevel=2)
    if steps is not None:
        have = {c.step for c in checkpoints}
        missing = sorted(set(steps) - have)
        if missing:
            raise ValueError(f"no intact checkpoint at steps {missing}; the run's: {sorted(have)}")
        checkpoints = [c for c in checkpoints if c.step in set(steps)]
    if not checkpoints:
        raise ValueError(f"{run.path} has no intact checkpoints to estimate")
    tokens = run_tokens(run.path, n_seqs, seq_len)
    data = {
        "source": TrainConfig.from_dict(run.config).data.source,
        "split": "train",
        "n_seqs": n_seqs,
        "seq_len": int(tokens.shape[1]),
    }
    first = load_native(checkpoints[0].path)
    names = ["all"] + [c.name for c in parse_components(first, components)]
    settings = _settings(config, data, names)
    estimates: dict[int, dict[str, LLCEstimate]] = {}
    resumed = []
    (folder / runs.LLC_ESTIMATES).mkdir(parents=True, exist_ok=True)
    for i, ckpt in enumerate(checkpoints):
        file = folder / runs.LLC_ESTIMATES / (runs.checkpoint_name(ckpt.step) + ".json")
        done = _read_done(file, settings)
        if done is not None:
            estimates[ckpt.step] = done
            resumed.append(ckpt.step)
        else:
            model = first if i == 0 else load_native(ckpt.path)
            found = {"all": estimate_llc(model, (tokens,), lm_loss, config, compile=compile)}
            for comp in parse_components(model, components):
                found[comp.name] = estimate_llc(
                    model, (tokens,), lm_loss, config, component=comp, compile=compile
                )
            runs.write_json(
                file,
                runs.Kind.LLC_CHECKPOINT,
                {"step": ckpt.step, **settings, "estimates": {k: e.to_dict() for k, e in found.items()}},
            )
            estimates[ckpt.step] = found
        if progress is not None:
            progress(i + 1, len(checkpoints))
    order = [c.step for c in checkpoints]
    return RunLLC(
        run_dir=str(run.path),
        steps=tuple(order),
        components=tuple(names),
        llc={n: tuple(estimates[s][n].llc for s in order) for n in names},
        se={n: tuple(estimates[s][n].se for s in order) for n in names},
        init_loss=tuple(estimates[s]["all"].init_loss for s in order),
        config=config,
        data=data,
        estimates=estimates,
        resumed=tuple(resumed),
        skipped=tuple(skipped),
        rhat={n: tuple(estimates[s][n].rhat for s in order) for n in names},
        ess_bulk={n: tuple(estimates[s][n].ess_bulk for s in order) for n in names},
        ess_tail={n: tuple(estimates[s][n].ess_tail for s in order) for n in names},
        chance_loss=math.log(first.cfg.d_vocab),
    )


def _read_done(file: Path, settings: dict[str, Any]) -> dict[str, LLCEstimate] | None:
    """The estimates of an earlier job at ``file`` when it used the same settings (else None: resampled)."""
    if not file.is_file():
        return None
    try:
        doc = runs.read_json(file, runs.Kind.LLC_CHECKPOINT)
    except runs.RunError:
        return None
    if {k: doc.get(k) for k in settings} != settings:
        return None
    return {k: LLCEstimate.from_dict(v) for k, v in doc["estimates"].items()}


def _attribution_window(run_dir: Path) -> tuple[int, int, str] | None:
    """The formation window of the first attribution report in ``RUN/attribution`` (lo, hi, target)."""
    root = run_dir / runs.ATTRIBUTION
    for report in sorted(root.glob(f"*/{runs.REPORT}")) if root.is_dir() else []:
        try:
            doc = runs.read_json(report, runs.Kind.ATTRIBUTION)
        except runs.RunError:
            continue
        window = doc.get("window")
        if isinstance(window, list) and len(window) == 2:
            return int(window[0]), int(window[1]), str(doc.get("target", report.parent.name))
    return None


def formation_llc_figure(
    formation: FormationResult, llc: RunLLC, window: tuple[int, int, str] | None = None
) -> Any:
    """The formation picture with the LLC beside the induction score, on one step axis: the induction score
    per head (top), the total LLC ± SE with the held-out loss (middle), the per-component LLCs (bottom, when
    estimated), estimates whose chains have not mixed crossed out; the formation step dotted and an
    attribution's formation window shaded."""
    from plotly.subplots import make_subplots

    parts = [c for c in llc.components if c != "all"]
    rows = 3 if parts else 2
    titles = ["induction score per head", "LLC (all parameters) ± SE, held-out loss"]
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        subplot_titles=titles + (["LLC per component"] if parts else []),
        specs=[[{"secondary_y": r == 2}] for r in range(1, rows + 1)],
        vertical_spacing=0.08,
    )
    steps = list(formation.steps)
    n_layers, n_heads = formation.induction.shape[1:]
    for la in range(n_layers):
        for h in range(n_heads):
            fig.add_scatter(
                x=steps,
                y=formation.induction[:, la, h].tolist(),
                name=f"L{la}H{h}",
                mode="lines",
                row=1,
                col=1,
            )
    fig.add_scatter(
        x=list(llc.steps),
        y=list(llc.llc["all"]),
        error_y={"type": "data", "array": [0 if math.isnan(s) else s for s in llc.se["all"]]},
        mode="lines+markers",
        name="LLC",
        line_color="black",
        row=2,
        col=1,
    )
    if any(v is not None for v in formation.val_loss):
        fig.add_scatter(
            x=steps,
            y=list(formation.val_loss),
            name="held-out loss",
            mode="lines",
            line_dash="dot",
            line_color="gray",
            row=2,
            col=1,
            secondary_y=True,
        )
    for c in parts:
        fig.add_scatter(
            x=list(llc.steps), y=list(llc.llc[c]), name=f"LLC {c}", mode="lines+markers", row=3, col=1
        )
    llc.mark_not_mixed(fig, lambda c: {"row": 2 if c == "all" else 3, "col": 1})
    for r in range(1, rows + 1):
        if formation.formation_step is not None:
            fig.add_vline(x=formation.formation_step, line_dash="dot", line_color="gray", row=r, col=1)
        if window is not None:
            fig.add_vrect(
                x0=window[0], x1=window[1], fillcolor="orange", opacity=0.15, line_width=0, row=r, col=1
            )
    fig.update_xaxes(title_text="step", row=rows, col=1)
    fig.update_yaxes(range=[0, 1], row=1, col=1)
    fig.update_yaxes(title_text="LLC", row=2, col=1, secondary_y=False)
    fig.update_yaxes(title_text="loss", row=2, col=1, secondary_y=True)
    title = f"{Path(formation.run_dir).name}: induction score and LLC"
    if formation.formation_step is not None:
        title += f" (induction heads form at step {formation.formation_step})"
    fig.update_layout(title=title, height=300 * rows, width=1000)
    return fig


def join_formation(run_dir: str | Path, llc: RunLLC | None = None) -> dict[str, str | None] | None:
    """Draw the run's LLC beside its induction scores: ``RUN/formation/formation_llc.html`` and ``.png``
    (`formation_llc_figure`), when the run holds both a formation report and an LLC curve (else None)."""
    run_dir = Path(run_dir)
    formation_file = run_dir / runs.FORMATION / runs.FORMATION_JSON
    if not formation_file.is_file():
        return None
    if llc is None:
        if not (run_dir / runs.LLC / runs.REPORT).is_file():
            return None
        llc = RunLLC.open(run_dir / runs.LLC)
    formation = FormationResult.from_dict(runs.read_json(formation_file, runs.Kind.FORMATION))
    window = _attribution_window(run_dir)
    fig = formation_llc_figure(formation, llc, window)
    return write_figure_files(
        fig,
        formation_file.parent,
        "formation_llc",
        assets=run_dir,
        fallback=lambda p: _combined_matplotlib(formation, llc, window, p),
    )


def _combined_matplotlib(
    formation: FormationResult, llc: RunLLC, window: tuple[int, int, str] | None, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [c for c in llc.components if c != "all"]
    fig, axes = plt.subplots(3 if parts else 2, 1, figsize=(10, 8 if parts else 6), sharex=True)
    n_layers, n_heads = formation.induction.shape[1:]
    for la in range(n_layers):
        for h in range(n_heads):
            axes[0].plot(formation.steps, formation.induction[:, la, h], label=f"L{la}H{h}")
    axes[0].set_ylabel("induction score")
    axes[0].legend(fontsize=7, ncol=4)
    axes[1].errorbar(llc.steps, llc.llc["all"], yerr=llc.se["all"], color="black", marker=".", capsize=2)
    axes[1].set_ylabel("LLC")
    for c in parts:
        axes[2].plot(llc.steps, llc.llc[c], marker=".", label=c)
    if parts:
        axes[2].legend(fontsize=7, ncol=4)
        axes[2].set_ylabel("LLC per component")
    for ax in axes:
        if formation.formation_step is not None:
            ax.axvline(formation.formation_step, color="gray", linestyle=":")
        if window is not None:
            ax.axvspan(window[0], window[1], color="orange", alpha=0.15)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
