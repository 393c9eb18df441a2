"""SAEBench 0.6's core eval (`sae_bench.evals.core.main.run_evals`) on a model, SAE and tokens written by
interplab; run by the sae-bench peer's interpreter (``bash scripts/peers.sh saebench`` builds
``.peers/saebench``), never imported by interplab.

    python _saebench_core_peer.py SPEC.json [SPEC.json ...]   (one process, one import of sae-bench, for all)

SPEC (written by tests/sae/test_bench_core_peer.py and benchmarks/bench_saebench_core.py):

- ``model``: a folder with a TransformerLens state dict ``model.pt`` and ``transformerlens_config.json``
  (`tests.autocircuit_peer.export_transformer_lens` of an interplab model), loaded into a ``HookedTransformer``;
- ``sae``: an SAE folder in SAELens' layout (`interplab.sae.save_sae`), loaded with ``SAE.load_from_disk``
  and prepared by SAEBench's own ``load_and_format_sae``;
- ``tokens``: a safetensors file with ``tokens`` [n, pos]; they become a pretokenized ``datasets.Dataset``
  read by a real SAELens ``ActivationsStore`` (``from_sae``, context size = pos, ``batch_size`` prompts per
  batch, no shuffle), and SAEBench evaluates n / batch_size batches for both its reconstruction (CE, KL) and its
  sparsity/variance metrics. Every batch the store hands out is checked against the rows (``tokens_match``);
- ``ignore_tokens``: the token ids SAEBench leaves out (its ``multiple_evals`` passes the tokenizer's pad, EOS
  and BOS ids); ``exclude_special_tokens_from_reconstruction`` (default false, SAEBench's default);
- ``repeats``: timed calls of run_evals (store rebuilt each time; the first also gives the numbers);
- ``out``: the result JSON: ``versions``, ``metrics`` (SAEBench's scalar metrics, flattened to their names, and
  its misc metrics: frac_alive, freq_over_1_percent, ...), ``feature_density`` [d_sae], ``tokens_match``,
  ``wall_s``/``cpu_s`` per call.
"""

import json
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

warnings.filterwarnings("ignore")

import datasets  # noqa: E402
import transformer_lens as tl  # noqa: E402
from sae_bench.evals.core import main as core  # noqa: E402
from sae_bench.evals.core.eval_config import CoreEvalConfig  # noqa: E402
from sae_bench.sae_bench_utils import general_utils  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.training.activations_store import ActivationsStore  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

_BUFFERS = ("mask", "IGNORE")


def load_model(folder: Path, tokenizer=None) -> tl.HookedTransformer:
    """The TransformerLens export in ``folder`` (with ``tokenizer``, a Hugging Face tokenizer, when given)."""
    cfg = json.loads((folder / "transformerlens_config.json").read_text())
    model = tl.HookedTransformer(tl.HookedTransformerConfig(**cfg), tokenizer=tokenizer)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.rsplit(".", 1)[-1] not in _BUFFERS]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval()


def load_sae(folder: str) -> SAE:
    sae = SAE.load_from_disk(folder, device="cpu").eval()
    meta = sae.cfg.metadata
    if getattr(meta, "model_name", None) is None:
        meta.model_name = "interplab"
    if getattr(meta, "prepend_bos", None) is None:
        meta.prepend_bos = True
    _, sae, _ = general_utils.load_and_format_sae("interplab", sae, "cpu")
    return sae


def evaluate(spec: dict, model, sae, tokens: torch.Tensor) -> tuple[dict, dict, dict]:
    n, pos = tokens.shape
    bs = int(spec["batch_size"])
    n_batches = n // bs
    rows = datasets.Dataset.from_dict({"tokens": tokens.tolist()})
    store = ActivationsStore.from_sae(
        model, sae, dataset=rows, context_size=pos, streaming=False, store_batch_size_prompts=bs
    )
    handed: list[torch.Tensor] = []
    get = store.get_batch_tokens

    def logged(*args, **kwargs):
        out = get(*args, **kwargs)
        handed.append(out.cpu())
        return out

    store.get_batch_tokens = logged  # type: ignore[method-assign]
    cfg = CoreEvalConfig(
        batch_size_prompts=bs,
        n_eval_reconstruction_batches=n_batches,
        n_eval_sparsity_variance_batches=n_batches,
        context_size=pos,
        compute_kl=True,
        compute_ce_loss=True,
        compute_l2_norms=True,
        compute_sparsity_metrics=True,
        compute_variance_metrics=True,
        compute_featurewise_density_statistics=True,
        compute_featurewise_weight_based_metrics=True,
        exclude_special_tokens_from_reconstruction=bool(
            spec.get("exclude_special_tokens_from_reconstruction")
        ),
    )
    metrics, features = core.run_evals(
        sae, store, model, cfg, ignore_tokens=set(int(t) for t in spec.get("ignore_tokens", []))
    )
    used = tokens[: n_batches * bs]
    match = {
        "reconstruction": bool(torch.equal(torch.cat(handed[:n_batches]), used)),
        "sparsity": bool(torch.equal(torch.cat(handed[n_batches : 2 * n_batches]), used)),
    }
    return metrics, features, match


def main() -> None:
    torch.set_num_threads(1)
    for path in sys.argv[1:]:
        run(json.loads(Path(path).read_text()))


def run(spec: dict) -> None:
    model = load_model(Path(spec["model"]))
    sae = load_sae(spec["sae"])
    tokens = load_file(spec["tokens"])["tokens"].long()
    walls, cpus, first = [], [], None
    for _ in range(max(1, int(spec.get("repeats", 1)))):
        w, c = time.perf_counter(), time.process_time()
        got = evaluate(spec, model, sae, tokens)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
        first = first or got
    metrics, features, match = first
    flat = {k: v for group in metrics.values() for k, v in group.items()}
    flat.update(core.calculate_misc_metrics(features))
    out = {
        "versions": {p: version(p) for p in ("sae-bench", "sae-lens", "transformer-lens", "torch")},
        "metrics": flat,
        "feature_density": features["feature_density"],
        "tokens_match": match,
        "wall_s": walls,
        "cpu_s": cpus,
    }
    Path(spec["out"]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
