"""interplab.analysis: ablations, activation and attribution patching, head scores, lenses, probes, steering.

Every function takes a model and tokens and returns a frozen result with ``.plot()`` (Plotly) and
``.save(path)`` (``.html``, ``.png`` or ``.json``). See docs/analysis.md.
"""

from interplab.analysis.ablation import Ablation, ablation, mean_ablation, resample_ablation, zero_ablation
from interplab.analysis.attribution import PatchingComparison, attribution_patch, compare_patching
from interplab.analysis.heads import AttentionPatterns, HeadScores, attention_patterns, head_scores
from interplab.analysis.lens import (
    DLAResult,
    LogitLensResult,
    ResidualDecomposition,
    direct_logit_attribution,
    logit_lens,
    residual_decomposition,
)
from interplab.analysis.metrics import (
    AnswerLoss,
    CorrectProb,
    LogitDiff,
    Metric,
    NormalizedLogitDiff,
    PositionMetric,
    SequenceLoss,
)
from interplab.analysis.patching import PatchConfig, activation_patch, activation_patch_loop
from interplab.analysis.probes import ProbeConfig, ProbeKind, ProbeResult, collect_activations, train_probe
from interplab.analysis.steering import SteeringVector, SteerMode, mean_difference, steering_hook
from interplab.analysis.targets import Direction, PatchResult, PatchTarget

__all__ = [
    "Ablation",
    "AnswerLoss",
    "AttentionPatterns",
    "CorrectProb",
    "DLAResult",
    "Direction",
    "HeadScores",
    "LogitDiff",
    "LogitLensResult",
    "Metric",
    "NormalizedLogitDiff",
    "PatchConfig",
    "PatchResult",
    "PatchTarget",
    "PatchingComparison",
    "PositionMetric",
    "ProbeConfig",
    "ProbeKind",
    "ProbeResult",
    "ResidualDecomposition",
    "SequenceLoss",
    "SteerMode",
    "SteeringVector",
    "ablation",
    "activation_patch",
    "activation_patch_loop",
    "attention_patterns",
    "attribution_patch",
    "collect_activations",
    "compare_patching",
    "direct_logit_attribution",
    "head_scores",
    "logit_lens",
    "mean_ablation",
    "mean_difference",
    "resample_ablation",
    "residual_decomposition",
    "steering_hook",
    "train_probe",
    "zero_ablation",
]
