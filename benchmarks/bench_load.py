"""Loading benchmark: time and peak memory of `interplab.load_model` vs `transformers.from_pretrained`
on the same random GPT-2 folder (safetensors).

Each load runs in a fresh subprocess (so caches and allocator state do not carry over); contenders are
interleaved in rounds with alternating order; medians are reported. Peak memory is the rise of the peak
resident set size (VmHWM, reset after imports through /proc/self/clear_refs) over the RSS before loading,
and the peak of anonymous memory (RssAnon, sampled every millisecond), i.e. memory not backed by the
file. Both loaders memory-map safetensors, so weights are read lazily: the peak through the first forward
(which touches every weight) is the honest number. The goal is a peak of at most ~1.5x the weights' size.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_load.py --out benchmarks/results/load.json
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
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def child(contender: str, path: str) -> None:
    import torch

    torch.set_num_threads(1)
    if contender == "interplab":
        from interplab import load_model

        def load():
            return load_model(path)
    else:
        import transformers
        from transformers.models.gpt2 import modeling_gpt2  # noqa: F401  (lazy import, kept out of the timing)

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(path)

    import gc

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss0, anon0 = _status("VmRSS"), _status("RssAnon")
    peak_anon = [anon0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0, c0 = time.perf_counter(), time.process_time()
    model = load()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    done.set()
    sampler.join()
    peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
    peak_rss = _status("VmHWM")
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the first forward touches every weight (a lazily mapped file is read here at the latest)
    tokens = torch.randint(0, 1000, (1, 16))
    t1 = time.perf_counter()
    with torch.no_grad():
        model(tokens)
    first_forward = time.perf_counter() - t1
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "peak_rss_rise": peak_rss - rss0,
                "hwm_reset": hwm_reset,
                "peak_anon_rise": peak_anon[0] - anon0,
                "param_bytes": n_bytes,
                "first_forward_s": first_forward,
                "rss_after_forward_rise": _status("VmRSS") - rss0,
                "peak_rss_rise_with_forward": _status("VmHWM") - rss0,
            }
        )
    )


def make_model(folder: Path, n_layer: int, d_model: int, vocab: int) -> int:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=d_model, n_layer=n_layer, n_head=d_model // 64, vocab_size=vocab, n_positions=1024
    )
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_child(contender: str, folder: Path) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", contender, "--path", str(folder)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--child", choices=["interplab", "transformers"])
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.path)
        return
    contenders = ["interplab", "transformers"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        weight_bytes = make_model(folder, args.layers, args.d_model, args.vocab)
        runs: dict[str, list[dict]] = {c: [] for c in contenders}
        for r in range(args.rounds):
            for c in contenders if r % 2 == 0 else contenders[::-1]:
                runs[c].append(run_child(c, folder))

    def med(c: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[c])

    summary = {
        c: {
            "wall_s_median": med(c, "wall_s"),
            "cpu_s_median": med(c, "cpu_s"),
            "first_forward_s_median": med(c, "first_forward_s"),
            "load_plus_first_forward_s_median": statistics.median(
                x["wall_s"] + x["first_forward_s"] for x in runs[c]
            ),
            "rss_after_forward_rise_mb": med(c, "rss_after_forward_rise") / 2**20,
            "peak_rss_rise_with_forward_mb": med(c, "peak_rss_rise_with_forward") / 2**20,
            "peak_rss_with_forward_over_weights": med(c, "peak_rss_rise_with_forward") / weight_bytes,
            "peak_rss_rise_mb": med(c, "peak_rss_rise") / 2**20,
            "peak_anon_rise_mb": med(c, "peak_anon_rise") / 2**20,
            "peak_rss_over_weights": med(c, "peak_rss_rise") / weight_bytes,
            "peak_anon_over_weights": med(c, "peak_anon_rise") / weight_bytes,
            "param_mb": runs[c][0]["param_bytes"] / 2**20,
        }
        for c in contenders
    }
    import torch
    import transformers

    result = {
        "benchmark": "load",
        "model": {
            "family": "gpt2 (random)",
            "n_layer": args.layers,
            "d_model": args.d_model,
            "vocab": args.vocab,
            "format": "safetensors",
            "weights_mb": weight_bytes / 2**20,
        },
        "rounds": args.rounds,
        "summary": summary,
        "ratios": {
            "load_time_interplab_over_transformers": summary["interplab"]["wall_s_median"]
            / summary["transformers"]["wall_s_median"],
            "load_plus_first_forward_interplab_over_transformers": summary["interplab"][
                "load_plus_first_forward_s_median"
            ]
            / summary["transformers"]["load_plus_first_forward_s_median"],
            "peak_rss_interplab_over_transformers": summary["interplab"]["peak_rss_rise_mb"]
            / summary["transformers"]["peak_rss_rise_mb"],
        },
        "goal": "peak memory while loading <= 1.5x the weights",
        "peers_not_measured": {"transformer_lens": "not installed in this environment (needs its own venv)"},
        "runs": runs,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": 1,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"summary": summary, "ratios": result["ratios"]}, indent=2))


if __name__ == "__main__":
    main()
