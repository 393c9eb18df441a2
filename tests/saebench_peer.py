"""SAEBench 0.6's core eval beside interplab's: the model, SAE and tokens handed over as files.

sae-bench runs in its own interpreter (``bash scripts/peers.sh saebench`` builds ``.peers/saebench``;
`tests.peers.peer_python("saebench")` finds it, or INTERPLAB_SAEBENCH_PYTHON) and reads what `prepare`
writes: the interplab model exported as a TransformerLens checkpoint (`export_transformer_lens`), the SAE in
SAELens' layout (`save_sae`) and the token rows (safetensors). ``benchmarks/_saebench_core_peer.py`` runs
SAEBench's ``run_evals`` through a real SAELens ``ActivationsStore`` and writes JSON. Used by
tests/sae/test_bench_core_peer.py and benchmarks/bench_saebench_core.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import Tensor

from interplab.model.transformer import Transformer
from interplab.sae import SAE, save_sae
from tests.autocircuit_peer import export_transformer_lens

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "benchmarks" / "_saebench_core_peer.py"


def prepare(
    model: Transformer,
    sae: SAE,
    tokens: Tensor,
    folder: Path,
    *,
    batch_size: int,
    ignore_tokens: Collection[int],
    exclude_special: bool = False,
    repeats: int = 1,
    model_folder: Path | None = None,
) -> Path:
    """Write one SAEBench job into ``folder`` (model, SAE, tokens [n, pos], spec.json) and return the spec's
    path. ``model_folder``: an export of ``model`` already written (several SAEs of one model share it)."""
    folder.mkdir(parents=True, exist_ok=True)
    if model_folder is None:
        model_folder = export_transformer_lens(model, folder / "model")
    save_sae(sae, folder / "sae")
    save_file({"tokens": tokens.contiguous()}, str(folder / "tokens.safetensors"))
    spec = {
        "model": str(model_folder),
        "sae": str(folder / "sae"),
        "tokens": str(folder / "tokens.safetensors"),
        "batch_size": batch_size,
        "ignore_tokens": sorted(int(t) for t in ignore_tokens),
        "exclude_special_tokens_from_reconstruction": exclude_special,
        "repeats": repeats,
        "out": str(folder / "saebench.json"),
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder / "spec.json"


def run_saebench(python: str, specs: Sequence[Path], env: dict[str, str], timeout: float = 1800) -> list[Any]:
    """Run every spec in one sae-bench process; their result dicts, in order."""
    done = subprocess.run(
        [python, str(RUNNER), *map(str, specs)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": ""},
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"sae-bench ({python}) failed:\n{done.stderr[-4000:]}")
    return [json.loads(Path(json.loads(Path(s).read_text())["out"]).read_text()) for s in specs]
