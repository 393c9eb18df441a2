"""interplab.scrub: causal scrubbing (Chan et al. 2022) of hypotheses stated as interpretation trees."""

from interplab.scrub.algorithm import ScrubConfig, ScrubTask, scrub
from interplab.scrub.hypothesis import Claim, Feature, Hypothesis, feature
from interplab.scrub.result import ClaimRow, Estimate, ScrubResult
from interplab.scrub.sampling import FeatureGroups, ScrubError

__all__ = [
    "Claim",
    "ClaimRow",
    "Estimate",
    "Feature",
    "FeatureGroups",
    "Hypothesis",
    "ScrubConfig",
    "ScrubError",
    "ScrubResult",
    "ScrubTask",
    "feature",
    "scrub",
]
