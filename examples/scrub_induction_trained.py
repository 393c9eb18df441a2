# %% [markdown]
# # Causal scrubbing on a trained induction model (the `induction-2l` preset)
#
# Run the demo first (`bash scripts/demo.sh`), or only its training (a few minutes on one CPU core):
# `interplab train --preset induction-2l --out runs/demo`; this reads the model it writes, `runs/demo/final`.
# With smeared keys the induction head forms in layer 0: its key input mixes in the previous position's key,
# doing the previous-token work itself. We find the head, then state and scrub the explanation step by step.

# %%
import os
import sys
from pathlib import Path

import torch

from interplab.model.load import load_model
from interplab.scrub import Claim, Hypothesis, ScrubConfig, scrub
from interplab.scrub.induction import current_token, next_token, previous_occurrence, smeared_induction_steps
from interplab.scrub.tasks import build_task

torch.set_num_threads(1)
MODEL = Path(os.environ.get("INDUCTION_MODEL", "runs/demo/final"))
if not MODEL.exists():
    print(
        f"no trained model at {MODEL}: run the demo (bash scripts/demo.sh) or "
        "`interplab train --preset induction-2l --out runs/demo`",
        file=sys.stderr,
    )
    sys.exit(77)  # "skipped" (the autotools convention tests/test_examples.py reads)
model = load_model(MODEL)
# sequences of 19 distinct tokens (ids < 32) whose 20th repeats one of them; predict what followed it
task = build_task("induction", model, n_rows=8000, vocab=32, length=20, seed=1)

# %% [markdown]
# ## Which head attends from the repeated token to the token after its earlier occurrence?

# %%
tokens = task.tokens[:500]
names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
_, cache = model.run_with_cache(tokens, names)
target = previous_occurrence(tokens)[:, 1] + 1
scores = {
    f"a{layer}.{h}": float(cache[names[layer]][torch.arange(500), h, -1, target].mean())
    for layer in range(model.cfg.n_layers)
    for h in range(model.cfg.n_heads)
}
head = max(scores, key=scores.get)
print({k: round(v, 3) for k, v in scores.items()}, "->", head)

# %% [markdown]
# ## The refinements, and a wrong hypothesis

# %%
config = ScrubConfig(n_examples=2000, n_seeds=2, per_claim=False)
wrong = Hypothesis(
    Claim(
        "logits",
        children=[
            Claim(
                head, next_token, children=[Claim(f"{head}.q", current_token), Claim(f"{head}.v", next_token)]
            )
        ],
    ),
    name="no key claim (K random)",
)
for hypothesis in smeared_induction_steps(head) + [wrong]:
    r = scrub(model, task, hypothesis, config)
    print(
        f"{hypothesis.name}: {r.recovered.mean:.1%} recovered (scrubbed {r.loss_scrubbed.mean:.3f}, "
        f"original {r.loss_original.mean:.3f}, random {r.loss_random.mean:.3f})"
    )
