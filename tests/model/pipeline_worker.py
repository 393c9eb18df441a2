"""One rank of the pipeline test (tests/model/test_parallel.py): run by torchrun as
``pipeline_worker.py OUT MODEL...``, it loads its stage of each model folder and writes what it computed to
``OUT/{i}.rank{r}.safetensors`` (model i)."""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from interplab.model.generate import generate
from interplab.model.parallel import PipelineModel

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()


def run(i: int, folder: str) -> None:
    model = PipelineModel.load(folder)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=g)
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0  # a left-padded row
    out = {"logits": model(tokens), "masked": model(tokens, attention_mask=mask)}
    out["loss"] = model(tokens, return_type="loss").reshape(1)
    names = (
        ["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"]
        if rank == 0
        else ["blocks.3.hook_resid_post"]
    )
    logits, cache = model.run_with_cache(tokens, names=names)
    out |= {f"cache.{k}": v for k, v in cache.items()}
    if rank == 0:  # patch on rank 0: the change reaches the logits of every rank

        def zero(act, site):
            return torch.zeros_like(act)

        out["patched"] = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mlp_out", zero)])
    else:
        out["patched"] = model.run_with_hooks(tokens)
    out["generated"] = generate(model, tokens, max_new_tokens=4, attention_mask=mask).tokens
    try:
        model.run_with_cache(tokens, names=["blocks.3.hook_resid_post" if rank == 0 else "hook_embed"])
    except ValueError as err:
        out["refused"] = torch.tensor([1 if "is computed by rank" in str(err) else 0])
    held = [i for i, b in enumerate(model.model.blocks) if not b.attn.W_Q.is_meta]
    out["held"] = torch.tensor(held)
    save_file({k: v.contiguous() for k, v in out.items()}, f"{sys.argv[1]}/{i}.rank{rank}.safetensors")


for i, folder in enumerate(sys.argv[2:]):
    run(i, folder)
dist.destroy_process_group()
