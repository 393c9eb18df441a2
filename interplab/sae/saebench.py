"""SAEBench's core metrics, by SAEBench's own definitions, so an interplab SAE gets numbers comparable with
published SAEBench tables (`sae_bench.evals.core`, version 0.6; tests/sae/test_bench_core_peer.py checks every
number against SAEBench itself on the same model, SAE and tokens).

`evaluate_sae` (and so `interplab sae bench`) defines its core metrics the usual way; SAEBench 0.6 differs in
four places, all reproduced here (docs/sae.md "SAEBench's core definitions" gives measured numbers):

- **which tokens count**: SAEBench drops the positions holding a special token (``ignore_tokens``: the
  tokenizer's BOS, EOS and pad ids) from every metric: from L0, reconstruction and density, and from the
  per-token CE and KL values (a CE value is dropped when the token *predicting* is special). The SAE is still
  spliced in at every position (``exclude_special_from_reconstruction`` False, SAEBench's default).
  `evaluate_sae` drops position 0 and BOS/pad from reconstruction and density (its `TokenFilter`) but averages
  CE and KL over every prediction.
- **KL**: SAEBench reports ``kl_div_score`` = (KL_zero - KL_sae) / KL_zero (KL of the clean next-token
  distribution to the zero-ablated one, and to the spliced one), each KL averaged over *every* position
  including the last (which predicts nothing in the corpus); `evaluate_sae`'s ``kl_div`` is KL_sae itself over
  the positions that predict a token.
- **explained variance**: SAEBench 0.6's ``explained_variance`` is 1 - E[|x - x̂|²] / (E[|x|²] - m²) with
  m = E[x_j²] averaged over tokens *and* dimensions (its ``mean_act_per_dimension`` is concatenated over batches
  and averaged to one number), not the centred total variance E[|x|²] - |E[x]|² of FVU: with m² small against
  E[|x|²] it is close to 1 - MSE / (mean squared norm), the uncentred ratio. Every batch is averaged first and
  the batch means are then averaged. ``explained_variance_legacy`` is the mean over tokens of
  1 - |x - x̂|² / |x - mean_batch(x)|²; ``mse`` is |x - x̂|² divided by the batch's kept-token count, averaged
  over tokens (so it shrinks with the batch size).
- **dead / dense**: from the density (fraction of kept tokens with activation > 0): ``frac_alive`` (> 0),
  ``freq_over_1_percent`` and ``freq_over_10_percent`` (`evaluate_sae`'s ``dense_fraction`` at its default
  threshold 0.1).

CE loss recovered is defined alike (zero ablation of the SAE's site as the baseline, (CE_zero - CE_sae) /
(CE_zero - CE_clean)); only its token set differs (above).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from interplab.hooks import Site
from interplab.sae.activations import _as_batch
from interplab.sae.base import SAE
from interplab.sae.bench import ExtraMetric

if TYPE_CHECKING:
    from interplab.data import Tokenizer
    from interplab.model import Transformer

#: the metrics `saebench_core` returns, by SAEBench's names
SAEBENCH_CORE = (
    "l0",
    "l1",
    "explained_variance",
    "explained_variance_legacy",
    "mse",
    "cossim",
    "l2_ratio",
    "relative_reconstruction_bias",
    "ce_loss_score",
    "ce_loss_with_sae",
    "ce_loss_without_sae",
    "ce_loss_with_ablation",
    "kl_div_score",
    "kl_div_with_sae",
    "kl_div_with_ablation",
    "frac_alive",
    "freq_over_1_percent",
    "freq_over_10_percent",
)


def saebench_ignore_tokens(tokenizer: Tokenizer | None) -> set[int]:
    """The token ids SAEBench's core eval ignores for a model with ``tokenizer``: its BOS, EOS and pad ids
    (those it has)."""
    if tokenizer is None:
        return set()
    ids = (getattr(tokenizer, a, None) for a in ("bos_id", "eos_id", "pad_id"))
    return {int(i) for i in ids if i is not None}


def _keep(tokens: Tensor, ignore: Collection[int]) -> Tensor:
    keep = torch.ones_like(tokens, dtype=torch.bool)
    for t in ignore:
        keep &= tokens != t
    return keep


def _kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    logp, logq = p_logits.float().log_softmax(-1), q_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _ce_per_token(logits: Tensor, tokens: Tensor) -> Tensor:
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def saebench_core(
    model: Transformer,
    sae: SAE,
    token_batches: Iterable[Tensor],
    *,
    ignore_tokens: Collection[int] = (),
    exclude_special_from_reconstruction: bool = False,
) -> dict[str, float]:
    """SAEBench 0.6's core metrics (`SAEBENCH_CORE`, its names; definitions in the module docstring) of
    ``sae`` on ``model`` over ``token_batches`` ([batch, pos] token tensors, every batch used for every metric,
    as SAEBench with ``n_eval_reconstruction_batches`` = ``n_eval_sparsity_variance_batches``).
    ``ignore_tokens``: the token ids whose positions are left out (`saebench_ignore_tokens` gives SAEBench's
    choice for a tokenizer); ``exclude_special_from_reconstruction`` also leaves the site's activation
    unchanged there when the SAE is spliced in."""
    if sae.cfg.hook_name_out and sae.cfg.hook_name_out != sae.cfg.hook_name:
        raise ValueError(
            f"SAEBench's core eval covers SAEs that reconstruct their input; this one reads {sae.cfg.hook_name} "
            f"and writes {sae.cfg.hook_name_out} (a transcoder): use evaluate_sae"
        )
    if not sae.cfg.hook_name:
        raise ValueError("the SAE's cfg.hook_name is empty: set it to the site it was trained on")
    hook = Site.parse(sae.cfg.hook_name).name
    if hook not in model.hook_points:
        model.hook_registry.resolve(hook)
    ignore = sorted({int(t) for t in ignore_tokens})
    per_token: dict[str, list[Tensor]] = {
        k: [] for k in ("ce_sae", "ce_clean", "ce_zero", "kl_sae", "kl_zero", "l0", "l1", "ev_legacy", "mse")
    }
    per_token.update(cossim=[], l2_ratio=[])
    per_batch: dict[str, list[Tensor]] = {"sum_sq": [], "act_sq": [], "resid": [], "rrb": []}
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n_kept = 0
    for batch in token_batches:
        tokens = _as_batch(batch).to(sae.device)
        keep = _keep(tokens, ignore)
        splice = keep if exclude_special_from_reconstruction else torch.ones_like(keep)
        clean, cache = model.run_with_cache(tokens, names=[hook])
        act = cache[hook]
        x = act.flatten(2).to(sae.W_enc.dtype)
        f = sae.encode(x)
        x_hat = sae.decode(f)

        def spliced(a: Tensor, s: object, r: Tensor = x_hat, where: Tensor = splice) -> Tensor:
            new = r.to(a.dtype).reshape(a.shape)
            m = where.reshape(where.shape + (1,) * (a.dim() - 2))
            return torch.where(m, new, a)

        with_sae = model.run_with_hooks(tokens, fwd_hooks=[(hook, spliced)])
        zero = model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda a, s: torch.zeros_like(a))])
        pred_keep = keep[:, :-1]
        for key, lg in (("ce_clean", clean), ("ce_sae", with_sae), ("ce_zero", zero)):
            per_token[key].append(_ce_per_token(lg, tokens)[pred_keep])
        per_token["kl_sae"].append(_kl(clean, with_sae)[keep])
        per_token["kl_zero"].append(_kl(clean, zero)[keep])

        xk, fk, rk = x[keep].float(), f[keep].float(), x_hat[keep].float()
        n = xk.shape[0]
        n_kept += n
        resid = (xk - rk).pow(2).sum(-1)
        per_token["l0"].append((fk != 0).float().sum(-1))
        per_token["l1"].append(fk.sum(-1))
        per_token["mse"].append(resid / n)
        per_token["ev_legacy"].append(1 - resid / (xk - xk.mean(0)).pow(2).sum(-1))
        per_token["cossim"].append(
            ((xk / xk.norm(dim=-1, keepdim=True)) * (rk / rk.norm(dim=-1, keepdim=True))).sum(-1)
        )
        norm_in = xk.norm(dim=-1)
        per_token["l2_ratio"].append(rk.norm(dim=-1) / torch.where(norm_in.abs() < 1e-4, 1.0, norm_in))
        per_batch["rrb"].append(rk.norm(dim=-1).pow(2).mean() / (xk * rk).sum(-1).mean())
        per_batch["sum_sq"].append(xk.pow(2).sum(-1).mean())
        per_batch["act_sq"].append(xk.pow(2).mean(0))
        per_batch["resid"].append(resid.mean())
        fired += (fk > 0).sum(0).double().cpu()
    if n_kept == 0:
        raise ValueError(
            f"no tokens were evaluated (empty corpus, or every position holds an ignored token {ignore})"
        )
    mean = {k: float(torch.cat(v).mean()) for k, v in per_token.items()}
    total_var = torch.stack(per_batch["sum_sq"]).mean() - torch.cat(per_batch["act_sq"]).mean() ** 2
    density = fired / n_kept
    ce_gap = mean["ce_zero"] - mean["ce_clean"]
    return {
        "l0": mean["l0"],
        "l1": mean["l1"],
        "explained_variance": float(1 - torch.stack(per_batch["resid"]).mean() / total_var),
        "explained_variance_legacy": mean["ev_legacy"],
        "mse": mean["mse"],
        "cossim": mean["cossim"],
        "l2_ratio": mean["l2_ratio"],
        "relative_reconstruction_bias": float(torch.stack(per_batch["rrb"]).mean()),
        "ce_loss_score": (mean["ce_zero"] - mean["ce_sae"]) / ce_gap if ce_gap != 0 else float("nan"),
        "ce_loss_with_sae": mean["ce_sae"],
        "ce_loss_without_sae": mean["ce_clean"],
        "ce_loss_with_ablation": mean["ce_zero"],
        "kl_div_score": (mean["kl_zero"] - mean["kl_sae"]) / mean["kl_zero"]
        if mean["kl_zero"] != 0
        else float("nan"),
        "kl_div_with_sae": mean["kl_sae"],
        "kl_div_with_ablation": mean["kl_zero"],
        "frac_alive": float((density > 0).double().mean()),
        "freq_over_1_percent": float((density > 0.01).double().mean()),
        "freq_over_10_percent": float((density > 0.1).double().mean()),
    }


def saebench_metric(
    model: Transformer, token_batches: Sequence[Tensor], ignore_tokens: Collection[int]
) -> ExtraMetric:
    """An extra metric for `interplab.sae.bench.bench_saes`: SAEBench's core metrics, each named
    ``saebench_<name>``."""

    def metric(name: str, sae: SAE) -> dict[str, float]:
        out = saebench_core(model, sae, token_batches, ignore_tokens=ignore_tokens)
        return {f"saebench_{k}": v for k, v in out.items()}

    return metric
