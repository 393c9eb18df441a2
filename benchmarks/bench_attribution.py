"""Training-data attribution benchmark (JSON output).

1. Per-example projected gradients per second (torch.func route, all parameters) for the ``induction-2l`` model on CPU: ours (torch.func vmap,
   chunked) vs a naive loop (one backward pass per example, same projection), at 256 and 32 tokens per example,
   interleaved in rounds; medians of wall and CPU time.
2. Softmax regression on sklearn's digits: LDS and time of every method of ours, and of dattri's explicit
   influence functions, TRAK and TracIn on the same data and models when dattri is installed in a separate venv
   (``--dattri-python /tmp/dattri-venv/bin/python``).
3. Storage bytes per example per checkpoint of a recording.
4. Factorised (LoGra) projected gradients (`factored_grads`) vs a naive loop (one backward pass per example
   over the same linear weights, each gradient projected with the same Kronecker projection, so the features
   are equal; ``naive_loop_jl``: the same loop projecting the flat gradients with a sparse JL projection of
   the same size, as in 1.), on ``induction-2l`` at 32, 128 and 256 tokens and on the digits softmax regression (where the
   LDS of grad-dot on the two feature sets is compared too); interleaved rounds, medians of wall and CPU
   time. ``--factored-before PATH`` adds another ``factored.py`` (e.g. main's) as a third contender.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution.py --out benchmarks/results/attribution.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution.py --only factored   # section 4 alone, merged
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

SEQ_CASES = ((64, 32), (32, 128), (32, 256))  # (examples, tokens) of the factorised speed runs

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


def _interleaved(rounds: int, contenders: dict, n: int) -> dict:
    for f in contenders.values():  # warm up
        f()
    times: dict[str, list] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, f in contenders.items():
            times[k].append(_timed(f))
    out: dict = {}
    for k, v in times.items():
        wall, cpu = statistics.median(t[0] for t in v), statistics.median(t[1] for t in v)
        out[k] = {
            "wall_s": wall,
            "cpu_s": cpu,
            "examples_per_s": n / wall,
            "examples_per_cpu_s": n / cpu,
            "cpu_s_rounds": [t[1] for t in v],
        }
    for k in contenders:
        if k != "naive_loop":
            out[f"speedup_cpu_{k}"] = out["naive_loop"]["cpu_s"] / out[k]["cpu_s"]
            out[f"speedup_wall_{k}"] = out["naive_loop"]["wall_s"] / out[k]["wall_s"]
    return out


def _load_module(path: str, name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _naive_factored(model, loss_of, examples, proj, params) -> torch.Tensor:
    """One backward pass per example over the sites' parameters, each gradient projected as it comes."""
    rows = []
    for i in range(examples[0].shape[0]):
        grads = torch.autograd.grad(loss_of(model, *(e[i : i + 1] for e in examples)), params)
        rows.append(proj.project_grads({k: g[None] for k, g in zip(proj.param_names, grads, strict=True)}))
    return torch.cat(rows)


def factored_speed(rounds: int, n: int, seq: int, k: int, before: str | None) -> dict:
    from interplab.data_attribution.factored import (
        FactoredProjector,
        default_chunk_size,
        factored_grads,
        linear_sites,
        lm_losses,
    )

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**INDUCTION_2L))
    tokens = torch.randint(0, INDUCTION_2L["d_vocab"], (n, seq))
    proj = FactoredProjector(linear_sites(model), dim_in=k, dim_out=k)
    named = dict(model.named_parameters())
    params = [named[p] for p in proj.param_names]

    def one_loss(m, t):
        return F.cross_entropy(m(t)[0, :-1], t[0, 1:])

    contenders = {
        "factored": lambda: factored_grads(model, lm_losses, tokens, proj),
        "naive_loop": lambda: _naive_factored(model, one_loss, (tokens,), proj, params),
    }
    jl = Projector(d_in=sum(p.numel() for p in params), dim=proj.dim, seed=0)

    def naive_jl():  # the per_example_speed loop's kind: flat gradients, sparse JL projection to the same size
        rows = []
        for i in range(n):
            grads = torch.autograd.grad(one_loss(model, tokens[i : i + 1]), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
        return jl.project(torch.stack(rows))

    contenders["naive_loop_jl"] = naive_jl
    if before:
        old = _load_module(before, "factored_before")
        old_proj = old.FactoredProjector(old.linear_sites(model), dim_in=k, dim_out=k)
        contenders["factored_before"] = lambda: old.factored_grads(model, old.lm_losses, tokens, old_proj)
    ours, naive = contenders["factored"](), contenders["naive_loop"]()
    out = _interleaved(rounds, contenders, n)
    d_in = sum(s.d_in_aug for s in proj.sites)
    d_out = sum(s.d_out for s in proj.sites)
    chunk = min(n, default_chunk_size(tokens))  # what factored_grads used
    out.update(
        model="induction-2l",
        n_examples=n,
        seq_len=seq,
        dim_in=k,
        dim_out=k,
        proj_dim=proj.dim,
        n_sites=len(proj.sites),
        n_params_projected=sum(p.numel() for p in params),
        max_abs_diff_vs_naive=float((ours - naive).abs().max()),
        max_abs_feature=float(naive.abs().max()),
        chunk_examples=chunk,
        # what one chunk holds beside the model's own activations: captured inputs and output gradients of
        # every site, and the logits' softmax and gradient (float32); independent of n
        chunk_capture_bytes=4 * chunk * seq * (d_in + d_out + 2 * INDUCTION_2L["d_vocab"]),
    )
    return out


def factored_digits(rounds: int, n_models: int, k_in: int) -> dict:
    from interplab.data_attribution import methods
    from interplab.data_attribution.factored import FactoredProjector, factored_grads, linear_sites

    l2, n_train, n_test = 1e-2, 600, 64
    x, y, xt, yt = digits(n_train, n_test, 0)
    gen = torch.Generator().manual_seed(1)
    subsets = torch.rand(n_models, n_train, generator=gen) < 0.5
    actual = torch.stack([_test_losses(fit(x[s], y[s], l2=l2), xt, yt) for s in subsets])
    full = fit(x, y, l2=l2).float()
    x, xt = x.float(), xt.float()
    named = dict(full.named_parameters())

    def ce(m, a, b):
        return F.cross_entropy(m(a), b, reduction="none")

    def one(m, a, b):
        return F.cross_entropy(m(a), b)

    out: dict = {"n_train": n_train, "n_test": n_test, "n_models": n_models}
    for label, kin in (("projected", k_in), ("exact", 10**6)):
        proj = FactoredProjector(linear_sites(full), dim_in=kin, dim_out=10**6)
        params = [named[p] for p in proj.param_names]

        def fac(proj=proj):
            return factored_grads(full, ce, (x, y), proj), factored_grads(full, ce, (xt, yt), proj)

        def naive(proj=proj, params=params):
            return (
                _naive_factored(full, one, (x, y), proj, params),
                _naive_factored(full, one, (xt, yt), proj, params),
            )

        (tr_f, te_f), (tr_n, te_n) = fac(), naive()
        res = _interleaved(rounds, {"factored": fac, "naive_loop": naive}, n_train + n_test)
        res.update(
            proj_dim=proj.dim,
            dim_in=min(kin, 65),
            max_abs_diff_vs_naive=float(max((tr_f - tr_n).abs().max(), (te_f - te_n).abs().max())),
            lds_grad_dot_factored=float(lds(methods.grad_dot(tr_f, te_f), subsets, actual).mean()),
            lds_grad_dot_naive=float(lds(methods.grad_dot(tr_n, te_n), subsets, actual).mean()),
        )
        out[label] = res
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


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)  # atomic


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attribution.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument("--dattri-python", default="/tmp/dattri-venv/bin/python")
    ap.add_argument("--only", choices=["all", "factored"], default="all")
    ap.add_argument("--factored-rounds", type=int, default=5)
    ap.add_argument(
        "--factored-before", default=None, help="another factored.py to time beside (e.g. main's)"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    machine = {
        "threads": args.threads,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
    }
    r = args.factored_rounds
    factored = {
        "machine": machine,
        "transformer": [factored_speed(r, n, seq, 16, args.factored_before) for n, seq in SEQ_CASES],
        "digits": factored_digits(r, args.models, 16),
        "load_avg_at_end": os.getloadavg(),
    }
    if args.only == "factored":
        path = Path(args.out)
        report = json.loads(path.read_text()) if path.exists() else {}
        report["factored_grads"] = factored
        _write_json(path, report)
        json.dump(factored, sys.stdout, indent=2)
        print()
        return
    report = {
        "machine": machine,
        "per_example_grads": [
            per_example_speed(args.rounds, 32, 256, args.dim),
            per_example_speed(args.rounds, 64, 32, args.dim),
        ],
        "digits_lds": digits_comparison(args.dattri_python, args.models),
        "storage": storage_bytes(args.dim),
        "factored_grads": factored,
    }
    _write_json(Path(args.out), report)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
