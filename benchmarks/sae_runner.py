"""One timed SAE training run in a fresh process (used by bench_sae.py, one call per contender and round).

``python sae_runner.py --impl ours|torch|saelens --arch relu|topk --data FILE --steps N`` prints one JSON
line: wall and CPU seconds of the timed steps (after one warm-up step), tokens, peak RSS. ``saelens`` runs
SAELens' own training step (the body of ``SAETrainer._train_step``: training_forward_pass, firing stats,
backward, grad-norm clipping, Adam) and needs a Python with sae_lens; ``torch`` is a bare float32 dense loop.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

D_SAE, K, L1 = 4096, 32, 5.0


def batches(data: torch.Tensor, batch: int, n: int) -> list[torch.Tensor]:
    return [data[(i * batch) % (data.shape[0] - batch + 1) :][:batch] for i in range(n)]


def run_ours(arch: str, xs: list[torch.Tensor]):
    from interplab.sae import SAEConfig, create_sae
    from interplab.sae.train import SAETrainConfig, train_saes

    sae = create_sae(
        SAEConfig(d_in=xs[0].shape[1], d_sae=D_SAE, architecture=arch, k=K if arch == "topk" else None)
    )
    cfg = SAETrainConfig(
        total_steps=len(xs), coefficient=L1 if arch == "relu" else 0.0, log_every=10**9, warmup_steps=1
    )
    train_saes(sae, [{"x": xs[0]}], SAETrainConfig(total_steps=1, log_every=10**9))  # warm-up step
    return lambda: train_saes(sae, [{"x": x} for x in xs[1:]], cfg)


def run_torch(arch: str, xs: list[torch.Tensor]):
    d = xs[0].shape[1]
    W_enc = torch.nn.Parameter(torch.randn(d, D_SAE) / d**0.5)
    W_dec = torch.nn.Parameter(W_enc.detach().T.clone())
    b_enc, b_dec = torch.nn.Parameter(torch.zeros(D_SAE)), torch.nn.Parameter(torch.zeros(d))
    opt = torch.optim.Adam([W_enc, W_dec, b_enc, b_dec], lr=3e-4)

    def step(x):
        pre = (x - b_dec) @ W_enc + b_enc
        if arch == "topk":
            v, i = pre.topk(K, dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, i, v.relu())
        else:
            acts = pre.relu()
        recon = acts @ W_dec + b_dec
        loss = (recon - x).pow(2).sum(-1).mean()
        if arch == "relu":
            loss = loss + L1 * (acts @ W_dec.norm(dim=-1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(xs[0])
    return lambda: [step(x) for x in xs[1:]]


def run_saelens(arch: str, xs: list[torch.Tensor]):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    d = xs[0].shape[1]
    if arch == "topk":
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=D_SAE, k=K))
        coeffs = {}
    else:
        sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d, d_sae=D_SAE, l1_coefficient=L1))
        coeffs = {"l1": L1}
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    since_fired = torch.zeros(D_SAE)

    def step(x, n):
        out = sae.training_forward_pass(
            TrainStepInput(
                sae_in=x,
                coefficients=coeffs,
                dead_neuron_mask=since_fired > 1e9,
                n_training_steps=n,
                is_logging_step=False,
            )
        )
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    step(xs[0], 0)
    return lambda: [step(x, n) for n, x in enumerate(xs[1:], start=1)]


def _peak_rss_mb() -> float:
    """This process' own peak RSS (VmHWM; ru_maxrss would include the parent's peak inherited across exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["ours", "torch", "saelens"], required=True)
    p.add_argument("--arch", choices=["relu", "topk"], required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    xs = batches(load_file(a.data)["x"], a.batch, a.steps + 1)
    fn = {"ours": run_ours, "torch": run_torch, "saelens": run_saelens}[a.impl](a.arch, xs)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    peak = _peak_rss_mb()
    print(
        json.dumps(
            {
                "impl": a.impl,
                "arch": a.arch,
                "wall_s": wall,
                "cpu_s": cpu,
                "tokens": a.steps * a.batch,
                "peak_rss_mb": peak,
            }
        )
    )


if __name__ == "__main__":
    main()
