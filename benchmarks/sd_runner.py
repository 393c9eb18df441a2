"""Run SAEDashboard on the benchmark's model, SAE and tokens (executed by bench_features.py inside the separate
virtual environment where sae-dashboard, sae-lens and transformer-lens are installed).

Usage: python sd_runner.py WORKDIR N_FEATURES OUT.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    work, n_features, out = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    from sae_dashboard.data_writing_fns import save_feature_centric_vis
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig
    from transformer_lens import HookedTransformerConfig

    spec = json.loads((work / "spec.json").read_text())
    cfg = HookedTransformerConfig(**spec["tl_config"])
    model = HookedSAETransformer(cfg)
    missing, unexpected = model.load_state_dict(load_file(str(work / "model.safetensors")), strict=False)
    assert not unexpected, unexpected
    assert all(k.endswith(("IGNORE", "mask")) for k in missing), missing
    model.eval()
    if (work / "tokenizer.json").is_file():  # the HTML writer decodes token strings
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast(tokenizer_file=str(work / "tokenizer.json"))
        if tok.pad_token is None:
            tok.pad_token = tok.convert_ids_to_tokens(0)
        # TransformerLens 2.x reloads the tokenizer by its name_or_path (with add_bos_token): a saved folder
        tok.save_pretrained(str(work / "hf_tokenizer"))
        tok = PreTrainedTokenizerFast.from_pretrained(str(work / "hf_tokenizer"))
        model.set_tokenizer(tok, default_padding_side="right")
    tokens = load_file(str(work / "tokens.safetensors"))["tokens"]
    with torch.no_grad():
        logits = model(tokens[:2])
    ref = load_file(str(work / "reference.safetensors"))["logits"]
    logit_diff = float((logits - ref).abs().max())

    sae_t = load_file(str(work / "sae.safetensors"))
    sae = StandardSAE(StandardSAEConfig(d_in=spec["d_in"], d_sae=spec["d_sae"], apply_b_dec_to_input=True))
    sae.load_state_dict(sae_t, strict=False)
    sae.cfg.metadata.hook_name = spec["hook_name"]
    sae.eval()

    vis_cfg = SaeVisConfig(
        hook_point=spec["hook_name"],
        features=list(range(n_features)),
        minibatch_size_features=min(n_features, 64),
        minibatch_size_tokens=64,
        device="cpu",
    )
    t0, c0 = time.perf_counter(), time.process_time()
    data = SaeVisRunner(vis_cfg).run(encoder=sae, model=model, tokens=tokens)
    t1 = time.perf_counter()
    html = work / "sd_dashboard.html"
    save_feature_centric_vis(sae_vis_data=data, filename=html)
    t2, c2 = time.perf_counter(), time.process_time()
    out.write_text(
        json.dumps(
            {
                "data_s": t1 - t0,
                "html_s": t2 - t1,
                "total_s": t2 - t0,
                "cpu_s": c2 - c0,
                "html_bytes": html.stat().st_size,
                "n_features": n_features,
                "logit_max_abs_diff": logit_diff,
            }
        )
    )


if __name__ == "__main__":
    main()
