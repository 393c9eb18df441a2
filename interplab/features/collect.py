"""Run a model over a corpus, encode the SAE's hook activation and feed `StreamingFeatureStats`; logit effects.

One forward (and, for loss effects, one backward to the hook) per batch serves every feature at once.
The loss effect of a firing is estimated to first order: ablating feature f at token p removes
``a_f * W_dec[f]`` from the hooked activation, which changes the sequence's summed next-token
cross-entropy by about ``-a_f * W_dec[f] . dL/dx_p`` (attribution patching); `ablation_loss_effect`
computes the exact value for chosen features, to check the estimate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interplab.features.config import FeatureBuildConfig
from interplab.features.stream import FeatureStats, StreamingFeatureStats
from interplab.hooks import Site
from interplab.model import Transformer
from interplab.sae import SAE

TokenSource = Tensor | Iterable[Tensor]
Progress = Callable[[int, int | None], None]


def decoder_directions(sae: SAE, features: Tensor | None = None) -> Float[Tensor, "feature d_in"]:
    """What one unit of each feature adds to the hooked activation, in the model's units: ``W_dec[f]``
    divided by the SAE's input scale when it normalises its inputs (``act_scale``)."""
    w = sae.W_dec if features is None else sae.W_dec[features]
    scale = getattr(sae, "act_scale", None)
    w = w.detach().float()
    return w / scale.detach().float() if scale is not None else w


def check_sae_fits(model: Transformer, sae: SAE) -> str:
    """The SAE's hook name, after checking that the model has it and its width matches ``d_in``."""
    hook = sae.cfg.hook_name
    if not hook:
        raise ValueError("the SAE's config has no hook_name: which activation of the model does it read?")
    if hook not in model.hook_registry:
        model.hook_registry.resolve(hook)  # raises the model's own explanation
    width = model.hook_shapes(batch=1, pos=2)[hook][-1]
    if width != sae.cfg.d_in:
        raise ValueError(
            f"the SAE reads {hook} with d_in={sae.cfg.d_in}, but the model's activation there has "
            f"width {width}: this SAE was trained on a different model or site"
        )
    return hook


def token_batches(tokens: TokenSource, batch_size: int, skip: int = 0) -> Iterator[Tensor]:
    """Batches [batch pos] from a [n_seq pos] tensor or an iterable of batches; skips the first ``skip``."""
    if isinstance(tokens, Tensor):
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [n_seq, pos], got shape {tuple(tokens.shape)}")
        for start in range(skip * batch_size, tokens.shape[0], batch_size):
            yield tokens[start : start + batch_size]
        return
    for i, batch in enumerate(tokens):
        if i >= skip:
            batch = torch.as_tensor(batch)
            yield batch[None] if batch.dim() == 1 else batch


def n_batches(tokens: TokenSource, batch_size: int) -> int | None:
    if isinstance(tokens, Tensor):
        return -(-tokens.shape[0] // batch_size)
    return len(tokens) if hasattr(tokens, "__len__") else None  # type: ignore[arg-type]


@dataclass
class _Batch:
    acts: Tensor
    grad: Tensor | None


def encode_batch(
    model: Transformer, sae: SAE, tokens: Tensor, hook: str, features: Tensor | None, with_grad: bool
) -> _Batch:
    """SAE activations [batch pos feature] of ``features`` (None: all) and, optionally, the gradient of the
    summed next-token cross-entropy at the hooked activation.

    The gradient only flows back to the hook, so autograd records nothing before it: the forward runs under
    ``no_grad`` and the hook switches recording on for the rest (the same kernels either way, so the
    activations and the gradient are the values a fully recorded forward gives)."""
    holder: dict[str, Tensor] = {}

    def grab(x: Tensor, _site: Site) -> Tensor:
        if with_grad:
            x = x.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # from here on (the outer no_grad restores the caller's mode)
        holder["x"] = x
        return x

    grad = None
    with torch.no_grad(), model.hooks([(hook, grab)]):
        logits = model(tokens)
        if with_grad:
            if "x" not in holder:
                raise RuntimeError(f"the forward never reached the hook {hook!r}")
            (grad,) = torch.autograd.grad(logits, holder["x"], grad_outputs=summed_ce_grad(logits, tokens))
    x = holder["x"].detach()
    with torch.no_grad():
        acts = sae.encode(x.to(sae.W_enc.dtype))
        if features is not None:
            acts = acts[..., features]
    return _Batch(acts, grad)


def summed_ce_grad(logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """The gradient of the summed next-token cross-entropy ``-sum_p log softmax(logits[:, p])[tokens[:, p+1]]``
    with respect to ``logits``, written directly: ``softmax - one_hot(next token)``, zero at the last position
    (no target). Equal to autograd's through log_softmax and gather to float32 rounding, in two passes over
    ``[batch pos vocab]`` instead of the log-softmax forward, its backward and the gather's zero-filled one."""
    with torch.no_grad():
        g = torch.softmax(logits.float(), -1)
        g[:, -1] = 0.0
        g[:, :-1].scatter_add_(-1, tokens[:, 1:, None], g.new_full((*tokens[:, 1:].shape, 1), -1.0))
    return g.to(logits.dtype)


def collect_features(
    model: Transformer,
    sae: SAE,
    tokens: TokenSource,
    cfg: FeatureBuildConfig | None = None,
    *,
    features: Tensor | None = None,
    progress: Progress | None = None,
    state: StreamingFeatureStats | None = None,
    checkpoint: Callable[[StreamingFeatureStats], None] | None = None,
) -> FeatureStats:
    """Statistics of ``features`` (default: all) of ``sae`` over ``tokens`` in one streaming pass.

    >>> stats = collect_features(model, sae, tokens)
    >>> stats.density.shape, stats.top_val.shape           # per feature; top-k activations per feature
    (torch.Size([128]), torch.Size([128, 20]))

    ``state`` continues an interrupted pass (its ``batches`` are skipped); ``checkpoint`` is called every
    ``cfg.checkpoint_every`` batches with the state to save."""
    cfg = cfg or FeatureBuildConfig()
    hook = check_sae_fits(model, sae)
    feats = torch.arange(sae.cfg.d_sae) if features is None else features.long()
    subset = None if torch.equal(feats, torch.arange(sae.cfg.d_sae)) else feats
    directions = decoder_directions(sae, feats) if cfg.loss_effect else None
    stats = state if state is not None else StreamingFeatureStats(sae.cfg.d_sae, cfg, features=feats)
    total = n_batches(tokens, cfg.batch_size)
    seq_len = None
    for batch in token_batches(tokens, cfg.batch_size, skip=stats.batches):
        if seq_len is None:
            seq_len = batch.shape[1]
        elif batch.shape[1] != seq_len:
            raise ValueError(f"all sequences must have the same length: got {batch.shape[1]} after {seq_len}")
        out = encode_batch(model, sae, batch, hook, subset, cfg.loss_effect)
        stats.update(batch, out.acts, out.grad, directions)
        if checkpoint is not None and cfg.checkpoint_every and stats.batches % cfg.checkpoint_every == 0:
            checkpoint(stats)
        if progress is not None:
            progress(stats.batches, total)
    return stats.result()


def decoder_logit_effects(
    model: Transformer, sae: SAE, features: Tensor | None = None
) -> Float[Tensor, "feature d_vocab"]:
    """Direct effect of each feature's decoder direction on the logits: `decoder_directions` through the final
    norm's centering (LayerNorm) and weight, then ``W_U`` (the norm's scale is a positive factor and is left out)."""
    d = decoder_directions(sae, features)
    if d.shape[-1] != model.cfg.d_model:
        raise ValueError(
            f"logit effects need an SAE on a d_model-wide site; {sae.cfg.hook_name} has width {d.shape[-1]}"
        )
    return model.ln_final.apply_to_direction(d) @ model.W_U.detach().float()


def top_logits(effects: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(promoted values, promoted ids, suppressed values, suppressed ids), each [feature k]."""
    k = min(k, effects.shape[-1])
    pos_v, pos_i = effects.topk(k, dim=-1)
    neg_v, neg_i = (-effects).topk(k, dim=-1)
    return pos_v, pos_i, -neg_v, neg_i


def ablation_loss_effect(
    model: Transformer, sae: SAE, tokens: Int[Tensor, "batch pos"], feature: int
) -> float:
    """Exact mean increase of the sequence's summed cross-entropy when feature ``feature`` is ablated at one
    firing at a time (a forward pass per firing: for checks on small inputs, not for whole corpora)."""
    hook = check_sae_fits(model, sae)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names=[hook])
        acts = sae.encode(cache[hook])[..., feature]
        base = _seq_loss(model(tokens), tokens)
        direction = decoder_directions(sae, torch.tensor([feature]))[0]
        increases = []
        for b, p in acts.gt(0).nonzero().tolist():
            remove = acts[b, p] * direction

            def ablate(x: Tensor, _site: Site, b: int = b, p: int = p, remove: Tensor = remove) -> Tensor:
                x = x.clone()
                x[b, p] -= remove
                return x

            loss = _seq_loss(model.run_with_hooks(tokens, fwd_hooks=[(hook, ablate)]), tokens)
            increases.append(float(loss[b] - base[b]))
    return sum(increases) / max(len(increases), 1)


def _seq_loss(logits: Tensor, tokens: Tensor) -> Tensor:
    logp = torch.log_softmax(logits[:, :-1].double(), -1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1).sum(-1)
