"""Sites, hook points and the activation cache. Knows nothing of transformers."""

from interplab.hooks.cache import ActivationCache, ComponentStack
from interplab.hooks.points import HookFn, HookPoint, HookRegistry, HookShapeError
from interplab.hooks.site import Site, SiteKind

__all__ = [
    "ActivationCache",
    "ComponentStack",
    "HookFn",
    "HookPoint",
    "HookRegistry",
    "HookShapeError",
    "Site",
    "SiteKind",
]
