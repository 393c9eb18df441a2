"""The MLP classification problem that `tests/kronfluence_peer.write_problem` writes, read back inside a peer's
own venv (torch and safetensors only; no interplab import). The peer runners `_kronfluence_peer.py` and
`_logix_peer.py` import it from their own folder (a script's folder is first on its path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module] | None] = {"tanh": nn.Tanh, "relu": nn.ReLU, "none": None}


class Problem:
    """``problem.json`` (``meta``) and ``problem.safetensors`` of ``work``: the layers' weights, the train and
    query examples. `model()` builds a fresh ``nn.Sequential`` of the ``Linear, act, ..., Linear`` layers."""

    def __init__(self, work: Path) -> None:
        self.meta: dict[str, Any] = json.loads((work / "problem.json").read_text())
        self.arrays: dict[str, Tensor] = load_file(work / "problem.safetensors")
        self.n_layers = sum(1 for k in self.arrays if k.endswith(".weight"))
        if self.meta["activation"] not in ACTIVATIONS:
            raise SystemExit(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {self.meta['activation']!r}"
            )
        self.train = self.arrays["x_train"].float(), self.arrays["y_train"].long()
        self.query = self.arrays["x_query"].float(), self.arrays["y_query"].long()

    def model(self) -> nn.Sequential:
        act = ACTIVATIONS[self.meta["activation"]]
        layers: list[nn.Module] = []
        for i in range(self.n_layers):
            w, b = self.arrays[f"layer{i}.weight"], self.arrays[f"layer{i}.bias"]
            lin = nn.Linear(w.shape[1], w.shape[0])
            lin.load_state_dict({"weight": w, "bias": b})
            layers.append(lin)
            if i < self.n_layers - 1 and act is not None:
                layers.append(act())
        return nn.Sequential(*layers)
