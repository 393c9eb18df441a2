"""Regenerate tests/sae/fixtures/saelens with the real sae_lens (run in a venv that has it):
``/tmp/sl-venv/bin/python tests/sae/make_saelens_fixtures.py``. Each folder is written by sae_lens'
own ``save_model``; ``expected.safetensors`` holds inputs and sae_lens' encodings and reconstructions."""

from pathlib import Path

import torch
from sae_lens import SAE, GatedSAEConfig, JumpReLUSAEConfig, StandardSAEConfig, TopKSAEConfig
from safetensors.torch import save_file

OUT = Path(__file__).parent / "fixtures" / "saelens"
torch.manual_seed(0)
for cls, extra in [
    (StandardSAEConfig, {}),
    (TopKSAEConfig, {"k": 4}),
    (JumpReLUSAEConfig, {}),
    (GatedSAEConfig, {}),
]:
    cfg = cls(d_in=8, d_sae=16, **extra)
    sae = SAE.from_dict(cfg.to_dict())
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    with torch.no_grad():
        for _name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(16) * 0.5)
    folder = OUT / cfg.architecture()
    sae.save_model(folder)
    x = torch.randn(5, 8)
    with torch.no_grad():
        acts = sae.encode(x)
        save_file(
            {"x": x, "feature_acts": acts, "reconstruction": sae.decode(acts)},
            str(folder / "expected.safetensors"),
        )
    print(folder)
