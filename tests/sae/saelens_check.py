"""Run with a Python that has sae_lens: ``python saelens_check.py DIR...`` loads each DIR with sae_lens and writes
DIR/saelens_out.safetensors with sae_lens' encodings of DIR/inputs.safetensors (used by test_io.py)."""

import sys

import torch
from sae_lens import SAE
from safetensors.torch import load_file, save_file

for folder in sys.argv[1:]:
    sae = SAE.load_from_disk(folder, device="cpu")
    x = load_file(f"{folder}/inputs.safetensors")["x"]
    with torch.no_grad():
        acts = sae.encode(x)
        save_file(
            {"feature_acts": acts, "reconstruction": sae.decode(acts)}, f"{folder}/saelens_out.safetensors"
        )
