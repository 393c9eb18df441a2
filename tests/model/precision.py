"""Parity of interplab with `transformers` in one dtype (float32, bfloat16, float16), on every family of
`tests.model.test_load_hf` and `tests.model.test_load_hf_qk_norm`: logits, every layer's ``hook_resid_pre``, ``unembed.hook_in`` (Hugging
Face's hidden states) and every ``hook_pattern`` (its eager attentions). Shared by tests/model/test_precision.py
and benchmarks/gpu_check.py (which runs it on CUDA).

The checkpoint is saved in the dtype compared (as real bf16 checkpoints are), and both libraries load it in that
dtype. Hugging Face runs eager attention for the hooks (it defines the upcasts: softmax in float32) and its
default attention (SDPA where the family has it) for the logits of interplab's fast path.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from interplab import load_model
from tests.model import test_load_hf, test_load_hf_qk_norm

VARIANTS = {**test_load_hf.VARIANTS, **test_load_hf_qk_norm.VARIANTS}
"""every tiny random configuration of the float32 parity tests"""

# what the tests assert (torch.testing.assert_close: |a - b| <= atol + rtol |b| elementwise); measured maxima in
# docs/loading.md ("Precision"): about one rounding step of the dtype at the compared values
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 1e-2, "rtol": 1.6e-2},
    torch.float16: {"atol": 1e-2, "rtol": 2e-3},
}
# families whose logits and every compared hook equal Hugging Face's bit for bit in bfloat16 on CPU (measured)
EXACT_BF16 = ("gpt2", "neox", "llama", "mistral", "qwen2", "gemma2", "qwen3", "gemma3", "olmo2")


def _make(variant: str) -> transformers.PreTrainedModel:
    if variant in test_load_hf.VARIANTS:
        return test_load_hf._make(variant)
    return test_load_hf_qk_norm.make_hf(variant)


def _hf_outputs(model, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True, output_attentions=True)
    n = len(out.hidden_states) - 1
    acts = {f"blocks.{i}.hook_resid_pre": out.hidden_states[i] for i in range(n)}
    acts["unembed.hook_in"] = out.hidden_states[n]  # after the final norm
    if out.attentions and out.attentions[0] is not None:
        acts.update({f"blocks.{i}.attn.hook_pattern": a for i, a in enumerate(out.attentions)})
    acts["logits"] = out.logits
    return acts


def compare(
    variant: str,
    dtype: torch.dtype,
    folder: str | Path,
    *,
    device: str = "cpu",
    batch: int = 3,
    seq: int = 20,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{site: (interplab, transformers)}`` for ``variant`` run in ``dtype`` on ``device``; ``"logits"`` are
    compared against eager attention with the hooks attached, ``"logits_fast"`` (no hooks) against Hugging
    Face's default attention."""
    hf_fp32 = _make(variant)
    hf_fp32.to(dtype).save_pretrained(folder)
    vocab = hf_fp32.config.get_text_config().vocab_size
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1)).to(device)
    auto = type(hf_fp32)
    eager = auto.from_pretrained(folder, dtype=dtype, attn_implementation="eager").eval().to(device)
    expected = _hf_outputs(eager, tokens)
    try:
        default = auto.from_pretrained(folder, dtype=dtype).eval().to(device)
    except ValueError:  # a family without SDPA in transformers (Gemma-2): eager is its default
        default = eager
    with torch.no_grad():
        expected["logits_fast"] = default(tokens).logits
    model = load_model(folder, dtype=dtype, device=device)
    sites = [k for k in expected if k.startswith(("blocks", "unembed"))]
    logits, cache = model.run_with_cache(tokens, names=sites)
    with torch.no_grad():
        fast = model(tokens)
    got = {**{s: cache[s] for s in sites}, "logits": logits, "logits_fast": fast}
    return {k: (got[k], expected[k]) for k in expected}


def max_differences(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per kind of site (logits, logits_fast, resid, pattern): the largest |a - b| and the largest |a - b|
    relative to the largest |b| of that site."""
    out: dict[str, dict[str, float]] = {}
    for name, (a, b) in pairs.items():
        kind = (
            "pattern" if "pattern" in name else ("resid" if name.startswith(("blocks", "unembed")) else name)
        )
        err = (a.double() - b.double()).abs().max().item()
        rel = err / max(b.double().abs().max().item(), 1e-30)
        cur = out.setdefault(kind, {"max_abs": 0.0, "max_rel": 0.0})
        cur["max_abs"], cur["max_rel"] = max(cur["max_abs"], err), max(cur["max_rel"], rel)
    return out


def family(variant: str) -> str:
    return variant.split("-")[0]


__all__ = ["EXACT_BF16", "TOLERANCES", "VARIANTS", "compare", "family", "max_differences"]
