"""An independent, hand-written implementation of REMIX's paren-balancer experiments (day 4 part 2), straight
from the model's weights: no edge engine, no hypothesis language. It follows rust_circuit's treeified
semantics as REMIX's solution builds them (redwoodresearch/remix_public, remix_d4_part2_solution.py; see
/work/wt/research/remix.md §1): every interp node draws its datum agreeing with its parent's on its feature, an
internal node also draws one random "other inputs" datum for everything below it that no child claims, a leaf
runs its whole upstream computation on its datum, heads' padding masks follow the node that covers them, and
position embeddings are constants (a pad at position j gets W_pos[j]).

Each experiment is written as the composition of component functions it is (``head``, ``mlp``, ``embeds``),
one line per claim, so it doubles as the "naive per-path implementation" of the benchmark. It cross-checks the
language (`interplab.scrub.remix`) on the same sampled rows and reproduces the published losses on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from interplab.scrub import parens as P
from interplab.scrub.hypothesis import Feature
from interplab.scrub.sampling import FeatureGroups

COMPONENTS = ["embeds", "a0.0", "a0.1", "m0", "a1.0", "a1.1", "m1", "a2.0", "a2.1", "m2"]


class ParenModel:
    """The paren balancer as functions of residual streams (float32, the model's own weights)."""

    def __init__(self, model, tokens: Tensor, *, pads_at_last_position: bool = False) -> None:
        self.m, self.tokens = model, tokens
        self.n_forwards = 0  # example-forwards' worth of work (components run / components of the model)
        self.pads_at_last_position = pads_at_last_position
        """interplab's former padding: a pad gets the last real position's embedding (issue 15 item 5)"""

    @torch.no_grad()
    def embeds(self, rows: Tensor) -> Tensor:
        if self.pads_at_last_position:
            pos = (self.mask(rows).long().cumsum(-1) - 1).clamp(min=0)
            return self.m.embed.W_E[self.tokens[rows]] + self.m.pos_embed.W_pos[pos]
        return self.m.embed.W_E[self.tokens[rows]] + self.m.pos_embed.W_pos[None]

    def mask(self, rows: Tensor) -> Tensor:
        return self.tokens[rows] != P.PAD

    @torch.no_grad()
    def head(self, layer: int, h: int, resid: Tensor, mask: Tensor) -> Tensor:
        blk = self.m.blocks[layer]
        a = blk.attn
        x = torch.nn.functional.layer_norm(resid, (resid.shape[-1],), blk.ln1.w, blk.ln1.b, blk.ln1.eps)
        q, k, v = (x @ w[h] + b[h] for w, b in ((a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V)))
        scores = (q @ k.transpose(1, 2)) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
        self.n_forwards += resid.shape[0] / len(COMPONENTS)
        return (scores.softmax(-1) @ v) @ a.W_O[h] + a.b_O / a.W_O.shape[0]

    @torch.no_grad()
    def mlp(self, layer: int, resid: Tensor) -> Tensor:
        blk = self.m.blocks[layer]
        x = torch.nn.functional.layer_norm(resid, (resid.shape[-1],), blk.ln2.w, blk.ln2.b, blk.ln2.eps)
        self.n_forwards += resid.shape[0] / len(COMPONENTS)
        return torch.relu(x @ blk.mlp.W_in + blk.mlp.b_in) @ blk.mlp.W_out + blk.mlp.b_out

    @torch.no_grad()
    def logits0(self, final: Tensor) -> Tensor:
        """(unbalanced, balanced) logits at position 0 from the final residual at position 0 [b d]."""
        ln = self.m.ln_final
        x = torch.nn.functional.layer_norm(final, (final.shape[-1],), ln.w, ln.b, ln.eps)
        return x @ self.m.W_U + self.m.unembed.b_U

    def clean(self, rows: Tensor) -> dict[str, Tensor]:
        """Every component's output on ``rows`` (the ordinary forward)."""
        out = {"embeds": self.embeds(rows)}
        mask, resid = self.mask(rows), out["embeds"]
        for layer in range(3):
            heads = [self.head(layer, h, resid, mask) for h in range(2)]
            out[f"a{layer}.0"], out[f"a{layer}.1"] = heads
            mid = resid + heads[0] + heads[1]
            out[f"m{layer}"] = self.mlp(layer, mid)
            resid = mid + out[f"m{layer}"]
        return out

    def resid_in(self, comps: dict[str, Tensor], layer: int) -> Tensor:
        """The residual stream read by layer ``layer``'s heads."""
        names = COMPONENTS[: 1 + 3 * layer]
        return torch.stack([comps[n] for n in names]).sum(0)


@dataclass
class Sampler:
    """Datums agreeing on a feature, drawn uniformly from every row (with replacement), as FuncSampler."""

    tokens: Tensor
    gen: torch.Generator
    groups: dict[str, FeatureGroups] = field(default_factory=dict)
    rows: dict[str, Tensor] = field(default_factory=dict)  # the datum of every node (for cross-checks)
    given: dict[str, Tensor] = field(default_factory=dict)  # rows to use instead of drawing (cross-checks)

    def agree(self, name: str, feature: Feature | None, parent: Tensor) -> Tensor:
        if name in self.given:
            self.rows[name] = self.given[name]
            return self.given[name]
        if feature is None:  # ExactSampler
            self.rows[name] = parent
            return parent
        key = feature.name
        if key not in self.groups:
            self.groups[key] = FeatureGroups.build(feature, self.tokens, name)
        out = self.groups[key].agreeing(parent, self.gen)
        self.rows[name] = out
        return out

    def random(self, name: str, n: int) -> Tensor:
        if name in self.given:
            self.rows[name] = self.given[name]
            return self.given[name]
        out = torch.randint(0, self.tokens.shape[0], (n,), generator=self.gen)
        self.rows[name] = out
        return out


def _pos1_input(
    pm: ParenModel, layer: int, emb: Tensor, h00: Tensor, others: Tensor, h00_at1: Tensor
) -> Tensor:
    """REMIX 2a: the residual at position 1 read by layer ``layer``'s head, when the embeddings on every path not
    through 0.0 come from ``emb``, 0.0's output at position 1 (on every path) is ``h00_at1`` [b d], 0.0's other
    positions come from ``h00`` (its output on the other-inputs datum) and every other head's mask from
    ``others``."""
    mask = pm.mask(others)
    e = pm.embeds(emb)
    a00 = h00.clone()
    a00[:, 1] = h00_at1
    resid = e + a00 + pm.head(0, 1, e, mask)
    resid = resid + pm.mlp(0, resid)
    if layer == 2:
        mid = resid + pm.head(1, 0, resid, mask) + pm.head(1, 1, resid, mask)
        resid = mid + pm.mlp(1, mid)
    return resid[:, 1]


def _project(x: Tensor, direction: Tensor) -> Tensor:
    u = direction / direction.norm()
    return (x @ u)[..., None] * u


def experiment(pm: ParenModel, name: str, ref: Tensor, s: Sampler, model) -> Tensor:
    """Logits at position 0 [b 2] of REMIX experiment ``name`` for references ``ref``."""
    if name == "0a":
        return pm.logits0(pm.resid_in(pm.clean(ref), 3)[:, 0])
    r = s.random("logits (others)", ref.numel())
    if name == "0b":
        return pm.logits0(pm.resid_in(pm.clean(r), 3)[:, 0])
    out = dict(pm.clean(r))  # every unclaimed direct path: the root's other-inputs datum
    first = P.count_equal if name == "1a" else P.count_and_open
    for h, layer in (("1.0", 1), ("2.0", 2)):
        base = f"logits/a{h}"
        d = s.agree(base, first, ref)
        if name in ("1a", "1b", "1-bonus") or name.startswith("3"):
            out[f"a{h}"] = pm.clean(d)[f"a{h}"]
            continue
        # 2.x: the head reads its input at position 1 only (count_and_open), the rest and its mask: others
        o = s.random(f"{base} (others)", ref.numel())
        p1 = f"{base}/a{h}.in@1"
        d1 = s.agree(p1, P.count_and_open, d)
        resid = pm.resid_in(pm.clean(o), layer)
        if name == "2-part1":
            resid[:, 1] = pm.resid_in(pm.clean(d1), layer)[:, 1]
        else:
            o1 = s.random(f"{p1} (others)", ref.numel())
            d00 = s.agree(f"{p1}/a0.0@1", P.p1_if_starts_open, d1)
            emb = s.agree(f"{p1}/embed", P.starts_open, d1)
            at1 = pm.clean(d00)["a0.0"][:, 1]
            if name in ("2-part3", "2b", "4"):  # 0.0 at position 1 = a claimed part + the rest on random rows
                o00 = s.random(f"{p1}/a0.0@1 (others)", ref.numel())
                part = "projection" if name == "2-part3" else "phi"
                dp = s.agree(f"{p1}/a0.0@1/a0.0:{part}", P.p1_if_starts_open, d00)
                rest = pm.clean(o00)["a0.0"][:, 1]
                if name == "2-part3":
                    v = P.h00_open_vector(model)
                    at1 = _project(pm.clean(dp)["a0.0"][:, 1], v) + rest - _project(rest, v)
                else:
                    f = P.phi(model)
                    zeros = torch.zeros(ref.numel(), 42, rest.shape[-1])
                    at1 = f(zeros, pm.tokens[dp])[:, 0] + rest - f(zeros, pm.tokens[o00])[:, 0]
            resid[:, 1] = _pos1_input(pm, layer, emb, pm.clean(o1)["a0.0"], o1, at1)
        out[f"a{h}"] = pm.head(layer, int(h[-1]), resid, pm.mask(o))
    if name == "1-bonus":
        out["a0.0"] = pm.clean(s.agree("logits/a0.0", P.count_and_open, ref))["a0.0"]
    if name.startswith("3") or name == "4":
        out["a2.1"] = _head21(pm, name, ref, s, model)
    else:
        out["a2.1"] = pm.clean(s.agree("logits/a2.1", P.horizon_ok, ref))["a2.1"]
    return pm.logits0(torch.stack([out[c] for c in COMPONENTS]).sum(0)[:, 0])


def _horizon_features(model, adjusted: bool) -> tuple[Feature, list[Feature]]:
    fn: Callable[[Tensor], Tensor] = P.adjusted_horizon(model) if adjusted else P.horizon
    cache: dict[int, Tensor] = {}

    def table(tokens: Tensor) -> Tensor:
        if id(tokens) not in cache:
            cache[id(tokens)] = fn(tokens)
        return cache[id(tokens)]

    tag = "adjusted_" if adjusted else ""
    every = Feature(f"{tag}horizon_all", lambda t: (table(t) >= 0).all(1))
    return every, [Feature(f"{tag}horizon_{i}", lambda t, i=i: table(t)[:, i]) for i in range(42)]


def _head21(pm: ParenModel, name: str, ref: Tensor, s: Sampler, model) -> Tensor:
    """REMIX 3a-3d (and 4's 2.1): 2.1 reads position i of its input only through horizon_i, its padding mask
    only through the input length."""
    every, per_pos = _horizon_features(model, adjusted=name != "3a")
    d21 = s.agree("logits/a2.1", every, ref)
    length = s.agree("logits/a2.1/a2.1.mask", Feature("input_length", P.input_length), d21)
    rows = torch.empty(ref.numel(), 42, pm.m.cfg.d_model)
    for i in range(42):
        pi = f"logits/a2.1/a2.1.in@{i}"
        di = s.agree(pi, per_pos[i], d21)
        if name in ("3c", "3d"):  # position i = a0.0 (not via m0, m1) + m0 (not via m1) + m1 + the rest
            oi = s.random(f"{pi} (others)", ref.numel())
            feat = per_pos[i] if name == "3c" else None
            a00 = pm.clean(s.agree(f"{pi}/a0.0", feat, di))["a0.0"]
            m0 = pm.clean(s.agree(f"{pi}/m0", feat, di))["m0"]
            m1 = pm.clean(s.agree(f"{pi}/m1", feat, di))["m1"]
            mask, e = pm.mask(oi), pm.embeds(oi)
            r1 = e + a00 + pm.head(0, 1, e, mask) + m0
            rows[:, i] = (r1 + pm.head(1, 0, r1, mask) + pm.head(1, 1, r1, mask) + m1)[:, i]
        else:
            rows[:, i] = pm.resid_in(pm.clean(di), 2)[:, i]
    return pm.head(2, 1, rows, pm.mask(length))


def run(model, task, name: str, refs: Tensor, seed: int = 0, batch: int = 1000) -> tuple[Tensor, Sampler]:
    """Per-example losses of experiment ``name`` on reference rows ``refs`` (and the sampler, with its rows
    of the last batch)."""
    pm = ParenModel(model, task.tokens)
    s = Sampler(task.tokens, torch.Generator().manual_seed(seed))
    losses = []
    for b in range(0, refs.numel(), batch):
        x = refs[b : b + batch]
        s.rows = {}
        logits = experiment(pm, name, x, s, model)
        losses.append(task.loss(logits[:, None, :], x))
    return torch.cat(losses), s
