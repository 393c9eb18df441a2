"""The names interplab's docstring examples use without defining them (`tests/test_doctests.py`).

A docstring example shows one call; what it needs around it (a model, tokens, an SAE, a training run, a
feature database) comes from here, small enough that every example runs in well under a second on a CPU.
Each name is built on first use and kept for the session, so running one module's examples builds only what
they use. Files the examples open by name (``"runs/demo"``, ``"features.db"``) are copied into the example's
working folder when its text mentions them.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

D_MODEL, N_LAYERS, N_HEADS, D_VOCAB, N_CTX = 64, 2, 4, 100, 32
SAE_SITE = "blocks.0.hook_resid_post"


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class DoctestNamespace:
    """Lazily built example objects; ``folder`` holds the files (training run, feature database)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[str, Any] = {}
        self.factories: dict[str, Callable[[], Any]] = {
            name[len("_make_") :]: getattr(self, name) for name in dir(self) if name.startswith("_make_")
        }
        self.files: dict[str, Callable[[], Path]] = {
            "runs/demo": self._run_dir,
            "features.db": self._feature_db,
            "fixtures/paren_balancer": self._paren_balancer,
            "code": self._corpus,
        }

    def get(self, name: str) -> Any:
        if name not in self._cache:
            self._cache[name] = self.factories[name]()
        return self._cache[name]

    def globals_for(self, module_globals: dict[str, Any], text: str, cwd: Path) -> dict[str, Any]:
        """The example's globals: the module's own names, then those of this namespace that ``text`` uses."""
        for name, make in self.files.items():
            if name in text:
                target = cwd / name
                target.parent.mkdir(parents=True, exist_ok=True)
                src = make()
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, target)
        names = {name for name in self.factories if re.search(rf"\b{name}\b", text)}
        ns = {name: self.get(name) for name in sorted(names) if name not in module_globals}
        return {**ns, **module_globals}

    # --- decision transformers (interplab.rl) --------------------------------------------------------------
    def _make_trajs(self) -> Any:
        """20 scripted-expert episodes of MiniGrid-MemoryS7 (half sent to the wrong object)."""
        from interplab.rl import collect

        return collect("MiniGrid-MemoryS7-v0", 20, self.folder / "trajs", wrong_object=0.5, seed=0)

    def _make_dt(self) -> Any:
        """A tiny random decision transformer for MemoryS7 (2 layers, context 8)."""
        from interplab.rl import DecisionTransformer, DTConfig

        torch.manual_seed(0)
        cfg = DTConfig(
            env="MiniGrid-MemoryS7-v0", context=8, max_timestep=245, d_model=32, n_layers=2, n_heads=2
        )
        return DecisionTransformer(cfg)

    # --- tensors and models -------------------------------------------------------------------------------
    def _make_torch(self) -> Any:
        return torch

    def _make_model(self) -> Any:
        from interplab.model import ModelConfig, Transformer

        torch.manual_seed(0)
        cfg = ModelConfig(d_model=D_MODEL, n_layers=N_LAYERS, n_heads=N_HEADS, d_vocab=D_VOCAB, n_ctx=N_CTX)
        return Transformer(cfg).eval()

    def _tokens(self, seed: int, batch: int = 4, pos: int = 16) -> torch.Tensor:
        return torch.randint(0, D_VOCAB, (batch, pos), generator=_seeded(seed))

    def _make_tokens(self) -> torch.Tensor:
        """[4 16] token ids."""
        return self._tokens(0)

    def _make_clean(self) -> torch.Tensor:
        return self._tokens(1)

    def _make_corrupted(self) -> torch.Tensor:
        return self._tokens(2)

    def _make_reference(self) -> torch.Tensor:
        """The model's activations at ``blocks.0.mlp.hook_post`` on other tokens (for mean ablation)."""
        _, cache = self.get("model").run_with_cache(self._tokens(3), names=["blocks.0.mlp.hook_post"])
        return cache["blocks.0.mlp.hook_post"]

    def _make_happy_tokens(self) -> torch.Tensor:
        return self._tokens(4)

    def _make_sad_tokens(self) -> torch.Tensor:
        return self._tokens(5)

    def _make_answers(self) -> torch.Tensor:
        return torch.tensor([5, 6, 7, 8])

    def _make_wrongs(self) -> torch.Tensor:
        return torch.tensor([9, 10, 11, 12])

    def _make_a(self) -> torch.Tensor:
        return self.get("answers")

    def _make_b(self) -> torch.Tensor:
        return self.get("wrongs")

    def _make_metric(self) -> Any:
        from interplab.analysis import LogitDiff

        return LogitDiff(answer=self.get("answers"), wrong=self.get("wrongs"))

    def _make_sae(self) -> Any:
        from interplab.sae import SAEConfig, create_sae

        torch.manual_seed(0)
        cfg = SAEConfig(d_in=D_MODEL, d_sae=128, architecture="topk", k=8, hook_name=SAE_SITE)
        return create_sae(cfg)

    def _make_acts(self) -> dict[str, torch.Tensor]:
        """``{site: [n d_model]}`` activations of ``model`` at the SAE's site."""
        _, cache = self.get("model").run_with_cache(self._tokens(6, batch=16), names=[SAE_SITE])
        return {SAE_SITE: cache[SAE_SITE].flatten(0, 1)}

    def _make_token_batches(self) -> list[torch.Tensor]:
        return [self._tokens(7 + i) for i in range(4)]

    def _make_lm_loss(self) -> Any:
        from interplab.data_attribution import lm_loss

        return lm_loss

    def _make_toy(self) -> Any:
        from interplab.toy import ToyConfig, ToyModel

        torch.manual_seed(0)
        return ToyModel(ToyConfig(n_features=5, n_hidden=2, n_instances=1))

    def _make_cfg(self) -> Any:
        """A tiny training config over a corpus of 16 small files."""
        from tests.train.conftest import _tiny_config

        return _tiny_config(self._corpus(), steps=24, checkpoints={"log_spaced": 4, "every": 6})

    def _make_task(self) -> Any:
        from interplab.tasks import get_task

        return get_task("induction", d_vocab=D_VOCAB, half_len=8)

    def _make_circuit_task(self) -> Any:
        """A circuit-discovery task on ``model``: 4 clean and 4 corrupted rows, the logit of token 5 at the end."""
        from interplab.circuits import DiscoveryTask

        return DiscoveryTask(
            name="doctest",
            tokens=self._tokens(20, batch=8),
            clean=torch.arange(4),
            corrupt=torch.arange(4, 8),
            metric=lambda logits, rows: logits[:, -1, 5],
        )

    def _make_batch(self) -> Any:
        return self.get("task").generate(4, seed=0)

    def _make_app(self) -> Any:
        from interplab.web.app import create_app

        return create_app([self._feature_db()])

    # --- files --------------------------------------------------------------------------------------------
    def _run_dir(self) -> Path:
        """A 24-step training run of a tiny 2-layer model, with checkpoints."""
        run = self.folder / "run"
        if not run.exists():
            from interplab.train import train

            train(self.get("cfg"), run)
        return run

    def _corpus(self) -> Path:
        """16 small Python files of repetitive code."""
        from tests.train.conftest import write_corpus

        corpus = self.folder / "code"
        if not corpus.exists():
            write_corpus(corpus)
        return corpus

    def _paren_balancer(self) -> Path:
        """The published paren balancer (TransformerLens state dict) in ../shared/fixtures."""
        from tests.conftest import SHARED

        folder = SHARED / "fixtures" / "paren_balancer"
        if not folder.is_dir():
            pytest.skip(f"the example loads the paren balancer from ../shared, which is absent ({folder})")
        return folder

    def _feature_db(self) -> Path:
        db = self.folder / "features.db"
        if not db.exists():
            from interplab.features import FeatureBuildConfig
            from interplab.features.build import build_feature_db

            cfg = FeatureBuildConfig(top_k=4, n_samples=4, batch_size=4)
            build_feature_db(db, self.get("model"), self.get("sae"), self._tokens(20, batch=8), cfg)
        return db
