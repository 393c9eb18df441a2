"""One loader for every dictionary interplab trains: `load_dictionary` returns an `SAE`, a `Crosscoder` or a
`CrossLayerTranscoder` by what the folder is (`interplab.runs.dictionary_folder`), and `describe_dictionary`
says what it is without loading a tensor (`interplab.runs.DictionaryInfo`).

>>> from interplab.sae import save_sae
>>> from interplab.sae.crosscoder import CrosscoderConfig
>>> isinstance(load_dictionary(save_sae(sae, "my-sae")), SAE)
True
>>> cc = Crosscoder(CrosscoderConfig(d_in=16, d_sae=64, k=4, sources=("step_100:x", "step_200:x")))
>>> type(load_dictionary(cc.save("my-crosscoder"))).__name__
'Crosscoder'
>>> describe_dictionary("my-crosscoder").summary()
'64 latents, BatchTopK crosscoder (k 4, 2 sources), reading step_100:x and step_200:x'

A model diff (``interplab sae diff``: its ``crosscoder/``), a CLT training run (its ``clt/``) and an SAE
training run (its ``saes/NAME``, ``name`` picking one of several) load the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from interplab import runs
from interplab.sae.base import SAE
from interplab.sae.clt import CrossLayerTranscoder, load_clt
from interplab.sae.crosscoder import Crosscoder, load_crosscoder
from interplab.sae.io import load_sae

Dictionary = SAE | Crosscoder | CrossLayerTranscoder


def load_dictionary(
    path: str | Path, *, name: str | None = None, device: str | torch.device = "cpu"
) -> Dictionary:
    """The dictionary ``path`` names: an SAE folder (or an SAE training run, or a folder holding SAEs: ``name``
    picks one of several) gives an `SAE` (`load_sae`); a crosscoder folder or a model diff (`interplab sae
    diff`: its ``crosscoder/``) a `Crosscoder` (`load_crosscoder`); a CLT folder or a CLT training run (one per
    checkpoint: ``name`` picks one) a `CrossLayerTranscoder` (`load_clt`). Anything else raises
    `interplab.runs.RunError`, saying what it is. Which folder was read:
    ``interplab.runs.dictionary_folder(path, name)``."""
    folder, kind = runs.dictionary_folder(path, name)
    if kind is runs.Kind.CROSSCODER:
        return load_crosscoder(folder, device=device)
    if kind is runs.Kind.CLT:
        return load_clt(folder, device=device)
    return load_sae(folder, device=device)


def describe_dictionary(path: str | Path, *, name: str | None = None) -> runs.DictionaryInfo:
    """What the dictionary ``path`` names is, from its JSON alone (`interplab.runs.open_dictionary`): kind,
    architecture, the sites it reads and writes, its size and how its training ended."""
    return runs.open_dictionary(path, name)


__all__ = ["Dictionary", "describe_dictionary", "load_dictionary"]
