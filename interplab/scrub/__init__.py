"""interplab.scrub: causal scrubbing (Chan et al. 2022) of hypotheses stated as interpretation trees."""

from interplab.scrub.algorithm import ScrubConfig, ScrubTask, scrub
from interplab.scrub.compile import CompiledHypothesis, compile_hypothesis
from interplab.scrub.graph import ComputationGraph, scrub_graph
from interplab.scrub.hypothesis import Claim, Feature, Hypothesis, Rewrite, anything, feature
from interplab.scrub.result import ClaimRow, Estimate, ScrubResult
from interplab.scrub.sampling import FeatureGroups, ScrubError

__all__ = [
    "Claim",
    "ClaimRow",
    "CompiledHypothesis",
    "ComputationGraph",
    "Estimate",
    "Feature",
    "FeatureGroups",
    "Hypothesis",
    "Rewrite",
    "ScrubConfig",
    "ScrubError",
    "ScrubResult",
    "ScrubTask",
    "anything",
    "compile_hypothesis",
    "feature",
    "scrub",
    "scrub_graph",
]
