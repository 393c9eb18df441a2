"""The registry of SAE architectures: one class per `Architecture`, registered once (duplicates refused)."""

from __future__ import annotations

from typing import TypeVar

from interplab.sae.base import SAE
from interplab.sae.config import Architecture, SAEConfig

_REGISTRY: dict[Architecture, type[SAE]] = {}
T = TypeVar("T", bound=type[SAE])


def register_architecture(cls: T) -> T:
    """Class decorator: register ``cls`` for ``cls.architecture``; a second registration is an error."""
    arch = cls.architecture
    if arch in _REGISTRY:
        raise ValueError(
            f"SAE architecture {arch.value!r} is already registered by {_REGISTRY[arch].__name__}"
        )
    _REGISTRY[arch] = cls
    return cls


def sae_class(architecture: Architecture | str) -> type[SAE]:
    import interplab.sae.architectures  # noqa: F401  (registers the built-in architectures)

    arch = Architecture.parse(architecture)
    if arch not in _REGISTRY:
        raise ValueError(
            f"no SAE class registered for {arch.value!r}; registered: {sorted(a.value for a in _REGISTRY)}"
        )
    return _REGISTRY[arch]


def registered_architectures() -> list[Architecture]:
    import interplab.sae.architectures  # noqa: F401

    return list(_REGISTRY)


def create_sae(cfg: SAEConfig, *, seed: int = 0) -> SAE:
    """A freshly initialised SAE of ``cfg.architecture``; the same ``cfg`` and ``seed`` give bit-identical
    weights (the draw uses its own generator, never the global RNG)."""
    return sae_class(cfg.architecture)(cfg, seed=seed)
