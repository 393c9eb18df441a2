"""Text generation with the key/value cache, padding masks and hooks.

>>> from interplab.model import ModelConfig, Transformer
>>> from interplab.model.generate import generate
>>> model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=4, d_vocab=50, n_ctx=32))
>>> out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=5)
>>> out.tokens.shape, out.new_tokens.shape
(torch.Size([1, 8]), torch.Size([1, 5]))

Forward hooks given as ``fwd_hooks`` run at every step: on the prompt (all positions), then on each new
token alone ([batch, 1, ...] activations; patterns are [batch, head, 1, key_pos]) when the cache is used.
A steering hook that adds a vector to ``hook_resid_pre`` therefore steers every generated token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from jaxtyping import Int
from torch import Tensor

from interplab import runs
from interplab.hooks.points import HookFn, HookTarget
from interplab.model.attention import keep_fused_weights
from interplab.model.rope import cache_expires_at

if TYPE_CHECKING:
    from interplab.model.transformer import Transformer


@dataclass(frozen=True)
class Generation:
    """Prompts and their continuations. Rows are left-padded: ``attention_mask`` marks real tokens."""

    tokens: Int[Tensor, "batch pos"]
    """prompt (left-padded) followed by the generated tokens"""
    attention_mask: Int[Tensor, "batch pos"]
    """1 at real tokens, 0 at padding (and after an end-of-sequence token when ``stop_at_eos``)"""
    prompt_length: int
    """width of the (padded) prompt: generated tokens start here"""
    text: tuple[str, ...] | None = None
    """each row's real tokens decoded, if the model has a tokenizer"""

    @property
    def new_tokens(self) -> Int[Tensor, "batch new"]:
        return self.tokens[:, self.prompt_length :]

    def save(self, path: str | Path) -> Path:
        """Write the tokens, mask and text as JSON."""
        path = Path(path)
        runs.write_json(
            path,
            runs.Kind.GENERATION,
            {
                "tokens": self.tokens.tolist(),
                "attention_mask": self.attention_mask.tolist(),
                "prompt_length": self.prompt_length,
                "text": list(self.text) if self.text is not None else None,
            },
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> Generation:
        data = json.loads(Path(path).read_text())
        text = tuple(data["text"]) if data["text"] is not None else None
        return cls(
            torch.tensor(data["tokens"]), torch.tensor(data["attention_mask"]), data["prompt_length"], text
        )


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: Int[Tensor, "batch pos"] | Int[Tensor, " pos"] | str | Sequence[str],
    max_new_tokens: int = 20,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    seed: int | None = None,
    stop_at_eos: bool = False,
    eos_token_id: int | None = None,
    fwd_hooks: Sequence[tuple[HookTarget, HookFn]] = (),
    use_kv_cache: bool = True,
) -> Generation:
    """Continue ``prompt`` by ``max_new_tokens`` tokens.

    ``temperature=0`` is greedy decoding; otherwise tokens are sampled from ``softmax(logits / temperature)``
    restricted to the ``top_k`` most likely tokens and to the smallest set whose probability reaches
    ``top_p``. ``seed`` makes sampling reproducible without touching the global generator. A batch of
    prompts of different lengths needs ``attention_mask`` (1 = real token); right-padded rows are moved to
    the left first, so every row continues right after its last real token. Strings are tokenised with the
    model's tokenizer. With ``stop_at_eos``, a row that emits ``eos_token_id`` (default: the tokenizer's)
    is finished: it is filled with that id and masked; generation ends when all rows are finished.
    ``use_kv_cache=False`` recomputes the whole sequence at every step (slow; for checking). With LongRoPE
    (Phi-3) the cache is recomputed once, when the sequence first passes ``original_max_position_embeddings``
    and the long factors take over, as transformers' Phi-3 ``generate`` does."""
    _check_options(max_new_tokens, temperature, top_k, top_p)
    if not model.cfg.causal:
        raise ValueError("generate needs a causal model; this one attends bidirectionally (causal=False)")
    tokens, mask = _prompt_tokens(model, prompt, attention_mask)
    batch, width = tokens.shape
    if width + max_new_tokens > model.cfg.n_ctx:
        raise ValueError(
            f"a prompt of {width} tokens plus max_new_tokens={max_new_tokens} exceeds the model's n_ctx={model.cfg.n_ctx}"
        )
    if stop_at_eos and eos_token_id is None:
        eos_token_id = getattr(model.tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.tokenizer, "eos_id", None)
        if eos_token_id is None:
            raise ValueError(
                "stop_at_eos=True needs eos_token_id (the model has no tokenizer that defines one)"
            )
    gen = None
    if seed is not None:
        gen = torch.Generator(device=tokens.device).manual_seed(seed)
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    kv = model.new_kv_cache() if use_kv_cache else None
    out, out_mask = tokens, mask
    step_input, step_mask = tokens, mask
    with model.hooks(fwd_hooks), keep_fused_weights(model):  # the weights are fixed for the whole call
        for _ in range(max_new_tokens):
            logits = model(step_input, attention_mask=step_mask, kv_cache=kv)[:, -1].to(tokens.device)
            nxt = _choose(logits, temperature, top_k, top_p, gen)
            real = ~finished
            if stop_at_eos and eos_token_id is not None:  # (it is set whenever stop_at_eos is)
                nxt = torch.where(finished, torch.full_like(nxt, eos_token_id), nxt)
                finished = finished | (nxt == eos_token_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            if out_mask is not None or stop_at_eos:
                base = out_mask if out_mask is not None else torch.ones_like(tokens)
                out_mask = torch.cat([base, real[:, None].to(base.dtype)], dim=1)
            if use_kv_cache and not cache_expires_at(model.cfg.rope_scaling, out.shape[1]):
                step_input = nxt[:, None]
                step_mask = None if out_mask is None else torch.ones_like(step_input)
            else:
                if use_kv_cache:  # the cached keys were rotated with frequencies this length no longer uses
                    kv = model.new_kv_cache()
                step_input, step_mask = out, out_mask
            if stop_at_eos and bool(finished.all()):
                break
    final_mask = out_mask if out_mask is not None else torch.ones_like(out)
    text = None
    if model.tokenizer is not None:
        text = tuple(
            cast(str, model.to_string(row[m.bool()].tolist())) for row, m in zip(out, final_mask, strict=True)
        )
    return Generation(out, final_mask, width, text)


def _check_options(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def _prompt_tokens(
    model: Transformer, prompt: Tensor | str | Sequence[str], attention_mask: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """[batch pos] tokens, left-padded, and their mask (None when every token is real)."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, Sequence) and not isinstance(prompt, Tensor):
        if attention_mask is not None:
            raise ValueError("attention_mask is computed from the strings: pass it only with token tensors")
        rows = [model.to_tokens(text).reshape(-1) for text in prompt]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long, device=model.W_E.device)
        attention_mask = torch.zeros_like(tokens)
        for i, r in enumerate(rows):
            tokens[i, width - len(r) :] = r
            attention_mask[i, width - len(r) :] = 1
    else:
        tokens = torch.as_tensor(prompt)
        if tokens.dim() == 1:
            tokens = tokens[None]
            attention_mask = (
                attention_mask[None]
                if attention_mask is not None and attention_mask.dim() == 1
                else attention_mask
            )
    if attention_mask is None:
        return tokens, None
    if attention_mask.shape != tokens.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, tokens {tuple(tokens.shape)}"
        )
    mask = attention_mask.to(device=tokens.device, dtype=torch.long)
    if bool(mask.all()):
        return tokens, None
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("attention_mask has a row with no real token")
    return _left_pad(tokens, mask)


def _left_pad(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move each row's real tokens to the right end (stable), keeping their order."""
    # sort key: padding first, then real tokens in their original order
    order = torch.argsort(mask * tokens.shape[1] + torch.arange(tokens.shape[1], device=tokens.device), dim=1)
    return tokens.gather(1, order), mask.gather(1, order)


def _choose(
    logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, gen: torch.Generator | None
) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the more likely ones already reach top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
