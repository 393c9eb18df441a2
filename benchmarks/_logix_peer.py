"""Runs LogIX (a peer library, PyPI ``logix-ai`` 0.1.1, the LoGra authors') on a problem written by interplab.
Runs in LogIX's own venv (no interplab import); nothing is pickled both ways.

    .peers/logix/bin/python benchmarks/_logix_peer.py DIR

``DIR/problem.safetensors`` and ``DIR/problem.json`` as `tests/kronfluence_peer.write_problem` writes them (the MLP
``Linear, act, ..., Linear``, train and query examples, ``damping``, ``rounds``, ``batch_size``), plus ``DIR/logix.json``
``{"jobs": [...]}`` naming what to do:

- ``"logra"``: LoGra's per-example projected gradients of every training example: LogIX's ``add_lora`` puts a
  rank-r encoder A, a zero bottleneck B and a decoder C beside each linear layer and logs B's per-example
  gradient ``(C^T g)(A x)^T`` summed over positions. A and C are set to the matrices in
  ``DIR/projection.safetensors`` (``layer{i}.A [r, d_in]``, ``layer{i}.C [d_out, r]``), so the projection is the one
  interplab uses. Writes ``logra`` ``[n, sum r_out r_in]`` (layer by layer, each ``[r, r]`` row-major) and, per
  round, the wall and CPU seconds of logging all n examples (forward, backward and LogIX's hooks), batches of
  ``batch_size``.
- ``"logra_influence"``: LoGra's whole method: the LoRA as for ``"logra"`` (the same A and C), the
  ``covariance`` statistic of the bottleneck's inputs ``A x`` and output gradients ``C^T g`` over the training
  set with the projected gradients logged, then ``compute_influence(query, train, hessian="kfac",
  damping=...)`` in that projected space. Writes ``logra_influence`` ``[m, n]`` and its seconds (the training
  pass, the query pass and the scores).
- ``"influence"``: LogIX's K-FAC influence without LoRA (raw per-example weight gradients of every linear layer;
  LogIX does not log biases): a pass over the training set with the ``covariance`` statistic on forward and
  backward activations and the per-example gradients logged, then ``compute_influence(query, train, hessian=
  "kfac", damping=...)``. Writes ``influence`` ``[m, n]`` (LogIX's sign: ``g_q^T H^-1 g_i``) and its seconds.

Both influence jobs score the training log in chunks of `TGT_CHUNK` examples through the same public
``compute_influence``. The loss is the summed cross-entropy, so a per-example gradient is that example's own.
Prints one JSON line.
"""

import importlib.metadata
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

logging.disable(logging.WARNING)  # LogIX prints its tracked modules at INFO
import logix  # noqa: E402
from _mlp_problem import Problem  # noqa: E402  (benchmarks/, beside this script)
from logix.config import LoRAConfig  # noqa: E402

torch.set_num_threads(1)
work = Path(sys.argv[1])
problem = Problem(work)
meta, n_layers = problem.meta, problem.n_layers
jobs = json.loads((work / "logix.json").read_text())["jobs"]
(x, y), (xq, yq) = problem.train, problem.query
bs = int(meta["batch_size"])
out: dict = {"version": importlib.metadata.version("logix-ai")}
tensors: dict[str, torch.Tensor] = {}


# training examples per compute_influence call: its dot product broadcasts [m, chunk, d_out, d_in] (the raw
# scores of all 1,500 digits at once would hold 25 GB for the 256 x 256 layer)
TGT_CHUNK = 64


def lora_model(name):
    """A fresh model with LogIX's LoRA beside each linear layer, its A and C set to the handed-over matrices."""
    proj = load_file(work / "projection.safetensors")
    rank = int(proj["layer0.A"].shape[0])
    model = problem.model()
    run = logix.LogIX(project=name)
    run.watch(model)
    run.add_lora(lora_config=LoRAConfig(rank=rank))
    loras = [m for m in model.modules() if hasattr(m, "logix_lora_A")]
    if len(loras) != n_layers:
        raise SystemExit(f"LogIX added {len(loras)} LoRA modules for {n_layers} linear layers")
    with torch.no_grad():
        for i, m in enumerate(loras):
            m.logix_lora_A.weight.copy_(proj[f"layer{i}.A"])
            m.logix_lora_C.weight.copy_(proj[f"layer{i}.C"])
    return model, run, rank


def influence(run, model, name):
    """K-FAC influence of the watched modules: covariances and gradients over the training set, the query's
    gradients, the scores; stores the scores as ``tensors[name]`` and their seconds as ``out[name]``."""
    run.setup({"forward": ["covariance"], "backward": ["covariance"], "grad": ["log"]})
    run.eval()  # the statistics still accumulate; the logs stay in memory (saving them held 24 GB raw)
    w, c = time.perf_counter(), time.process_time()
    train = log_pass(run, model, x, y, ids)
    run.finalize()
    run.setup({"grad": ["log"]})
    query = log_pass(run, model, xq, yq, qids)
    src = (qids, {k: {"grad": v} for k, v in query.items()})
    scores = []
    for start in range(0, len(ids), TGT_CHUNK):
        sl = slice(start, start + TGT_CHUNK)
        result = run.compute_influence(
            src_log=src,
            tgt_log=(ids[sl], {k: {"grad": v[sl]} for k, v in train.items()}),
            hessian="kfac",
            damping=float(meta["damping"]),
        )
        scores.append(result["influence"])
    out[name] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}
    tensors[name] = torch.cat(scores, dim=1).double().contiguous()


def log_pass(run, model, xs, ys, ids):
    """One logged forward + backward per batch; the per-example gradients of the watched modules, per module
    (in watch order), concatenated over batches."""
    grads: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(ys), bs):
        sl = slice(start, start + bs)
        with run(data_id=ids[sl]):
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xs[sl]), ys[sl], reduction="sum").backward()
        _, log = run.get_log()
        for name, entry in log.items():
            grads.setdefault(name, []).append(entry["grad"].detach().clone())
    return {k: torch.cat(v) for k, v in grads.items()}


ids = [str(i) for i in range(len(y))]
qids = [f"q{i}" for i in range(len(yq))]
with tempfile.TemporaryDirectory() as root:
    os.chdir(root)  # LogIX writes its state under ./logix/<project>
    if "logra" in jobs:
        rounds = []
        feats = None
        for r in range(int(meta["rounds"])):
            model, run, rank = lora_model(f"logra{r}")
            run.setup({"grad": ["log"]})
            run.eval()  # keep the logs in memory, write nothing
            w, c = time.perf_counter(), time.process_time()
            got = log_pass(run, model, x, y, ids)
            rounds.append({"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c})
            names = [n for n, _ in model.named_modules() if n.endswith("logix_lora_B")]
            feats = torch.cat([got[n].flatten(1) for n in names], dim=1)
        out["logra"] = {"rank": rank, "rounds": rounds}
        tensors["logra"] = feats.contiguous()
    if "logra_influence" in jobs:
        model, run, _ = lora_model("logra_influence")
        influence(run, model, "logra_influence")
    if "influence" in jobs:
        model = problem.model()
        run = logix.LogIX(project="influence")
        run.watch(model)
        influence(run, model, "influence")
tmp = work / "logix_out.tmp.safetensors"
save_file(tensors, str(tmp))
tmp.replace(work / "logix_out.safetensors")
print(json.dumps(out))
