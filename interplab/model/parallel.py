"""Pipeline-parallel inference over ``torch.distributed``: a model split by layers across processes (one per
GPU, or several CPU processes on the gloo backend), each rank holding only its own blocks.

Launch one process per stage with torchrun; every rank runs the same script on the same tokens:

    torchrun --nproc_per_node 2 my_script.py

    import torch.distributed as dist
    from interplab.model.parallel import PipelineModel

    dist.init_process_group("gloo")  # "nccl" on GPUs, with device=f"cuda:{local_rank}"
    model = PipelineModel.load("checkpoints/llama", device="cpu")
    logits = model(tokens)  # the same logits on every rank
    logits, cache = model.run_with_cache(tokens)  # the cache holds this rank's own hook points

Rank 0 embeds the tokens and runs the first blocks, sends the residual stream to rank 1 (``dist.send``),
which runs the next blocks, and so on; the last rank applies the final norm and the unembedding and
broadcasts the logits, so every rank returns them (and `interplab.model.generate.generate` works on a
`PipelineModel` given token ids, every rank choosing the same tokens). Blocks of other ranks stay on the ``meta`` device:
their weights are never read from the checkpoint. Hooks, caching and patching work on the hook points of the
rank's own blocks (``hook_embed`` etc. on the first rank, ``ln_final``/``unembed`` points on the last); a
hook point named on a rank that does not own it is an error naming the rank that does.

This is inference only: one micro-batch at a time, so the ranks take turns (memory scales with the ranks,
not speed; split batches across calls or data-parallel replicas for throughput).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from interplab.hooks.cache import ActivationCache
from interplab.hooks.points import HookFn, HookTarget
from interplab.hooks.site import Site, SiteKind
from interplab.model import compat
from interplab.model.compat import ReturnType
from interplab.model.kv_cache import KVCache
from interplab.model.load import load_config, load_model
from interplab.model.placement import EMBED, UNEMBED
from interplab.model.transformer import Transformer

_FIRST_KINDS = (SiteKind.EMBED, SiteKind.POS_EMBED)


def stage_layers(n_layers: int, world_size: int) -> list[range]:
    """The blocks of each rank: contiguous, as even as possible, earlier ranks taking one more."""
    if world_size < 1 or world_size > n_layers:
        raise ValueError(
            f"a pipeline of {world_size} ranks needs between 1 and n_layers={n_layers} ranks (one block or more each)"
        )
    q, r = divmod(n_layers, world_size)
    starts = [i * q + min(i, r) for i in range(world_size + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(world_size)]


def stage_device_map(
    n_layers: int, rank: int, world_size: int, device: str | torch.device = "cpu", *, tied: bool = False
) -> dict[str, torch.device]:
    """The device map of ``rank``: its blocks on ``device``, every other block on ``meta``; the embedding on
    the first rank, the final norm and unembedding on the last (both on both when the embeddings are tied,
    since the unembedding then reads the embedding)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
    mine = stage_layers(n_layers, world_size)[rank]
    here, meta = torch.device(device), torch.device("meta")
    first, last = rank == 0, rank == world_size - 1
    plan = {EMBED: here if first or (tied and last) else meta}
    plan |= {f"blocks.{i}": here if i in mine else meta for i in range(n_layers)}
    plan[UNEMBED] = here if last or (tied and first) else meta
    return plan


class PipelineModel(nn.Module):
    """One rank's stage of a `Transformer` split across the ranks of a process group (see the module
    docstring). ``model`` holds real weights for this rank's blocks and ``meta`` ones elsewhere
    (`stage_device_map`, as `PipelineModel.load` builds it)."""

    def __init__(self, model: Transformer, *, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError(
                "PipelineModel needs torch.distributed: run under torchrun and call "
                "torch.distributed.init_process_group first"
            )
        self.model = model
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        mine = [i for i, b in enumerate(model.blocks) if b.attn.W_Q.device.type != "meta"]
        layers = stage_layers(model.cfg.n_layers, self.world_size)
        if mine != list(layers[self.rank]):
            raise ValueError(
                f"rank {self.rank} of {self.world_size} must hold blocks {list(layers[self.rank])} "
                f"(stage_device_map), it holds {mine}"
            )
        self.layers = layers[self.rank]
        self.first, self.last = self.rank == 0, self.rank == self.world_size - 1
        if (self.first and model.W_E.is_meta) or (self.last and model.W_U.is_meta):
            raise ValueError(
                "the first rank needs the embedding and the last the unembedding (stage_device_map)"
            )
        w = model.blocks[self.layers.start].attn.W_Q
        self.device, self.dtype = w.device, w.dtype
        self.cfg = model.cfg

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        group: dist.ProcessGroup | None = None,
        **kwargs: Any,
    ) -> PipelineModel:
        """Load this rank's stage of the model at ``path`` (an interplab or Hugging Face folder, as
        `interplab.load_model`; ``kwargs`` go there): only its own weights are read."""
        if not dist.is_initialized():
            raise RuntimeError(
                "PipelineModel.load needs torch.distributed.init_process_group first (torchrun)"
            )
        cfg = load_config(path)
        plan = stage_device_map(
            cfg.n_layers, dist.get_rank(group), dist.get_world_size(group), device, tied=cfg.tie_embeddings
        )
        return cls(load_model(path, dtype=dtype, device_map=plan, **kwargs), group=group)

    # ---- what generate() and the analyses use -------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self.model.tokenizer

    def to_tokens(self, text: str | list[str], **kwargs: Any) -> Tensor:
        return self.model.to_tokens(text, **kwargs).to(self.device)

    def to_string(self, tokens: Tensor | list[int]) -> str | list[str]:
        return self.model.to_string(tokens)

    def new_kv_cache(self) -> KVCache:
        return self.model.new_kv_cache()

    def owner(self, name: HookTarget) -> int | None:
        """The rank whose stage computes hook point ``name`` (None for a filter function)."""
        if callable(name) and not isinstance(name, (str, Site)):
            return None
        site = Site.parse(name)
        if site.layer is None:
            return 0 if site.kind in _FIRST_KINDS else self.world_size - 1
        layers = stage_layers(self.cfg.n_layers, self.world_size)
        return next(r for r, rng in enumerate(layers) if site.layer in rng)

    def _check_own(self, targets: Sequence[HookTarget]) -> None:
        for t in targets:
            owner = self.owner(t)
            if owner is not None and owner != self.rank:
                raise ValueError(
                    f"hook point {Site.parse(t).name!r} is computed by rank {owner}, not by this rank "  # type: ignore[arg-type]
                    f"({self.rank}, blocks {self.layers.start}..{self.layers.stop - 1}): attach it there"
                )

    def hooks(
        self,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        read_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
    ):
        """`Transformer.hooks` on this rank's own hook points."""
        self._check_own([t for t, _ in [*fwd_hooks, *bwd_hooks, *read_hooks]])
        return self.model.hooks(fwd_hooks, bwd_hooks, read_hooks)

    # ---- the forward ----------------------------------------------------------------------------------
    def forward(
        self,
        tokens: Tensor,
        *,
        attention_mask: Tensor | None = None,
        kv_cache: KVCache | None = None,
        return_type: ReturnType = "logits",
        loss_per_token: bool = False,
    ) -> Any:
        """`Transformer.forward` through the pipeline; every rank passes the same ``tokens`` (and mask) and
        gets the same result. ``kv_cache``: each rank's own (`new_kv_cache`), holding its own layers."""
        compat.check_return_type(return_type, None)
        m = self.model
        tokens = m.check_tokens(tokens, kv_cache).to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        ctx = m.context(tokens, attention_mask, kv_cache)
        b, p = tokens.shape
        if self.first:
            resid = m.embed_tokens(tokens, ctx)
        else:
            resid = torch.empty(b, p, self.cfg.d_model, dtype=self.dtype, device=self.device)
            dist.recv(resid, src=self._global(self.rank - 1), group=self.group)
        resid = m.run_blocks(resid, ctx, start=self.layers.start, stop=self.layers.stop, kv_cache=kv_cache)
        if not self.last:
            dist.send(resid.to(self.dtype).contiguous(), dst=self._global(self.rank + 1), group=self.group)
            logits = torch.empty(b, p, self.cfg.d_vocab_out, dtype=self.dtype, device=self.device)
        else:
            logits = m.unembed_resid(resid).to(self.dtype).contiguous()
        if return_type is not None:
            dist.broadcast(logits, src=self._global(self.world_size - 1), group=self.group)
        return compat.finish(logits, tokens, return_type, attention_mask, loss_per_token)

    def run_with_hooks(
        self, tokens: Tensor, fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (), **kwargs: Any
    ) -> Any:
        with self.hooks(fwd_hooks):
            return self(tokens, **kwargs)

    def run_with_cache(
        self,
        tokens: Tensor,
        names: HookTarget | Sequence[HookTarget] | None = None,
        *,
        device: torch.device | str | None = None,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
        **kwargs: Any,
    ) -> tuple[Any, ActivationCache]:
        """The pipeline's output and a cache of this rank's own hook points (all of them when ``names`` is
        None; a name that another rank computes is an error)."""
        if names is not None:
            self._check_own(
                [names] if isinstance(names, (str, Site, tuple)) or callable(names) else list(names)
            )
        self._check_own([t for t, _ in fwd_hooks])
        return self.model.cache_call(
            lambda: self(tokens, **kwargs), names, device=device, fwd_hooks=fwd_hooks
        )

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)
