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

from interplab.hooks import Site
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


def train_model_and_saes(
    run: Path, saes_run: Path, *, model_steps: int, sae_steps: int, ks: str, hook: str, env: dict[str, str]
) -> None:
    """The SAEBench comparisons' model and SAEs, trained unless present: the demo's preset with MLPs
    (``induction-2l-mlp``) made TransformerLens-compatible (learned positions, no smeared keys) into ``run``,
    and TopK SAEs of expansion 4 (k in ``ks``, e.g. "16,32") at ``hook`` into ``saes_run``; one thread each."""
    import sys

    if not (run / "final").exists():
        subprocess.run(
            [sys.executable, "-m", "interplab", "train", "--preset", "induction-2l-mlp", "--out", str(run),
             "--set", "model.positional=learned", "--set", "model.smear_keys=false", "--steps",
             str(model_steps), "--threads", "1"],
            check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    if not (saes_run / "saes").exists():
        subprocess.run(
            [sys.executable, "-m", "interplab", "sae", "train", "--model", str(run / "final"), "--hook", hook,
             "--out", str(saes_run), "--arch", "topk", "--expansion", "4", "--sweep", f"k={ks}",
             "--steps", str(sae_steps), "--batch", "1024", "--threads", "1"],
            check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        )  # fmt: skip


# --------------------------------------------------------------------------- feature absorption

ABSORPTION_RUNNER = ROOT / "benchmarks" / "_saebench_absorption_peer.py"
#: SAEBench's absorption prompt after the word; the word's position from the end depends on the tokenizer
ABSORPTION_SUFFIX = " has the first letter:"


def absorption_spec(
    model: Transformer, sae: SAE, folder: Path, *, model_folder: Path | None = None, **config: Any
) -> Path:
    """Write one SAEBench absorption job into ``folder`` (model export, tokenizer, SAE, spec.json; ``config``:
    SAEBench's ``max_k_value``, ``min_gt_probe_f1``, ``min_feats_for_eval``, ``seed``) and return the spec's
    path. SAEBench reads a ``blocks.L.hook_resid_post`` SAE only."""
    site = Site.parse(sae.cfg.hook_name)
    if site.name != f"blocks.{site.layer}.hook_resid_post":
        raise ValueError(
            f"SAEBench's absorption reads blocks.L.hook_resid_post SAEs, not {sae.cfg.hook_name}"
        )
    tok = model.tokenizer
    if tok is None or tok.bos_id is None or tok.pad_id is None:
        raise ValueError("SAEBench's absorption tokenises its own prompts: the model needs a BPE tokenizer")
    folder.mkdir(parents=True, exist_ok=True)
    if model_folder is None:
        model_folder = export_transformer_lens(model, folder / "model")
    save_sae(sae, folder / "sae")
    tok.save(folder / "tokenizer.json")
    spec = {
        "model": str(model_folder),
        "tokenizer": str(folder / "tokenizer.json"),
        "bos": "<|bos|>",
        "pad": "<|pad|>",
        "sae": str(folder / "sae"),
        "layer": site.layer,
        "prompt_token_pos": -(len(tok.encode(ABSORPTION_SUFFIX)) + 1),
        "work": str(folder / "work"),
        "out": str(folder / "absorption.json"),
        **config,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    return folder / "spec.json"


def run_absorption_peer(python: str, spec: Path, env: dict[str, str], timeout: float = 1800) -> Any:
    """Run SAEBench's absorption eval on one spec (its own process); the result dict (``error`` when SAEBench
    raised, the process itself having finished)."""
    done = subprocess.run(
        [python, str(ABSORPTION_RUNNER), str(spec)],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": ""},
        timeout=timeout,
        check=False,
        cwd=json.loads(spec.read_text())["work"].rsplit("/", 1)[0],
    )
    if done.returncode != 0:
        raise RuntimeError(f"sae-bench ({python}) failed:\n{done.stderr[-4000:]}")
    return json.loads(Path(json.loads(spec.read_text())["out"]).read_text())


def compare_absorption(model: Transformer, sae: SAE, got: dict[str, Any]) -> dict[str, Any]:
    """interplab's per-word rule (`absorption_flags`) on SAEBench's own inputs: the interplab model's
    activations of SAEBench's prompt tokens at the word position, SAEBench's probe direction for the word's
    letter and its split features as the main latents; against SAEBench's ``is_full_absorption``."""
    import torch

    from interplab.sae.bench import absorption_flags

    words = got["words"]
    hook = sae.cfg.hook_name
    xs = []
    with torch.no_grad():
        for w in words:
            _, cache = model.run_with_cache(torch.tensor([w["tokens"]]), names=[hook])
            xs.append(cache[hook][0])
    probe = torch.tensor(got["probe"])
    theirs_x = torch.tensor(got["x"])
    pos = int(got["prompt_token_pos"])
    x = torch.stack([a[pos] for a in xs])
    acts = sae.encode(x).detach()
    agree, ours_full, per_letter = 0, 0, {}
    for i, w in enumerate(words):
        letter = got["letters_order"].index(w["letter"])
        _, flag = absorption_flags(
            x[i : i + 1], acts[i : i + 1], sae.W_dec.detach(), probe[letter], w["split_feats"]
        )
        mine = bool(flag[0])
        ours_full += mine
        agree += mine == w["is_full_absorption"]
        s = per_letter.setdefault(w["letter"], {"words": 0, "ours": 0, "theirs": 0})
        s["words"] += 1
        s["ours"] += mine
        s["theirs"] += w["is_full_absorption"]
    return {
        "words": len(words),
        "agree": agree,
        "interplab_full_absorptions": ours_full,
        "sae_bench_full_absorptions": sum(w["is_full_absorption"] for w in words),
        "max_abs_diff_x": float((x - theirs_x).abs().max()),
        "word_position": pos,
        "per_letter": per_letter,
    }
