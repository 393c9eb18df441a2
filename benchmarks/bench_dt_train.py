"""Decision-transformer training throughput on CPU: `interplab.rl.train_dt` (the hooked Transformer, the run
folder, the JSONL log) against a bare PyTorch DT loop of the same size (nanoGPT-style blocks, the same
embeddings, batches, optimizer, schedule and clipping), in interleaved rounds, medians of wall and CPU time.
``train_dt`` uses AdamW's fused kernel on CPU; ``bare`` is the loop one writes with torch's default AdamW
(a Python loop over the parameters), ``bare_fused`` the same loop with ``AdamW(fused=True)``: the ratio to
``bare`` is the issue's "at least as fast as a bare loop", the ratio to ``bare_fused`` what is left of
interplab's own overhead (the hooked Transformer, the run folder, the log).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_dt_train.py --out benchmarks/results/dt_train.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from interplab.rl.model import DTConfig  # noqa: E402
from interplab.rl.train import (  # noqa: E402
    DTTrainConfig,
    WindowSampler,
    batch_ends,
    dt_preset,
    split_steps,
    train_dt,
)
from interplab.rl.trajectories import Trajectories  # noqa: E402
from interplab.train.config import CheckpointConfig  # noqa: E402
from interplab.train.sources import cosine_lr  # noqa: E402


def random_data(n_episodes: int, length: int, env: str, seed: int = 0) -> Trajectories:
    """Episodes of random MiniGrid-shaped observations and actions (throughput does not depend on content)."""
    g = torch.Generator().manual_seed(seed)
    n = n_episodes * length
    obs = torch.stack([torch.randint(0, k, (n, 7, 7), generator=g) for k in (11, 6, 3)], -1).to(torch.uint8)
    rewards = torch.zeros(n)
    rewards[length - 1 :: length] = torch.rand(n_episodes, generator=g)
    dones = torch.zeros(n, dtype=torch.bool)
    dones[length - 1 :: length] = True
    return Trajectories(
        env=env,
        obs=obs,
        actions=torch.randint(0, 7, (n,), generator=g),
        rewards=rewards,
        dones=dones,
        episode_starts=torch.arange(0, n + 1, length),
        seeds=torch.arange(n_episodes),
        source="random",
    )


class BareBlock(nn.Module):
    def __init__(self, d: int, heads: int, d_mlp: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, d_mlp), nn.Linear(d_mlp, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, p, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, p, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(z.transpose(1, 2).reshape(b, p, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class BareDT(nn.Module):
    """A hand-written decision transformer of the same size as `DecisionTransformer` (no hooks)."""

    def __init__(self, cfg: DTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.rtg = nn.Linear(1, d)
        self.state = nn.EmbeddingBag(49 * sum(cfg.obs_values), d, mode="sum")
        self.action = nn.Embedding(cfg.n_actions + 1, d)
        self.time = nn.Embedding(max(3 * cfg.context, cfg.max_timestep + 1), d)
        self.blocks = nn.ModuleList([BareBlock(d, cfg.n_heads, cfg.d_mlp) for _ in range(cfg.n_layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.n_actions, bias=False)
        offsets = torch.tensor([0, *cfg.obs_values[:-1]]).cumsum(0)
        self.register_buffer("base", torch.arange(49).view(7, 7, 1) * sum(cfg.obs_values) + offsets)

    def forward(self, rtg, obs, actions, timesteps, mask):
        b, t = rtg.shape
        s = self.state((self.base + obs.long()).flatten(0, 1).flatten(1)).view(b, t, -1)
        x = torch.stack([self.rtg(rtg[..., None]), s, self.action(actions)], 2).flatten(1, 2)
        x = x + self.time(timesteps.repeat_interleave(3, 1))
        keys = mask.repeat_interleave(3, 1)
        allowed = torch.ones(3 * t, 3 * t, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]
        allowed = allowed | torch.eye(3 * t, dtype=torch.bool)  # a pad query sees itself
        for block in self.blocks:
            x = block(x, allowed)
        return self.head(self.ln(x))[:, 1::3]


def bare_loop(
    model_cfg: DTConfig, cfg: DTTrainConfig, data: Trajectories, steps: int, fused: bool = False
) -> tuple[float, float]:
    torch.manual_seed(cfg.seed)
    model = BareDT(model_cfg)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused or None
    )
    sampler = WindowSampler(data, model_cfg.context)
    train_steps, _ = split_steps(sampler, cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(
                step - 1, lr=cfg.lr, warmup=cfg.warmup, total=cfg.steps, min_ratio=cfg.min_lr_ratio
            )
        w = sampler.windows(batch_ends(train_steps, cfg, step))
        logits = model(*w.inputs())
        loss = F.cross_entropy(logits[w.mask], w.actions[w.mask])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % cfg.log_every == 0:
            float(loss.detach())
    return time.perf_counter() - t0, time.process_time() - c0


def interplab_run(
    model_cfg: DTConfig, cfg: DTTrainConfig, data: Trajectories, folder: Path
) -> tuple[float, float]:
    shutil.rmtree(folder, ignore_errors=True)
    train_dt(model_cfg, cfg, data, folder, device="cpu")
    report = json.loads((folder / "report.json").read_text())
    return report["seconds"] - report["checkpoint_seconds"] - report["eval_seconds"], report[
        "train_cpu_seconds"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/dt_train.json")
    parser.add_argument("--preset", default="memory-dt-tiny")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model_cfg, train_cfg = dt_preset(args.preset)
    cfg = train_cfg.replace(
        steps=args.steps,
        val_fraction=0.0,
        eval_every=10**9,
        checkpoints=CheckpointConfig(log_spaced=0),
    )
    data = random_data(400, 20, model_cfg.env)
    tokens = args.steps * cfg.batch_size * 3 * model_cfg.context
    names = ("interplab", "bare", "bare_fused")
    wall: dict[str, list[float]] = {k: [] for k in names}
    cpu: dict[str, list[float]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        bare_loop(model_cfg, cfg, data, 3)  # warm up every path once
        bare_loop(model_cfg, cfg, data, 3, fused=True)
        interplab_run(model_cfg, cfg.replace(steps=3), data, Path(tmp) / "warm")
        for _ in range(args.rounds):
            for name in names:
                w, c = (
                    interplab_run(model_cfg, cfg, data, Path(tmp) / "run")
                    if name == "interplab"
                    else bare_loop(model_cfg, cfg, data, args.steps, fused=name == "bare_fused")
                )
                wall[name].append(w)
                cpu[name].append(c)
    med = {k: statistics.median(v) for k, v in wall.items()}
    cmed = {k: statistics.median(v) for k, v in cpu.items()}
    results = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "note": (
            "medians over interleaved rounds; interplab's seconds are its training loop minus checkpoint writes "
            "and evaluation (both off but the first and last checkpoint); tokens = steps x batch x 3 x context"
        ),
        "preset": args.preset,
        "model": model_cfg.to_dict(),
        "steps": args.steps,
        "batch_size": cfg.batch_size,
        "tokens": tokens,
        "rounds": args.rounds,
        "seconds_all": wall,
        "cpu_seconds_all": cpu,
        "seconds_median": med,
        "cpu_seconds_median": cmed,
        "tokens_per_s": {k: tokens / v for k, v in med.items()},
        "tokens_per_cpu_s": {k: tokens / v for k, v in cmed.items()},
        "interplab_over_bare_cpu": cmed["interplab"] / cmed["bare"],
        "interplab_over_bare_wall": med["interplab"] / med["bare"],
        "interplab_over_bare_fused_cpu": cmed["interplab"] / cmed["bare_fused"],
        "interplab_over_bare_fused_wall": med["interplab"] / med["bare_fused"],
    }
    assert math.isfinite(results["interplab_over_bare_cpu"])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: results[k]
                for k in ("tokens_per_cpu_s", "interplab_over_bare_cpu", "interplab_over_bare_fused_cpu")
            }
        )
    )


if __name__ == "__main__":
    main()
