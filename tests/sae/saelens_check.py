"""Run with a Python that has sae_lens: ``python saelens_check.py DIR...`` loads each DIR with
``sae_lens.SAE.load_from_disk`` and writes, for test_io.py:

- DIR/saelens_out.safetensors: sae_lens' ``feature_acts`` (encode) and ``reconstruction`` (forward) of the
  ``x`` in DIR/inputs.safetensors (per-head [batch, pos, n_heads, d_head] for a hook_z SAE);
- DIR/saelens_out.json: the class and config sae_lens made of the folder (architecture, metadata,
  reshape_activations), the top-level keys of ``cfg.json`` when sae_lens itself saves that SAE again, and
  whether HookedSAETransformer.add_sae places the SAE at its metadata hook(s) on a small model (the model's
  logits with the SAE attached equal those of splicing the SAE's forward in by hand).
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
from sae_lens import SAE, HookedSAETransformer
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformerConfig


def tiny_model() -> HookedSAETransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=8, n_heads=4, d_head=2, d_mlp=16, d_vocab=20, n_ctx=8, act_fn="relu"
    )
    cfg.use_hook_mlp_in = True
    return HookedSAETransformer(cfg).eval()


def placed(model: HookedSAETransformer, sae: SAE) -> bool:
    """add_sae puts the SAE where its metadata says, and it computes there what the SAE computes."""
    hook_in = sae.cfg.metadata.hook_name
    hook_out = sae.cfg.metadata.hook_name_out or hook_in
    tokens = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    model.reset_saes()
    model.add_sae(sae)
    if list(model.acts_to_saes) != [hook_in]:
        return False
    with torch.no_grad():
        attached = model(tokens)
        model.reset_saes()
        seen = {}
        by_hand = model.run_with_hooks(
            tokens,
            fwd_hooks=[
                (hook_in, lambda a, hook: seen.setdefault("x", a)),
                (hook_out, lambda a, hook: sae.decode(sae.encode(seen["x"]))),
            ],
        )
        clean = model(tokens)
    return torch.allclose(attached, by_hand, atol=1e-5) and not torch.allclose(attached, clean, atol=1e-5)


def main(folders: list[str]) -> None:
    model = tiny_model()
    for folder in folders:
        sae = SAE.load_from_disk(folder, device="cpu").eval()
        x = load_file(f"{folder}/inputs.safetensors")["x"]
        with torch.no_grad():
            out = {"feature_acts": sae.encode(x), "reconstruction": sae(x)}
        save_file(out, f"{folder}/saelens_out.safetensors")
        with tempfile.TemporaryDirectory() as tmp:
            sae.save_model(tmp)
            resaved = json.loads((Path(tmp) / "cfg.json").read_text())
        report = {
            "class": type(sae).__name__,
            "architecture": sae.cfg.architecture(),
            "reshape_activations": sae.cfg.reshape_activations,
            "normalize_activations": sae.cfg.normalize_activations,
            "metadata": sae.cfg.metadata.to_dict(),
            "resaved_keys": list(resaved),
            "placed": placed(model, sae) if sae.cfg.d_in == 8 else None,
        }
        Path(f"{folder}/saelens_out.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1:])
