"""Run devinterp 2.0's LLC estimator on a model folder and token file (run in devinterp's own venv, with the
checkout on PYTHONPATH so the same interplab model loads): prints one JSON line with the estimate and the
wall and CPU seconds of the `devinterp.slt.llc.llc` call alone (CPU: the whole process, zarr's writer
threads included), and the call's voluntary and involuntary context switches.

    .peers/devinterp/bin/python benchmarks/_devinterp_llc.py MODEL_DIR TOKENS.safetensors '{"lr": 1e-4, ...}'

A regression case of the LLC validation (``benchmarks/_llc_models.py``): MODEL_DIR is a safetensors file of
the model's weights, TOKENS a safetensors file of ``x`` and ``y``, and the settings carry ``"model": spec``.
devinterp reads ``input_ids`` rows: each row is ``[x, y]`` and the per-"token" loss is the example's
``0.5 |f(x) - y|^2`` repeated over the row's positions, so devinterp's mean is interplab's `mse_loss`.
"""

from __future__ import annotations

import json
import os
import resource
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
    TransformerLens model (and calls ``.to(device, print_details=False)`` on it). Its frozen parameters
    (``requires_grad=False``: the biases the config switches off) become buffers of the same value, so that
    devinterp samples the set interplab's `estimate_llc` samples (given as parameters, devinterp would move
    them by noise and localisation alone)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        for name, p in list(model.named_parameters()):
            if not p.requires_grad:
                owner, _, leaf = name.rpartition(".")
                module = model.get_submodule(owner)
                delattr(module, leaf)
                module.register_buffer(leaf, p.detach())
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def regression_loss(d_in: int):  # noqa: ANN201
    def loss(model: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor:
        per = 0.5 * ((model(rows[:, :d_in]) - rows[:, d_in:]) ** 2).sum(-1)
        return per[:, None].expand(rows.shape[0], rows.shape[1] - 1)

    return loss


def main() -> None:
    model_dir, tokens_file, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    torch.set_num_threads(int(settings.get("threads", 1)))
    loss_fn = per_token_loss
    if "model" in settings:  # a regression case
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _llc_models import build

        model = build(settings["model"])
        model.load_state_dict(load_file(model_dir))
        xy = load_file(tokens_file)
        rows = torch.cat([xy["x"], xy["y"]], 1)
        loss_fn = regression_loss(xy["x"].shape[1])
    else:
        model = Plain(load_native(model_dir))
        rows = load_file(tokens_file)["tokens"]
    data = Dataset.from_dict({"input_ids": rows.tolist()}).with_format("torch")
    tokens = rows
    with tempfile.TemporaryDirectory() as tmp:
        r0 = resource.getrusage(resource.RUSAGE_SELF)
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
            loss_fn=loss_fn,
            device="cpu",
            output_path=os.path.join(tmp, "samples.zarr"),
        )
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    per_chain = [float(v) for v in out.llc_per_chain.values]
    print(
        json.dumps(
            {
                "llc": float(out.llc_mean),
                "per_chain": per_chain,
                "init_loss": float(out.init_loss),
                "wall_s": wall,
                "cpu_s": cpu,
                "voluntary_switches": r1.ru_nvcsw - r0.ru_nvcsw,
                "involuntary_switches": r1.ru_nivcsw - r0.ru_nivcsw,
            }
        )
    )


if __name__ == "__main__":
    main()
