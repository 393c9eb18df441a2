"""The JSON API of the feature explorer: features, labels, steering, attention patterns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import torch
from fastapi import FastAPI, HTTPException, Path, Query
from jaxtyping import Int
from pydantic import BaseModel, Field
from torch import Tensor

from interplab.features.database import ReadOnlyDatabase
from interplab.features.reader import FeatureNotFound
from interplab.features.steer import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_STRENGTH,
    SteerMode,
    decode,
    prompt_tokens,
    steer_generate,
)
from interplab.hooks import Site, SiteKind
from interplab.model import Transformer
from interplab.sae import SAE
from interplab.web.views import show_token

if TYPE_CHECKING:  # app.py imports this module
    from interplab.web.app import Resources

INT64_MAX = 2**63 - 1
FeatureIndex = Annotated[int, Path(ge=0, le=INT64_MAX, description="feature index")]


class LabelIn(BaseModel):
    explanation: str = Field(max_length=2000)


class SteerIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    strength: float | None = Field(default=None, ge=-1000, le=1000, allow_inf_nan=False)
    """a multiple of the feature's max activation (default `DEFAULT_STRENGTH`)"""
    value: float | None = Field(default=None, ge=-1e6, le=1e6, allow_inf_nan=False)
    """an absolute activation instead of ``strength``"""
    mode: str = Field(default=SteerMode.ADD.value, max_length=20)
    max_new_tokens: int = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=100)


class AttentionIn(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)


def token_texts(model: Transformer, toks: Int[Tensor, " pos"]) -> list[str]:
    return [show_token(decode(model, [int(t)])) for t in toks]


def add_routes(app: FastAPI, res: Resources) -> None:
    def feature_or_404(db: str, index: FeatureIndex) -> dict[str, Any]:
        try:
            return res.store(db).feature(index)
        except FeatureNotFound:
            raise HTTPException(404, f"feature {index} is not in database {db!r}") from None

    @app.get("/api/db/{db}/feature/{index}")
    def api_feature(db: str, index: FeatureIndex):
        return feature_or_404(db, index)

    @app.get("/api/db/{db}/feature/{index}/explanations")
    def api_explanations(db: str, index: FeatureIndex):
        """Every stored explanation of the feature with its scores (`FeatureReader.explanations`)."""
        feature_or_404(db, index)
        return res.store(db).explanations(index)

    @app.get("/api/db/{db}/explanations")
    def api_search_explanations(db: str, q: str = Query(min_length=1, max_length=1000), limit: int = 50):
        """Explanations whose text contains every word of ``q`` (`FeatureReader.search_explanations`)."""
        return res.store(db).search_explanations(q, limit=max(1, min(limit, 500)))

    @app.post("/api/db/{db}/feature/{index}/label")
    def api_label(db: str, index: FeatureIndex, body: LabelIn):
        try:
            res.writer(db).set_label(index, body.explanation, source="human")
        except ReadOnlyDatabase as err:
            raise HTTPException(403, str(err)) from None
        except FeatureNotFound:
            raise HTTPException(404, f"feature {index} is not in database {db!r}") from None
        return {"feature": index, "explanation": body.explanation.strip()}

    @app.post("/api/db/{db}/feature/{index}/steer")
    def api_steer(db: str, index: FeatureIndex, body: SteerIn):
        rec = feature_or_404(db, index)
        if isinstance(res.meta.get(db, {}).get("dt"), dict):  # a decision transformer's: no prompt to steer
            raise HTTPException(
                422,
                f"database {db!r} holds a decision transformer's features: steering by prompt needs a "
                "language model's (see interplab.rl.analysis.steer for DT steering)",
            )
        if body.value is not None and body.strength is not None:
            raise HTTPException(
                422, "give either strength (a multiple of the max activation) or value, not both"
            )
        model, sae = _model_and_sae(res, db)
        try:
            mode = SteerMode(body.mode)
        except ValueError:
            raise HTTPException(
                422, f"unknown mode {body.mode!r}; valid: {[m.value for m in SteerMode]}"
            ) from None
        try:
            toks = prompt_tokens(model, body.prompt)
            relative = body.value is None
            out = steer_generate(
                model,
                sae,
                toks,
                index,
                body.strength if body.strength is not None else DEFAULT_STRENGTH,
                mode,
                max_act=rec["max_act"] if relative else None,
                value=body.value,
                max_new_tokens=body.max_new_tokens,
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
            "strength": out.strength,
            "max_act": out.max_act,
            "description": out.describe(),
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
        names = [Site(SiteKind.PATTERN, layer).name for layer in range(model.cfg.n_layers)]
        with torch.no_grad():
            _, cache = model.run_with_cache(toks[None], names=names)
        patterns = [
            [[[round(float(v), 4) for v in row] for row in head] for head in cache[n][0]] for n in names
        ]
        return {"tokens": token_texts(model, toks), "patterns": patterns}


def _model_and_sae(res: Resources, db: str) -> tuple[Transformer, SAE]:
    try:
        model, sae = res.model(db), res.sae(db)
    except (ImportError, OSError, ValueError, KeyError) as err:  # a moved, partial or foreign folder
        raise HTTPException(409, f"cannot load the model or SAE for steering: {err}") from None
    if model is None or sae is None:
        raise HTTPException(
            409,
            "steering needs the model and the SAE: start `interplab serve --model DIR --sae DIR` "
            "or build the database with --model/--sae paths",
        )
    return model, sae
