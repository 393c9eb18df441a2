"""Training-data attribution along checkpoints: per-example gradients, projections, targets (losses and
mechanism scores), methods (TracIn, grad-dot/cos, TRAK, influence, the trajectory method) and their evaluation."""

from interplab.data_attribution.evaluate import ablation_check, auc, lds, spearman
from interplab.data_attribution.methods import (
    CheckpointGrads,
    Method,
    StepUpdates,
    ensemble,
    formation_window,
    grad_cos,
    grad_dot,
    influence,
    tracin,
    tracin_per_checkpoint,
    trajectory,
    trak,
)
from interplab.data_attribution.params import ParamGroup, param_group
from interplab.data_attribution.per_example import lm_loss, logits_of, objective_grad, per_example_grads
from interplab.data_attribution.projection import ProjectionKind, Projector, jl_bound
from interplab.data_attribution.targets import (
    Target,
    composition_target,
    feature_target,
    induction_target,
    loss_target,
    neuron_target,
    parse_target,
    prev_token_target,
)

__all__ = [
    "ablation_check",
    "CheckpointGrads",
    "Method",
    "ParamGroup",
    "Projector",
    "ProjectionKind",
    "StepUpdates",
    "Target",
    "auc",
    "composition_target",
    "ensemble",
    "feature_target",
    "formation_window",
    "grad_cos",
    "grad_dot",
    "induction_target",
    "influence",
    "jl_bound",
    "lds",
    "lm_loss",
    "logits_of",
    "loss_target",
    "neuron_target",
    "objective_grad",
    "param_group",
    "parse_target",
    "per_example_grads",
    "prev_token_target",
    "spearman",
    "tracin",
    "tracin_per_checkpoint",
    "trajectory",
    "trak",
]
