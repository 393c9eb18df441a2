"""Run with a Python that has sae_lens: ``python matryoshka_saelens_loss.py DIR`` builds sae_lens'
``MatryoshkaBatchTopKTrainingSAE`` from DIR/setup.json (d_in, d_sae, k, matryoshka_widths) with the tensors of
DIR/weights.safetensors (W_enc, b_enc, W_dec, b_dec and the input x), runs one training forward on x and
writes its loss, per-width inner losses and feature activations to DIR/saelens_loss.safetensors, for
test_matryoshka.py."""

import json
import sys
from pathlib import Path

import torch
from sae_lens.saes.matryoshka_batchtopk_sae import (
    MatryoshkaBatchTopKTrainingSAE,
    MatryoshkaBatchTopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput
from safetensors.torch import load_file, save_file

folder = Path(sys.argv[1])
setup = json.loads((folder / "setup.json").read_text())
w = load_file(str(folder / "weights.safetensors"))
cfg = MatryoshkaBatchTopKTrainingSAEConfig(
    d_in=setup["d_in"],
    d_sae=setup["d_sae"],
    k=setup["k"],
    matryoshka_widths=list(setup["matryoshka_widths"]),
    rescale_acts_by_decoder_norm=False,
    apply_b_dec_to_input=True,
)
sae = MatryoshkaBatchTopKTrainingSAE(cfg)
with torch.no_grad():
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        getattr(sae, name).copy_(w[name])
out = sae.training_forward_pass(
    TrainStepInput(
        sae_in=w["x"], coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=True
    )
)
tensors = {"loss": out.loss.detach(), "feature_acts": out.feature_acts.detach().to_dense()}
for key, value in out.losses.items():
    tensors[key] = torch.as_tensor(value).detach().float()
save_file(tensors, str(folder / "saelens_loss.safetensors"))
