"""Placing a `Transformer` across several devices, split by layers: plan a device map, check that it fits,
move the model onto it.

A device map names a device for each of the model's parts, in forward order:

- ``"embed"``: the token (and learned position) embeddings;
- ``"blocks.0"`` .. ``"blocks.{n_layers - 1}"``: one entry per block (a block is never split);
- ``"unembed"``: the final norm and the unembedding. With tied embeddings the unembedding *is* the embedding,
  so ``"unembed"`` must be on ``"embed"``'s device.

The forward moves the residual stream (and the per-batch attention context) to each block's device as it
reaches it, so hooks see every activation on the device of the block that computes it, logits come out on
``"unembed"``'s device, and the key/value cache of a layer lives with its layer.

>>> from interplab.model import ModelConfig, Transformer
>>> model = Transformer(ModelConfig(d_model=32, n_layers=4, n_heads=4, d_vocab=50, n_ctx=16))
>>> plan = infer_device_map(model, max_memory={"cpu": "10MB", "meta": "10MB"})
>>> plan["embed"], plan["blocks.3"], plan["unembed"]
(device(type='cpu'), device(type='cpu'), device(type='cpu'))
>>> sizes = part_sizes(model)
>>> plan = infer_device_map(model, max_memory={"cpu": sizes["embed"] + 2 * sizes["blocks.0"], "meta": "10MB"})
>>> [str(plan[f"blocks.{i}"]) for i in range(4)]
['cpu', 'cpu', 'meta', 'meta']
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from interplab.model.config import ModelConfig
from interplab.model.transformer import Transformer

DeviceMap = Mapping[str, str | torch.device | int]
"""part name -> device (``"cuda:1"``, ``torch.device(...)``, or a CUDA index)"""

EMBED, UNEMBED = "embed", "unembed"
_BLOCK = re.compile(r"^blocks\.(\d+)(?:\.|$)")
_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
AUTO_HEADROOM = 0.9
"""the share of a CUDA device's free memory that ``device_map="auto"`` fills with weights (the rest is left
for activations and the allocator)"""


def part_names(n_layers: int) -> list[str]:
    """The parts of a device map, in forward order."""
    return [EMBED, *(f"blocks.{i}" for i in range(n_layers)), UNEMBED]


def part_of(name: str) -> str:
    """The device-map part that holds parameter (or module) ``name``: ``blocks.3.attn.W_Q`` -> ``blocks.3``,
    ``embed.W_E`` / ``pos_embed.W_pos`` -> ``embed``, ``ln_final.w`` / ``unembed.W_U`` -> ``unembed``."""
    m = _BLOCK.match(name)
    if m:
        return f"blocks.{m.group(1)}"
    if name.split(".")[0] in ("embed", "pos_embed", "hook_embed", "hook_pos_embed"):
        return EMBED
    return UNEMBED


def parse_memory(value: int | float | str) -> int:
    """Bytes from ``1_000_000``, ``"500MB"``, ``"1.5GiB"`` ... (a bad value is named)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"a memory budget must be >= 0 bytes, got {value}")
        return int(value)
    m = _MEMORY.match(str(value))
    if not m:
        raise ValueError(
            f"cannot read memory budget {value!r}: give bytes (an int) or e.g. '500MB', '1.5GiB'"
        )
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").lower()])


def _device(d: str | torch.device | int) -> torch.device:
    try:
        return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{d!r} is not a device (e.g. 'cpu', 'cuda:0', 'meta'): {err}") from None


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def part_sizes(model: nn.Module | ModelConfig, dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes of weights in each part (see the module docstring), for ``model``'s dtypes or ``dtype``. A config
    is measured on a model built on the meta device (nothing allocated)."""
    if isinstance(model, ModelConfig):
        with torch.device("meta"):
            model = Transformer(model, init=False)
    sizes = {name: 0 for name in part_names(len(model.blocks))}  # type: ignore[arg-type]
    for name, p in model.named_parameters():
        size = dtype.itemsize if dtype is not None and p.is_floating_point() else p.element_size()
        sizes[part_of(name)] += p.numel() * size
    return sizes


def device_budgets(max_memory: Mapping[str, int | float | str] | None = None) -> dict[torch.device, int]:
    """Bytes available for weights per device: ``max_memory`` when given (device -> bytes or ``"20GiB"``),
    else AUTO_HEADROOM x the free memory of every visible CUDA device (``torch.cuda.mem_get_info``). Without
    CUDA and without ``max_memory`` there is nothing to plan with: a ValueError says so."""
    if max_memory is not None:
        if not max_memory:
            raise ValueError(
                "max_memory is empty: give at least one device and its budget, e.g. {'cuda:0': '20GiB'}"
            )
        return {_device(d): parse_memory(v) for d, v in max_memory.items()}
    if torch.cuda.is_available():
        return {
            torch.device("cuda", i): int(AUTO_HEADROOM * torch.cuda.mem_get_info(i)[0])
            for i in range(torch.cuda.device_count())
        }
    raise ValueError(
        'device_map="auto" needs CUDA devices or max_memory={device: budget, ...} (e.g. '
        "{'cpu': '8GiB', 'meta': '1GiB'}) to know what each device can hold; CUDA is not available here"
    )


def infer_device_map(
    model: nn.Module | ModelConfig,
    *,
    max_memory: Mapping[str, int | float | str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.device]:
    """Fill the devices in order with the parts in forward order (``"auto"``): each device takes parts until
    the next one would exceed its budget (`device_budgets`). With tied embeddings ``"unembed"`` goes with
    ``"embed"``. Raises ValueError, with how much the model needs and how much each device has, when the parts
    do not fit."""
    sizes = part_sizes(model, dtype)
    budgets = device_budgets(max_memory)
    tied = _tied(model)
    order = [p for p in sizes if not (tied and p == UNEMBED)]
    devices = list(budgets)
    plan: dict[str, torch.device] = {}
    used = dict.fromkeys(devices, 0)
    d = 0
    for part in order:
        need = sizes[part] + (sizes[UNEMBED] if tied and part == EMBED else 0)
        while d < len(devices) and used[devices[d]] + need > budgets[devices[d]]:
            d += 1
        if d == len(devices):
            raise ValueError(_does_not_fit(sizes, budgets, f"{part} ({_gib(need)}) fits on no device left"))
        plan[part] = devices[d]
        used[devices[d]] += need
    if tied:
        plan[UNEMBED] = plan[EMBED]
    return {p: plan[p] for p in sizes}


def check_device_map(
    model: nn.Module | ModelConfig,
    device_map: DeviceMap,
    *,
    max_memory: Mapping[str, int | float | str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.device]:
    """``device_map`` completed and checked: every part named once (``"blocks"`` stands for every block
    not named on its own), devices readable, a tied unembedding with its embedding, and, where budgets are
    known (``max_memory``, or free CUDA memory for the CUDA devices used), what each device gets fits."""
    sizes = part_sizes(model, dtype)
    parts = list(sizes)
    default = device_map.get("blocks")
    unknown = [k for k in device_map if k not in sizes and k != "blocks"]
    if unknown:
        raise ValueError(
            f"device_map has unknown part {unknown[0]!r}: the parts are 'embed', 'blocks.0' .. "
            f"'blocks.{len(parts) - 3}' (or 'blocks' for all of them) and 'unembed'"
        )
    missing = [
        p for p in parts if p not in device_map and not (default is not None and p.startswith("blocks."))
    ]
    if missing:
        raise ValueError(
            f"device_map names no device for {missing[0]!r}"
            + (f" and {len(missing) - 1} more parts" if len(missing) > 1 else "")
            + " (every part needs one: 'embed', each 'blocks.i' or 'blocks', 'unembed')"
        )
    plan = {p: _device(device_map[p] if p in device_map else default) for p in parts}  # type: ignore[arg-type]
    if _tied(model) and plan[UNEMBED] != plan[EMBED]:
        raise ValueError(
            f"the model ties its unembedding to its embedding, so 'unembed' must be on 'embed''s device "
            f"({plan[EMBED]}), got {plan[UNEMBED]}"
        )
    if max_memory is not None:
        budgets = device_budgets(max_memory)
    else:
        budgets = {
            d: int(torch.cuda.mem_get_info(d.index or 0)[0])
            for d in set(plan.values())
            if d.type == "cuda" and torch.cuda.is_available()
        }
    load: dict[torch.device, int] = {}
    for p, d in plan.items():
        load[d] = load.get(d, 0) + sizes[p]
    for d, n in load.items():
        if d in budgets and n > budgets[d]:
            on = [p for p in parts if plan[p] == d]
            raise ValueError(
                _does_not_fit(
                    sizes,
                    budgets,
                    f"the device_map puts {_gib(n)} on {d} ({_span(on)}), which has {_gib(budgets[d])}",
                )
            )
    return plan


def resolve_device_map(
    model: nn.Module | ModelConfig,
    device_map: str | DeviceMap,
    *,
    max_memory: Mapping[str, int | float | str] | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.device]:
    """``"auto"`` (`infer_device_map`) or an explicit map (`check_device_map`), as a complete plan."""
    if isinstance(device_map, str):
        if device_map != "auto":
            raise ValueError(f'device_map must be "auto" or a dict of part -> device, got {device_map!r}')
        return infer_device_map(model, max_memory=max_memory, dtype=dtype)
    return check_device_map(model, device_map, max_memory=max_memory, dtype=dtype)


def dispatch(model: Transformer, device_map: str | DeviceMap, **kwargs) -> Transformer:
    """Move ``model``'s parts onto the devices of ``device_map`` (in place; returns the model). ``kwargs``
    (``max_memory``) go to `resolve_device_map`."""
    plan = resolve_device_map(model, device_map, **kwargs)
    for name, module in _part_modules(model):
        module.to(plan[name])
    return model


def device_map_of(model: Transformer) -> dict[str, torch.device]:
    """Where each part of ``model`` is now (the device of its first weight)."""
    plan: dict[str, torch.device] = {}
    for name, module in _part_modules(model):
        p = next(module.parameters(), None)
        if p is not None:
            plan.setdefault(name, p.device)
    return plan


def meta_layers(device_map: Mapping[str, torch.device] | None) -> frozenset[int]:
    """The blocks a (complete) device map puts on ``meta``: a loader never reads their weights."""
    return frozenset(
        int(p.split(".")[1])
        for p, d in (device_map or {}).items()
        if p.startswith("blocks.") and d.type == "meta"
    )


def _part_modules(model: Transformer) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_children():
        if name == "blocks":
            for i, block in enumerate(model.blocks):
                yield f"blocks.{i}", block
        else:
            yield part_of(name), module


def _tied(model: nn.Module | ModelConfig) -> bool:
    cfg = model if isinstance(model, ModelConfig) else model.cfg
    return bool(cfg.tie_embeddings)  # type: ignore[union-attr]


def _span(parts: list[str]) -> str:
    blocks = [int(p.split(".")[1]) for p in parts if p.startswith("blocks.")]
    named = [p for p in parts if not p.startswith("blocks.")]
    if blocks:
        named.insert(1 if EMBED in named else 0, f"blocks.{min(blocks)}..{max(blocks)}")
    return ", ".join(named)


def _does_not_fit(sizes: dict[str, int], budgets: dict[torch.device, int], why: str) -> str:
    n_blocks = len(sizes) - 2
    block = max((sizes[f"blocks.{i}"] for i in range(n_blocks)), default=0)
    return (
        f"the model does not fit: {why}. It needs {_gib(sum(sizes.values()))} of weights (embed "
        f"{_gib(sizes[EMBED])}, {n_blocks} blocks of up to {_gib(block)}, unembed {_gib(sizes[UNEMBED])}); "
        f"available: {', '.join(f'{d} {_gib(b)}' for d, b in budgets.items())} (total {_gib(sum(budgets.values()))})"
    )
