"""Benchmark: batched activation patching and attribution patching against TransformerLens.

Same weights (a random GPT-2 saved by transformers to a temp folder, loaded by both), same prompts,
same metric (mean logit difference at the last position). Contenders run interleaved in rounds; we
report medians of wall and CPU time, ratios, and the largest difference between results.

TransformerLens cannot share the project venv (it pins its own dependencies), so run this file with
an interpreter that has both: ``python3 -m venv /tmp/tl-venv && /tmp/tl-venv/bin/pip install torch==2.13.0
transformer-lens``, then from the repository root::

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=. /tmp/tl-venv/bin/python benchmarks/bench_patching.py

Without transformer_lens importable, the peer is our own one-forward-per-patch loop with hooks
(`activation_patch_loop`), labelled as such in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interplab import load_model  # noqa: E402
from interplab.analysis import LogitDiff, PatchConfig, activation_patch, activation_patch_loop  # noqa: E402
from interplab.analysis.attribution import attribution_patch  # noqa: E402


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def make_models(folder: Path, d_model: int, n_layers: int, n_heads: int, d_vocab: int, n_ctx: int):
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            n_embd=d_model, n_layer=n_layers, n_head=n_heads, vocab_size=d_vocab, n_positions=n_ctx
        )
    ).eval()
    hf.save_pretrained(folder)
    ours = load_model(folder)
    try:
        from transformer_lens import TransformerBridge

        tl = TransformerBridge.boot_transformers(str(folder), device="cpu")
        tl.eval()
        import transformer_lens

        peer = f"transformer_lens {getattr(transformer_lens, '__version__', '')}".strip()
        try:
            from importlib.metadata import version

            peer = f"transformer_lens {version('transformer-lens')}"
        except Exception:  # noqa: BLE001
            pass
    except ImportError as err:
        tl, peer = (
            None,
            f"not installable here ({err}); peer = interplab activation_patch_loop (one forward per patch)",
        )
    return ours, tl, peer


def contenders(ours, tl, clean, corrupted, answer, wrong, budget):
    metric = LogitDiff(answer=answer, wrong=wrong)
    cfg = PatchConfig(max_batch_tokens=budget)
    out = {
        "ours_resid": lambda: (
            activation_patch(ours, clean, corrupted, metric, "resid_pre", config=cfg).values
        ),
        "ours_heads": lambda: activation_patch(ours, clean, corrupted, metric, "z", config=cfg).values,
        "ours_attribution_heads": lambda: attribution_patch(ours, clean, corrupted, metric, "z").values,
    }
    if tl is not None:
        from transformer_lens import patching

        def tl_metric(logits):
            last = logits[:, -1]
            return (last.gather(-1, answer[:, None]) - last.gather(-1, wrong[:, None])).mean()

        def tl_run(fn):
            with torch.no_grad():
                _, cache = tl.run_with_cache(clean)
                return fn(tl, corrupted, cache, tl_metric)

        out["peer_resid"] = lambda: tl_run(patching.get_act_patch_resid_pre)
        out["peer_heads"] = lambda: tl_run(patching.get_act_patch_attn_head_out_all_pos)
    else:
        out["peer_resid"] = lambda: activation_patch_loop(ours, clean, corrupted, metric, "resid_pre").values
        out["peer_heads"] = lambda: activation_patch_loop(ours, clean, corrupted, metric, "z").values
    return out


def run_case(ours, tl, batch, n_pos, rounds, budget, d_vocab):
    g = torch.Generator().manual_seed(batch * 1000 + n_pos)
    clean = torch.randint(0, d_vocab, (batch, n_pos), generator=g)
    corrupted = torch.randint(0, d_vocab, (batch, n_pos), generator=g)
    answer = torch.randint(0, d_vocab, (batch,), generator=g)
    wrong = torch.randint(0, d_vocab, (batch,), generator=g)
    fns = contenders(ours, tl, clean, corrupted, answer, wrong, budget)
    walls: dict[str, list[float]] = {k: [] for k in fns}
    cpus: dict[str, list[float]] = {k: [] for k in fns}
    results = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            res, w, c = timed(fn)
            walls[name].append(w)
            cpus[name].append(c)
            results[name] = res.detach().float()
    med = {k: statistics.median(v) for k, v in walls.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    case = {
        "batch": batch,
        "n_pos": n_pos,
        "rounds": rounds,
        "max_batch_tokens": budget,
        "wall_s_median": med,
        "cpu_s_median": cpu,
        "wall_s_all": walls,
        "speedup_resid_vs_peer": med["peer_resid"] / med["ours_resid"],
        "speedup_heads_vs_peer": med["peer_heads"] / med["ours_heads"],
        "speedup_attribution_vs_activation_heads": med["ours_heads"] / med["ours_attribution_heads"],
        "speedup_attribution_vs_peer_heads": med["peer_heads"] / med["ours_attribution_heads"],
        "cpu_speedup_resid_vs_peer": cpu["peer_resid"] / cpu["ours_resid"],
        "cpu_speedup_heads_vs_peer": cpu["peer_heads"] / cpu["ours_heads"],
        "cpu_speedup_attribution_vs_activation_heads": cpu["ours_heads"] / cpu["ours_attribution_heads"],
        "max_abs_diff_resid": float((results["ours_resid"] - results["peer_resid"]).abs().max()),
        "max_abs_diff_heads": float((results["ours_heads"] - results["peer_heads"]).abs().max()),
        "n_patches_resid": int(results["ours_resid"].numel()),
        "n_patches_heads": int(results["ours_heads"].numel()),
    }
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/analysis.json")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default="1x16:5,8x128:2", help="BATCHxPOS:ROUNDS,...")
    ap.add_argument("--budget", type=int, default=PatchConfig().max_batch_tokens)
    ap.add_argument("--d-vocab", type=int, default=4096)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dims = {"d_model": 256, "n_layers": 4, "n_heads": 8, "d_vocab": args.d_vocab, "n_ctx": 128}
    with tempfile.TemporaryDirectory() as tmp:
        ours, tl, peer = make_models(Path(tmp), **dims)
    cases: list[dict] = []
    report = {
        "benchmark": "activation patching (resid_pre by layer x pos; head outputs z, all positions) and "
        "attribution patching of all heads; metric = mean logit difference at the last position",
        "model": {"family": "random GPT-2 (transformers), same weights in both", **dims},
        "peer": peer,
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cases": cases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.cases.split(","):
        shape, rounds = spec.split(":")
        batch, n_pos = (int(x) for x in shape.split("x"))
        case = run_case(ours, tl, batch, n_pos, int(rounds), args.budget, args.d_vocab)
        print(json.dumps({k: v for k, v in case.items() if k != "wall_s_all"}), flush=True)
        cases.append(case)
        out.write_text(
            json.dumps(report, indent=2) + "\n"
        )  # after every case, so a long run keeps its results


if __name__ == "__main__":
    main()
