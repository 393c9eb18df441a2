"""Runs under TransformerLens' own interpreter (never imported by the test suite): builds random
``HookedTransformer`` models, saves each as a TL checkpoint (state dict + config JSON), and writes what TL
computes on given tokens (every cached hook, logits, loss) for the interplab tests to compare against.

Usage: python tl_peer_script.py SPEC.json   (see tests/tl_peer.py for the spec's fields)
"""

import json
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

import torch
import transformer_lens as tl
from safetensors.torch import load_file, save_file

warnings.filterwarnings("ignore", category=DeprecationWarning)  # HookedTransformer is 3.9's subject

FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")


def build(job: dict) -> "tl.HookedTransformer":
    cfg = tl.HookedTransformerConfig(**job["config"])
    model = tl.HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(job.get("seed", 0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):  # norm weights far from 1, biases far from 0, so no term hides
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif ".b" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            if job.get("zero_gated_b_in") and cfg.gated_mlp and name.endswith("mlp.b_in"):
                p.zero_()  # TL adds a gated MLP's b_in after the product, interplab inside (see docs/hooks.md)
    return model


def run_pass(model, tokens: torch.Tensor, spec: dict) -> dict[str, torch.Tensor]:
    for flag in FLAGS:  # only the flags that change (TL refuses even set_use_attn_in(False) under GQA)
        if bool(getattr(model.cfg, flag)) != bool(spec.get(flag, False)):
            getattr(model, "set_" + flag)(bool(spec.get(flag, False)))
    mask = spec.get("attention_mask")
    kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, **kwargs)
        lm = model.cfg.d_vocab_out == model.cfg.d_vocab  # a classifier's outputs are not next tokens
        loss = model(tokens, return_type="loss", **kwargs) if lm else None
    out = {name: t.clone(memory_format=torch.contiguous_format) for name, t in cache.items()}
    out["__logits__"] = logits.clone()
    if loss is not None:
        out["__loss__"] = loss.reshape(1)
    return out


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(1)
    for job in spec["jobs"]:
        out = Path(job["out"])
        out.mkdir(parents=True, exist_ok=True)
        model = build(job)
        torch.save(model.state_dict(), out / "model.pt")
        (out / "transformerlens_config.json").write_text(json.dumps(model.cfg.to_dict(), default=str))
        tokens = load_file(job["tokens"])["tokens"]
        for i, pass_spec in enumerate(job.get("passes", [])):
            save_file(run_pass(model, tokens, pass_spec), str(out / f"pass{i}.safetensors"))
        if job.get("process"):
            model.process_weights_(**job["process"])
            state = {k: v.contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(out / "processed.safetensors"))
    Path(spec["done"]).write_text(json.dumps({"transformer_lens": version("transformer-lens")}))


if __name__ == "__main__":
    main()
