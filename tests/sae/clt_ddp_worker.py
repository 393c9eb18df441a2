"""Run under torchrun (2 CPU processes, gloo) by test_clt_train.py: each rank trains a CLT on its half of every
activation batch; rank 0 writes the run to argv[1]. Imported by the test for the same data and config."""

import sys

import torch

from interplab.sae.clt import CLTConfig
from interplab.sae.clt_train import CLTTrainConfig, train_clt

CFG = CLTTrainConfig(
    clt=CLTConfig(n_layers=2, d_model=8, d_sae=16), total_steps=12, batch_size=32, lr=1e-2, log_every=4
)
HOOKS = [
    "blocks.0.hook_resid_mid",
    "blocks.0.hook_mlp_out",
    "blocks.1.hook_resid_mid",
    "blocks.1.hook_mlp_out",
]


def batches(rank: int, world: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(CFG.total_steps):
        full = {h: torch.randn(64, 8, generator=g) * (i + 1) for i, h in enumerate(HOOKS)}
        out.append({h: v[rank::world] for h, v in full.items()})
    return out


if __name__ == "__main__":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    train_clt(None, batches(rank, world), CFG, sys.argv[1])
    dist.destroy_process_group()
