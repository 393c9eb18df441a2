"""Runs dattri (a peer library) on the digits problem saved by bench_attribution.py; prints timing JSON and
writes its scores beside the problem file. Runs in dattri's own venv (no interplab import)."""

import importlib.metadata
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from dattri.algorithm.influence_function import IFAttributorExplicit
from dattri.algorithm.tracin import TracInAttributor
from dattri.algorithm.trak import TRAKAttributor
from dattri.task import AttributionTask
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(1)
path = Path(sys.argv[1])
p = torch.load(path)
x, y, xt, yt, l2 = p["x"], p["y"], p["xt"], p["yt"], p["l2"]
model = nn.Sequential(nn.Linear(64, 10, dtype=torch.float64))
model[0].load_state_dict({"weight": p["state"]["linear.weight"], "bias": p["state"]["linear.bias"]})
model.eval()


def loss_func(params, data):
    xb, yb = data
    out = torch.func.functional_call(model, params, (xb,))
    return F.cross_entropy(out, yb)  # L2 enters through IFAttributorExplicit's regularization


def prob_func(params, data):
    xb, yb = data
    out = torch.func.functional_call(model, params, (xb.unsqueeze(0),))
    return torch.exp(-F.cross_entropy(out, yb.unsqueeze(0)))


train = DataLoader(TensorDataset(x, y), batch_size=len(y), shuffle=False)
test = DataLoader(TensorDataset(xt, yt), batch_size=len(yt), shuffle=False)
ckpt = {k: v for k, v in model.state_dict().items()}
seconds, scores = {}, {}
for name, make in {
    "influence_explicit": lambda t: IFAttributorExplicit(t, regularization=l2),
    "trak": lambda t: TRAKAttributor(
        t, correct_probability_func=prob_func, projector_kwargs={"proj_dim": 256, "device": "cpu"}
    ),
    "tracin": lambda t: TracInAttributor(
        t,
        weight_list=torch.ones(1),
        normalized_grad=False,
        projector_kwargs={"proj_dim": 256, "device": "cpu"},
    ),
}.items():
    t0 = time.perf_counter()
    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=ckpt)
    attributor = make(task)
    if hasattr(attributor, "cache"):
        try:
            attributor.cache(train)
        except TypeError:
            pass
    if name == "trak":  # TRAK takes the test loader first and reuses the cached training loader
        scores[name] = attributor.attribute(test).detach().double()
    else:
        scores[name] = attributor.attribute(train, test).detach().double()  # [n_train, n_test]
    seconds[name] = time.perf_counter() - t0
torch.save(scores, path.with_name("scores.pt"))
print(json.dumps({"version": importlib.metadata.version("dattri"), "seconds": seconds}))
