"""Run under torchrun (CPU, gloo) by test_distributed.py: ``dist_worker.py OUT STEPS`` caches activations
rank-sharded into OUT/cache, trains one SAE data-parallel from it into OUT/run (recording each rank's rows and its
initial and final weights in OUT/rows_RANK.pt) and spreads a 3-SAE sweep over the ranks into OUT/sweep.

Environment: ``KILL_STEP=k`` makes rank 1 write its pid to OUT/pid when it reaches step k and wait there (the
test kills it); ``HANG_STEP=k`` makes rank 1 sleep at step k instead (rank 0's monitored barrier times out);
``ONLY=train`` skips the sweep."""

import os
import sys
import time
from pathlib import Path

import torch

from interplab.sae import SAEConfig, create_sae
from interplab.sae.activations import SkippableBatches
from interplab.sae.disk_store import cache_activations
from interplab.sae.sweep import cache_source, plan_sweep, train_sweep
from interplab.sae.train import train_saes
from interplab.train.distributed import init_distributed, shutdown
from tests.sae.dist_setup import HOOK, SWEEP, sweep_config, tiny_model, token_stream, train_config

torch.set_num_threads(1)
out, steps = Path(sys.argv[1]), int(sys.argv[2])
info = init_distributed(torch.device("cpu"))
rank = info.rank
model = tiny_model()
cache_activations(model, token_stream(), [HOOK], out / "cache", shard_rows=100, source={"test": 1})

kill_step, hang_step = int(os.environ.get("KILL_STEP", -1)), int(os.environ.get("HANG_STEP", -1))
seen: list[torch.Tensor] = []


def record(batches, start):
    for step, batch in enumerate(batches, start):
        if rank == 1 and step == kill_step:
            (out / "pid.tmp").write_text(str(os.getpid()))
            (out / "pid.tmp").rename(out / "pid")
            time.sleep(300)
        if rank == 1 and step == hang_step:
            time.sleep(300)
        seen.append(batch[HOOK].clone())
        yield batch


torch.manual_seed(0)
# each rank draws its own initial weights (rank 0's are the one-process reference's, seed 0): the ranks train
# one SAE only because the trainer broadcasts rank 0's weights at start-up (`create_sae` alone would make them
# equal by seeding, and a missing broadcast would go unseen)
sae = create_sae(SAEConfig(d_in=32, d_sae=64, architecture="relu", hook_name=HOOK), seed=rank)
initial = {k: v.clone() for k, v in sae.state_dict().items()}
source = cache_source(out / "cache", [HOOK], batch_size=32, steps=steps)
batches = SkippableBatches(lambda start: record(source.batches.from_batch(start), start))
result = train_saes(sae, batches, train_config(steps), run_dir=out / "run", data=source.data)
# the rows this process trained on in this launch, and the tokens the trainer counted
torch.save({"rows": torch.cat(seen), "tokens": result.tokens, "resumed_from": result.resumed_from,
            "local_rank": info.local_rank, "world": info.world, "initial": initial,
            "final": {k: v.clone() for k, v in sae.state_dict().items()}},
           out / f"rows_{rank}.pt")  # fmt: skip

if os.environ.get("ONLY") != "train":
    cfg = sweep_config()
    src = cache_source(out / "cache", [HOOK], batch_size=cfg.batch_size, steps=cfg.steps, spread=True)
    train_sweep(plan_sweep(src.widths, cfg), src, cfg, out / "sweep", spread=True)
shutdown(info)
assert SWEEP  # (imported for the test's reference run)
