"""interplab.routing: gradient routing (Cloud et al. 2024): data-dependent masks on the backward pass, so
chosen data is learned in chosen parts of a network; expand-route-ablate for robust unlearning.

>>> labels = torch.tensor([0, 1, 0, 1])          # the group of each example of the batch
>>> route = Route.from_regions("blocks.0.hook_resid_post", width=64, regions={0: range(32), 1: range(32, 64)})
>>> with Router([route]).apply(model, labels):
...     task.loss(model(batch.tokens), batch).backward()
"""

from interplab.routing.expand import Expansion, ablate_expansion, expand_mlp
from interplab.routing.params import ParamRoute
from interplab.routing.routes import UNLABELLED, Anneal, Axis, Route, Router, route_gradient

__all__ = [
    "UNLABELLED",
    "Anneal",
    "Axis",
    "Expansion",
    "ParamRoute",
    "Route",
    "Router",
    "ablate_expansion",
    "expand_mlp",
    "route_gradient",
]
