"""Loading benchmark: time and peak memory of `interplab.load_model` vs `transformers.from_pretrained`
on the same random GPT-2 folder (safetensors).

Each load runs in a fresh subprocess (so caches and allocator state do not carry over); contenders are
interleaved in rounds with alternating order; medians are reported. Peak memory is the rise of the peak
resident set size (VmHWM, reset after imports through /proc/self/clear_refs) over the RSS before loading,
and the peak of anonymous memory (RssAnon, sampled every millisecond), i.e. memory not backed by the
file. Both interplab and transformers memory-map the file, so weights are read lazily: the peak after
reading every weight once and running one forward is the honest number ("with_forward" below). The goal is a peak of at most ~1.5x the weights' size.

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


def _loader(contender: str, path: str):
    """A function that loads the model at ``path`` the way ``contender`` does (imports done beforehand)."""
    import torch

    if contender.startswith("interplab"):
        from interplab import load_model

        return lambda: load_model(path)
    if contender == "transformers":
        import transformers
        from transformers.models.gpt2 import modeling_gpt2  # noqa: F401  (lazy import, kept out of the timing)

        return lambda: transformers.AutoModelForCausalLM.from_pretrained(path)
    # transformer_lens: how its checkpoints are loaded, HookedTransformer(cfg) + load_state_dict
    import transformer_lens

    cfg = json.loads((Path(path).parent / "transformerlens_config.json").read_text())

    def load():
        model = transformer_lens.HookedTransformer(transformer_lens.HookedTransformerConfig(**cfg))
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    return load


def child(contender: str, path: str) -> None:
    import torch

    torch.set_num_threads(1)
    load = _loader(contender, path)
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
    # read every weight once (a lazily mapped file is paged in here at the latest), then one forward
    t1 = time.perf_counter()
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    touch_all = time.perf_counter() - t1
    tokens = torch.randint(0, 100, (1, 16))  # any vocabulary of 100 or more
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
                "touch_all_s": touch_all,
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


TL_MAKE = """
import json, sys, torch, transformer_lens as tl
n_layers, d_model, vocab, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
cfg = dict(n_layers=n_layers, d_model=d_model, n_heads=d_model // 64, d_head=64, d_mlp=4 * d_model, d_vocab=vocab,
           n_ctx=1024, act_fn="gelu_new", normalization_type="LN", seed=0)
model = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg))
torch.save(model.state_dict(), out + "/model.pt")
open(out + "/transformerlens_config.json", "w").write(json.dumps(cfg))
"""


def make_tl_checkpoint(folder: Path, tl_python: str, n_layer: int, d_model: int, vocab: int) -> int:
    """A TransformerLens GPT-2-style checkpoint (state dict .pt + config JSON), written by TL itself."""
    args = [tl_python, "-W", "ignore", "-c", TL_MAKE, str(n_layer), str(d_model), str(vocab), str(folder)]
    subprocess.run(args, check=True, capture_output=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    return (folder / "model.pt").stat().st_size


def run_child(contender: str, path: Path, python: str = sys.executable) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [python, "-W", "ignore", __file__, "--child", contender, "--path", str(path)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: dict[str, list[dict]], weight_bytes: int) -> dict:
    def med(c: str, key: str) -> float:
        return statistics.median(x[key] for x in runs[c])

    return {
        c: {
            "wall_s_median": med(c, "wall_s"),
            "cpu_s_median": med(c, "cpu_s"),
            "first_forward_s_median": med(c, "first_forward_s"),
            "touch_all_weights_s_median": med(c, "touch_all_s"),
            "load_plus_first_forward_s_median": statistics.median(
                x["wall_s"] + x["first_forward_s"] for x in runs[c]
            ),
            "load_plus_touch_all_plus_forward_s_median": statistics.median(
                x["wall_s"] + x["touch_all_s"] + x["first_forward_s"] for x in runs[c]
            ),
            "peak_rss_rise_mb": med(c, "peak_rss_rise") / 2**20,
            "peak_rss_over_weights": med(c, "peak_rss_rise") / weight_bytes,
            "peak_anon_rise_mb": med(c, "peak_anon_rise") / 2**20,
            "peak_anon_over_weights": med(c, "peak_anon_rise") / weight_bytes,
            "peak_rss_rise_with_forward_mb": med(c, "peak_rss_rise_with_forward") / 2**20,
            "peak_rss_with_forward_over_weights": med(c, "peak_rss_rise_with_forward") / weight_bytes,
            "rss_after_forward_rise_mb": med(c, "rss_after_forward_rise") / 2**20,
            "param_mb": runs[c][0]["param_bytes"] / 2**20,
        }
        for c in runs
    }


def ratios(summary: dict, ours: str, peer: str) -> dict:
    a, b = summary[ours], summary[peer]
    return {
        f"load_time_{ours}_over_{peer}": a["wall_s_median"] / b["wall_s_median"],
        f"load_plus_first_forward_{ours}_over_{peer}": a["load_plus_first_forward_s_median"]
        / b["load_plus_first_forward_s_median"],
        f"peak_rss_with_forward_{ours}_over_{peer}": a["peak_rss_rise_with_forward_mb"]
        / b["peak_rss_rise_with_forward_mb"],
    }


def scenario(model: dict, runs: dict[str, list[dict]], weight_bytes: int, ours: str, peer: str) -> dict:
    summary = summarise(runs, weight_bytes)
    return {"model": model, "summary": summary, "ratios": ratios(summary, ours, peer), "runs": runs}


def interleaved(contenders: dict[str, tuple[Path, str]], rounds: int) -> dict[str, list[dict]]:
    """``contenders``: name -> (path, python). Rounds alternate the order."""
    names = list(contenders)
    runs: dict[str, list[dict]] = {c: [] for c in names}
    for r in range(rounds):
        for c in names if r % 2 == 0 else names[::-1]:
            runs[c].append(run_child(c, *contenders[c]))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load.json"))
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--tl-python", help="python of a venv with transformer-lens (adds the TL checkpoint scenario)"
    )
    ap.add_argument("--child", choices=["interplab", "transformers", "interplab_tl", "transformer_lens"])
    ap.add_argument("--path")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.path)
        return
    import torch
    import transformers

    size = {"n_layer": args.layers, "d_model": args.d_model, "vocab": args.vocab}
    scenarios = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "hf"
        weight_bytes = make_model(folder, args.layers, args.d_model, args.vocab)
        runs = interleaved(
            {"interplab": (folder, sys.executable), "transformers": (folder, sys.executable)}, args.rounds
        )
        scenarios["hf_folder"] = scenario(
            {"family": "gpt2 (random)", **size, "format": "safetensors", "weights_mb": weight_bytes / 2**20},
            runs,
            weight_bytes,
            "interplab",
            "transformers",
        )
        if args.tl_python:
            tl_folder = Path(tmp) / "tl"
            tl_folder.mkdir()
            tl_bytes = make_tl_checkpoint(tl_folder, args.tl_python, args.layers, args.d_model, args.vocab)
            pt = tl_folder / "model.pt"
            runs = interleaved(
                {"interplab_tl": (pt, sys.executable), "transformer_lens": (pt, args.tl_python)}, args.rounds
            )
            tl_version = subprocess.run(
                [
                    args.tl_python,
                    "-c",
                    "import importlib.metadata as m; print(m.version('transformer-lens'))",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            model = {
                "family": "HookedTransformer GPT-2 style (random)",
                **size,
                "format": "torch .pt state dict",
                "weights_mb": tl_bytes / 2**20,
                "transformer_lens": tl_version,
                "peer_method": "HookedTransformer(cfg) + load_state_dict(torch.load(...))",
            }
            scenarios["transformer_lens_checkpoint"] = scenario(
                model, runs, tl_bytes, "interplab_tl", "transformer_lens"
            )
    result = {
        "benchmark": "load",
        "rounds": args.rounds,
        "goal": "peak memory while loading (through the first forward) <= 1.5x the weights",
        "scenarios": scenarios,
        "peers_not_measured": {} if args.tl_python else {"transformer_lens": "no --tl-python given"},
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
    print(
        json.dumps(
            {k: {"summary": v["summary"], "ratios": v["ratios"]} for k, v in scenarios.items()}, indent=2
        )
    )


if __name__ == "__main__":
    main()
