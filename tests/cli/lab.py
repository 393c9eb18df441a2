"""The tiny lab the CLI tests run commands in: a 2-layer model with a character tokenizer (``model/``), a TopK
SAE on its ``HOOK`` (``sae/``) and a text corpus (``corpus/``)."""

from __future__ import annotations

from pathlib import Path

import torch

from interplab.data import CharTokenizer
from interplab.model import ModelConfig, Transformer
from interplab.sae import SAEConfig, create_sae, save_sae

HOOK = "blocks.0.hook_resid_post"


def make_lab(root: Path, corpus: dict[str, str]) -> Path:
    """Write the model, the SAE and ``corpus`` (file name -> text) under ``root``; returns ``root``."""
    tok = CharTokenizer("abcdefgh \n")
    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(d_model=16, n_layers=2, n_heads=2, d_vocab=tok.vocab_size, n_ctx=64, d_mlp=32)
    )
    model.tokenizer = tok
    model.save(root / "model")
    save_sae(create_sae(SAEConfig(d_in=16, d_sae=32, architecture="topk", k=4, hook_name=HOOK)), root / "sae")
    (root / "corpus").mkdir()
    for name, text in corpus.items():
        (root / "corpus" / name).write_text(text)
    return root
