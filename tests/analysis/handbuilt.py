"""A hand-built two-layer induction model (weights set by construction, no training).

Residual stream subspaces: token one-hot [0, V), position one-hot [V, V+T), previous token [V+T, 2V+T),
output [2V+T, 3V+T). Layer 0 head 0 attends to the previous position (queries and keys read positions)
and copies that position's token into the previous-token subspace. Layer 1 head 0 is an induction head:
its key reads the previous-token subspace (K-composition with L0H0), its query the current token, and it
copies the attended token into the output subspace, which the unembedding reads. Head 1 of each layer is
all zeros (uniform attention)."""

import torch

from interplab.model import ModelConfig, Transformer

V, T = 16, 24


def induction_model(strength: float = 30.0) -> Transformer:
    tok, pos, prev, out = 0, V, V + T, 2 * V + T
    cfg = ModelConfig(
        d_model=3 * V + T,
        n_layers=2,
        n_heads=2,
        d_head=T,
        d_vocab=V,
        n_ctx=T,
        attn_only=True,
        normalization="none",
        attn_scale=1.0,
    )
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for t in range(V):
            model.embed.W_E[t, tok + t] = 1.0
            model.unembed.W_U[out + t, t] = 1.0
        for i in range(T):
            model.pos_embed.W_pos[i, pos + i] = 1.0
        a0, a1 = model.blocks[0].attn, model.blocks[1].attn
        for i in range(T):
            a0.W_Q[0, pos + i, i] = strength
            if i + 1 < T:
                a0.W_K[0, pos + i, i + 1] = 1.0
        for t in range(V):
            a0.W_V[0, tok + t, t] = 1.0
            a0.W_O[0, t, prev + t] = 1.0
            a1.W_Q[0, tok + t, t] = strength
            a1.W_K[0, prev + t, t] = 1.0
            a1.W_V[0, tok + t, t] = 1.0
            a1.W_O[0, t, out + t] = 1.0
    return model
