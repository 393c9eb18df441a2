"""Write SAE folders with the real sae_lens (run with a Python that has it, e.g. the peer environment that
``bash scripts/peers.sh saelens`` builds):

    .peers/saelens/bin/python tests/sae/make_saelens_fixtures.py [OUT]

OUT defaults to tests/sae/fixtures/saelens (committed, so the offline tests need no sae_lens); test_io.py also
runs it into a temporary folder when the peer is there. Each folder is written by sae_lens' own ``save_model``
(inference SAEs, and training SAEs as its trainer writes checkpoints); ``expected.safetensors`` holds the input
``x`` and what sae_lens computes for it at inference: ``feature_acts`` and ``reconstruction`` (the forward
output). For a training checkpoint that is the inference SAE sae_lens makes of it (``save_inference_model``,
then ``load_from_disk``), e.g. BatchTopK's ``topk_threshold`` becoming a JumpReLU threshold.
"""

import sys
import tempfile
from pathlib import Path

import sae_lens
import torch
from sae_lens import SAE, TrainingSAE
from safetensors.torch import save_file

D_IN, D_SAE = 8, 16
#: metadata as sae_lens' training runner records it (hook names vary per fixture)
METADATA = {
    "model_name": "tiny-model",
    "hook_head_index": None,
    "context_size": 16,
    "prepend_bos": True,
    "dataset_path": "local/corpus",
    "model_from_pretrained_kwargs": {},
    "seqpos_slice": [None],
}
RESID = "blocks.0.hook_resid_post"
FIXTURES = {
    # name: (config class, config kwargs, extra metadata, training SAE?, input shape)
    "standard": ("StandardSAEConfig", {}, {}, False, (5, D_IN)),
    "topk": ("TopKSAEConfig", {"k": 4}, {}, False, (5, D_IN)),
    "jumprelu": ("JumpReLUSAEConfig", {}, {}, False, (5, D_IN)),
    "gated": ("GatedSAEConfig", {}, {}, False, (5, D_IN)),
    "transcoder": (
        "TranscoderConfig",
        {"d_out": D_IN, "apply_b_dec_to_input": False},
        {"hook_name": "blocks.0.hook_mlp_in", "hook_name_out": "blocks.0.hook_mlp_out"},
        False,
        (5, D_IN),
    ),
    "jumprelu_transcoder": (
        "JumpReLUTranscoderConfig",
        {"d_out": D_IN, "apply_b_dec_to_input": False},
        {"hook_name": "blocks.1.hook_mlp_in", "hook_name_out": "blocks.1.hook_mlp_out"},
        False,
        (5, D_IN),
    ),
    # sae_lens' trainer applies the scale outside the SAE; load_from_disk applies none
    "standard_expected_average": (
        "StandardSAEConfig",
        {"normalize_activations": "expected_average_only_in"},
        {},
        False,
        (5, D_IN),
    ),
    # per-head input [batch, pos, n_heads=4, d_head=2]
    "hook_z": (
        "TopKSAEConfig",
        {"k": 3, "reshape_activations": "hook_z"},
        {"hook_name": "blocks.1.attn.hook_z"},
        False,
        (2, 3, 4, 2),
    ),
    # training checkpoints (rescale_acts_by_decoder_norm defaults to True for TopK / BatchTopK training)
    "batchtopk_checkpoint": ("BatchTopKTrainingSAEConfig", {"k": 4.0}, {}, True, (5, D_IN)),
    "topk_checkpoint": ("TopKTrainingSAEConfig", {"k": 4}, {}, True, (5, D_IN)),
    "jumprelu_checkpoint": ("JumpReLUTrainingSAEConfig", {}, {}, True, (5, D_IN)),
}


def build(cls_name: str, kwargs: dict, meta: dict, training: bool):
    cfg = getattr(sae_lens, cls_name)(d_in=D_IN, d_sae=D_SAE, **kwargs)
    sae = (TrainingSAE if training else SAE).from_dict(cfg.to_dict())
    for key, value in {**METADATA, "hook_name": RESID, **meta}.items():
        sae.cfg.metadata[key] = value
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5)
            if name == "threshold":
                p.copy_(torch.rand_like(p) * 0.5)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    return sae.eval()


def expected(sae, training: bool, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    if training:  # what sae_lens serves at inference for this checkpoint
        with tempfile.TemporaryDirectory() as tmp:
            sae.save_inference_model(tmp)
            sae = SAE.load_from_disk(tmp)
    x = torch.randn(*shape)
    with torch.no_grad():
        acts = sae.encode(x)
        return {"x": x, "feature_acts": acts, "reconstruction": sae(x)}


def main(out: Path) -> None:
    torch.manual_seed(0)
    for name, (cls_name, kwargs, meta, training, shape) in FIXTURES.items():
        sae = build(cls_name, kwargs, meta, training)
        folder = out / name
        sae.save_model(folder)
        save_file(expected(sae, training, shape), str(folder / "expected.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "fixtures" / "saelens")
