"""Pipeline-parallel inference on CPU: `interplab.model.parallel.PipelineModel` over 2 (or more) gloo processes
started by torchrun vs one process with the whole model, on the same random Llama folder.

Per rank: peak RSS rise of loading its stage (VmHWM reset after the imports), which is what the pipeline
buys (each rank holds its share of the blocks); and the median wall time of a forward, interleaved with the
single-process forward in the same rounds (each run in its own processes, one thread per process). The ranks
take turns, so the pipeline's forward is never faster than one process: the ratio shows what the hand-offs
cost.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_pipeline.py --out benchmarks/results/pipeline.json
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


def child(path: str, batch: int, pos: int, repeats: int, pipeline: bool) -> None:
    import torch

    torch.set_num_threads(1)
    if pipeline:
        import torch.distributed as dist

        from interplab.model.parallel import PipelineModel

        dist.init_process_group("gloo")
        load = lambda: PipelineModel.load(path)  # noqa: E731
    else:
        from interplab import load_model

        load = lambda: load_model(path)  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")
    rss0 = _status("VmRSS")
    model = load()
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_meta:
                p.sum()
    peak = _status("VmHWM") - rss0
    tokens = torch.randint(0, 1000, (batch, pos), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(tokens)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - t0)
    held = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
    rank = int(os.environ.get("RANK", 0))
    print(
        "RESULT " + json.dumps({"rank": rank, "peak_rss_rise": peak, "held_bytes": held, "forward_s": times})
    )
    if pipeline:
        dist.destroy_process_group()


def run(path: Path, args, pipeline: bool) -> list[dict]:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    shape = ["--batch", str(args.batch), "--pos", str(args.pos), "--repeats", str(args.repeats)]
    cmd = [__file__, "--child", str(path), *shape]
    if pipeline:
        cmd = [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(args.ranks),
            *cmd,
            "--pipeline",
        ]
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, env=env, check=True)
    return [
        json.loads(line[len("RESULT ") :]) for line in out.stdout.splitlines() if line.startswith("RESULT ")
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pipeline.json"))
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pos", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child")
    ap.add_argument("--pipeline", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batch, args.pos, args.repeats, args.pipeline)
        return
    import torch
    import transformers

    rounds: dict[str, list] = {"single": [], "pipeline": []}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            hidden_size=args.d_model,
            num_hidden_layers=args.layers,
            num_attention_heads=args.d_model // 64,
            num_key_value_heads=max(1, args.d_model // 256),
            intermediate_size=int(2.75 * args.d_model),
            vocab_size=args.vocab,
            max_position_embeddings=max(256, args.pos),
            tie_word_embeddings=False,
        )
        folder = Path(tmp) / "llama"
        transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
        weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        for r in range(args.rounds):
            for kind in ("single", "pipeline") if r % 2 == 0 else ("pipeline", "single"):
                rounds[kind].append(run(folder, args, kind == "pipeline"))
    single = [x[0] for x in rounds["single"]]
    fwd_single = statistics.median(t for x in single for t in x["forward_s"])
    ranks = {}
    for rank in range(args.ranks):
        mine = [next(x for x in rnd if x["rank"] == rank) for rnd in rounds["pipeline"]]
        ranks[rank] = {
            "peak_rss_rise_mb": statistics.median(x["peak_rss_rise"] for x in mine) / 2**20,
            "held_mb": mine[0]["held_bytes"] / 2**20,
            "forward_s_median": statistics.median(t for x in mine for t in x["forward_s"]),
        }
    summary = {
        "single": {
            "peak_rss_rise_mb": statistics.median(x["peak_rss_rise"] for x in single) / 2**20,
            "held_mb": single[0]["held_bytes"] / 2**20,
            "forward_s_median": fwd_single,
        },
        "pipeline_ranks": ranks,
        "largest_rank_peak_over_single": max(r["peak_rss_rise_mb"] for r in ranks.values())
        / (statistics.median(x["peak_rss_rise"] for x in single) / 2**20),
        "pipeline_forward_over_single": ranks[0]["forward_s_median"] / fwd_single,
    }
    result = {
        "benchmark": "pipeline",
        "model": {
            "family": "llama (random)",
            "n_layer": args.layers,
            "d_model": args.d_model,
            "vocab": args.vocab,
            "weights_mb": weights / 2**20,
        },
        "settings": {
            "ranks": args.ranks,
            "backend": "gloo",
            "batch": args.batch,
            "pos": args.pos,
            "repeats": args.repeats,
            "rounds": args.rounds,
            "threads_per_process": 1,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "summary": summary,
        "runs": rounds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=2) + "\n")
    tmp_out.replace(out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
