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
from typing import Any

import torch
from torch import Tensor

from interplab.hooks.site import Site, SiteKind, suggest


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

    def __init__(self, store: dict[str, Tensor], model: Any) -> None:
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
        needed = ["hook_embed"] + [n for n in ["hook_pos_embed"] if n in self.model.hook_names]
        needed += [
            f"blocks.{i}.hook_{part}_out"
            for i in range(layer)
            for part in ("attn", "mlp")[: 1 + self.cfg.has_mlp]
        ]
        missing = [n for n in needed if n not in self._store]
        if missing:
            raise KeyError(
                f"decompose_resid needs {len(needed)} components, {len(missing)} not cached: {missing[:4]}"
                f"{' ...' if len(missing) > 4 else ''}; cache them with run_with_cache(names=...)"
            )
        parts, labels = [self["hook_embed"]], ["embed"]
        if "hook_pos_embed" in self.model.hook_names:
            parts.append(self["hook_pos_embed"])
            labels.append("pos_embed")
        for lyr in range(layer):
            parts.append(self[("attn_out", lyr)])
            labels.append(f"{lyr}_attn_out")
            if self.cfg.has_mlp:
                parts.append(self[("mlp_out", lyr)])
                labels.append(f"{lyr}_mlp_out")
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
        if self.cfg.normalization.value == "none":
            return stack
        if layer is None or layer == self.cfg.n_layers:
            scale = self["ln_final.hook_scale"]
        else:
            scale = self[("ln1_scale", layer)]
        if self.cfg.normalization.value == "layernorm":
            stack = stack - stack.mean(-1, keepdim=True)
        return stack / scale
