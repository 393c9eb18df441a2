"""The key/value cache for incremental decoding: `KVCache` (every layer's `LayerKV`, the attention mask and
the length so far)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerKV:
    """Keys and values of earlier positions for one layer (generation), and for key smearing the raw keys
    (before smearing and rotary)."""

    k: Tensor | None = None
    v: Tensor | None = None
    raw_k: Tensor | None = None

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
        return self.k, self.v

    def prefix(self, upto: int, repeat: int = 1) -> LayerKV:
        """The first ``upto`` positions, the batch tiled ``repeat`` times (copy i is rows i*batch ..)."""

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[:, :upto].repeat(repeat, 1, 1, 1)

        return LayerKV(cut(self.k), cut(self.v), cut(self.raw_k))


class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding."""

    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(n_layers)]
        self.mask: Tensor | None = None
        self.length = 0

    def extend_mask(
        self, attention_mask: Tensor | None, b: int, p: int, device: torch.device
    ) -> Tensor | None:
        new = (
            attention_mask
            if attention_mask is not None
            else torch.ones(b, p, dtype=torch.bool, device=device)
        )
        if self.mask is None and attention_mask is None and self.length == 0:
            self.length = p
            return None
        if self.mask is None:
            self.mask = torch.ones(b, self.length, dtype=torch.bool, device=device)
        self.mask = torch.cat([self.mask, new], dim=1)
        self.length += p
        return self.mask

    def __iter__(self) -> Iterator[LayerKV]:
        return iter(self.layers)

    def prefix(self, upto: int, repeat: int = 1, *, from_layer: int = 0) -> KVCache:
        """A cache of the first ``upto`` positions of this one, the batch tiled ``repeat`` times (copy i is rows
        i*batch .. (i+1)*batch - 1), to run ``repeat`` continuations of the same prefix in one batch. Layers
        before ``from_layer`` are left empty (for a run that starts at a later block and never reads them)."""
        if not 0 <= upto <= self.length:
            raise ValueError(f"upto must be in 0..{self.length} (the positions cached), got {upto}")
        out = KVCache(len(self.layers))
        out.length = upto
        if self.mask is not None:
            out.mask = self.mask[:, :upto].repeat(repeat, 1)
        for layer in range(from_layer, len(self.layers)):
            out.layers[layer] = self.layers[layer].prefix(upto, repeat)
        return out
