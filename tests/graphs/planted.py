"""Planted ground truth for the graph tests: models whose MLPs are exactly sparse in a known basis (their own
ReLU neurons), the transcoder that recovers them exactly, and a hand-written reference of the direct effects."""

from __future__ import annotations

import torch
from torch import Tensor

from interplab.graphs.attribution import AttributionGraph, NodeKind
from interplab.graphs.replacement import ReplacementRun
from interplab.model import ModelConfig, Transformer
from tests.graphs.helpers import CLTActivation, HandCLT, HandCLTConfig

# tokens of the planted model: A at position 1 is copied by layer 1's head to the last position (query C)
BOS, A, C, D, B, OTHER = 0, 1, 2, 3, 4, 5


def exact_transcoder(model: Transformer) -> HandCLT:
    """Per-layer transcoders (reading ``ln2.hook_normalized``) equal to a ReLU model's MLPs: latent i of layer l
    is neuron i (encoder ``w * W_in``, bias ``b @ W_in + b_in``), decoder ``W_out``; the errors are zero."""
    cfg = model.cfg
    assert cfg.act_fn.value == "relu" and not cfg.gated_mlp
    clt = HandCLT(
        HandCLTConfig(
            n_layers=cfg.n_layers,
            d_model=cfg.d_model,
            d_sae=cfg.d_mlp,
            cross_layer=False,
            hook_in="blocks.{layer}.ln2.hook_normalized",
            activation=CLTActivation.RELU,
        )
    )
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            w = block.ln2.w if hasattr(block.ln2, "w") else torch.ones(cfg.d_model)
            b = getattr(block.ln2, "b", torch.zeros(cfg.d_model))
            clt.W_enc[layer] = w[:, None] * block.mlp.W_in
            clt.b_enc[layer] = b @ block.mlp.W_in + block.mlp.b_in
            clt.W_dec[layer][:, 0] = block.mlp.W_out
            clt.b_dec[layer] = block.mlp.b_out
    return clt


def planted_model() -> Transformer:
    """A two-layer model, no norms or positions, one head, d_model 8 (basis e0..e7), ReLU MLPs of 4 neurons:
    token A embeds as e0; layer 0's neuron 0 reads e0 and writes e1; layer 1's head attends from a query C (e2)
    to a key e0 with score 8 and moves e1 into e3; layer 1's neuron 0 reads e3 and writes e4; the unembedding
    of B reads e4. Every other weight is zero."""
    cfg = ModelConfig(
        d_model=8, n_layers=2, n_heads=1, d_vocab=6, n_ctx=8, d_mlp=4, normalization="none",
        positional="none", act_fn="relu", attn_bias=False, mlp_bias=False,
    )  # fmt: skip
    model = Transformer(cfg)
    e = torch.eye(8)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.embed.W_E[BOS] = e[5]
        model.embed.W_E[A] = e[0]
        model.embed.W_E[C] = e[2]
        model.embed.W_E[D] = e[6]
        model.embed.W_E[B] = e[7]
        model.embed.W_E[OTHER] = e[7]
        model.blocks[0].mlp.W_in[:, 0] = e[0]
        model.blocks[0].mlp.W_out[0] = e[1]
        attn = model.blocks[1].attn
        attn.W_Q[0] = 4.0 * torch.outer(e[2], torch.eye(8)[0])  # q = 4 (x . e2) on d_head dim 0
        attn.W_K[0] = 4.0 * torch.outer(e[0], torch.eye(8)[0]) * (8**0.5) / 2  # scores = 8 (x.e2)(y.e0) / 1
        attn.W_V[0] = torch.outer(e[1], torch.eye(8)[0])
        attn.W_O[0] = torch.outer(torch.eye(8)[0], e[3])
        model.blocks[1].mlp.W_in[:, 0] = e[3]
        model.blocks[1].mlp.W_out[0] = e[4]
        model.unembed.W_U[:, B] = e[4]
    return model


def reference_adjacency(model: Transformer, run: ReplacementRun, graph: AttributionGraph, clt) -> Tensor:
    """The direct effects written out by hand: each source's vector placed in the residual stream, carried
    through each attention layer's frozen linear map (``sum_h P[h, p, q] N(x[q]) W_V[h] W_O[h]``, no biases;
    never through an MLP) up to the target's read-out."""
    cfg = model.cfg
    n_layers, n_pos = cfg.n_layers, graph.n_pos
    fr = run.frozen

    def norm(x: Tensor, scale: Tensor | None, w: Tensor | None) -> Tensor:  # frozen norm, no bias
        if scale is None:
            return x
        if cfg.normalization.value == "layernorm":
            x = x - x.mean(-1, keepdim=True)
        x = x / scale[0]
        return x if w is None else x * w

    def attention(layer: int, x: Tensor) -> Tensor:
        block = model.blocks[layer]
        h = norm(x, fr.ln1_scale[layer], getattr(block.ln1, "w", None))
        out = torch.zeros_like(x)
        P = fr.patterns[layer][0]
        g = cfg.n_groups
        for head in range(cfg.n_heads):
            ov = block.attn.W_V[head // g] @ block.attn.W_O[head]
            for p in range(n_pos):
                for q in range(n_pos):
                    out[p] += P[head, p, q] * (h[q] @ ov)
        if cfg.post_norms:  # Gemma 2's norm of the attention output, its scale frozen too
            out = norm(out, fr.ln1_post_scale[layer], block.ln1_post.w)
        return out

    def readouts(x: Tensor, start: int) -> dict[int, Tensor]:
        """``x`` [pos d_model] entering block ``start`` (its resid_pre); the state read at each layer's
        feature input (key: layer) and at ln_final's output (key: n_layers)."""
        reads = {}
        for layer in range(start, n_layers):
            mid = x + attention(layer, x)  # resid_mid; a parallel block's MLP reads resid_pre
            read = x if cfg.parallel_attn_mlp else mid
            x = mid
            reads[layer] = (
                norm(read, fr.ln2_scale[layer], None) if clt.cfg.hook_in.endswith("normalized") else read
            )
        reads[n_layers] = norm(x, fr.ln_final_scale, getattr(model.ln_final, "w", None))
        return reads

    def effect(reads: dict[int, Tensor], target) -> float:
        if target.kind is NodeKind.LOGIT:
            i = graph.nodes.index(target) - graph.logit_slice.start
            return float(reads[n_layers][-1] @ graph.targets[i].vector.detach())
        if target.layer not in reads:
            return 0.0
        return float(
            reads[target.layer][target.position] @ clt.W_enc.detach()[target.layer][:, target.feature]
        )

    ref = torch.zeros(len(graph.nodes), len(graph.nodes))
    torch.set_grad_enabled(False)
    errors = run.errors[0]
    for j, src in enumerate(graph.nodes):
        pieces: list[tuple[int, Tensor]] = []  # (the block it enters, the vector)
        if src.kind is NodeKind.FEATURE:
            dsts = range(src.layer, n_layers) if clt.cfg.cross_layer else [src.layer]
            pieces = [(m + 1, src.value * clt.decoder(src.layer, m)[src.feature]) for m in dsts]
        elif src.kind is NodeKind.ERROR and src.position > 0:
            pieces = [(src.layer + 1, errors[src.position, src.layer])]
        elif src.kind is NodeKind.EMBEDDING:
            pieces = [(0, run.embed[0, src.position])]
        for start, vec in pieces:
            x = torch.zeros(n_pos, cfg.d_model)
            x[src.position] = vec
            reads = readouts(x, start)
            for i, tgt in enumerate(graph.nodes):
                if tgt.kind in (NodeKind.FEATURE, NodeKind.LOGIT):
                    ref[i, j] += effect(reads, tgt)
    torch.set_grad_enabled(True)
    return ref
