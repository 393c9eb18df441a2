"""Run under torchrun (2 CPU processes, gloo) by test_train.py: each rank trains on its half of every batch;
rank 0 saves the SAE to argv[1]."""

import sys

import torch
import torch.distributed as dist

from interplab.sae import SAEConfig, create_sae
from interplab.sae.recovery import SyntheticFeatures
from interplab.sae.train import SAETrainConfig, train_saes

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(rank)  # different init per rank: train_saes must broadcast rank 0's
sae = create_sae(
    SAEConfig(d_in=16, d_sae=64, architecture=sys.argv[2], k=4 if sys.argv[2] == "topk" else None)
)
batches = [{"x": b["x"][rank::world]} for b in SyntheticFeatures(n_features=32, d=16).batches(64, 20, seed=5)]
cfg = SAETrainConfig(
    total_steps=20,
    lr=1e-2,
    coefficient=0.1,
    autocast=False,
    warmup_steps=2,
    log_every=5,
    dead_after_tokens=10**9,
    b_dec_init="zeros",
)
train_saes(sae, batches, cfg, run_dir=sys.argv[1] if rank == 0 else None)
dist.destroy_process_group()
