"""TransformerLens checkpoints: a ``HookedTransformer`` state dict plus its config as JSON.

Many published toy models exist only in this form (ARENA, REMIX, the paren balancer). TransformerLens
already uses interplab's weight names and shapes, so the conversion maps the config, drops TL's buffers
(``attn.mask``, ``attn.IGNORE``, rotary tables) and fills the weights TL does not store (folded norms).

The state dict is read with ``torch.load(map_location="cpu", weights_only=True)`` (files saved on a GPU
load anywhere, and no pickled code runs) or from ``.safetensors``.

>>> model = load_transformer_lens("fixtures/paren_balancer/brackets_model_state_dict.pt")
>>> model.cfg.n_layers, model.cfg.causal
(3, False)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from interplab.io import load_tensors
from interplab.model.config import Activation, ModelConfig, Norm, Positional, QKNorm, RotaryStyle
from interplab.model.convert import build_from_weights
from interplab.model.rope import LinearRope, Llama3Rope, RopeScaling, YarnRope

if TYPE_CHECKING:
    from interplab.model.transformer import Transformer

TL_CONFIG_NAMES = ("transformerlens_config.json", "tl_config.json", "hooked_transformer_config.json")
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

_ACT = {
    "relu": Activation.RELU,
    "gelu": Activation.GELU,
    "gelu_new": Activation.GELU_NEW,
    "gelu_fast": Activation.GELU_TANH,
    "gelu_pytorch_tanh": Activation.GELU_TANH,
    "silu": Activation.SILU,
    "swish": Activation.SILU,
    "quick_gelu": Activation.GELU_QUICK,
}
# normalization_type -> (our norm, whether TL stores weights for it)
_NORM = {
    "LN": (Norm.LAYERNORM, True),
    "LNPre": (Norm.LAYERNORM, False),
    "RMS": (Norm.RMSNORM, True),
    "RMSPre": (Norm.RMSNORM, False),
    None: (Norm.NONE, False),
    "None": (Norm.NONE, False),
}
_POSITIONAL = {"standard": Positional.LEARNED, "rotary": Positional.ROTARY}
# TL buffers that are not weights (recomputed by interplab)
_BUFFERS = {"mask", "IGNORE", "rotary_sin", "rotary_cos"}
# config fields read below
_MAPPED = set(
    """d_model n_layers n_heads d_head d_mlp d_vocab d_vocab_out n_ctx act_fn eps normalization_type attention_dir
    positional_embedding_type attn_only n_key_value_heads rotary_dim rotary_base rotary_adjacent_pairs gated_mlp
    parallel_attn_mlp use_attn_scale attn_scale original_architecture model_name initializer_range use_local_attn
    window_size attn_types attn_scores_soft_cap output_logits_soft_cap use_normalization_before_and_after
    final_rms use_NTK_by_parts_rope use_qk_norm use_yarn_rope yarn_factor yarn_attention_factor yarn_beta_fast
    yarn_beta_slow yarn_original_max_position_embeddings rotary_scaling_factor""".split()
)
# features interplab does not implement: field -> the values that mean "off"
_MUST_BE_OFF: dict[str, tuple[Any, ...]] = {
    "scale_attn_by_inverse_layer_idx": (False, None),
    "post_embedding_ln": (False, None),
    "num_experts": (None, 0, 1),
    "use_dynamic_ntk_rope": (False, None),
    "use_logn_attn": (False, None),
    "use_attention_sinks": (False, None),
    "relative_attention_num_buckets": (None,),
    "clip_qkv": (None,),
    "rotary_base_local": (None,),
    "quantization_method": (None,),
}
# informational or run-time settings that do not change the function the weights compute
# (the yarn/NTK factors only matter when the switch above that uses them is on)
_IGNORED = set(
    """use_attn_result use_split_qkv_input use_hook_mlp_in use_attn_in use_hook_tokens from_checkpoint
    checkpoint_index checkpoint_label_type checkpoint_value tokenizer_name init_mode device n_devices seed
    init_weights n_params default_prepend_bos dtype tokenizer_prepends_bos trust_remote_code load_in_4bit
    load_in_8bit experts_per_token norm_topk_prob relative_attention_max_distance decoder_start_token_id
    tie_word_embeddings NTK_by_parts_low_freq_factor NTK_by_parts_high_freq_factor NTK_by_parts_factor
    NTK_original_ctx_len yarn_truncate yarn_global_attn_only train_seq_length
    tokenizer_padding_side default_padding_side dtype_str ungroup_grouped_query_attention is_stateful
    model_type uses_rms_norm layer_norm_folding""".split()
) | set(_MUST_BE_OFF)


def read_tl_config(tl_config: str | Path | Mapping[str, Any] | None, weights_file: Path) -> dict[str, Any]:
    """The TL config as a dict: given directly, read from a path, or found next to the weights file."""
    if isinstance(tl_config, Mapping):
        return dict(tl_config)
    if tl_config is not None:
        return json.loads(Path(tl_config).read_text())
    found = next(
        (weights_file.parent / n for n in TL_CONFIG_NAMES if (weights_file.parent / n).is_file()), None
    )
    if found is None:
        raise FileNotFoundError(
            f"no TransformerLens config next to {weights_file}: expected one of {', '.join(TL_CONFIG_NAMES)} "
            f"in {weights_file.parent}, or pass tl_config= (a dict or a JSON path)"
        )
    return json.loads(found.read_text())


def tl_config_to_model_config(tl: dict[str, Any]) -> ModelConfig:
    """Map a TransformerLens ``HookedTransformerConfig`` (as a dict) to a `ModelConfig`.

    Raises ``ValueError`` naming the field and the supported values for anything interplab cannot run."""
    for key in ("d_model", "n_layers", "n_ctx", "d_vocab"):
        if tl.get(key) in (None, -1):
            raise ValueError(f"TransformerLens config has no {key!r}; it is required")
    for key, off in _MUST_BE_OFF.items():
        if key in tl and tl[key] not in off:
            raise ValueError(f"TransformerLens config {key}={tl[key]!r} is not supported by interplab")
    unknown = sorted(set(tl) - _MAPPED - _IGNORED)
    if unknown:
        warnings.warn(f"TransformerLens config fields ignored by interplab: {unknown}", stacklevel=3)

    norm_type = tl.get("normalization_type", "LN")
    if norm_type not in _NORM:
        raise ValueError(
            f"TransformerLens normalization_type={norm_type!r} is not supported; supported: LN, LNPre, RMS, RMSPre, None"
        )
    if tl.get("final_rms") and norm_type in ("LN", "LNPre"):
        raise ValueError(
            f"TransformerLens final_rms=True with normalization_type={norm_type!r} (an RMSNorm after LayerNorm "
            "blocks) is not supported: interplab uses one kind of norm throughout"
        )
    pos_type = tl.get("positional_embedding_type", "standard")
    if pos_type not in _POSITIONAL:
        raise ValueError(
            f"TransformerLens positional_embedding_type={pos_type!r} is not supported; supported: {sorted(_POSITIONAL)}"
        )
    attn_dir = tl.get("attention_dir", "causal")
    if attn_dir not in ("causal", "bidirectional"):
        raise ValueError(f"TransformerLens attention_dir={attn_dir!r} is not one of: causal, bidirectional")
    attn_only = bool(tl.get("attn_only", False))
    act = tl.get("act_fn")
    if act is None and not attn_only:
        raise ValueError("TransformerLens config has no act_fn but the model has MLPs (attn_only is false)")
    if act is not None and act not in _ACT:
        raise ValueError(f"TransformerLens act_fn={act!r} is not supported; supported: {sorted(_ACT)}")

    n_heads = tl.get("n_heads", -1)
    d_head = tl.get("d_head")
    if n_heads in (None, -1):
        if not d_head:
            raise ValueError("TransformerLens config needs n_heads or d_head")
        n_heads = tl["d_model"] // d_head
    d_head = d_head or tl["d_model"] // n_heads
    if tl.get("use_attn_scale", True):
        attn_scale = tl.get("attn_scale", -1.0)
        attn_scale = float(d_head) ** 0.5 if attn_scale in (None, -1, -1.0) else float(attn_scale)
    else:
        attn_scale = 1.0
    window = None
    sliding: tuple[int, ...] = ()
    if tl.get("use_local_attn"):
        types = tl.get("attn_types") or []
        window = tl.get("window_size")
        if window is None or len(types) != tl["n_layers"]:
            raise ValueError(
                "TransformerLens use_local_attn needs window_size and one attn_types entry per layer"
            )
        sliding = tuple(i for i, t in enumerate(types) if t == "local")

    if tl.get("original_architecture") in _FULL_QK_NORM and not tl.get("use_qk_norm"):
        raise ValueError(
            f"TransformerLens original_architecture={tl['original_architecture']!r} (q/k RMSNorm over all heads "
            "at once, no pre-norms) is not supported: load the Hugging Face checkpoint instead (interplab reads "
            "OLMo-2 from transformers)"
        )
    rope_scaling, scaled_layers = _tl_rope_scaling(tl, sliding)

    def cap(key: str) -> float | None:
        value = tl.get(key)
        return None if value in (None, -1, -1.0) or value <= 0 else float(value)

    d_vocab_out = tl.get("d_vocab_out", -1)
    return ModelConfig(
        d_model=tl["d_model"],
        n_layers=tl["n_layers"],
        n_heads=n_heads,
        d_head=d_head,
        d_vocab=tl["d_vocab"],
        n_ctx=tl["n_ctx"],
        d_mlp=tl.get("d_mlp") or None,  # type: ignore[arg-type]  # None: derived by ModelConfig
        d_vocab_out=None if d_vocab_out in (None, -1) else d_vocab_out,  # type: ignore[arg-type]
        n_kv_heads=tl.get("n_key_value_heads"),  # type: ignore[arg-type]
        attn_only=attn_only,
        act_fn=_ACT[act] if act is not None else Activation.GELU,
        gated_mlp=bool(tl.get("gated_mlp", False)),
        normalization=_NORM[norm_type][0],
        norm_eps=float(tl.get("eps", 1e-5)),
        post_norms=bool(tl.get("use_normalization_before_and_after", False)),
        positional=_POSITIONAL[pos_type],
        rotary_dim=tl.get("rotary_dim") if pos_type == "rotary" else None,  # type: ignore[arg-type]
        rotary_base=float(tl.get("rotary_base", 10000)),
        rotary_style=RotaryStyle.GPTJ if tl.get("rotary_adjacent_pairs") else RotaryStyle.NEOX,
        rope_scaling=rope_scaling,
        rope_scaled_layers=scaled_layers,
        qk_norm=QKNorm.HEAD if tl.get("use_qk_norm") else QKNorm.NONE,
        parallel_attn_mlp=bool(tl.get("parallel_attn_mlp", False)),
        unembed_bias=True,
        causal=attn_dir == "causal",
        attn_scale=attn_scale,
        attn_softcap=cap("attn_scores_soft_cap"),
        logit_softcap=cap("output_logits_soft_cap"),
        sliding_window=window,
        sliding_layers=sliding,
        init_range=float(tl.get("initializer_range") or 0.02),
        name=tl.get("model_name") or "",
        architecture=f"transformer_lens:{tl.get('original_architecture') or 'HookedTransformer'}",
    )


# TransformerLens' q/k norm over all heads (by architecture, without use_qk_norm): not read
_FULL_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def _tl_rope_scaling(
    tl: dict[str, Any], sliding: tuple[int, ...]
) -> tuple[RopeScaling | None, tuple[int, ...]]:
    """(the rope scaling, the layers it applies to: () for all) of a TL config, as TransformerLens'
    ``calculate_sin_cos_rotary`` computes it: NTK-by-parts (transformers' llama3), else YaRN, else a linear
    ``rotary_scaling_factor`` on the global (non-local) layers only."""
    if tl.get("use_NTK_by_parts_rope"):  # Llama-3.1's rope: TL's NTK-by-parts is transformers' llama3
        scaling: RopeScaling = Llama3Rope(
            factor=float(tl.get("NTK_by_parts_factor", 8.0)),
            low_freq_factor=float(tl.get("NTK_by_parts_low_freq_factor", 1.0)),
            high_freq_factor=float(tl.get("NTK_by_parts_high_freq_factor", 4.0)),
            # TransformerLens before NTK_original_ctx_len existed took the original context to be n_ctx
            original_max_position_embeddings=int(tl.get("NTK_original_ctx_len") or tl["n_ctx"]),
        )
        return scaling, ()
    if tl.get("use_yarn_rope"):
        # TL's YaRN: transformers' ramp with whole-dimension ends (truncate), cos and sin times
        # yarn_attention_factor as given (TL does not derive it from the factor: its default is 1)
        scaling = YarnRope(
            factor=float(tl.get("yarn_factor", 1.0)),
            original_max_position_embeddings=int(tl.get("yarn_original_max_position_embeddings", 4096)),
            attention_factor=float(tl.get("yarn_attention_factor", 1.0)),
            beta_fast=float(tl.get("yarn_beta_fast", 32.0)),
            beta_slow=float(tl.get("yarn_beta_slow", 1.0)),
            truncate=True,
        )
        return scaling, ()
    factor = tl.get("rotary_scaling_factor")
    if factor in (None, 1, 1.0):
        return None, ()
    if not sliding:
        return LinearRope(factor=float(factor)), ()
    global_layers = tuple(i for i in range(tl["n_layers"]) if i not in sliding)
    return (LinearRope(factor=float(factor)), global_layers) if global_layers else (None, ())


_NESTED_WEIGHTS = ("state_dict", "model_state_dict", "model")
_NESTED_CONFIG = ("cfg", "config")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state dict in ``path``, and the TL config if the file embeds one (``{"state_dict"|"model": ...,
    "cfg"|"config": {...}}``, a common way of publishing toy models)."""
    if path.suffix == ".safetensors":
        return load_tensors(path), None
    # not memory-mapped: torch.save rewrites a file in place (same inode), so a training loop saving over the
    # checkpoint would silently change (or crash, SIGBUS) a model whose weights still map the old file
    data = torch.load(path, map_location="cpu", weights_only=True)
    embedded = None
    if isinstance(data, dict) and not all(isinstance(v, torch.Tensor) for v in data.values()):
        embedded = next((data[k] for k in _NESTED_CONFIG if isinstance(data.get(k), dict)), None)
        data = next((data[k] for k in _NESTED_WEIGHTS if isinstance(data.get(k), dict)), data)
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(
            f"{path} does not hold a state dict (a mapping of names to tensors, possibly under one of the keys "
            f"{', '.join(_NESTED_WEIGHTS)})"
        )
    return data, embedded


def tl_weights(
    state: dict[str, torch.Tensor], tl: dict[str, Any], cfg: ModelConfig, source: str
) -> Iterator[tuple[str, torch.Tensor]]:
    """interplab weights from a TL state dict: TL's names, minus buffers, plus folded-away norm weights."""
    norm_type = tl.get("normalization_type", "LN")
    state = dict(state)
    if cfg.gated_mlp:
        # TL's gated MLP adds b_in after the product: (act(x W_gate) * (x W_in) + b_in) W_out + b_out. interplab
        # adds it inside the linear branch, so move it (exactly) into b_out: b_out + b_in W_out.
        for layer in range(cfg.n_layers):
            m = f"blocks.{layer}.mlp."
            if m + "b_in" in state and m + "W_out" in state and m + "b_out" in state:
                b_in = state[m + "b_in"]
                state[m + "b_out"] = (
                    state[m + "b_out"] + b_in.to(state[m + "W_out"].dtype) @ state[m + "W_out"]
                )
                state[m + "b_in"] = torch.zeros_like(b_in)
    for name, tensor in state.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _BUFFERS:
            continue
        if leaf in ("_W_K", "_W_V", "_b_K", "_b_V"):  # TL's grouped-query attention stores K/V unrepeated
            name = name[: -len(leaf)] + leaf[1:]
        yield name, tensor
    if cfg.normalization is not Norm.NONE and not _NORM[norm_type][1]:
        # LNPre / RMSPre: the norm's weights were folded into the next layer; they are the identity
        ones, zeros = torch.ones(cfg.d_model), torch.zeros(cfg.d_model)
        norms = ["ln_final"] + [
            f"blocks.{layer}.{n}"
            for layer in range(cfg.n_layers)
            for n in ("ln1", "ln2")
            if n == "ln1" or cfg.has_mlp
        ]
        for n in norms:
            yield f"{n}.w", ones.clone()
            if cfg.normalization is Norm.LAYERNORM:
                yield f"{n}.b", zeros.clone()
    if "unembed.b_U" not in state:
        yield "unembed.b_U", torch.zeros(cfg.d_vocab_out)


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(files) != 1:
        raise FileNotFoundError(
            f"{path}: expected exactly one TransformerLens state dict ({', '.join(WEIGHT_SUFFIXES)}), "
            f"found {[p.name for p in files] or 'none'}; pass the file itself"
        )
    return files[0]


def load_transformer_lens(
    path: str | Path,
    tl_config: str | Path | Mapping[str, Any] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Transformer:
    """Load a TransformerLens ``HookedTransformer`` state dict (a file, or a folder holding one) into a
    `Transformer`. ``tl_config`` is the TL config (dict or JSON path); by default it is the config embedded
    in the checkpoint (``{"state_dict": ..., "cfg": ...}``) or ``transformerlens_config.json`` (or another of
    `TL_CONFIG_NAMES`) next to the weights."""

    weights_file = _weights_file(Path(path))
    state, embedded = read_checkpoint(weights_file)
    tl = read_tl_config(tl_config if tl_config is not None else embedded, weights_file)
    cfg = tl_config_to_model_config(tl)
    return build_from_weights(
        cfg,
        tl_weights(state, tl, cfg, str(weights_file)),
        device=device,
        dtype=dtype,
        source=str(weights_file),
    )
