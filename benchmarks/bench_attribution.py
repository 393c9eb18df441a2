"""Training-data attribution benchmark (JSON output).

1. Per-example projected gradients per second for the ``induction-2l`` model on CPU: ours (torch.func vmap,
   chunked) vs a naive loop (one backward pass per example, same projection), at 256 and 32 tokens per example,
   interleaved in rounds; medians of wall and CPU time.
2. Softmax regression on sklearn's digits: LDS and time of every method of ours, and of dattri's explicit
   influence functions, TRAK and TracIn on the same data and models when dattri is installed in a separate venv
   (``--dattri-python /tmp/dattri-venv/bin/python``).
3. Storage bytes per example per checkpoint of a recording.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution.py --out benchmarks/results/attribution.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from interplab.data_attribution import Projector, lds, lm_loss, param_group, per_example_grads  # noqa: E402
from interplab.data_attribution.convex import (  # noqa: E402
    _test_losses,
    digits,
    fit,
    lds_experiment,
)
from interplab.model import ModelConfig, Transformer  # noqa: E402

INDUCTION_2L = dict(
    d_model=128,
    n_layers=2,
    n_heads=4,
    d_vocab=1024,
    n_ctx=256,
    positional="rotary",
    attn_only=True,
    smear_keys=True,
)


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def per_example_speed(rounds: int, n: int, seq: int, dim: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**INDUCTION_2L))
    tokens = torch.randint(0, 1024, (n, seq))
    group = param_group(model, "all")
    proj = Projector(d_in=group.numel, dim=dim, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]

    def ours():
        proj.project(per_example_grads(model, lm_loss, tokens, group, chunk_size=8))

    def naive():
        rows = []
        for i in range(n):
            loss = F.cross_entropy(model(tokens[i : i + 1])[0, :-1], tokens[i, 1:])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        proj.project(torch.stack(rows))

    ours(), naive()  # warm up
    times = {"ours": [], "naive_loop": []}
    for _ in range(rounds):  # interleaved
        times["ours"].append(_timed(ours))
        times["naive_loop"].append(_timed(naive))
    out = {}
    for k, v in times.items():
        wall, cpu = statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)
        out[k] = {"wall_s": wall, "cpu_s": cpu, "examples_per_s": n / wall, "examples_per_cpu_s": n / cpu}
    out["speedup_wall"] = out["naive_loop"]["wall_s"] / out["ours"]["wall_s"]
    out["speedup_cpu"] = out["naive_loop"]["cpu_s"] / out["ours"]["cpu_s"]
    out.update(n_examples=n, seq_len=seq, proj_dim=dim, n_params=group.numel)
    return out


def digits_comparison(dattri_python: str | None, n_models: int) -> dict:
    t0 = time.perf_counter()
    ours = lds_experiment(n_models=n_models)
    result: dict = {
        "ours": {"lds": ours.lds, "seconds_all_methods_incl_retraining": time.perf_counter() - t0}
    }
    if not dattri_python or not Path(dattri_python).exists():
        result["dattri"] = {
            "status": "not run: pass --dattri-python pointing at a venv with dattri installed"
        }
        return result
    l2, n_train, n_test = 1e-2, 600, 64
    x, y, xt, yt = digits(n_train, n_test, 0)
    gen = torch.Generator().manual_seed(1)
    subsets = torch.rand(n_models, n_train, generator=gen) < 0.5
    actual = torch.stack([_test_losses(fit(x[s], y[s], l2=l2), xt, yt) for s in subsets])
    full = fit(x, y, l2=l2)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "problem.pt"
        torch.save({"x": x, "y": y, "xt": xt, "yt": yt, "state": full.state_dict(), "l2": l2}, data)
        proc = subprocess.run(
            [dattri_python, str(Path(__file__).with_name("_dattri_peer.py")), str(data)],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            result["dattri"] = {"status": "failed", "stderr": proc.stderr[-2000:]}
            return result
        peer = json.loads(proc.stdout.strip().splitlines()[-1])
        scores = torch.load(Path(tmp) / "scores.pt")
    result["dattri"] = {"version": peer["version"], "seconds": peer["seconds"], "lds": {}}
    for name, s in scores.items():
        # dattri scores are positive for examples that lower the test loss; ours predict the loss change
        result["dattri"]["lds"][name] = float(lds(-s.T.double(), subsets, actual).mean())
    return result


def storage_bytes(dim: int) -> dict:
    from interplab.data_attribution.record import GradientRecorder, RecordConfig

    model = Transformer(ModelConfig(**INDUCTION_2L))
    tokens = torch.randint(0, 1024, (16, 256))
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for half in (False, True):
            rec = GradientRecorder(Path(tmp) / f"h{int(half)}", model, RecordConfig(dim=dim, half=half))
            rec.record(model, tokens, torch.arange(16), step=0, lr=1e-3)
            size = (Path(tmp) / f"h{int(half)}" / rec.index[0]["file"]).stat().st_size
            out["float16" if half else "float32"] = size / 16
    return {"bytes_per_example_per_checkpoint": out, "dim": dim}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attribution.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--dattri-python", default="/tmp/dattri-venv/bin/python")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {
        "machine": {
            "threads": args.threads,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "load_avg_at_start": os.getloadavg(),
        },
        "per_example_grads": [
            per_example_speed(args.rounds, 32, 256, args.dim),
            per_example_speed(args.rounds, 64, 32, args.dim),
        ],
        "digits_lds": digits_comparison(args.dattri_python, args.models),
        "storage": storage_bytes(args.dim),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
