"""interplab.analysis: ablations, activation and attribution patching, head scores, lenses, probes, steering.

Every function takes a model and tokens and returns a frozen result with ``.plot()`` and ``.save(path)``.
See docs/analysis.md.
"""

from interplab.analysis.attribution import PatchingComparison, attribution_patch, compare_patching
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
from interplab.analysis.targets import Direction, PatchResult, PatchTarget

__all__ = [
    "AnswerLoss",
    "CorrectProb",
    "Direction",
    "LogitDiff",
    "Metric",
    "NormalizedLogitDiff",
    "PatchConfig",
    "PatchResult",
    "PatchTarget",
    "PositionMetric",
    "SequenceLoss",
    "activation_patch",
    "activation_patch_loop",
]
