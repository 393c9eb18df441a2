"""Hand-built transformers whose weights implement a known circuit exactly, and their data.

`planted_induction` is a two-layer attention-only model (no norms) with orthogonal subspaces of the residual
stream for the token (TOK), the position (POS), the previous token (PREV) and the output (OUT):

- ``a0.0`` is a previous-token head: its query and key read POS (position i attends to i-1), its value reads
  TOK, it writes the token into PREV;
- ``a1.0`` is an induction head: its query reads TOK, its key reads PREV (K-composition with ``a0.0``), its
  value reads TOK and it writes into OUT, which the unembedding reads: it predicts the token that followed
  the previous occurrence of the current token;
- ``a0.1`` writes nothing; ``a1.1`` is a noise head that attends uniformly and writes a small random
  function of the tokens into OUT.

`induction_data` gives sequences of distinct tokens whose last token repeats the token at a random position
``i``; the label is the token at ``i + 1``. The loss is the cross-entropy at the last position.
The edges that carry the circuit (``PLANTED_EDGES``) are the only ones whose corruption changes the output,
apart from the noise head's two (``NOISE_EDGES``); positional edges never change under resampling.
"""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.model.config import ModelConfig, Norm
from interplab.model.transformer import Transformer

PLANTED_EDGES = ("embed->a0.0.v", "a0.0->a1.0.k", "embed->a1.0.q", "embed->a1.0.v", "a1.0->logits")
NOISE_EDGES = ("embed->a1.1.v", "a1.1->logits")


def planted_induction(
    d_vocab: int = 16,
    n_ctx: int = 10,
    *,
    sharpness: float = 8.0,
    out_scale: float = 8.0,
    noise: float = 0.5,
    seed: int = 0,
) -> Transformer:
    """The model of the module docstring. ``sharpness``: attention score of a match; ``out_scale``: logit of
    the copied token; ``noise``: size of the noise head's logits."""
    v, t = d_vocab, n_ctx
    tok, pos, prev, out = 0, v, v + t, 2 * v + t
    d_head = max(v, t)
    cfg = ModelConfig(
        d_model=3 * v + t,
        n_layers=2,
        n_heads=2,
        d_head=d_head,
        d_vocab=v,
        n_ctx=t,
        attn_only=True,
        normalization=Norm.NONE,
        attn_scale=1.0,
        name="planted-induction",
    )
    model = Transformer(cfg, init=False)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        eye_v, eye_t = torch.eye(v), torch.eye(t)
        model.embed.W_E[:, tok : tok + v] = eye_v
        model.pos_embed.W_pos[:, pos : pos + t] = eye_t
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        # previous-token head: query position i matches key position i - 1
        a0.W_Q[0, pos : pos + t, :t] = sharpness * eye_t
        a0.W_K[0, pos : pos + t - 1, 1:t] = eye_t[: t - 1, : t - 1]
        a0.W_V[0, tok : tok + v, :v] = eye_v
        a0.W_O[0, :v, prev : prev + v] = eye_v
        # induction head: query token t matches a key whose previous token is t
        a1.W_Q[0, tok : tok + v, :v] = sharpness * eye_v
        a1.W_K[0, prev : prev + v, :v] = eye_v
        a1.W_V[0, tok : tok + v, :v] = eye_v
        a1.W_O[0, :v, out : out + v] = out_scale * eye_v
        # noise head: uniform attention, a random map of the tokens into OUT
        a1.W_V[1, tok : tok + v, :v] = eye_v
        a1.W_O[1, :v, out : out + v] = noise * torch.randn(v, v, generator=gen)
        model.unembed.W_U[out : out + v, :] = eye_v
    return model.eval()


def induction_data(
    n: int, d_vocab: int = 16, n_ctx: int = 10, *, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """``tokens [n n_ctx]``, ``labels [n]`` (the token to predict at the last position) and ``match [n]`` (the
    position of the earlier occurrence of the last token)."""
    if n_ctx - 1 > d_vocab:
        raise ValueError(
            f"sequences of {n_ctx - 1} distinct tokens need d_vocab >= {n_ctx - 1}, got {d_vocab}"
        )
    gen = torch.Generator().manual_seed(seed)
    body = torch.argsort(torch.rand(n, d_vocab, generator=gen), dim=1)[:, : n_ctx - 1]
    match = torch.randint(1, n_ctx - 2, (n,), generator=gen)
    rows = torch.arange(n)
    tokens = torch.cat([body, body[rows, match][:, None]], dim=1)
    return tokens, body[rows, match + 1], match


def last_position_loss(labels: Tensor):
    """Per-example cross-entropy at the last position, labels looked up by row (a scrubbing loss)."""

    def loss(logits: Tensor, rows: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(logits[:, -1].float(), labels[rows], reduction="none")

    return loss
