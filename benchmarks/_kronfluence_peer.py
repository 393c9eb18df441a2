"""Runs kronfluence (a peer library) on a problem written by interplab: EK-FAC influence scores of every query
against every training example, with the damping the problem names. Runs in kronfluence's own venv (no interplab
import); nothing is pickled both ways.

    .peers/kronfluence/bin/python benchmarks/_kronfluence_peer.py DIR

``DIR/problem.safetensors``: ``x_train [n, d]``, ``y_train [n]``, ``x_query [m, d]``, ``y_query [m]`` and the MLP's weights
``layer{i}.weight`` / ``layer{i}.bias`` (float32); ``DIR/problem.json``: ``{"activation": "tanh" | "relu" |
"none", "damping": float, "fisher": "empirical" | "true", "rounds": int, "batch_size": int}``. The model is
``Linear, act, Linear, act, ..., Linear`` in that order, the loss the summed cross-entropy (kronfluence's
convention), the measurement each query's cross-entropy. Writes ``DIR/scores.safetensors`` (``scores [m, n]``,
kronfluence's sign: positive = the training example lowers the query's loss; no 1/n) and prints one JSON line:
version, and per round the wall and CPU seconds of ``fit_all_factors`` and of ``compute_pairwise_scores``.
"""

import importlib.metadata
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _mlp_problem import Problem  # benchmarks/, beside this script
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from safetensors.torch import save_file
from torch.utils.data import TensorDataset

torch.set_num_threads(1)
work = Path(sys.argv[1])
problem = Problem(work)
meta = problem.meta
(x, y), (xq, yq) = problem.train, problem.query


class Classification(Task):
    def compute_train_loss(self, batch, model, sample=False):
        xb, yb = batch
        logits = model(xb)
        if sample:  # the true Fisher: labels drawn from the model's own predictions
            with torch.no_grad():
                yb = torch.multinomial(F.softmax(logits.detach(), -1), 1)[:, 0]
        return F.cross_entropy(logits, yb, reduction="sum")

    def compute_measurement(self, batch, model):
        xb, yb = batch
        return F.cross_entropy(model(xb), yb, reduction="sum")


torch.manual_seed(0)
task = Classification()
model = prepare_model(problem.model(), task)
factor_args = FactorArguments(
    strategy="ekfac",
    use_empirical_fisher=meta["fisher"] == "empirical",
    activation_covariance_dtype=torch.float64,
    gradient_covariance_dtype=torch.float64,
    lambda_dtype=torch.float64,
)
score_args = ScoreArguments(damping_factor=meta["damping"], precondition_dtype=torch.float64)
train_set, query_set = TensorDataset(x, y), TensorDataset(xq, yq)
bs = int(meta["batch_size"])
rounds = []
scores = None
with tempfile.TemporaryDirectory() as out_dir:
    for r in range(int(meta["rounds"])):
        analyzer = Analyzer(
            analysis_name="interplab_peer",
            model=model,
            task=task,
            cpu=True,
            disable_tqdm=True,
            log_level=logging.WARNING,
            output_dir=out_dir,
        )
        w, c = time.perf_counter(), time.process_time()
        analyzer.fit_all_factors(
            factors_name=f"ekfac{r}",
            dataset=train_set,
            per_device_batch_size=bs,
            factor_args=factor_args,
            overwrite_output_dir=True,
        )
        fit_wall, fit_cpu = time.perf_counter() - w, time.process_time() - c
        w, c = time.perf_counter(), time.process_time()
        analyzer.compute_pairwise_scores(
            scores_name=f"pairwise{r}",
            factors_name=f"ekfac{r}",
            query_dataset=query_set,
            train_dataset=train_set,
            per_device_query_batch_size=len(query_set),
            per_device_train_batch_size=bs,
            score_args=score_args,
            overwrite_output_dir=True,
        )
        got = analyzer.load_pairwise_scores(f"pairwise{r}")["all_modules"]
        score_wall, score_cpu = time.perf_counter() - w, time.process_time() - c
        scores = got.double() if scores is None else scores
        rounds.append(
            {
                "fit_wall_s": fit_wall,
                "fit_cpu_s": fit_cpu,
                "score_wall_s": score_wall,
                "score_cpu_s": score_cpu,
                "wall_s": fit_wall + score_wall,
                "cpu_s": fit_cpu + score_cpu,
            }
        )
tmp = work / "scores.tmp.safetensors"
save_file({"scores": scores.contiguous()}, str(tmp))
tmp.replace(work / "scores.safetensors")
print(json.dumps({"version": importlib.metadata.version("kronfluence"), "rounds": rounds}))
