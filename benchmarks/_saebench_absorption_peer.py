"""SAEBench 0.6's feature-absorption eval (first-letter absorption: `sae_bench.evals.absorption`) on a model,
tokenizer and SAE written by interplab; run by the sae-bench peer's interpreter (``bash scripts/peers.sh
saebench`` builds ``.peers/saebench``), never imported by interplab.

    python _saebench_absorption_peer.py SPEC.json

SPEC (written by tests/sae/test_bench_absorption_peer.py and benchmarks/bench_saebench_absorption.py):

- ``model``: a TransformerLens export of an interplab model (`tests.autocircuit_peer.export_transformer_lens`),
  loaded into a ``HookedTransformer`` with ``tokenizer`` (the model's ``tokenizer.json``, as a
  ``PreTrainedTokenizerFast``; ``bos``/``pad``: its special tokens) so SAEBench tokenises its own prompts;
- ``sae``: an SAE folder in SAELens' layout, prepared by SAEBench's ``load_and_format_sae``;
- ``work``: a folder for SAEBench's artifacts (its probes, k-sparse probing and absorption parquet files);
- ``prompt_token_pos``: where the word sits in SAEBench's prompt ``{word} has the first letter:`` (counted from
  the end; SAEBench's -6 is GPT-2's tokenisation, each tokenizer has its own);
- ``max_k_value``, ``min_gt_probe_f1``, ``min_feats_for_eval``, ``seed``: SAEBench's config (defaults 10, 0.6,
  20, 42);
- ``single_token_answers`` (default false): draw SAEBench's in-context examples only from words whose answer
  is one token (`single_token_answers`; without it a tokenizer that splits some answers makes SAEBench refuse).

SAEBench's ``run_eval`` loads its model by name from the Hugging Face hub (``from_pretrained_no_processing``),
so this calls the two experiments it chains (`run_k_sparse_probing_experiment`, then
`run_feature_absortion_experiment`) and its own aggregation (``_aggregate_results_df``) with the model built
here, and applies ``run_eval``'s gate (letters whose ground-truth probe F1 > ``min_gt_probe_f1``; at least
``min_feats_for_eval`` of them, else SAEBench reports no absorption) after the fact, so both the gated and the
ungated means come back. Writes ``out``: ``versions``, ``letters`` (per letter: probe F1, split features,
true positives, full-absorption count and rate, mean absorption fraction), ``mean_full_absorption_score`` and
``mean_absorption_fraction_score`` over the gated letters (null when too few pass) and over all letters,
``words`` (per probe true positive: letter, prompt token ids, SAEBench's flags), ``probe`` [26, d_model]
weights, ``x`` (the word-position activations SAEBench read, per word), ``wall_s``/``cpu_s``; or ``error``
(the exception SAEBench raised) when it cannot run on this model.
"""

import json
import random
import shutil
import sys
import time
import traceback
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")

import _saebench_core_peer as core_peer  # noqa: E402  (beside this file: the model and SAE loaders)
import transformer_lens as tl  # noqa: E402
from sae_bench.evals.absorption import main as absorption_main  # noqa: E402
from sae_bench.evals.absorption.common import load_probe  # noqa: E402
from sae_bench.evals.absorption.feature_absorption import run_feature_absortion_experiment  # noqa: E402
from sae_bench.evals.absorption.k_sparse_probing import run_k_sparse_probing_experiment  # noqa: E402
from sae_bench.evals.absorption.vocab import LETTERS  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

TEMPLATE = "{word} has the first letter:"


def load_model(folder: Path, tokenizer_file: str, bos: str, pad: str, work: Path) -> tl.HookedTransformer:
    tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, bos_token=bos, eos_token=bos, pad_token=pad)
    # TransformerLens re-opens the tokenizer by its name_or_path (AutoTokenizer, to add BOS): a saved folder
    tok.save_pretrained(work / "hf_tokenizer")
    return core_peer.load_model(folder, PreTrainedTokenizerFast.from_pretrained(work / "hf_tokenizer"))


def single_token_answers(model: tl.HookedTransformer) -> None:
    """Draw SAEBench's in-context examples only from words whose answer `` X`` (the capitalised first
    letter) is one token of this tokenizer (every word is still evaluated: its own answer is not in its
    prompt). SAEBench's ICL prompts must all have one token length (its absorption step refuses otherwise,
    and its probe step reads a fixed position from the end of right-padded prompts); a small BPE splits some
    answers (`` J`` -> 2 tokens)."""
    from sae_bench.evals.absorption import feature_absorption_calculator, probing, prompting

    tok = model.tokenizer
    ok = {c for c in LETTERS if len(tok.encode(" " + c.upper(), add_special_tokens=False)) == 1}

    def create_icl_prompt(word, examples, *args, **kwargs):
        kept = [e for e in examples if e.strip() and e.strip()[0].lower() in ok]
        return prompting.create_icl_prompt(word, kept, *args, **kwargs)

    probing.create_icl_prompt = create_icl_prompt
    feature_absorption_calculator.create_icl_prompt = create_icl_prompt


def run(spec: dict) -> dict:
    seed = int(spec.get("seed", 42))
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    work = Path(spec["work"])
    shutil.rmtree(work, ignore_errors=True)  # SAEBench reuses any probe it finds there: start clean
    work.mkdir(parents=True)
    model = load_model(Path(spec["model"]), spec["tokenizer"], spec["bos"], spec["pad"], work)
    sae = core_peer.load_sae(spec["sae"])
    layer = int(spec["layer"])
    if spec.get("single_token_answers"):
        single_token_answers(model)
    pos, max_k = int(spec["prompt_token_pos"]), int(spec.get("max_k_value", 10))
    dirs = {"probes_dir": work / "probes"}
    name = "interplab_sae"
    probing = run_k_sparse_probing_experiment(
        model=model, sae=sae, layer=layer, sae_name=name, force=True, max_k_value=max_k,
        prompt_template=TEMPLATE, prompt_token_pos=pos, device="cpu",
        experiment_dir=work / "k_sparse_probing", precalc_k_sparse_probe_sae_acts=True, verbose=False, **dirs,
    )  # fmt: skip
    raw = run_feature_absortion_experiment(
        model=model, sae=sae, layer=layer, sae_name=name, force=True, max_k_value=max_k,
        prompt_template=TEMPLATE, prompt_token_pos=pos, device="cpu",
        experiment_dir=work / "feature_absorption", sparse_probing_experiment_dir=work / "k_sparse_probing",
        batch_size=10, **dirs,
    )  # fmt: skip
    agg = absorption_main._aggregate_results_df(raw)
    f1 = {r["letter"]: float(r["f1_probe"]) for _, r in probing.iterrows()}
    letters = {}
    for _, r in agg.iterrows():
        letters[r["letter"]] = {
            "f1_probe": f1[r["letter"]],
            "split_feats": [int(i) for i in r["split_feats"]],
            "num_probe_true_positives": float(r["num_probe_true_positives"]),
            "num_full_absorption": int(r["num_full_absorption"]),
            "full_absorption_rate": float(r["full_absorption_rate"]),
            "mean_absorption_fraction": float(r["mean_absorption_fraction"]),
        }
    gate = float(spec.get("min_gt_probe_f1", 0.6))
    passed = [v for v in letters.values() if v["f1_probe"] > gate]
    enough = len(passed) >= int(spec.get("min_feats_for_eval", 20))

    def mean(rows: list, key: str):
        return float(np.mean([v[key] for v in rows])) if rows else None

    probe = load_probe(model.cfg.model_name, layer, work / "probes", torch.float32, "cpu")
    hook = f"blocks.{layer}.hook_resid_post"
    words, xs = [], []
    for _, r in raw.iterrows():
        toks = model.to_tokens(r["prompt"])
        _, cache = model.run_with_cache(toks, names_filter=[hook])
        xs.append(cache[hook][0, pos].tolist())
        words.append({"letter": r["letter"], "token": r["token"], "tokens": toks[0].tolist(),
                      "is_full_absorption": bool(r["is_full_absorption"]),
                      "absorption_fraction": float(r["absorption_fraction"]),
                      "split_feats": [int(i) for i in r["split_feats"]]})  # fmt: skip
    return {
        "letters": letters,
        "n_letters_passing_gate": len(passed),
        "gate_met": enough,
        "mean_full_absorption_score": mean(passed, "full_absorption_rate") if enough else None,
        "mean_absorption_fraction_score": mean(passed, "mean_absorption_fraction") if enough else None,
        "mean_full_absorption_all_letters": mean(list(letters.values()), "full_absorption_rate"),
        "mean_absorption_fraction_all_letters": mean(list(letters.values()), "mean_absorption_fraction"),
        "words": words,
        "x": xs,
        "probe": probe.weights.detach().float().tolist(),
        "letters_order": LETTERS,
        "prompt_token_pos": pos,
    }


def main() -> None:
    torch.set_num_threads(1)
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = {"versions": {p: version(p) for p in ("sae-bench", "sae-lens", "transformer-lens", "torch")}}
    w, c = time.perf_counter(), time.process_time()
    try:
        out.update(run(spec))
    except Exception as err:  # the exact error is the result when SAEBench cannot run on this model
        out["error"] = f"{type(err).__name__}: {err}"
        out["traceback"] = traceback.format_exc()[-4000:]
    out["wall_s"], out["cpu_s"] = time.perf_counter() - w, time.process_time() - c
    Path(spec["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
