"""Load memory on a big checkpoint: peak host memory and load time of `interplab.load_model` vs
`transformers.from_pretrained` and TransformerLens 3.9 (its `TransformerBridge.boot_transformers`, and the
steps of `HookedTransformer.from_pretrained_no_processing`) on the same random, sharded 1-2 GB GPT-2 folder.

The checkpoint is made in a temporary folder from a random config (transformers' ``save_pretrained`` with
``max_shard_size``), so nothing is downloaded. Each load runs in a fresh subprocess; contenders are interleaved
in rounds with alternating order; medians are reported. Peak memory is the rise of the peak resident set size
(VmHWM, reset after the imports through /proc/self/clear_refs) over the RSS before loading, measured three
times: right after the load, after reading every weight once (safetensors files are memory-mapped, so a lazy
loader's weights are only paged in when first read: this is the honest load peak), and after one forward
(1 x 16 tokens). The issue's goals: interplab's peak <= 0.6x TransformerLens', and a transient overhead (the
peak after reading every weight, minus the loaded weights themselves) <= 1.2x the largest shard plus one layer.

TransformerLens' ``HookedTransformer.from_pretrained`` takes only official model names and fetches their config
from the Hub, so it cannot load a local random model offline; ``tl_hooked`` runs the same steps by hand (the HF
model via ``from_pretrained``, ``convert_gpt2_weights``, ``HookedTransformer(cfg)``,
``load_and_process_state_dict`` with no processing), which is what ``from_pretrained_no_processing`` does.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_load_memory.py --tl-python .peers/tl/bin/python
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_load import _status  # noqa: E402  (the sibling script's VmRSS / VmHWM reader)

CONTENDERS = ("interplab", "transformers", "tl_bridge", "tl_hooked")


def _loader(contender: str, path: str):
    """A function that loads the model at ``path`` the way ``contender`` does (imports done beforehand)."""
    if contender == "interplab":
        from interplab import load_model

        return lambda: load_model(path)
    import transformers
    from transformers.models.gpt2 import modeling_gpt2  # noqa: F401  (lazy import, kept out of the timing)

    if contender == "transformers":
        return lambda: transformers.AutoModelForCausalLM.from_pretrained(path)
    if contender == "tl_bridge":
        from transformer_lens.model_bridge import TransformerBridge

        return lambda: TransformerBridge.boot_transformers(path)
    import transformer_lens as tl
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    hf = json.loads((Path(path) / "config.json").read_text())
    cfg = tl.HookedTransformerConfig(
        n_layers=hf["n_layer"],
        d_model=hf["n_embd"],
        n_heads=hf["n_head"],
        d_head=hf["n_embd"] // hf["n_head"],
        d_mlp=4 * hf["n_embd"],
        d_vocab=hf["vocab_size"],
        n_ctx=hf["n_positions"],
        act_fn="gelu_new",
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
    )

    def load():
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(path)
        state = convert_gpt2_weights(hf_model, cfg)
        del hf_model
        model = tl.HookedTransformer(cfg, move_to_device=False)
        model.load_and_process_state_dict(
            state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
        )
        return model

    return load


def child(contender: str, path: str) -> None:
    import gc

    import torch

    torch.set_num_threads(1)
    load = _loader(contender, path)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss0 = _status("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    model = load()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_load = _status("VmHWM") - rss0
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
        peak_touch = _status("VmHWM") - rss0
        model(torch.randint(0, 100, (1, 16)))
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "peak_rss_rise_load": peak_load,
                "peak_rss_rise_touch": peak_touch,
                "peak_rss_rise": _status("VmHWM") - rss0,
                "param_bytes": n_bytes,
            }
        )
    )


def make_checkpoint(folder: Path, n_layer: int, d_model: int, vocab: int, shard: str) -> dict:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_embd=d_model, n_layer=n_layer, n_head=d_model // 64, vocab_size=vocab, n_positions=1024
    )
    model = transformers.GPT2LMHeadModel(cfg)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.transformer.h[0].parameters())
    model.save_pretrained(folder, max_shard_size=shard)
    del model
    shards = sorted(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {
        "family": "gpt2 (random)",
        "n_layer": n_layer,
        "d_model": d_model,
        "vocab": vocab,
        "weights_mb": sum(shards) / 2**20,
        "shards": len(shards),
        "largest_shard_mb": shards[-1] / 2**20,
        "layer_mb": layer_bytes / 2**20,
    }


def run_child(contender: str, path: Path, python: str) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [python, "-W", "ignore", __file__, "--child", contender, "--path", str(path)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], model: dict) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}

    def med(key: str) -> float:
        return statistics.median(r[key] for r in ok)

    weights = ok[0]["param_bytes"]
    return {
        "load_s_median": med("wall_s"),
        "load_cpu_s_median": med("cpu_s"),
        "peak_rss_rise_load_mb": med("peak_rss_rise_load") / 2**20,
        "peak_rss_rise_touch_mb": med("peak_rss_rise_touch") / 2**20,
        "peak_rss_rise_mb": med("peak_rss_rise") / 2**20,
        "peak_over_weights": med("peak_rss_rise") / weights,
        "overhead_mb": (med("peak_rss_rise_touch") - weights) / 2**20,
        "overhead_over_goal": (med("peak_rss_rise_touch") - weights)
        / 2**20
        / (1.2 * model["largest_shard_mb"] + model["layer_mb"]),
        "param_mb": weights / 2**20,
        "rounds": len(ok),
    }


def summarise_all(runs: dict[str, list[dict]], model: dict) -> tuple[dict, dict]:
    """Per-contender summaries and interplab's ratios to each peer (load peak = after reading every
    weight; with_forward = after one forward too)."""
    summary = {c: summarise(runs[c], model) for c in runs}
    ratios = {}
    for peer in ("tl_hooked", "tl_bridge", "transformers"):
        a, b = summary["interplab"], summary.get(peer, {})
        if "peak_rss_rise_mb" in a and "peak_rss_rise_mb" in b:
            ratios[f"peak_interplab_over_{peer}"] = a["peak_rss_rise_touch_mb"] / b["peak_rss_rise_touch_mb"]
            ratios[f"peak_with_forward_interplab_over_{peer}"] = a["peak_rss_rise_mb"] / b["peak_rss_rise_mb"]
            ratios[f"load_time_interplab_over_{peer}"] = a["load_s_median"] / b["load_s_median"]
    return summary, ratios


def resummarise(path: Path) -> None:
    """Recompute the summary and ratios of a results file from its raw runs (after changing what is
    summarised, without loading everything again)."""
    result = json.loads(path.read_text())
    result["summary"], result["ratios"] = summarise_all(result["runs"], result["model"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps({"summary": result["summary"], "ratios": result["ratios"]}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "load_memory.json"))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=1280)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--shard", default="400MB", help="max_shard_size of save_pretrained")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tl-python", help="python of a venv with transformer-lens 3.9 (adds the TL contenders)")
    ap.add_argument("--child", choices=CONTENDERS)
    ap.add_argument("--path")
    ap.add_argument("--resummarise", action="store_true", help="recompute --out's summary from its raw runs")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.path)
        return
    if args.resummarise:
        resummarise(Path(args.out))
        return
    import torch
    import transformers

    pythons = {"interplab": sys.executable, "transformers": sys.executable}
    if args.tl_python:
        pythons |= {"tl_bridge": args.tl_python, "tl_hooked": args.tl_python}
    names = list(pythons)
    runs: dict[str, list[dict]] = {c: [] for c in names}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-big"
        model = make_checkpoint(folder, args.layers, args.d_model, args.vocab, args.shard)
        for r in range(args.rounds):
            for c in names if r % 2 == 0 else names[::-1]:
                runs[c].append(run_child(c, folder, pythons[c]))
                print(c, runs[c][-1], file=sys.stderr)
    summary, ratios = summarise_all(runs, model)
    result = {
        "benchmark": "load_memory",
        "model": model,
        "summary": summary,
        "ratios": ratios,
        "goals": {"peak_over_transformer_lens": 0.6, "overhead_over_1.2_largest_shard_plus_layer": 1.0},
        "runs": runs,
        "settings": {
            "rounds": args.rounds,
            "threads": 1,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(out)
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
