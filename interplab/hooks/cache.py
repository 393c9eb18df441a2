"""`ActivationCache`: the activations one forward pass stored, addressable by any form of site name.

>>> logits, cache = model.run_with_cache(tokens)
>>> cache["blocks.0.hook_resid_post"] is cache["resid_post", 0]
True
>>> parts = cache.decompose_resid()
>>> torch.testing.assert_close(parts.tensor.sum(0), cache["resid_post", model.cfg.n_layers - 1])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from interplab.hooks.site import Site, SiteKind, suggest

if TYPE_CHECKING:  # the model imports this module
    from interplab.model.transformer import Transformer


@dataclass(frozen=True)
class ComponentStack:
    """Tensors of several residual-stream components stacked on dim 0, with a label each."""

    tensor: Tensor  # [component, batch, pos, d_model]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def sum(self) -> Tensor:
        return self.tensor.sum(0)


class ActivationCache:
    """A mapping from hook names to activations, with helpers that know the model's structure."""

    def __init__(self, store: dict[str, Tensor], model: Transformer) -> None:
        self._store = store
        self.model = model
        self.cfg = model.cfg

    # ---- mapping -------------------------------------------------------------------------------
    def _key(self, key: Any) -> str:
        if isinstance(key, str) and key in self._store:
            return key
        try:
            name = Site.parse(key).name
        except ValueError as err:
            raise KeyError(str(err)) from None
        if name not in self._store:
            close = suggest(name, list(self._store))
            hint = f"; closest cached: {close}" if close else ""
            raise KeyError(f"{name!r} is not in the cache ({len(self._store)} hook points cached{hint})")
        return name

    def __getitem__(self, key: Any) -> Tensor:
        return self._store[self._key(key)]

    def __contains__(self, key: object) -> bool:
        try:
            self._key(key)
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def keys(self) -> list[str]:
        return list(self._store)

    def items(self) -> list[tuple[str, Tensor]]:
        return list(self._store.items())

    def get(self, key: Any, default: Tensor | None = None) -> Tensor | None:
        return self[key] if key in self else default

    @property
    def nbytes(self) -> int:
        """Bytes of memory the cached tensors hold, each storage counted once: q, k and v share the fused
        projection's storage, the per-head input copies are broadcast views of ``hook_resid_pre``."""
        storages = {}
        for t in self._store.values():
            storage = t.untyped_storage()
            storages[(storage.data_ptr(), t.device)] = storage.nbytes()
        return sum(storages.values())

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self.model)

    def cpu(self) -> ActivationCache:
        return self.to("cpu")

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} hook points, {self.nbytes / 1e6:.2f} MB)"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><code>{k}</code></td><td>{list(v.shape)}</td><td>{v.dtype}</td></tr>"
            for k, v in self._store.items()
        )
        return (
            f"<p>ActivationCache: {len(self)} hook points, {self.nbytes / 1e6:.2f} MB</p>"
            f"<table><tr><th>hook</th><th>shape</th><th>dtype</th></tr>{rows}</table>"
        )

    # ---- structure-aware helpers ---------------------------------------------------------------
    def stack(self, kind: str | SiteKind, layers: list[int] | None = None) -> Tensor:
        """One per-layer activation kind stacked over layers: [layer, ...]."""
        layers = list(range(self.cfg.n_layers)) if layers is None else layers
        name = kind.value if isinstance(kind, SiteKind) else kind
        return torch.stack([self[Site.parse(name, layer)] for layer in layers])

    def decompose_resid(self, layer: int | None = None) -> ComponentStack:
        """The residual stream entering ``layer`` (after the last block if None) as a sum of components:
        embed, pos_embed, then each layer's attn_out and mlp_out. They sum to that residual stream exactly."""
        layer = self.cfg.n_layers if layer is None else layer
        if not 0 <= layer <= self.cfg.n_layers:
            raise ValueError(f"layer must be in 0..{self.cfg.n_layers}, got {layer}")
        embeds = [Site(SiteKind.EMBED)]
        if Site(SiteKind.POS_EMBED).name in self.model.hook_names:
            embeds.append(Site(SiteKind.POS_EMBED))
        outs = (SiteKind.ATTN_OUT, SiteKind.MLP_OUT)[: 1 + self.cfg.has_mlp]
        layered = [Site(kind, lyr) for lyr in range(layer) for kind in outs]
        needed = [site.name for site in embeds + layered]
        missing = [n for n in needed if n not in self._store]
        if missing:
            raise KeyError(
                f"decompose_resid needs {len(needed)} components, {len(missing)} not cached: {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}; cache them with run_with_cache(names=...)"
            )
        parts = [self[site] for site in embeds + layered]
        labels = [site.kind.value.removeprefix("hook_") for site in embeds]
        labels += [f"{site.layer}_{site.kind.value.removeprefix('hook_')}" for site in layered]
        return ComponentStack(torch.stack(parts), tuple(labels))

    def accumulated_resid(self, layer: int | None = None) -> ComponentStack:
        """resid_pre of every layer up to ``layer`` and, if None, the final resid_post: [layer+1, ...]."""
        layer = self.cfg.n_layers if layer is None else layer
        parts = [self[("resid_pre", lyr)] for lyr in range(min(layer, self.cfg.n_layers))]
        labels = [f"{lyr}_pre" for lyr in range(min(layer, self.cfg.n_layers))]
        if layer == self.cfg.n_layers:
            parts.append(self[("resid_post", self.cfg.n_layers - 1)])
            labels.append("final_post")
        return ComponentStack(torch.stack(parts), tuple(labels))

    def stack_head_results(self, layer: int | None = None) -> ComponentStack:
        """Every head's output (``attn.hook_result``) of layers before ``layer``: [layer*head, batch, pos, d_model].
        Biases (b_O) are not included."""
        layer = self.cfg.n_layers if layer is None else layer
        parts, labels = [], []
        for lyr in range(layer):
            result = self[("result", lyr)]
            for h in range(result.shape[2]):
                parts.append(result[:, :, h])
                labels.append(f"L{lyr}H{h}")
        return ComponentStack(torch.stack(parts), tuple(labels))

    def apply_ln_to_stack(self, stack: Tensor, layer: int | None = None) -> Tensor:
        """Apply the normalisation the model applied to the residual stream entering ``layer`` (the final
        norm if None) to a stack of components, using the cached scale: centre (LayerNorm) and divide by
        the scale. The norm's weight and bias are not applied (fold them with `fold_layer_norm`).
        Needs ``ln_final.hook_scale`` or ``blocks.{layer}.ln1.hook_scale`` in the cache."""
        final = layer is None or layer == self.cfg.n_layers
        norm = self.model.ln_final if final or layer is None else self.model.blocks[layer].ln1
        if norm.hook_scale is None:  # no normalisation: nothing to divide by
            return stack
        return norm.divide_by_scale(stack, self[norm.hook_scale.site])
