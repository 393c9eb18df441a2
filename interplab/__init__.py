"""interplab: a laboratory for mechanistic interpretability.

Heavy submodules (training, SAEs, the web app) are imported lazily so that ``import interplab`` is fast.
"""

from interplab.hooks import ActivationCache, Site, SiteKind
from interplab.model import ModelConfig, Transformer
from interplab.model.load import load_model

__version__ = "0.1.0"


__all__ = ["ActivationCache", "ModelConfig", "Site", "SiteKind", "Transformer", "load_model", "__version__"]
