"""Training-step overhead of gradient routing vs the same step without routes.

Contenders, interleaved in rounds on the same model and batch:
- ``plain``: forward + backward + AdamW step;
- ``routed``: the same under activation routes on every layer's MLP neurons and residual stream (per-token
  labels, two groups), i.e. masks built and applied every step;
- ``routed_definition``: the same routes written as ``m * a + (1 - m) * a.detach()`` hooks (for reference).
Also the split-autoencoder step of the digits experiment (a tiny MLP: the worst case for relative overhead).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_routing.py --out benchmarks/results/routing.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from interplab.model import ModelConfig, Transformer
from interplab.routing import Route, Router


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def transformer_case(rounds: int, steps: int) -> dict:
    cfg = ModelConfig(
        d_model=128, n_layers=2, n_heads=4, d_mlp=512, d_vocab=256, n_ctx=128, positional="rotary"
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 256, (16, 129))
    labels = torch.randint(0, 2, (16, 128))
    routes = []
    for layer in range(cfg.n_layers):
        routes.append(Route.from_regions(f"blocks.{layer}.mlp.hook_post", width=512,
                                         regions={0: range(256), 1: range(256, 512)}))  # fmt: skip
        routes.append(Route.from_regions(f"blocks.{layer}.hook_resid_post", width=128,
                                         regions={0: range(64), 1: range(64, 128)}))  # fmt: skip
    router = Router(routes)

    def definition_hook(route):
        def fn(x, _site):
            m = route.mask(labels, x.shape)
            return m * x + (1 - m) * x.detach()

        return fn

    def step():
        opt.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[:, 1:].reshape(-1)).backward()
        opt.step()

    def plain():
        for _ in range(steps):
            step()

    def routed():
        for _ in range(steps):
            with router.apply(model, labels):
                step()

    def routed_definition():
        for _ in range(steps):
            with model.hooks([(r.site, definition_hook(r)) for r in routes]):
                step()

    return run_rounds({"plain": plain, "routed": routed, "routed_definition": routed_definition}, rounds,
                      steps, cfg.to_dict())  # fmt: skip


def digits_case(rounds: int, steps: int) -> dict:
    from interplab.routing.digits import SplitAutoencoder, correlation_penalty

    torch.manual_seed(0)
    model = SplitAutoencoder(32, 128)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(128, 64)
    groups = torch.randint(0, 2, (128,))
    router = Router([Route.from_regions("code", width=32, regions={0: range(16), 1: range(16, 32)})])

    def step():
        z, recon = model(x)
        loss = (recon - x).pow(2).sum(1).mean() + 0.02 * z.abs().sum(1).mean() + 0.1 * correlation_penalty(z)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def plain():
        for _ in range(steps):
            step()

    def routed():
        for _ in range(steps):
            with router.apply(model, groups):
                step()

    return run_rounds(
        {"plain": plain, "routed": routed}, rounds, steps, {"latent": 32, "hidden": 128, "batch": 128}
    )


def run_rounds(contenders: dict, rounds: int, steps: int, setup: dict) -> dict:
    for fn in contenders.values():  # warm up
        fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            samples[name].append(timed(fn))
    out: dict = {"setup": setup, "steps_per_round": steps, "rounds": rounds, "contenders": {}}
    for name, values in samples.items():
        out["contenders"][name] = {
            "median_wall_ms_per_step": 1e3 * statistics.median(v[0] for v in values) / steps,
            "median_cpu_ms_per_step": 1e3 * statistics.median(v[1] for v in values) / steps,
        }
    base = out["contenders"]["plain"]
    for value in out["contenders"].values():
        value["wall_ratio_vs_plain"] = value["median_wall_ms_per_step"] / base["median_wall_ms_per_step"]
        value["cpu_ratio_vs_plain"] = value["median_cpu_ms_per_step"] / base["median_cpu_ms_per_step"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/routing.json")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(args.threads)
    result = {
        "benchmark": "routing step overhead",
        "goal": "routed / plain step time < 1.10",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
                    "cpu_count": os.cpu_count(), "note": "shared 2-core machine; CPU time is the steadier figure"},
        "transformer_lm_step": transformer_case(args.rounds, 5),
        "digits_autoencoder_step": digits_case(args.rounds, 50),
        "peers": "none: no other library implements gradient routing as a training feature",
    }  # fmt: skip
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for case in ("transformer_lm_step", "digits_autoencoder_step"):
        for name, value in result[case]["contenders"].items():
            print(f"{case:24s} {name:18s} {value['median_cpu_ms_per_step']:8.2f} ms cpu/step  "
                  f"ratio {value['cpu_ratio_vs_plain']:.3f} (wall {value['wall_ratio_vs_plain']:.3f})")  # fmt: skip


if __name__ == "__main__":
    main()
