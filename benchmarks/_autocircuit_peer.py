"""auto-circuit 1.0.1 on a model and task written by interplab (run by the auto-circuit peer's interpreter, never
imported by interplab: ``bash scripts/peers.sh autocircuit`` builds it in ``.peers/autocircuit``).

    python _autocircuit_peer.py SPEC.json [SPEC.json ...]   (one process, one import of auto-circuit, for all)

SPEC (written by `tests.autocircuit_peer.run_autocircuit` or by ``benchmarks/bench_discovery.py``):

- ``model``: a folder with a TransformerLens state dict ``model.pt`` and ``transformerlens_config.json``
  (exported from an interplab `Transformer`), ``dtype`` ("float32" or "float64": the model's and the patch
  masks' dtype for the scores and ``full``/``corrupt``; circuits always run in float32, because ``run_circuits``
  sets its masks with ``.float()``);
- ``data``: a safetensors file with ``clean`` and ``corrupt`` [n, pos] token rows (paired: row i of corrupt is
  the counterfactual of row i of clean), ``answers`` and ``wrong_answers`` [n, 1]; the metric is auto-circuit's
  logit difference (answer minus wrong answer) at the last position, all rows in one batch;
- ``methods``: a list of ``{"name": ..., "integrated_grad_samples": N}`` (omitted or null: plain EAP, the
  mask gradient at mask 0); each is auto-circuit's ``mask_gradient_prune_scores(grad_function="logit",
  answer_function="avg_diff")`` with RESAMPLE ablation from the corrupt rows;
- ``edge_counts``: circuit sizes whose outputs ``run_circuits`` computes with ``PatchType.TREE_PATCH``
  (input = clean, every edge outside the circuit patched to the corrupt run's sender value), edges ranked by
  the absolute score of each method;
- ``repeats``: timed calls per method, after one untimed warm-up call of the first method (0: score once,
  untimed);
- ``out``: the result JSON.

The result: ``versions``, ``n_edges``, ``edges`` (auto-circuit's edge names ``A0.1->A1.2.Q``, ``Resid
Start->MLP 0``, ``MLP 1->Resid End``), per method ``scores`` (edge -> score, auto-circuit's sign: the mask
gradient of minus the logit difference), ``wall_s``/``cpu_s`` (one per timed call), ``circuits`` (per
requested count: the edges kept, their number after ties, the per-example logit differences) and
``circuit_wall_s``/``circuit_cpu_s`` (run_circuits over all counts), plus ``full`` and ``corrupt`` (per-example
logit differences of the unpatched model on the clean and on the corrupt rows).
"""

import json
import sys
import time
import warnings
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

import transformer_lens as tl  # noqa: E402
from auto_circuit.data import PromptDataLoader, PromptDataset  # noqa: E402
from auto_circuit.prune import run_circuits  # noqa: E402
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores  # noqa: E402
from auto_circuit.types import AblationType, PatchType  # noqa: E402
from auto_circuit.utils.graph_utils import patchable_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

_BUFFERS = ("mask", "IGNORE")


def load_model(folder: Path, dtype: torch.dtype) -> tl.HookedTransformer:
    cfg = json.loads((folder / "transformerlens_config.json").read_text())
    cfg.update(use_attn_result=True, use_split_qkv_input=True, use_hook_mlp_in=True, dtype=dtype)
    model = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg))  # in dtype before the weights load
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[-1] not in _BUFFERS]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit the TransformerLens model: missing {missing}, unexpected {unexpected}"
        )
    model = model.to(dtype).eval()
    for p in model.parameters():  # as auto-circuit's load_tl_model: mask gradients only
        p.requires_grad = False
    return model


def logit_diffs(logits: torch.Tensor, answers: torch.Tensor, wrong: torch.Tensor) -> list[float]:
    return (logits.gather(-1, answers) - logits.gather(-1, wrong)).mean(-1).tolist()


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        run(json.loads(Path(path).read_text()))


def run(spec: dict) -> None:
    dtype = {"float32": torch.float32, "float64": torch.float64}[spec.get("dtype", "float32")]
    torch.set_default_dtype(dtype)  # auto-circuit creates its patch masks in the default dtype
    data = load_file(spec["data"])
    clean, corrupt = data["clean"], data["corrupt"]
    answers, wrong = data["answers"], data["wrong_answers"]
    model = load_model(Path(spec["model"]), dtype)
    with torch.no_grad():
        full = logit_diffs(model(clean)[:, -1], answers, wrong)
        corrupted = logit_diffs(model(corrupt)[:, -1], answers, wrong)
    pm, setup_wall, setup_cpu = timed(
        lambda: patchable_model(model, factorized=True, slice_output="last_seq", separate_qkv=True)
    )
    dataset = PromptDataset(clean, corrupt, list(answers), list(wrong))
    loader = PromptDataLoader(dataset, seq_len=None, diverge_idx=0, batch_size=len(clean), shuffle=False)
    edges = sorted(pm.edges, key=lambda e: e.name)
    out = {
        "versions": {p: version(p) for p in ("auto-circuit", "transformer-lens", "torch")},
        "n_edges": pm.n_edges,
        "edges": [e.name for e in edges],
        "setup_wall_s": setup_wall,
        "setup_cpu_s": setup_cpu,
        "full": full,
        "corrupt": corrupted,
        "methods": {},
    }

    def float32_model():
        torch.set_default_dtype(torch.float32)
        return patchable_model(
            load_model(Path(spec["model"]), torch.float32),
            factorized=True,
            slice_output="last_seq",
            separate_qkv=True,
        )

    circuit_model = None
    for index, method in enumerate(spec["methods"]):
        n = method.get("integrated_grad_samples")
        kwargs = {"mask_val": 0.0} if n is None else {"integrated_grad_samples": int(n)}

        score = partial(
            mask_gradient_prune_scores,
            pm,
            loader,
            None,
            grad_function="logit",
            answer_function="avg_diff",
            ablation_type=AblationType.RESAMPLE,
            clean_corrupt="corrupt",
            **kwargs,
        )

        repeats = int(spec.get("repeats", 0))
        if not repeats or index == 0:  # the first method's untimed call warms up the process for all
            scores = score()
        walls, cpus = [], []
        for _ in range(repeats):
            scores, wall, cpu = timed(score)
            walls.append(wall)
            cpus.append(cpu)
        result: dict = {
            "scores": {e.name: float(scores[e.dest.module_name][e.patch_idx]) for e in edges},
            "wall_s": walls,
            "cpu_s": cpus,
        }
        counts = [int(c) for c in spec.get("edge_counts", [])]
        if counts:
            if circuit_model is None:
                circuit_model = pm if dtype is torch.float32 else float32_model()
            outputs, wall, cpu = timed(
                partial(
                    run_circuits,
                    circuit_model,
                    loader,
                    counts,
                    scores,
                    patch_type=PatchType.TREE_PATCH,
                    ablation_type=AblationType.RESAMPLE,
                )
            )
            ranked = sorted(((abs(s), name) for name, s in result["scores"].items()), reverse=True)
            circuits = {}
            for count in counts:
                if count == 0:
                    kept = []
                else:  # run_circuits keeps every edge at least as large as the count-th (ties included)
                    threshold = ranked[count - 1][0]
                    kept = sorted(name for value, name in ranked if value >= threshold)
                logits = next(iter(outputs[len(kept)].values()))
                circuits[str(count)] = {"edges": kept, "logit_diff": logit_diffs(logits, answers, wrong)}
            result |= {"circuits": circuits, "circuit_wall_s": wall, "circuit_cpu_s": cpu}
        out["methods"][method["name"]] = result
    Path(spec["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
