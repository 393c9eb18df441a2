# %% [markdown]
# # Toy models of superposition
#
# Elhage et al. (2022) compress n sparse features into m < n dimensions with `h = W x`,
# `x' = ReLU(W^T h + b)`. Dense features: the model keeps the m most important ones, orthogonally.
# Sparse features: it packs more features than dimensions into superposition. We train many models in one
# tensor, look at their geometry, reproduce the sparsity-importance phase diagram, and check that an SAE on
# the hidden layer recovers the true features. (Runs in about a minute on a laptop CPU.)

# %%
from pathlib import Path

import torch

from interplab.plots import save_figure
from interplab.toy import ToyConfig, ToyModel, analyze, phase_diagram, toy_sae, train_toy

torch.manual_seed(0)
out = Path("runs/toy")

# %% [markdown]
# Five features in two dimensions, importance 0.9^i, from dense (p = 1) to very sparse (p = 0.03):
# four models trained side by side.

# %%
cfg = ToyConfig(
    n_features=5, n_hidden=2, n_instances=4, feature_probability=[1.0, 0.3, 0.1, 0.03], importance=0.9
)
model = ToyModel(cfg, seed=0)
train_toy(model, steps=2000, lr=1e-2)
geometry = analyze(model)
print("feature norms per instance (1 = represented):\n", geometry.norms.round(decimals=2))
print("features per dimension:", geometry.features_per_dimension.round(decimals=2).tolist())
geometry.save(out / "five_in_two")  # W^T W, norms coloured by superposition, dimensionality

# %% [markdown]
# The phase diagram: two features in one dimension. Feature 2's relative importance varies along x, the
# sparsity of both along y. Dense: the more important feature takes the dimension. Sparse: both share it
# (antipodally), i.e. superposition.

# %%
diagram = phase_diagram(
    torch.tensor([0.0, 0.5, 0.8, 0.9, 0.97, 0.99]), torch.logspace(-1, 1, 7), steps=2000, restarts=3
)
print(diagram.phase)
diagram.save(out / "phase_diagram")
save_figure(diagram.plot(), out / "phase_diagram.html")

# %% [markdown]
# An SAE on the hidden layer of a sparse model (12 features in 6 dimensions) finds the true directions.

# %%
sparse = ToyModel(ToyConfig(n_features=12, n_hidden=6, feature_probability=0.03), seed=0)
train_toy(sparse, steps=1500, lr=1e-2)
result = toy_sae(sparse)
print(result.recovery)
result.save(out / "toy_sae")
