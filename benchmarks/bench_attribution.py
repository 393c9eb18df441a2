"""Training-data attribution benchmark (JSON output).

1. Per-example projected gradients per second (torch.func route, all parameters) for the ``induction-2l`` model on CPU: ours (torch.func vmap,
   chunked) vs a naive loop (one backward pass per example, same projection), at 256 and 32 tokens per example,
   interleaved in rounds; medians of wall and CPU time.
2. Softmax regression on sklearn's digits: LDS and time of every method of ours, and of dattri's explicit
   influence functions, TRAK and TracIn on the same data and models when dattri is installed in a separate venv
   (``--dattri-python``, by default ``.peers/dattri/bin/python``: ``bash scripts/peers.sh dattri``).
3. Storage bytes per example per checkpoint of a recording.
4. Factorised (LoGra) projected gradients (`factored_grads`) vs a naive loop (one backward pass per example
   over the same linear weights, each gradient projected with the same Kronecker projection, so the features
   are equal; ``naive_loop_jl``: the same loop projecting the flat gradients with a sparse JL projection of
   the same size, as in 1.), on ``induction-2l`` at 32, 128 and 256 tokens and on the digits softmax regression (where the
   LDS of grad-dot on the two feature sets is compared too); interleaved rounds, medians of wall and CPU
   time. ``--factored-before PATH`` adds another ``factored.py`` (e.g. main's) as a third contender. Beside them:
   the batched forward alone and the forward + backward to the sites (where the factorised path's time goes),
   the factorised path under bf16 autocast, and FLOP counts (``torch.utils.flop_counter``) with this machine's
   single-thread fp32 matmul rate, from which the bound on the speedup follows (docs/attribution.md).
5. The routes of `attribute_run` at the demo run's size (``induction-2l``, 256 tokens, parameter group
   ``all``, ``dim`` 1024): ``grads="exact"`` (torch.func per-example gradients + sparse JL) and
   ``grads="factored"`` (Kronecker projection of every linear map, embedding included), each beside the naive
   loop that computes the same features; then both routes end to end on a short run of the ``induction-2l``
   preset (256 candidates, 5 checkpoint terms: the demo's attribution size).

Every run keeps the sections it replaces under ``history`` (with the time they were replaced).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution.py --out benchmarks/results/attribution.json
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution.py --only factored   # section 4 alone, merged
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_attribution.py --only run        # section 5 alone, merged
"""

from __future__ import annotations

import argparse
import json
import math
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


def _flops(fn) -> int:
    """Floating-point operations of one call (matmuls and attention, as torch's FLOP counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_rate(rounds: int = 50) -> float:
    """This machine's fp32 matmul rate on the current threads (FLOP/s, best of ``rounds``) at the shape of the
    unembedding over one chunk: [2048, 128] x [128, 1024]."""
    a, b = torch.randn(2048, 128), torch.randn(128, 1024)
    best = min(_timed(lambda: a @ b)[0] for _ in range(rounds))
    return 2 * 2048 * 128 * 1024 / best


def _bound(out: dict, naive_flops: int, factored_flops: int, forward_flops: int, peak: float) -> dict:
    """What the FLOP counts allow: the factorised path's arithmetic as a share of the naive loop's, the rates
    both run at (share of the matmul rate), and the speedup if the factorised path ran at the matmul rate while
    the naive loop keeps its measured time."""
    naive_s, fac_s = out["naive_loop"]["cpu_s"], out["factored"]["cpu_s"]
    return {
        "naive_loop_flops": naive_flops,
        "factored_flops": factored_flops,
        "forward_flops": forward_flops,
        "factored_flops_share_of_naive": factored_flops / naive_flops,
        "forward_flops_share_of_naive": forward_flops / naive_flops,
        "matmul_flops_per_s": peak,
        "naive_loop_flops_per_cpu_s": naive_flops / naive_s,
        "naive_loop_share_of_matmul_rate": naive_flops / naive_s / peak,
        "factored_flops_per_cpu_s": factored_flops / fac_s,
        "factored_share_of_matmul_rate": factored_flops / fac_s / peak,
        "speedup_bound_equal_rates": naive_flops / factored_flops,
        "speedup_bound_factored_at_matmul_rate": naive_s / (factored_flops / peak),
    }


def factored_speed(rounds: int, n: int, seq: int, k: int, before: str | None, peak: float) -> dict:
    from interplab.data_attribution.factored import (
        FactoredProjector,
        capture_factors,
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

    chunk = min(n, default_chunk_size(tokens))  # what factored_grads uses

    def forward_only():  # the batched forward alone, in factored_grads' chunks
        with torch.no_grad():
            for start in range(0, n, chunk):
                lm_losses(model, tokens[start : start + chunk])

    def to_sites():  # the batched forward and the backward to the sites' outputs, no projection
        for start in range(0, n, chunk):
            capture_factors(model, lm_losses, (tokens[start : start + chunk],), proj.sites)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return factored_grads(model, lm_losses, tokens, proj)

    contenders = {
        "factored": lambda: factored_grads(model, lm_losses, tokens, proj),
        "naive_loop": lambda: _naive_factored(model, one_loss, (tokens,), proj, params),
        "forward_only": forward_only,
        "to_sites": to_sites,
        "factored_bf16_autocast": bf16,
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
    ours, naive, half = contenders["factored"](), contenders["naive_loop"](), bf16()
    out = _interleaved(rounds, contenders, n)
    d_in = sum(s.d_in_aug for s in proj.sites)
    d_out = sum(s.d_out for s in proj.sites)
    naive_flops = n * _flops(lambda: _naive_factored(model, one_loss, (tokens[:1],), proj, params))
    out["flops"] = _bound(out, naive_flops, _flops(contenders["factored"]), _flops(forward_only), peak)
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
        bf16_autocast_relative_error=float((half - ours).norm() / ours.norm()),
        chunk_examples=chunk,
        # what one chunk holds beside the model's own activations: captured inputs and output gradients of
        # every site, and the logits' softmax and gradient (float32); independent of n
        chunk_capture_bytes=4 * chunk * seq * (d_in + d_out + 2 * INDUCTION_2L["d_vocab"]),
    )
    return out


def run_route_speed(rounds: int, n: int, seq: int, dim: int, peak: float) -> dict:
    """`attribute_run`'s two routes per checkpoint at the demo run's size, each beside a naive loop that computes
    the same numbers (one backward pass per example): ``factored`` (`factored_dots`: exact dot products with a
    target gradient, a fixed random one here, over every linear map and the embedding) and ``exact_route``
    (torch.func + sparse JL); and the factorised projected features over the same maps (`factored_grads`,
    ``dim_in = dim_out = isqrt(dim / maps)``) beside their naive loop."""
    from interplab.data_attribution.factored import (
        FactoredProjector,
        LinearSite,
        factored_dots,
        factored_grads,
        lm_losses,
    )
    from interplab.data_attribution.run import group_sites

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**INDUCTION_2L))
    tokens = torch.randint(0, INDUCTION_2L["d_vocab"], (n, seq))
    group = param_group(model, "all")
    jl = Projector(d_in=group.numel, dim=min(dim, group.numel), seed=0)
    sites = [s for s in group_sites(model, group)[0] if isinstance(s, LinearSite)]  # the linear maps
    k = math.isqrt(dim // len(sites))
    fproj = FactoredProjector(sites, dim_in=k, dim_out=k)
    named = dict(model.named_parameters())
    fparams = [named[p] for p in fproj.param_names]
    params = [named[p] for p in group.param_names]
    target = {p: torch.randn_like(named[p]) for p in fproj.param_names}  # stands in for a target's gradient
    whole, rest = group_sites(model, group)  # attribute_run's default: the linear maps, norms and smear gates
    assert rest is None
    whole_target = {p: torch.randn_like(named[p]) for s in whole for p in s.params}

    def one_loss(m, t):
        return F.cross_entropy(m(t)[0, :-1], t[0, 1:])

    def naive_dots():
        rows = []
        for i in range(n):
            grads = torch.autograd.grad(one_loss(model, tokens[i : i + 1]), fparams)
            rows.append(sum((g * target[p]).sum() for p, g in zip(fproj.param_names, grads, strict=True)))
        return torch.stack(rows)[:, None]

    def naive_jl():
        rows = []
        for i in range(n):
            grads = torch.autograd.grad(one_loss(model, tokens[i : i + 1]), params)
            rows.append(group.flatten(dict(zip(group.param_names, grads, strict=True))))
        return jl.project(torch.stack(rows))

    contenders = {
        "factored": lambda: factored_dots(model, lm_losses, tokens, sites, [target]),
        "factored_whole_group": lambda: factored_dots(model, lm_losses, tokens, whole, [whole_target]),
        "naive_loop": naive_dots,
        "factored_projected": lambda: factored_grads(model, lm_losses, tokens, fproj),
        "naive_loop_projected": lambda: _naive_factored(model, one_loss, (tokens,), fproj, fparams),
        "exact_route": lambda: jl.project(per_example_grads(model, lm_loss, tokens, group, chunk_size=8)),
        "naive_loop_jl": naive_jl,
    }
    same = {
        "factored_vs_naive": ("factored", "naive_loop"),
        "factored_projected_vs_naive": ("factored_projected", "naive_loop_projected"),
        "exact_route_vs_naive": ("exact_route", "naive_loop_jl"),
    }
    results = {name: contenders[name]() for pair in same.values() for name in pair}
    out = _interleaved(rounds, contenders, n)
    for a, b in (
        ("exact_route", "factored"),
        ("exact_route", "factored_whole_group"),
        ("naive_loop_projected", "factored_projected"),
    ):
        out[f"speedup_cpu_{b}_vs_{a}"] = out[a]["cpu_s"] / out[b]["cpu_s"]
    out["speedup_cpu_exact_route_vs_its_naive_loop"] = (
        out["naive_loop_jl"]["cpu_s"] / out["exact_route"]["cpu_s"]
    )
    naive_flops = n * _flops(lambda: _naive_factored(model, one_loss, (tokens[:1],), fproj, fparams))
    fwd = _flops(lambda: lm_losses(model, tokens.clone()).detach())
    out["flops"] = _bound(out, naive_flops, _flops(contenders["factored"]), fwd, peak)
    out.update(
        model="induction-2l",
        n_examples=n,
        seq_len=seq,
        group="all",
        n_params_group=group.numel,
        n_params_factored=sum(p.numel() for p in fparams),
        factored_sites=[s.name for s in sites],
        factored_projected_dim=fproj.dim,
        exact_route_dim=jl.dim,
        **{
            f"max_abs_diff_{key}": float((results[a] - results[b]).abs().max())
            for key, (a, b) in same.items()
        },
        max_abs_dot=float(results["naive_loop"].abs().max()),
    )
    return out


def run_end_to_end(candidates: int, steps: int, every: int) -> dict:
    """Both `attribute_run` routes on a short run of the ``induction-2l`` preset (its model, corpus and batch),
    ``candidates`` sequences over every checkpoint term: wall and CPU seconds of the whole call; and, at the
    window's first checkpoint, how each route's scores rank against the unprojected TracIn term over all
    parameters (exact per-example gradients, chunk by chunk)."""
    from interplab.data_attribution import spearman
    from interplab.data_attribution.per_example import objective_grad
    from interplab.data_attribution.run import _open_run, attribute_run, run_target
    from interplab.model.io import load_native
    from interplab.train import train
    from interplab.train.config import CheckpointConfig, load_preset
    from interplab.train.sources import CorpusSource

    cfg = load_preset("induction-2l")
    cfg = cfg.replace(steps=steps, checkpoints=CheckpointConfig(log_spaced=0, every=every), eval_every=steps)
    out: dict = {"preset": "induction-2l", "train_steps": steps, "checkpoint_every": every}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(cfg, run)
        for grads in ("factored", "exact"):
            wall, cpu = time.perf_counter(), time.process_time()
            results[grads] = attribute_run(
                run, "induction:best", window=(0, steps), max_candidates=candidates, grads=grads
            )
            out[grads] = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
        res = results["exact"]
        _, ckpts = _open_run(run)
        model = load_native(ckpts[0].path)
        source = CorpusSource(cfg)
        target = run_target(load_native(ckpts[-1].path), res.target, source)
        group = param_group(model, "all")
        tg = objective_grad(model, target, group)
        tokens = source.train.sequences(res.example_ids, source.seq_len)
        dots, norms = [], []
        for start in range(0, len(tokens), 32):  # exact per-example gradients, 32 at a time
            g = per_example_grads(model, lm_loss, tokens[start : start + 32], group, chunk_size=8)
            dots.append(g @ tg)
            norms.append(g.norm(dim=1))
        truth, norm = torch.cat(dots), torch.cat(norms)
    out.update(
        n_candidates=int(res.example_ids.numel()),
        checkpoint_terms=len(res.steps),
        target=res.target,
        speedup_cpu=out["exact"]["cpu_s"] / out["factored"]["cpu_s"],
        speedup_wall=out["exact"]["wall_s"] / out["factored"]["wall_s"],
        first_checkpoint=res.steps[0],
        # the first term's scores are -w <grad target, grad loss_i>: rank against <grad target, grad loss_i>
        spearman_vs_unprojected={g: float(spearman(-r.per_step[0], truth)) for g, r in results.items()},
        mean_abs_cosine_target_vs_examples=float((truth / (tg.norm() * norm)).abs().mean()),
    )
    return out


def run_faithfulness(candidates: int, steps: int, every: int, dims: tuple[int, ...]) -> dict:
    """How faithful each `attribute_run` route is on the run `run_end_to_end` uses (the induction-2l preset,
    ``candidates`` sequences, target ``induction:best``, group ``all``): at every checkpoint term, the Spearman
    correlation of the route's term with the exact unprojected TracIn term (``<grad target, grad loss_i>`` from
    exact per-example gradients over all parameters), and the same for the combined (weighted, summed) scores.
    ``factored`` is attribute_run's default; ``exact_dim_D`` is the ``grads="exact"`` route's sparse JL
    projection at dimension D applied to the same gradients (D = 1024 is also run through attribute_run to
    check it is the route's own numbers)."""
    from interplab.data_attribution import spearman
    from interplab.data_attribution.per_example import objective_grad
    from interplab.data_attribution.run import _lr_at, _open_run, attribute_run, run_target
    from interplab.model.io import load_native
    from interplab.train import train
    from interplab.train.config import CheckpointConfig, load_preset
    from interplab.train.sources import CorpusSource

    cfg = load_preset("induction-2l")
    cfg = cfg.replace(steps=steps, checkpoints=CheckpointConfig(log_spaced=0, every=every), eval_every=steps)
    out: dict = {"preset": "induction-2l", "train_steps": steps, "checkpoint_every": every, "group": "all"}
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train(cfg, run)
        timed = {}
        for grads in ("factored", "exact"):
            wall, cpu = time.perf_counter(), time.process_time()
            timed[grads] = attribute_run(
                run, "induction:best", window=(0, steps), max_candidates=candidates, grads=grads
            )
            out[f"{grads}_route_s"] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
        res = timed["factored"]
        _, ckpts = _open_run(run)
        by_step = {c.step: c for c in ckpts}
        source = CorpusSource(cfg)
        target = run_target(load_native(ckpts[-1].path), res.target, source)
        tokens = source.train.sequences(res.example_ids, source.seq_len)
        used = [c.step for c in ckpts if 0 <= c.step <= steps]
        truth_sum = torch.zeros(len(tokens), dtype=torch.float64)
        route_sum = {f"exact_dim_{d}": torch.zeros_like(truth_sum) for d in dims}
        terms = []
        for c, step in enumerate(res.steps):
            model = load_native(by_step[step].path)
            group = param_group(model, "all")
            tg = objective_grad(model, target, group)
            projs = {d: Projector(d_in=group.numel, dim=d, seed=0) for d in dims}
            ptg = {d: p.project(tg[None])[0] for d, p in projs.items()}
            dots, norms, pdots = [], [], {d: [] for d in dims}
            for start in range(0, len(tokens), 32):  # exact per-example gradients, 32 at a time
                g = per_example_grads(model, lm_loss, tokens[start : start + 32], group, chunk_size=8)
                dots.append(g @ tg)
                norms.append(g.norm(dim=1))
                for d, p in projs.items():
                    pdots[d].append(p.project(g) @ ptg[d])
            truth, norm = torch.cat(dots), torch.cat(norms)
            weight = _lr_at(cfg, step) * (used[used.index(step) + 1] - step) / source.n_train
            factored = -res.per_step[c] / weight  # the route's term is -weight <grad target, grad loss_i>
            jl = -timed["exact"].per_step[c] / weight
            row = {
                "step": step,
                "mean_abs_cosine": float((truth / (tg.norm() * norm)).abs().mean()),
                "spearman": {"factored": float(spearman(factored, truth))},
                "factored_max_rel_diff": float((factored - truth).abs().max() / truth.abs().max()),
                "exact_route_dim_1024_equals_projection": float(
                    (jl - torch.cat(pdots[1024])).abs().max() / jl.abs().max()
                )
                if 1024 in dims
                else None,
            }
            truth_sum += weight * truth.double()
            for d in dims:
                row["spearman"][f"exact_dim_{d}"] = float(spearman(torch.cat(pdots[d]), truth))
                route_sum[f"exact_dim_{d}"] += weight * torch.cat(pdots[d]).double()
            terms.append(row)
        combined = {"factored": float(spearman(-res.scores.double(), truth_sum))}
        combined.update({k: float(spearman(v, truth_sum)) for k, v in route_sum.items()})
        top = truth_sum.argsort(descending=True)[:10]
        out.update(
            target=res.target,
            n_candidates=len(tokens),
            dims=list(dims),
            per_checkpoint=terms,
            combined_spearman=combined,
            # how many of the true top 10 (by the unprojected combined score) each route puts in its own top 10
            top10_overlap={
                "factored": len(
                    set(top.tolist()) & set((-res.scores).argsort(descending=True)[:10].tolist())
                ),
                **{
                    k: len(set(top.tolist()) & set(v.argsort(descending=True)[:10].tolist()))
                    for k, v in route_sum.items()
                },
            },
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
            "status": "not run: build .peers/dattri (bash scripts/peers.sh dattri) or pass --dattri-python"
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


def _write_json(path: Path, sections: dict) -> dict:
    """Merge ``sections`` into the report at ``path``; the sections they replace move to ``history`` (with the
    time they were replaced), so earlier measurements stay readable."""
    report = json.loads(path.read_text()) if path.exists() else {}
    history = report.pop("history", [])
    replaced = {k: report[k] for k in sections if k in report}
    if replaced:
        history.append(
            {"replaced_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sections": replaced}
        )
    report = {**report, **sections, "history": history}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)  # atomic
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/attribution.json")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--models", type=int, default=50)
    ap.add_argument(
        "--dattri-python",
        default=".peers/dattri/bin/python",
        help="dattri's venv (bash scripts/peers.sh dattri)",
    )
    ap.add_argument("--only", choices=["all", "factored", "run", "faithfulness"], default="all")
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
    peak = matmul_rate()
    machine["matmul_flops_per_s"] = peak
    sections: dict = {}
    if args.only in ("all", "run"):
        sections["attribute_run_routes"] = {
            "machine": machine,
            "per_checkpoint": run_route_speed(r, 32, 256, args.dim, peak),
            "end_to_end": run_end_to_end(256, 40, 8),
            "load_avg_at_end": os.getloadavg(),
        }
    if args.only in ("all", "faithfulness"):
        sections["attribute_run_faithfulness"] = {
            "machine": machine,
            **run_faithfulness(256, 40, 8, (1024, 4096, 16384)),
            "load_avg_at_end": os.getloadavg(),
        }
    if args.only in ("all", "factored"):
        sections["factored_grads"] = {
            "machine": machine,
            "transformer": [
                factored_speed(r, n, seq, 16, args.factored_before, peak) for n, seq in SEQ_CASES
            ],
            "digits": factored_digits(r, args.models, 16),
            "load_avg_at_end": os.getloadavg(),
        }
    if args.only != "all":
        _write_json(Path(args.out), sections)
        json.dump(sections, sys.stdout, indent=2)
        print()
        return
    sections.update(
        {
            "machine": machine,
            "per_example_grads": [
                per_example_speed(args.rounds, 32, 256, args.dim),
                per_example_speed(args.rounds, 64, 32, args.dim),
            ],
            "digits_lds": digits_comparison(args.dattri_python, args.models),
            "storage": storage_bytes(args.dim),
        }
    )
    report = _write_json(Path(args.out), sections)
    json.dump({k: v for k, v in report.items() if k != "history"}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
