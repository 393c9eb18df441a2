"""Evaluating an SAE honestly: reconstruction (L0, MSE, FVU), the model's loss with the SAE spliced in through
a hook (cross-entropy loss recovered relative to zero- and mean-ablation, KL divergence), and latent density
(dead and dense fractions, the log-density histogram).

CE loss recovered = (CE_ablated - CE_spliced) / (CE_ablated - CE_clean): 1 when the SAE is perfect, 0 when
splicing it is as bad as ablating the site. Every position of the site is replaced (the SAE must handle BOS
too); reconstruction and density statistics use the positions kept by the `TokenFilter`. The losses are read
at every next token of a text corpus, and for a task (``targets``: its targets and loss mask per batch) where
its model is trained to predict: a task's other positions hold random inputs its model was never trained on
(and modular addition's answer is not a next token at all), so a loss there says nothing about the task.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from interplab.hooks import Site
from interplab.plots import save_figure
from interplab.runs import REPORT, Kind, write_json
from interplab.sae.activations import TokenFilter, _as_batch, loss_positions
from interplab.sae.base import SAE
from interplab.sae.plots import density_histogram

if TYPE_CHECKING:
    from interplab.model import Transformer


@dataclass(frozen=True)
class SAEEvalReport:
    """Metrics of one SAE on one model and corpus (see module docstring for definitions)."""

    hook_name: str
    tokens: int
    l0: float
    mse: float
    fvu: float
    explained_variance: float
    cosine: float
    ce_clean: float
    ce_spliced: float
    ce_zero_ablation: float
    ce_mean_ablation: float
    ce_loss_recovered: float
    ce_loss_recovered_vs_mean: float
    kl_div: float
    dead_fraction: float
    dense_fraction: float
    density: Tensor = field(repr=False)
    """[d_sae] fraction of kept tokens on which each latent fired"""
    loss_positions: str = "next_token"
    """where the CE and KL were read: ``next_token`` (every next token) or ``task`` (the task's loss mask)"""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "density"}
        hist_counts, edges = self.density_histogram()
        out["density_histogram"] = {"log10_density_edges": edges, "counts": hist_counts}
        return out

    def density_histogram(self, bins: int = 40) -> tuple[list[int], list[float]]:
        """Counts of alive latents per log10-density bin (dead latents are counted in ``dead_fraction``)."""
        alive = self.density[self.density > 0]
        if alive.numel() == 0:
            return [], []
        logd = alive.log10()
        lo, hi = float(logd.min()), max(float(logd.max()), float(logd.min()) + 1e-6)
        counts = torch.histc(logd, bins=bins, min=lo, max=hi)
        edges = torch.linspace(lo, hi, bins + 1)
        return [int(c) for c in counts], [round(float(e), 4) for e in edges]

    def plot(self) -> Any:
        """The latent-density histogram (Plotly)."""
        return density_histogram(self.density, title=f"{self.hook_name}: latent density (L0 {self.l0:.1f})")

    def save(self, path: str | Path) -> Path:
        """Write ``report.json`` and ``density.html`` into folder ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / REPORT, Kind.SAE_EVAL, self.to_dict())
        save_figure(self.plot(), path / "density.html")
        return path

    def __repr__(self) -> str:
        return (
            f"SAEEvalReport({self.hook_name}: L0 {self.l0:.2f}, FVU {self.fvu:.4f}, CE recovered "
            f"{self.ce_loss_recovered:.4f} (vs mean {self.ce_loss_recovered_vs_mean:.4f}), KL {self.kl_div:.4f}, "
            f"dead {self.dead_fraction:.3f}, dense {self.dense_fraction:.3f}, {self.tokens} tokens)"
        )


@torch.no_grad()
def evaluate_sae(
    model: Transformer,
    sae: SAE,
    token_batches: Iterable[Tensor],
    *,
    token_filter: TokenFilter = TokenFilter(),
    dense_threshold: float = 0.1,
    targets: Sequence[tuple[Tensor, Tensor]] | None = None,
) -> SAEEvalReport:
    """Evaluate ``sae`` at its hook(s) on ``model`` over ``token_batches`` ([batch, pos] token tensors).
    ``targets``: per batch ``(targets, loss_mask)`` [batch pos] (a task's, `CorpusBatches.targets`): the losses
    are read at the masked positions against those targets instead of at every next token."""
    hook_in = Site.parse(sae.cfg.hook_name).name if sae.cfg.hook_name else ""
    if not hook_in:
        raise ValueError("the SAE's cfg.hook_name is empty: set it to the site it was trained on")
    hook_out = Site.parse(sae.cfg.hook_name_out).name if sae.cfg.hook_name_out else hook_in
    for h in {hook_in, hook_out}:
        if h not in model.hook_points:
            model.hook_registry.resolve(h)
    acc = _Accumulator(sae.cfg.d_sae)
    seen = 0
    for toks in token_batches:
        tokens = _as_batch(toks).to(sae.device)
        if targets is not None and seen >= len(targets):
            raise ValueError(f"more token batches than the {len(targets)} (targets, loss_mask) pairs")
        read = None if targets is None else targets[seen]
        seen += 1
        keep = token_filter.mask(tokens)
        _, cache = model.run_with_cache(tokens, names=list({hook_in, hook_out}))
        x, y = cache[hook_in], cache[hook_out]
        if x.shape[2:].numel() != sae.cfg.d_in:  # per-head sites ([batch, pos, head, d_head]) count as flat
            raise ValueError(
                f"the SAE expects d_in={sae.cfg.d_in} but {hook_in} has width {x.shape[2:].numel()}"
            )
        out = sae(x.flatten(2).to(sae.W_enc.dtype))
        recon = out.reconstruction.to(y.dtype).reshape(y.shape)
        mean_act = y[keep].mean(0)
        logits = {
            "clean": model(tokens),
            "spliced": model.run_with_hooks(tokens, fwd_hooks=[(hook_out, lambda a, s, r=recon: r)]),  # type: ignore[misc]
            "zero": model.run_with_hooks(tokens, fwd_hooks=[(hook_out, lambda a, s: torch.zeros_like(a))]),
            "mean": model.run_with_hooks(
                tokens,
                fwd_hooks=[(hook_out, lambda a, s, m=mean_act: m.expand_as(a).clone())],  # type: ignore[misc]
            ),
        }
        acc.add(
            tokens,
            logits,
            y[keep].flatten(1).float(),
            recon[keep].flatten(1).float(),
            out.feature_acts[keep],
            read,
        )
    if targets is not None and seen != len(targets):
        raise ValueError(f"{len(targets)} (targets, loss_mask) pairs for {seen} token batches")
    return acc.report(hook_out, dense_threshold, "next_token" if targets is None else "task")


class _Accumulator:
    def __init__(self, d_sae: int) -> None:
        self.ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "mean": 0.0}
        self.kl = 0.0
        self.n_pred = 0
        self.n_tok = 0
        self.sq_err = 0.0
        self.sum_y: Tensor | None = None
        self.sum_y2 = 0.0
        self.l0 = 0.0
        self.cos = 0.0
        self.counts = torch.zeros(d_sae, dtype=torch.long)

    def add(
        self,
        tokens: Tensor,
        logits: dict[str, Tensor],
        y: Tensor,
        recon: Tensor,
        acts: Tensor,
        read: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        mask, target = loss_positions(tokens, read, n_classes=logits["clean"].shape[-1])
        for key, lg in logits.items():
            self.ce[key] += float(F.cross_entropy(lg[mask].float(), target, reduction="sum"))
        logp = logits["clean"][mask].float().log_softmax(-1)
        logq = logits["spliced"][mask].float().log_softmax(-1)
        self.kl += float((logp.exp() * (logp - logq)).sum())
        self.n_pred += target.numel()
        self.n_tok += y.shape[0]
        self.sq_err += float((recon - y).pow(2).sum())
        self.sum_y = y.sum(0) if self.sum_y is None else self.sum_y + y.sum(0)
        self.sum_y2 += float(y.pow(2).sum())
        self.l0 += float((acts != 0).sum())
        self.cos += float(F.cosine_similarity(recon, y, dim=-1).sum())
        self.counts += (acts != 0).sum(0).cpu()

    def report(self, hook: str, dense_threshold: float, loss_positions: str = "next_token") -> SAEEvalReport:
        if self.n_tok == 0:
            raise ValueError("no tokens were evaluated (empty corpus, or every position filtered out)")
        n, m = self.n_tok, self.n_pred
        assert self.sum_y is not None  # set by the first batch (n_tok > 0)
        total_var = self.sum_y2 - float(self.sum_y.pow(2).sum()) / n
        ce = {k: v / m for k, v in self.ce.items()}
        density = self.counts.float() / n

        def recovered(base: str) -> float:
            gap = ce[base] - ce["clean"]
            return (ce[base] - ce["spliced"]) / gap if gap != 0 else float("nan")

        fvu = self.sq_err / total_var if total_var > 0 else float("nan")
        return SAEEvalReport(
            hook_name=hook,
            tokens=n,
            l0=self.l0 / n,
            mse=self.sq_err / n,
            fvu=fvu,
            explained_variance=1 - fvu,
            cosine=self.cos / n,
            ce_clean=ce["clean"],
            ce_spliced=ce["spliced"],
            ce_zero_ablation=ce["zero"],
            ce_mean_ablation=ce["mean"],
            ce_loss_recovered=recovered("zero"),
            ce_loss_recovered_vs_mean=recovered("mean"),
            kl_div=self.kl / m,
            dead_fraction=float((density == 0).float().mean()),
            dense_fraction=float((density > dense_threshold).float().mean()),
            density=density,
            loss_positions=loss_positions,
        )
