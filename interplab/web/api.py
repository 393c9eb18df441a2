"""The JSON API of the feature explorer: features, labels, steering, attention patterns."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, Field

from interplab.features.store import FeatureNotFound, ReadOnlyDatabase

MAX_PROMPT = 256


class LabelIn(BaseModel):
    explanation: str = Field(max_length=2000)


class SteerIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    value: float = 10.0
    mode: str = "add"
    max_new_tokens: int = Field(default=20, ge=1, le=100)


class AttentionIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)


def prompt_tokens(model, prompt: str):
    """Tokens of a typed prompt: the model's tokenizer, or space-separated ids (``12 7 #3``) without one."""
    import torch

    if getattr(model, "tokenizer", None) is not None:
        toks = model.to_tokens(prompt)[0]
    else:
        parts = re.split(r"[\s,]+", prompt.strip())
        if not all(re.fullmatch(r"#?\d+", p) for p in parts):
            raise ValueError("this model has no tokenizer: type token ids separated by spaces, e.g. '12 7 3'")
        toks = torch.tensor([int(p.lstrip("#")) for p in parts])
    if toks.numel() > min(MAX_PROMPT, model.cfg.n_ctx):
        raise ValueError(f"the prompt has {toks.numel()} tokens; at most {min(MAX_PROMPT, model.cfg.n_ctx)}")
    if toks.numel() and int(toks.max()) >= model.cfg.d_vocab:
        raise ValueError(f"token id {int(toks.max())} is out of range (d_vocab={model.cfg.d_vocab})")
    return toks


def token_texts(model, toks) -> list[str]:
    from interplab.features.steer import decode
    from interplab.web.views import show_token

    return [show_token(decode(model, [int(t)])) for t in toks]


def add_routes(app, res) -> None:
    from fastapi import HTTPException

    def feature_or_404(db: str, index: int) -> dict[str, Any]:
        try:
            return res.store(db).feature(index)
        except FeatureNotFound:
            raise HTTPException(404, f"feature {index} is not in database {db!r}") from None

    @app.get("/api/db/{db}/feature/{index}")
    def api_feature(db: str, index: int):
        return feature_or_404(db, index)

    @app.post("/api/db/{db}/feature/{index}/label")
    def api_label(db: str, index: int, body: LabelIn):
        try:
            res.store(db).set_label(index, body.explanation, source="human")
        except ReadOnlyDatabase as err:
            raise HTTPException(403, str(err)) from None
        except FeatureNotFound:
            raise HTTPException(404, f"feature {index} is not in database {db!r}") from None
        return {"feature": index, "explanation": body.explanation.strip()}

    @app.post("/api/db/{db}/feature/{index}/steer")
    def api_steer(db: str, index: int, body: SteerIn):
        from interplab.features.steer import SteerMode, steer_generate

        feature_or_404(db, index)
        model, sae = _model_and_sae(res, db)
        try:
            mode = SteerMode(body.mode)
        except ValueError:
            raise HTTPException(
                422, f"unknown mode {body.mode!r}; valid: {[m.value for m in SteerMode]}"
            ) from None
        try:
            toks = prompt_tokens(model, body.prompt)
            out = steer_generate(
                model, sae, toks, index, body.value, mode, max_new_tokens=body.max_new_tokens
            )
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        return {
            "prompt": out.prompt,
            "baseline": out.baseline,
            "steered": out.steered,
            "baseline_text": out.baseline_text,
            "steered_text": out.steered_text,
            "mode": mode.value,
            "value": out.value,
        }

    @app.post("/api/attention")
    def api_attention(body: AttentionIn):
        model = res.model()
        if model is None:
            raise HTTPException(409, "no model is loaded: start `interplab serve --model DIR`")
        try:
            toks = prompt_tokens(model, body.prompt)
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
        import torch

        names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
        with torch.no_grad():
            _, cache = model.run_with_cache(toks[None], names=names)
        patterns = [
            [[[round(float(v), 4) for v in row] for row in head] for head in cache[n][0]] for n in names
        ]
        return {"tokens": token_texts(model, toks), "patterns": patterns}


def _model_and_sae(res, db: str):
    from fastapi import HTTPException

    try:
        model, sae = res.model(db), res.sae(db)
    except (ImportError, FileNotFoundError, ValueError) as err:
        raise HTTPException(409, f"cannot load the model or SAE for steering: {err}") from None
    if model is None or sae is None:
        raise HTTPException(
            409,
            "steering needs the model and the SAE: start `interplab serve --model DIR --sae DIR` "
            "or build the database with --model/--sae paths",
        )
    return model, sae
