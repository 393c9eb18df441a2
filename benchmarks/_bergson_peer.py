"""Runs bergson (a peer library, PyPI ``bergson`` 2.5.1, EleutherAI's) on a problem written by interplab. Runs in
bergson's own venv (no interplab import); nothing is pickled both ways.

    .peers/bergson/bin/python benchmarks/_bergson_peer.py DIR

``DIR/problem.safetensors`` and ``DIR/problem.json`` as `tests/kronfluence_peer.write_problem` writes them (the MLP
``Linear, act, ..., Linear``, train and query examples, ``damping``, ``rounds``, ``batch_size``), plus
``DIR/bergson.json`` ``{"jobs": [...], "projection_dim": p}``:

- ``"features"``: bergson's per-example gradients of every linear layer's weight (no biases, its default),
  projected on both sides to ``[p, p]`` per layer by its ``GradientProcessor(projection_dim=p,
  projection_type="normal")``, collected by its ``InMemoryCollector`` hooks around our own forward and backward
  passes (batches of ``batch_size``; the collector wants ``[N, S, I]`` inputs, so each digit is one position).
  One untimed warm-up pass draws bergson's projection matrices; then ``rounds`` timed passes, each with a fresh
  collector on the same processor. Writes ``features`` ``[n, layers p^2]`` (layer by layer, each ``[p, p]``
  row-major: output side, input side) and the matrices (``layer{i}.left [p, d_out]``, ``layer{i}.right
  [p, d_in]``: the feature is ``left @ G @ right^T``), with per-round wall and CPU seconds.
- ``"influence"``: bergson's dense per-layer preconditioning: one collection with ``skip_hessians=False`` (the
  per-layer second moment ``H = F^T F / n`` of the projected training gradients), the query gradients,
  ``DensePreconditioner.from_processor`` with ``inversion="absolute_damped_inverse"`` (``(H + damping I)^-1``)
  applied to them, scores summed over layers: ``influence`` ``[m, n]`` (bergson's sign, ``q^T (H + c I)^-1 g_i``)
  and its seconds (both collections, the inversion and the scores).

The loss is the summed cross-entropy, so a per-example gradient is that example's own. Prints one JSON line.
"""

import importlib.metadata
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _mlp_problem import Problem  # noqa: E402  (benchmarks/, beside this script)
from bergson import GradientProcessor, IndexConfig, InMemoryCollector  # noqa: E402
from bergson.config import InversionConfig  # noqa: E402
from bergson.hessians.preconditioner import DensePreconditioner  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file

torch.set_num_threads(1)
work = Path(sys.argv[1])
problem = Problem(work)
meta = problem.meta
spec = json.loads((work / "bergson.json").read_text())
jobs, p = spec["jobs"], int(spec["projection_dim"])
(x, y), (xq, yq) = problem.train, problem.query
bs = int(meta["batch_size"])
out: dict = {"version": importlib.metadata.version("bergson")}
tensors: dict[str, torch.Tensor] = {}
model = problem.model()
model.device = torch.device("cpu")  # the collector asks the model for its device
processor = GradientProcessor(projection_dim=p, projection_type="normal")


def collect(xs, ys, root, *, hessians: bool = False):
    """One pass of bergson's in-memory collector over (xs, ys): its per-layer gradients, in layer order."""
    data = Dataset.from_dict({"row": list(range(len(ys)))})
    cfg = IndexConfig(run_path=str(Path(root) / "run"), projection_dim=p)
    collector = InMemoryCollector(
        model=model, cfg=cfg, processor=processor, data=data, skip_hessians=not hessians
    )
    for start in range(0, len(ys), bs):
        idx = list(range(start, min(start + bs, len(ys))))
        with collector.with_batch(None):
            model.zero_grad(set_to_none=True)
            losses = F.cross_entropy(model(xs[idx][:, None, :]).squeeze(1), ys[idx], reduction="none")
            losses.sum().backward()
        collector.process_batch(idx, losses=losses.detach())
    collector.teardown()
    return collector.gradients


with tempfile.TemporaryDirectory() as root:
    if "features" in jobs:
        names = list(collect(x, y, root))  # warm-up: draws the projection matrices
        rounds = []
        feats = None
        for _ in range(int(meta["rounds"])):
            w, c = time.perf_counter(), time.process_time()
            got = collect(x, y, root)
            rounds.append({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c})
            feats = torch.cat([got[n].float() for n in names], dim=1)
        out["features"] = {"modules": names, "rounds": rounds}
        tensors["features"] = feats.contiguous()
        for i, n in enumerate(names):
            for role in ("left", "right"):
                tensors[f"layer{i}.{role}"] = processor._projection_matrices[(n, role, torch.device("cpu"))]
    if "influence" in jobs:
        w, c = time.perf_counter(), time.process_time()
        processor.hessians = {}
        train = collect(x, y, root, hessians=True)
        inverse = DensePreconditioner.from_processor(
            processor,
            inversion_cfg=InversionConfig(
                inversion="absolute_damped_inverse", damping_factor=float(meta["damping"])
            ),
        )
        processor.hessians = {}  # else the query pass's teardown would normalise them again
        pre = inverse.apply(collect(xq, yq, root))
        scores = sum(pre[n].double() @ train[n].double().T for n in train)
        out["influence"] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}
        tensors["influence"] = scores.contiguous()
tmp = work / "bergson_out.tmp.safetensors"
save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
tmp.replace(work / "bergson_out.safetensors")
print(json.dumps(out))
