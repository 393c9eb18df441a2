"""Activations seen inside ``torch.func`` transforms (vmap, grad, jvp, functionalize).

Inside a transform a tensor is a wrapper (a ``BatchedTensor`` per vmap, a grad-tracking wrapper per grad
or jvp) that is only valid until the transform returns. A read hook that keeps it would keep a dead tensor,
so read hooks are shown `unwrapped` values: plain tensors that stay valid, with one leading dim per active
vmap (outermost first), as stacking the results of the equivalent loops would give.

>>> from torch.func import vmap
>>> seen = []
>>> def double(x):  # x: one row [2] of the batch
...     seen.append(unwrapped(x * 2))
...     return x * 2
>>> _ = vmap(double)(torch.ones(3, 2))
>>> seen[0].shape, is_transformed(seen[0])
(torch.Size([3, 2]), False)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._functorch.pyfunctorch import VmapInterpreter, retrieve_all_functorch_interpreters

_F = torch._C._functorch


def is_transformed(x: Tensor) -> bool:
    """Whether ``x`` is wrapped by a running ``torch.func`` transform (its values may not be read in Python)."""
    return bool(_F.is_functorch_wrapped_tensor(x))


def is_vmapped(x: Tensor) -> bool:
    """Whether a running ``torch.func.vmap`` batches ``x`` (at any depth of the transforms)."""
    while _F.is_functorch_wrapped_tensor(x):
        if _F.is_batchedtensor(x):
            return True
        x = _F.get_unwrapped(x)
    return False


def unwrapped(x: Tensor) -> Tensor:
    """``x`` as a plain tensor that outlives the transforms: under vmap ``[vmap dims..., *x.shape]`` with
    the dims of the active vmaps first, outermost first (a value no vmapped input reaches is expanded over
    them, as a loop would repeat it); under grad or jvp its values, outside their autograd. A plain ``x`` is
    returned as it is."""
    if not _F.is_functorch_wrapped_tensor(x):
        return x
    levels: list[int] = []  # the vmap levels of x's leading dims, in order
    while _F.is_functorch_wrapped_tensor(x):
        if _F.is_batchedtensor(x):
            levels.insert(0, _F.maybe_get_level(x))
            bdim = _F.maybe_get_bdim(x)
            x = _F.get_unwrapped(x).movedim(bdim, 0)
        else:
            x = _F.get_unwrapped(x)
    vmaps = sorted(
        (i for i in retrieve_all_functorch_interpreters() if isinstance(i, VmapInterpreter)),
        key=lambda i: i.level(),
    )
    for dim, vmap in enumerate(vmaps):
        if dim >= len(levels) or levels[dim] != vmap.level():
            x = x.unsqueeze(dim).expand(*x.shape[:dim], vmap.batch_size(), *x.shape[dim:])
            levels.insert(dim, vmap.level())
    return x
