"""Core metrics side by side with SAEBench 0.6 on one model, SAE and token set: interplab's `evaluate_sae`
(its own definitions), interplab's `saebench_core` (SAEBench's definitions) and SAEBench's ``run_evals`` itself
(through a real SAELens ActivationsStore, in the sae-bench peer's interpreter: benchmarks/_saebench_core_peer.py),
with wall and CPU time per evaluation, in interleaved rounds, one thread each.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_saebench_core.py \\
        --saebench-python .peers/saebench/bin/python --out benchmarks/results/saebench_core.json

The model: the demo's preset with MLPs (``induction-2l-mlp``) made TransformerLens-compatible (learned
positions, no smeared keys), trained ``--model-steps`` steps; the SAEs: TopK, k in ``--ks``, at
blocks.0.hook_resid_post, trained ``--sae-steps`` steps (both cached in ``--work``, reused when present). The
tokens: ``--batches`` validation batches of 16 x 128 of the python-stdlib corpus; SAEBench ignores the
tokenizer's BOS and pad ids (as its ``multiple_evals`` does).
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
CORE = ("l0", "fvu", "explained_variance", "ce_loss_recovered", "kl_div", "dead_fraction", "dense_fraction")


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--saebench-python", default=os.environ.get("INTERPLAB_SAEBENCH_PYTHON",
                                                                str(ROOT / ".peers/saebench/bin/python")))  # fmt: skip
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "saebench_core.json"))
    ap.add_argument("--work", default="/tmp/bench_saebench_core")
    ap.add_argument("--model-steps", type=int, default=400)
    ap.add_argument("--sae-steps", type=int, default=300)
    ap.add_argument("--ks", default="16,32")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    work = Path(args.work)
    run = work / "model"
    from tests.saebench_peer import train_model_and_saes

    saes_run = work / "saes"
    train_model_and_saes(
        run, saes_run, model_steps=args.model_steps, sae_steps=args.sae_steps, ks=args.ks, hook=HOOK, env=env
    )

    from interplab import load_model
    from interplab.sae import load_sae
    from interplab.sae.activations import TokenFilter, corpus_token_batches
    from interplab.sae.evaluate import evaluate_sae
    from interplab.sae.saebench import saebench_core, saebench_ignore_tokens
    from tests.autocircuit_peer import export_transformer_lens
    from tests.peers import peer_env
    from tests.saebench_peer import prepare, run_saebench

    model = load_model(run / "final").eval()
    data = corpus_token_batches(model, split="validation", seq_len=128, batch_size=16, n_batches=args.batches)
    tokens = torch.cat(data.batches)
    ignore = saebench_ignore_tokens(model.tokenizer)
    model_dir = export_transformer_lens(model, work / "tl_model")
    saes = {f.name: load_sae(f) for f in sorted((saes_run / "saes").iterdir())}
    specs = {
        name: prepare(model, sae, tokens, work / "jobs" / name, batch_size=16, ignore_tokens=ignore,
                      model_folder=model_dir)
        for name, sae in saes.items()
    }  # fmt: skip
    # the token set SAEBench uses: positions not holding an ignored token (interplab's default filter also
    # drops position 0 of every row)
    same_tokens = TokenFilter(exclude_bos=False, bos_token_id=model.tokenizer.bos_id,
                              pad_token_id=model.tokenizer.pad_id)  # fmt: skip
    times: dict[str, dict[str, list[float]]] = {}
    results: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, sae in saes.items():
            t = times.setdefault(name, {})
            rep, w, c = timed(
                lambda sae=sae: evaluate_sae(model, sae, data.batches, token_filter=data.token_filter)
            )
            t.setdefault("evaluate_sae_wall_s", []).append(w)
            t.setdefault("evaluate_sae_cpu_s", []).append(c)
            alike = evaluate_sae(model, sae, data.batches, token_filter=same_tokens)
            sb, w, c = timed(lambda sae=sae: saebench_core(model, sae, data.batches, ignore_tokens=ignore))
            t.setdefault("saebench_core_wall_s", []).append(w)
            t.setdefault("saebench_core_cpu_s", []).append(c)
            results[name] = {"evaluate_sae": rep.to_dict(), "evaluate_sae_saebench_tokens": alike.to_dict(),
                             "saebench_core": sb}  # fmt: skip
        peer, w, c = timed(lambda: run_saebench(args.saebench_python, list(specs.values()), peer_env()))
        for name, got in zip(specs, peer, strict=True):
            times[name].setdefault("sae_bench_wall_s", []).extend(got["wall_s"])
            times[name].setdefault("sae_bench_cpu_s", []).extend(got["cpu_s"])
            results[name]["sae_bench"] = {"metrics": got["metrics"], "tokens_match": got["tokens_match"]}
            versions = got["versions"]
        for name in specs:
            times[name].setdefault("sae_bench_process_wall_s", []).append(w / len(specs))

    table = []
    for name, r in results.items():
        ev, alike, ours, theirs = (r["evaluate_sae"], r["evaluate_sae_saebench_tokens"], r["saebench_core"],
                                   r["sae_bench"]["metrics"])  # fmt: skip
        med = {k: statistics.median(v) for k, v in times[name].items()}
        r["median_s"] = med
        table.append(
            {
                "sae": name,
                "l0": [ev["l0"], ours["l0"], theirs["l0"]],
                "fvu / explained_variance": [
                    ev["fvu"],
                    ours["explained_variance"],
                    theirs["explained_variance"],
                ],
                "1 - fvu (SAEBench tokens)": 1 - alike["fvu"],
                "ce_loss_recovered / ce_loss_score": [
                    ev["ce_loss_recovered"],
                    ours["ce_loss_score"],
                    theirs["ce_loss_score"],
                ],  # fmt: skip
                "ce_loss_recovered (SAEBench tokens)": alike["ce_loss_recovered"],
                "kl_div / kl_div_with_sae": [
                    ev["kl_div"],
                    ours["kl_div_with_sae"],
                    theirs["kl_div_with_sae"],
                ],
                "kl_div_score": [None, ours["kl_div_score"], theirs["kl_div_score"]],
                "dead_fraction / 1 - frac_alive": [
                    ev["dead_fraction"],
                    1 - ours["frac_alive"],
                    1 - theirs["frac_alive"],
                ],  # fmt: skip
                "dense_fraction / freq_over_10_percent": [
                    ev["dense_fraction"],
                    ours["freq_over_10_percent"],
                    theirs["freq_over_10_percent"],
                ],  # fmt: skip
                "wall_s": [med["evaluate_sae_wall_s"], med["saebench_core_wall_s"], med["sae_bench_wall_s"]],
                "cpu_s": [med["evaluate_sae_cpu_s"], med["saebench_core_cpu_s"], med["sae_bench_cpu_s"]],
                "max_abs_diff_saebench_core_vs_sae_bench": max(
                    abs(ours[k] - theirs[k]) for k in ours if isinstance(theirs.get(k), float)
                ),
            }
        )
    out = {
        "what": "core metrics on the same model, SAE and tokens: [interplab evaluate_sae, interplab "
        "saebench_core (SAEBench's definitions), sae-bench run_evals]",
        "model": "induction-2l-mlp, learned positions, no smeared keys",
        "model_steps": args.model_steps,
        "sae_steps": args.sae_steps,
        "hook": HOOK,
        "tokens": list(tokens.shape),
        "ignore_tokens": sorted(ignore),
        "rounds": args.rounds,
        "threads": 1,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "peer_versions": versions,
        "table": table,
        "saes": results,
        "times": times,
    }
    from interplab.io import atomic_write_json

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, out)
    print(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
