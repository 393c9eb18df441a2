"""interplab: a laboratory for mechanistic interpretability.

Heavy submodules (training, SAEs, the web app) are imported lazily so that ``import interplab`` is fast.
"""

from interplab.hooks import ActivationCache, Site, SiteKind
from interplab.model import ModelConfig, Transformer

__version__ = "0.1.0"


def load_model(path, **kwargs):  # noqa: ANN001, ANN201 - thin re-export, documented in interplab.model.load
    """Load a model directory (interplab, Hugging Face or TransformerLens); see `interplab.model.load.load_model`."""
    from interplab.model.load import load_model as _load

    return _load(path, **kwargs)


__all__ = ["ActivationCache", "ModelConfig", "Site", "SiteKind", "Transformer", "load_model", "__version__"]
