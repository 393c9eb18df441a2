"""Feature absorption side by side with SAEBench 0.6 on one model and SAE: interplab's `sae bench` absorption
(first letters of the model's own corpus tokens, the class-mean direction, one main latent) and SAEBench's
first-letter absorption eval itself (its ICL prompts ``{word} has the first letter:``, its trained
ground-truth probe, its k-sparse feature splits; in the sae-bench peer's interpreter:
benchmarks/_saebench_absorption_peer.py), with wall and CPU time; plus the per-word rule on SAEBench's own
inputs: interplab's `absorption_flags` on the activations of SAEBench's prompts (computed by the interplab
model), SAEBench's probe direction and split features, against SAEBench's ``is_full_absorption``.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_saebench_absorption.py \\
        --saebench-python .peers/saebench/bin/python --out benchmarks/results/saebench_absorption.json

The model and SAEs as in bench_saebench_core.py (``induction-2l-mlp`` with learned positions and no smeared
keys, TopK SAEs at blocks.0.hook_resid_post), trained here (cached in ``--work``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HOOK = "blocks.0.hook_resid_post"


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saebench-python", default=os.environ.get("INTERPLAB_SAEBENCH_PYTHON",
                                                                str(ROOT / ".peers/saebench/bin/python")))  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "saebench_absorption.json"))
    ap.add_argument("--work", default="/tmp/bench_saebench_absorption")
    ap.add_argument("--model", default=None, help="an interplab training run to use instead of training one")
    ap.add_argument(
        "--saes", default=None, help="an `interplab sae train` run to use instead of training one"
    )
    ap.add_argument("--model-steps", type=int, default=150)
    ap.add_argument("--sae-steps", type=int, default=300)
    ap.add_argument("--ks", default="16,32")
    ap.add_argument("--batches", type=int, default=8, help="validation batches of 16 x 128 for interplab's")
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    work = Path(args.work)
    run = Path(args.model) if args.model else work / "model"
    from tests.saebench_peer import train_model_and_saes

    saes_run = Path(args.saes) if args.saes else work / "saes"
    train_model_and_saes(
        run, saes_run, model_steps=args.model_steps, sae_steps=args.sae_steps, ks=args.ks, hook=HOOK, env=env
    )

    from interplab import load_model
    from interplab.sae import load_sae
    from interplab.sae.activations import corpus_token_batches
    from interplab.sae.bench import BenchConfig, first_letter_labels, labelled_metrics, site_activations
    from tests.autocircuit_peer import export_transformer_lens
    from tests.peers import peer_env
    from tests.saebench_peer import absorption_spec, compare_absorption, run_absorption_peer

    model = load_model(run / "final").eval()
    data = corpus_token_batches(model, split="validation", seq_len=128, batch_size=16, n_batches=args.batches)
    model_dir = export_transformer_lens(model, work / "tl_model")
    saes = {f.name: load_sae(f) for f in sorted((saes_run / "saes").iterdir())}
    cfg = BenchConfig()
    rows, versions = [], None
    for name, sae in saes.items():

        def ours(sae=sae):
            x, acts, props = site_activations(
                model, sae, data.batches, data.token_filter,
                {"first_letter": lambda t: first_letter_labels(model.tokenizer, t)}, cfg.max_tokens,
            )  # fmt: skip
            cfg_abs = BenchConfig(ks=(1,), input_probe=False)
            return labelled_metrics(acts.float(), x.float(), sae.W_dec.detach().float(), props, cfg_abs)

        mine, w_ours, c_ours = timed(ours)
        # SAEBench as published, then with its in-context examples drawn from single-token answers only
        plain = absorption_spec(model, sae, work / "jobs" / name / "plain", model_folder=model_dir)
        as_is = run_absorption_peer(args.saebench_python, plain, peer_env())
        spec = absorption_spec(model, sae, work / "jobs" / name / "single", model_folder=model_dir,
                               single_token_answers=True)  # fmt: skip
        (got, w_peer, c_peer) = timed(
            lambda spec=spec: run_absorption_peer(args.saebench_python, spec, peer_env())
        )
        versions = got["versions"]
        row: dict = {"sae": name, "k": sae.cfg.k, "interplab_wall_s": w_ours, "interplab_cpu_s": c_ours,
                     "sae_bench_wall_s": got["wall_s"], "sae_bench_cpu_s": got["cpu_s"],
                     "sae_bench_process_wall_s": w_peer,
                     "sae_bench_as_published": as_is.get("error") or "ran",
                     "interplab": {"absorption_first_letter": mine["absorption_first_letter"],
                                   "false_negative_first_letter": mine["false_negative_first_letter"]}}  # fmt: skip
        if "error" in got:
            row["sae_bench_error"] = got["error"]
            row["sae_bench_traceback"] = got["traceback"]
        else:
            row["sae_bench"] = {k: got[k] for k in ("mean_full_absorption_score", "mean_absorption_fraction_score",
                                                    "mean_full_absorption_all_letters",
                                                    "mean_absorption_fraction_all_letters",
                                                    "n_letters_passing_gate", "gate_met", "letters")}  # fmt: skip
            row["same_inputs"] = compare_absorption(model, sae, got)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("sae_bench",)}, indent=1, default=str))
    out = {
        "what": "feature absorption on the same model and SAE: interplab's sae bench (first letters of corpus "
        "tokens) and sae-bench 0.6's first-letter absorption eval; same_inputs: interplab's per-word rule on "
        "sae-bench's prompts, probe and split features against sae-bench's is_full_absorption",
        "model": "induction-2l-mlp, learned positions, no smeared keys",
        "model_steps": args.model_steps,
        "sae_steps": args.sae_steps,
        "hook": HOOK,
        "interplab_tokens": [len(data.batches) * 16, 128],
        "threads": 1,
        "load": os.getloadavg(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "peer_versions": versions,
        "rows": rows,
        "median_sae_bench_cpu_s": statistics.median(r["sae_bench_cpu_s"] for r in rows),
    }
    from interplab.io import atomic_write_json

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)


if __name__ == "__main__":
    main()
