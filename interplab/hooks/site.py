"""Sites: typed addresses of activations, and their canonical strings.

A `Site` names one activation tensor of a model: a kind (``resid_pre``, ``attn.hook_z`` ...) and,
for per-layer kinds, a layer. Its canonical string is TransformerLens' hook name
(``blocks.3.attn.hook_z``, ``hook_embed``), which is a file format (SAE configs, feature databases,
reports): strings are built and parsed only here.

>>> Site.parse("blocks.3.attn.hook_z")
Site(kind=<SiteKind.Z: 'attn.hook_z'>, layer=3)
>>> Site(SiteKind.RESID_POST, 1).name
'blocks.1.hook_resid_post'
>>> Site.parse("resid_post", layer=1) == Site.parse("blocks.1.hook_resid_post")
True
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from enum import Enum


class SiteKind(str, Enum):
    """Every kind of activation a `Transformer` exposes. The value is the hook name without ``blocks.{l}.``."""

    # global (no layer)
    EMBED = "hook_embed"
    POS_EMBED = "hook_pos_embed"
    LN_FINAL_SCALE = "ln_final.hook_scale"
    LN_FINAL_NORMALIZED = "ln_final.hook_normalized"
    # residual stream
    RESID_PRE = "hook_resid_pre"
    RESID_MID = "hook_resid_mid"
    RESID_POST = "hook_resid_post"
    # norms
    LN1_SCALE = "ln1.hook_scale"
    LN1_NORMALIZED = "ln1.hook_normalized"
    LN2_SCALE = "ln2.hook_scale"
    LN2_NORMALIZED = "ln2.hook_normalized"
    # per-head residual copies feeding each head (Q, K and V alike), and Q, K, V separately
    ATTN_IN = "hook_attn_in"
    Q_INPUT = "hook_q_input"
    K_INPUT = "hook_k_input"
    V_INPUT = "hook_v_input"
    # attention
    Q = "attn.hook_q"
    K = "attn.hook_k"
    V = "attn.hook_v"
    Q_NORM_SCALE = "attn.q_norm.hook_scale"
    Q_NORM_NORMALIZED = "attn.q_norm.hook_normalized"
    K_NORM_SCALE = "attn.k_norm.hook_scale"
    K_NORM_NORMALIZED = "attn.k_norm.hook_normalized"
    ROT_Q = "attn.hook_rot_q"
    ROT_K = "attn.hook_rot_k"
    ATTN_SCORES = "attn.hook_attn_scores"
    PATTERN = "attn.hook_pattern"
    Z = "attn.hook_z"
    RESULT = "attn.hook_result"
    ATTN_OUT = "hook_attn_out"
    # mlp
    MLP_IN = "hook_mlp_in"
    MLP_PRE = "mlp.hook_pre"
    MLP_PRE_LINEAR = "mlp.hook_pre_linear"
    MLP_POST = "mlp.hook_post"
    MLP_OUT = "hook_mlp_out"
    # unembedding (global)
    UNEMBED_IN = "unembed.hook_in"
    UNEMBED_OUT = "unembed.hook_out"

    @property
    def per_layer(self) -> bool:
        return self not in _GLOBAL_KINDS

    @property
    def short(self) -> str:
        """The short name used by ``cache["resid_post", 3]``: the value without ``hook_`` prefixes."""
        return _SHORT[self]


_GLOBAL_KINDS = frozenset(
    {
        SiteKind.EMBED,
        SiteKind.POS_EMBED,
        SiteKind.LN_FINAL_SCALE,
        SiteKind.LN_FINAL_NORMALIZED,
        SiteKind.UNEMBED_IN,
        SiteKind.UNEMBED_OUT,
    }
)


def _short_name(kind: SiteKind) -> str:
    # "attn.hook_z" -> "z", "mlp.hook_pre" -> "pre"; norms keep their module name ("ln1_scale",
    # "q_norm_scale") since several norms share the leaf names, and so does the unembedding ("unembed_in")
    module, _, leaf = kind.value.rpartition(".")
    leaf = leaf.removeprefix("hook_")
    module = module.rpartition(".")[2]  # "attn.q_norm" -> "q_norm"
    if module.endswith("_norm"):
        return f"{module}_{leaf}"
    return f"{module}_{leaf}" if module.startswith(("ln", "unembed")) else leaf


_SHORT = {kind: _short_name(kind) for kind in SiteKind}
# TransformerLens' short aliases, accepted on input.
_ALIASES = {
    "scale": SiteKind.LN_FINAL_SCALE,
    "attn": SiteKind.PATTERN,
    "scores": SiteKind.ATTN_SCORES,
    "mlp_pre": SiteKind.MLP_PRE,
    "mlp_post": SiteKind.MLP_POST,
}
_BY_SHORT: dict[str, SiteKind] = {**{v: k for k, v in _SHORT.items()}, **_ALIASES}
_BY_VALUE: dict[str, SiteKind] = {kind.value: kind for kind in SiteKind}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """The address of one activation: a kind and, for per-layer kinds, a layer."""

    kind: SiteKind
    layer: int | None = None
    name: str = field(init=False, repr=False, compare=False)
    """The canonical string (TransformerLens' hook name), computed once."""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, SiteKind):
            object.__setattr__(self, "kind", SiteKind(self.kind))
        if self.kind.per_layer and self.layer is None:
            raise ValueError(f"site kind {self.kind.value!r} is per layer: give a layer")
        if not self.kind.per_layer and self.layer is not None:
            raise ValueError(f"site kind {self.kind.value!r} has no layer, got layer={self.layer}")
        if self.layer is not None and (type(self.layer) is not int or self.layer < 0):
            raise ValueError(f"layer must be a non-negative int, got {self.layer!r}")
        name = self.kind.value if self.layer is None else f"blocks.{self.layer}.{self.kind.value}"
        object.__setattr__(self, "name", name)

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, value: str | Site | tuple, layer: int | None = None) -> Site:
        """Accept a Site, a canonical string, a short name with a layer, or a ``(short, layer)`` tuple."""
        if isinstance(value, Site):
            return value
        if isinstance(value, tuple):
            if len(value) != 2:
                raise ValueError(f"a site tuple is (name, layer), got {value!r}")
            return cls.parse(value[0], value[1])
        if not isinstance(value, str):
            raise TypeError(f"a site is a str, tuple or Site, got {type(value).__name__}")
        m = _LAYER_RE.match(value)
        if m:
            kind = _BY_VALUE.get(m.group(2))
            if kind is None or not kind.per_layer:
                raise ValueError(_unknown(value))
            if layer is not None and layer != int(m.group(1)):
                raise ValueError(f"site {value!r} already names layer {m.group(1)}, got layer={layer}")
            return cls(kind, int(m.group(1)))
        kind = _BY_VALUE.get(value) or _BY_SHORT.get(value)
        if kind is None:
            raise ValueError(_unknown(value))
        if kind.per_layer:
            if layer is None:
                raise ValueError(f"site {value!r} is per layer: give a layer, e.g. ({value!r}, 0)")
            return cls(kind, layer)
        if layer is not None:
            raise ValueError(f"site {value!r} ({kind.value}) has no layer, got layer={layer}")
        return cls(kind, None)


def all_site_names_example() -> list[str]:
    """One name of each kind (layer 0), for messages and docs."""
    return [Site(k, 0 if k.per_layer else None).name for k in SiteKind]


def _unknown(value: str) -> str:
    close = difflib.get_close_matches(value, all_site_names_example() + list(_BY_SHORT), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown site {value!r}{hint} (valid: hook_embed, blocks.{{l}}.hook_resid_pre, blocks.{{l}}.attn.hook_z, ...)"


def suggest(name: str, valid: list[str], n: int = 3) -> list[str]:
    """The closest valid names to ``name`` (for error messages)."""
    return difflib.get_close_matches(name, valid, n=n, cutoff=0.4)
