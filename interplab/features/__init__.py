"""Feature statistics (one streaming pass for all SAE features), the feature database, explanations, steering.

>>> from interplab.features import FeatureBuildConfig
>>> from interplab.features.build import build_feature_db
>>> report = build_feature_db("my-features.db", model, sae, tokens, FeatureBuildConfig())
"""

from interplab.features.collect import collect_features
from interplab.features.config import FeatureBuildConfig
from interplab.features.stream import FeatureStats, StreamingFeatureStats

__all__ = ["FeatureBuildConfig", "FeatureStats", "StreamingFeatureStats", "collect_features"]
