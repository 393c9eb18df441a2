# %% [markdown]
# # Causal scrubbing, worked example (b): Redwood's paren balancer
#
# The published model and data set of REMIX day 4 (`../shared/fixtures/paren_balancer/`). We reproduce the
# unscrubbed loss, the random baseline and hypothesis 1a on 4,000 reference examples (published: 0.00 (0.01),
# 4.3 (0.12), 0.52 (0.04)), with per-class losses, and then test refinements of 1a.

# %%
import os
from pathlib import Path

import torch

from interplab.scrub import Claim, Hypothesis, ScrubConfig, feature, scrub
from interplab.scrub.parens import count_equal, horizon_ok, hypothesis_1a, load_paren_model, paren_task

torch.set_num_threads(1)
FIXTURE = Path(os.environ.get("PAREN_FIXTURE", "../shared/fixtures/paren_balancer"))
# INTERPLAB_EXAMPLES_FAST=1 (CI) scrubs 400 examples instead of the published 4,000
N = int(os.environ.get("SCRUB_EXAMPLES", "400" if os.environ.get("INTERPLAB_EXAMPLES_FAST") else "4000"))
model = load_paren_model(FIXTURE)
task = paren_task(FIXTURE)

# %% [markdown]
# ## Hypothesis 1a, as published

# %%
result = scrub(model, task, hypothesis_1a(), ScrubConfig(n_examples=N, n_seeds=2))
print(result.table())

# %% [markdown]
# ## Refinements
# - **1a-diff**: heads 1.0 and 2.0 carry the *amount* of imbalance (number of `(` minus number of `)`), not
#   just whether it is zero; a finer feature, so it can only recover more if the heads use it.
# - **1a-both**: head 2.1's direct path also knows whether the counts are equal.
# - **1a+m1**: additionally claims that MLP 1's direct path depends only on equal counts.


# %%
@feature
def open_minus_close(tokens):
    return (tokens == 3).sum(1) - (tokens == 4).sum(1)


@feature
def horizon_and_count(tokens):
    return torch.stack([horizon_ok(tokens), count_equal(tokens)], 1)


def direct_paths(name, a10, a20, a21, *extra):
    """Claims about the direct paths of 1.0, 2.0 and 2.1 (and any extra claims) into the logits."""
    claims = [Claim("a1.0", a10), Claim("a2.0", a20), Claim("a2.1", a21), *extra]
    return Hypothesis(Claim("logits", children=claims), name=name)


refinements = [
    direct_paths("1a-diff", open_minus_close, open_minus_close, horizon_ok),
    direct_paths("1a-both", count_equal, count_equal, horizon_and_count),
    direct_paths("1a-diff-both", open_minus_close, open_minus_close, horizon_and_count),
    direct_paths("1a+m1", count_equal, count_equal, horizon_ok, Claim("m1", count_equal)),
]
for hypothesis in refinements:
    r = scrub(model, task, hypothesis, ScrubConfig(n_examples=N, n_seeds=2, per_claim=False))
    print(
        f"{hypothesis.name:<8} loss {r.loss_scrubbed}  recovered {r.recovered.mean:.1%}  "
        + "  ".join(f"{k}: {c['scrubbed'].mean:.3f}" for k, c in r.per_class.items())
    )
