"""Run devinterp 2.0's LLC estimator on a model folder and token file (run in devinterp's own venv, with the
checkout on PYTHONPATH so the same interplab model loads): prints one JSON line with the estimate and the
wall and CPU seconds of the `devinterp.slt.llc.llc` call alone.

    .peers/devinterp/bin/python benchmarks/_devinterp_llc.py MODEL_DIR TOKENS.safetensors '{"lr": 1e-4, ...}'
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
warnings.simplefilter("ignore")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from devinterp.slt.llc import llc  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from interplab.model.io import load_native  # noqa: E402


def per_token_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), input_ids[:, 1:], reduction="none")


class Plain(torch.nn.Module):
    """The interplab model behind a plain module: devinterp takes any module with a ``cfg.n_heads`` for a
    TransformerLens model (and calls ``.to(device, print_details=False)`` on it)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def main() -> None:
    model_dir, tokens_file, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(1)
    model = Plain(load_native(model_dir))
    tokens = load_file(tokens_file)["tokens"]
    data = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    with tempfile.TemporaryDirectory() as tmp:
        w, c = time.perf_counter(), time.process_time()
        out = llc(
            model,
            data,
            {},
            lr=settings["lr"],
            n_beta=settings["nbeta"],
            localization=settings["gamma"],
            num_chains=settings["chains"],
            num_draws=settings["draws"],
            num_burnin_steps=0,
            batch_size=settings["batch_size"],
            num_init_loss_batches=max(1, tokens.shape[0] // settings["batch_size"]),
            init_seed=settings["seed"],
            loss_fn=per_token_loss,
            device="cpu",
            output_path=os.path.join(tmp, "samples.zarr"),
        )
        wall, cpu = time.perf_counter() - w, time.process_time() - c
    per_chain = [float(v) for v in out.llc_per_chain.values]
    print(
        json.dumps(
            {
                "llc": float(out.llc_mean),
                "per_chain": per_chain,
                "init_loss": float(out.init_loss),
                "wall_s": wall,
                "cpu_s": cpu,
            }
        )
    )


if __name__ == "__main__":
    main()
