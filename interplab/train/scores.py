"""Per-head attention scores on repeated random tokens: the induction and previous-token scores.

A sequence of ``half`` random tokens followed by the same tokens again: an induction head at position
``q`` in the second half attends to ``q - half + 1``, the token after the earlier occurrence of the current
token; a previous-token head attends to ``q - 1``.

>>> tokens = repeated_random_tokens(8, 16, d_vocab=model.cfg.d_vocab, seed=0)
>>> induction_scores(model, tokens).shape  # [layer head], 1.0 = all attention on the induction target
torch.Size([2, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor


def repeated_random_tokens(
    n: int, half: int, *, d_vocab: int, seed: int = 0, low: int = 0
) -> Int[Tensor, "batch pos"]:
    """``n`` sequences of ``half`` uniformly random ids from ``[low, d_vocab)``, each repeated once."""
    if half < 2:
        raise ValueError(f"half={half} must be at least 2")
    if not 0 <= low < d_vocab:
        raise ValueError(f"low={low} must be in [0, d_vocab={d_vocab})")
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(low, d_vocab, (n, half), generator=g)
    return torch.cat([first, first], dim=1)


@torch.no_grad()
def attention_patterns(
    model: torch.nn.Module, tokens: Int[Tensor, "batch pos"]
) -> Float[Tensor, "layer batch head q k"]:
    """Every layer's attention pattern (computed only for this call, through the pattern hooks)."""
    return patterns_and_logits(model, tokens)[0]


@torch.no_grad()
def patterns_and_logits(
    model: torch.nn.Module, tokens: Int[Tensor, "batch pos"]
) -> tuple[Float[Tensor, "layer batch head q k"], Float[Tensor, "batch pos d_vocab_out"]]:
    """Attention patterns of every layer and the logits, from one forward pass."""
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    logits, cache = model.run_with_cache(tokens, names=names)
    return torch.stack([cache[name].float() for name in names]), logits


def _diagonal_score(patterns: Tensor, offset: int, q_start: int) -> Tensor:
    """Mean over batch and queries ``q >= q_start`` of the attention from ``q`` to ``q - offset``."""
    q_len = patterns.shape[-2]
    q = torch.arange(q_start, q_len)
    picked = patterns[..., q, q - offset]  # layer batch head n_q
    return picked.mean(dim=(1, 3))


def induction_scores(
    model: torch.nn.Module,
    tokens: Int[Tensor, "batch pos"],
    *,
    half: int | None = None,
    patterns: Float[Tensor, "layer batch head q k"] | None = None,
) -> Float[Tensor, "layer head"]:
    """Mean attention from the second half of repeated sequences to the token after the earlier occurrence.

    ``tokens`` repeat with period ``half`` (default: half their length). Pass ``patterns`` (from
    `attention_patterns`) to reuse one forward pass for several scores."""
    half = half or tokens.shape[1] // 2
    if tokens.shape[1] < 2 * half or not torch.equal(tokens[:, half : 2 * half], tokens[:, :half]):
        raise ValueError(f"tokens must repeat with period half={half} (see repeated_random_tokens)")
    patterns = attention_patterns(model, tokens) if patterns is None else patterns
    return _diagonal_score(patterns, offset=half - 1, q_start=half)


def prev_token_scores(
    model: torch.nn.Module,
    tokens: Int[Tensor, "batch pos"],
    *,
    patterns: Float[Tensor, "layer batch head q k"] | None = None,
) -> Float[Tensor, "layer head"]:
    """Mean attention from each position (after the first) to the position before it."""
    patterns = attention_patterns(model, tokens) if patterns is None else patterns
    return _diagonal_score(patterns, offset=1, q_start=1)


@torch.no_grad()
def token_losses(
    model: torch.nn.Module, tokens: Int[Tensor, "batch pos"], *, logits: Tensor | None = None
) -> Float[Tensor, "batch pos_minus_1"]:
    """Next-token cross-entropy at every position (position ``i`` predicts token ``i + 1``)."""
    logits = (model(tokens) if logits is None else logits).float()
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")


def in_context_score(losses: Float[Tensor, "batch pos"]) -> float:
    """Loss late in the context minus loss early in it (negative: the model uses its context).

    Early = positions ``[L/16, L/8)``, late = the last ``L/8`` positions, of ``L`` predicted positions."""
    L = losses.shape[1]
    if L < 16:
        raise ValueError(f"the in-context score needs at least 16 positions, got {L}")
    early = losses[:, L // 16 : L // 8].mean()
    late = losses[:, L - L // 8 :].mean()
    return float(late - early)
