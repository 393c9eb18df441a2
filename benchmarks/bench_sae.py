"""SAE benchmark: training throughput vs SAELens and a bare float32 PyTorch loop, quality vs a float32 dense
reference, fraction of the machine's matmul rate, activation-caching throughput and bytes per token, peak memory.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_sae.py [--out benchmarks/results/sae.json] [--rounds 3]

Every contender runs in a fresh process (benchmarks/sae_runner.py), interleaved in rounds (the order rotates
each round); we report medians of wall and CPU time. On a shared machine CPU time is the fair measure (wall
time includes waiting for a core), so ratios use CPU time. SAELens runs from ``--saelens-python`` (a venv with
sae-lens and the CPU torch); if that is missing the JSON says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
D_IN, D_SAE, BATCH, K = 512, 4096, 4096, 32


def matmul_rates(reps: int = 5) -> dict[str, float]:
    """GFLOP/s of one [4096, 512] x [512, 4096] matmul per dtype (median of reps, CPU time)."""
    out = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        a, b = torch.randn(BATCH, D_IN, dtype=dt), torch.randn(D_IN, D_SAE, dtype=dt)
        a @ b
        times = []
        for _ in range(reps):
            c = time.process_time()
            a @ b
            times.append(time.process_time() - c)
        out[name] = 2 * BATCH * D_IN * D_SAE / statistics.median(times) / 1e9
    return out


def make_data(path: Path, n_tokens: int, seed: int = 0) -> None:
    """Synthetic activations: 8192 sparse directions in 512 dims (~32 active per token)."""
    from safetensors.torch import save_file

    from interplab.sae.recovery import SyntheticFeatures

    syn = SyntheticFeatures(n_features=8192, d=D_IN, probability=1 / 256, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.cat([syn.sample(4096, g) for _ in range(-(-n_tokens // 4096))])[:n_tokens]
    save_file({"x": x.contiguous()}, str(path))


def run(impl: str, arch: str, data: Path, steps: int, python: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    cmd = [
        python,
        str(ROOT / "benchmarks" / "sae_runner.py"),
        "--impl",
        impl,
        "--arch",
        arch,
        "--data",
        str(data),
        "--steps",
        str(steps),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{impl}/{arch} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def throughput(data: Path, rounds: int, steps: int, saelens_python: str | None) -> dict:
    contenders = [("ours", a) for a in ("relu", "topk")] + [("torch", a) for a in ("relu", "topk")]
    if saelens_python:
        contenders += [("saelens", a) for a in ("relu", "topk")]
    runs: dict[str, list[dict]] = {f"{i}/{a}": [] for i, a in contenders}
    for r in range(rounds):
        order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
        for impl, arch in order:
            py = saelens_python if impl == "saelens" else sys.executable
            runs[f"{impl}/{arch}"].append(run(impl, arch, data, steps, py))
    out = {}
    for key, rs in runs.items():
        tokens = rs[0]["tokens"]
        cpu = statistics.median(r["cpu_s"] for r in rs)
        wall = statistics.median(r["wall_s"] for r in rs)
        out[key] = {
            "tokens_per_s_cpu": tokens / cpu,
            "tokens_per_s_wall": tokens / wall,
            "cpu_s_per_step": cpu / steps,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "rounds": len(rs),
        }
    return out


def flop_rates(arch: str, tokens_per_s: float, rates: dict[str, float]) -> dict[str, float]:
    """Matmul FLOPs of one step per token: a dense step is 10 * d_in * d_sae (encoder forward and W_enc
    gradient, decoder forward and both gradients; b_dec's input gradient is a matrix-vector product). TopK
    needs only the encoder forward densely, 2 * d_in * d_sae, plus 8 * k * d_in for the sparse parts."""
    dense = 10 * D_IN * D_SAE
    needed = dense if arch == "relu" else 2 * D_IN * D_SAE + 8 * K * D_IN
    out = {
        "needed_gflops": needed * tokens_per_s / 1e9,
        "dense_equivalent_gflops": dense * tokens_per_s / 1e9,
    }
    for name in ("bfloat16", "float32"):
        out[f"needed_fraction_of_{name}_matmul"] = out["needed_gflops"] / rates[name]
    return out


def peak_memory(data: Path, saelens_python: str | None) -> dict:
    """Peak RSS (VmHWM) of one fresh process per contender: data, model, optimizer and one training step."""
    out = {}
    for impl in ("ours", "torch", "saelens"):
        if impl == "saelens" and not saelens_python:
            continue
        for arch in ("relu", "topk"):
            py = saelens_python if impl == "saelens" else sys.executable
            out[f"{impl}/{arch}"] = run(impl, arch, data, 2, py)["peak_rss_mb"]
    return out


def quality(data: Path, steps: int, archs: list[str], relu_coefficient: float, lr: dict[str, float]) -> dict:
    """Ours (bf16 autocast + sparse TopK) vs a float32 dense reference from the same init on the same tokens:
    FVU on held-out tokens."""
    from safetensors.torch import load_file

    from interplab.sae import SAEConfig, create_sae
    from interplab.sae.base import TrainStep
    from interplab.sae.kernels import scatter_latents
    from interplab.sae.train import SAETrainConfig, train_saes

    x = load_file(str(data))["x"]
    held = x[-8192:]
    xs = [x[i * BATCH : (i + 1) * BATCH] for i in range(steps)]
    assert (steps + 2) * BATCH <= x.shape[0], "not enough tokens for the quality run"
    out = {}
    for arch in archs:
        coef = relu_coefficient if arch == "relu" else 0.0
        cfg_sae = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=arch, k=K if arch == "topk" else None)
        torch.manual_seed(0)
        fast = create_sae(cfg_sae)
        ref = create_sae(cfg_sae)
        ref.load_state_dict(fast.state_dict())
        common = {
            "total_steps": steps,
            "coefficient": coef,
            "lr": lr[arch],
            "log_every": 10**9,
            "warmup_steps": 10,
            "dead_after_tokens": 10**12,
        }
        c = time.process_time()
        train_saes(fast, [{"x": b} for b in xs], SAETrainConfig(**common))
        fast_cpu = time.process_time() - c
        if arch == "topk":  # the reference TopK is dense: patch in a dense float32 train_forward

            def dense_forward(x_in, target, dead_mask, sae=ref):
                v, i = torch.addmm(sae.b_enc, x_in, sae.W_enc).topk(K, dim=-1)
                acts = scatter_latents(v.relu(), i, D_SAE)
                recon = acts @ sae.W_dec + sae.b_dec
                zero = recon.new_zeros(())
                return TrainStep(reconstruction=recon, feature_acts=acts, sparsity=zero, aux=zero)

            ref.train_forward = dense_forward
        c = time.process_time()
        train_saes(ref, [{"x": b} for b in xs], SAETrainConfig(**common, autocast=False, stats_every=1))
        ref_cpu = time.process_time() - c
        with torch.no_grad():
            var = (held - held.mean(0)).pow(2).sum()
            fvu = {
                name: float((m(held).reconstruction - held).pow(2).sum() / var)
                for name, m in (("fast", fast), ("ref", ref))
            }
            l0 = {
                name: float((m.encode(held) != 0).sum(-1).float().mean())
                for name, m in (("fast", fast), ("ref", ref))
            }
        out[arch] = {
            "steps": steps,
            "tokens": steps * BATCH,
            "lr": lr[arch],
            "coefficient": coef,
            "fvu_ours": fvu["fast"],
            "fvu_float32_dense": fvu["ref"],
            "fvu_relative_difference": (fvu["fast"] - fvu["ref"]) / fvu["ref"],
            "l0_ours": l0["fast"],
            "l0_float32_dense": l0["ref"],
            "cpu_s_ours": fast_cpu,
            "cpu_s_float32_dense": ref_cpu,
        }
    return out


def caching(tmp: Path, n_batches: int = 12) -> dict:
    """Write activations of a 2-layer d_model=512 model (random weights) at one hook: tokens/s and bytes/token
    for float32 and bfloat16, and the bf16 rounding error."""
    from interplab.model import ModelConfig, Transformer
    from interplab.sae.disk_store import DiskActivationStore, cache_activations

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=D_IN, n_layers=2, n_heads=8, d_vocab=4096, n_ctx=256, name="bench")
    )
    batches = [torch.randint(0, 4096, (8, 256)) for _ in range(n_batches)]
    out = {}
    for dtype in ("float32", "bfloat16"):
        w0, c0 = time.perf_counter(), time.process_time()
        res = cache_activations(
            model, batches, ["blocks.1.hook_resid_pre"], tmp / dtype, dtype=dtype, shard_rows=8192
        )
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        out[dtype] = {
            "rows": res.rows,
            "tokens_per_s_cpu": res.rows / cpu,
            "tokens_per_s_wall": res.rows / wall,
            "bytes_per_token": res.bytes_per_token,
        }
    a = DiskActivationStore(tmp / "float32").shard(0, "blocks.1.hook_resid_pre")
    b = DiskActivationStore(tmp / "bfloat16").shard(0, "blocks.1.hook_resid_pre").float()
    out["bfloat16"]["relative_rms_error"] = float((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt())
    store = DiskActivationStore(tmp / "bfloat16")
    c0 = time.process_time()
    n = sum(b_["blocks.1.hook_resid_pre"].shape[0] for b_ in store.batches(4096))
    out["bfloat16"]["shuffled_read_tokens_per_s_cpu"] = n / max(time.process_time() - c0, 1e-9)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sae.json"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="timed steps per contender run")
    p.add_argument("--quality-steps", type=int, default=60)
    p.add_argument(
        "--saelens-python",
        default=os.environ.get(
            "INTERPLAB_SAELENS_PYTHON", str(ROOT / ".peers" / "saelens" / "bin" / "python")
        ),
        help="the sae_lens peer (bash scripts/peers.sh saelens)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "quality", "caching", "peak"])
    p.add_argument("--quality-archs", nargs="*", default=["relu", "topk"], choices=["relu", "topk"])
    p.add_argument(
        "--relu-coefficient", type=float, default=0.3, help="L1 coefficient of the ReLU quality run"
    )
    p.add_argument("--relu-lr", type=float, default=2e-3)
    p.add_argument("--topk-lr", type=float, default=3e-4)
    p.add_argument("--merge", action="store_true", help="update the sections run in an existing --out JSON")
    a = p.parse_args()
    torch.set_num_threads(1)
    sl = a.saelens_python if Path(a.saelens_python).exists() else None
    result: dict = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
            "threads": 1,
            "load_average": os.getloadavg(),
        },
        "config": {"d_in": D_IN, "d_sae": D_SAE, "batch": BATCH, "k": K},
        "saelens": "installed (sae-lens 6.54.12, CPU torch 2.13.0)" if sl else "not installable / not found",
    }
    out_path = Path(a.out)
    if a.merge and out_path.exists():
        result = {**json.loads(out_path.read_text()), **{k: v for k, v in result.items() if k != "machine"}}
    result["matmul_gflops_cpu"] = rates = result.get("matmul_gflops_cpu") if a.merge else None
    if not rates:
        result["matmul_gflops_cpu"] = rates = matmul_rates()
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every section, so a long run leaves its partial results
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "acts.safetensors"
        make_data(data, (max(a.quality_steps, a.steps + 1) + 2) * BATCH)
        if "throughput" not in a.skip:
            tp = throughput(data, a.rounds, a.steps, sl)
            for arch in ("relu", "topk"):
                ours = tp[f"ours/{arch}"]["tokens_per_s_cpu"]
                tp[f"ours/{arch}"]["vs_torch_float32"] = ours / tp[f"torch/{arch}"]["tokens_per_s_cpu"]
                if sl:
                    tp[f"ours/{arch}"]["vs_saelens"] = ours / tp[f"saelens/{arch}"]["tokens_per_s_cpu"]
                tp[f"ours/{arch}"].update(flop_rates(arch, ours, rates))
            result["throughput"] = tp
            write()
        if "quality" not in a.skip:
            lrs = {"relu": a.relu_lr, "topk": a.topk_lr}
            q = quality(data, a.quality_steps, a.quality_archs, a.relu_coefficient, lrs)
            result["quality"] = {**result.get("quality", {}), **q}
            write()
        if "caching" not in a.skip:
            result["caching"] = caching(tmp)
            write()
        if "peak" not in a.skip:
            result["peak_rss_mb"] = peak_memory(data, sl)
        if "throughput" in result:
            for arch in ("relu", "topk"):
                result["throughput"][f"ours/{arch}"].update(
                    flop_rates(arch, result["throughput"][f"ours/{arch}"]["tokens_per_s_cpu"], rates)
                )
                for key in ("fraction_of_bf16_matmul", "fraction_of_float32_matmul"):
                    result["throughput"][f"ours/{arch}"].pop(key, None)
            for v in result["throughput"].values():
                v.pop("peak_rss_mb", None)  # per-process peaks live in result["peak_rss_mb"]
    write()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
