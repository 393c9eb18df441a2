"""Small corpora and configs shared by the training tests (everything in tmp_path, its own cache)."""

import pytest

from interplab.model import ModelConfig
from interplab.train import TrainConfig


def write_corpus(folder):
    """16 small Python files of repetitive code (a corpus for tiny training runs)."""
    folder.mkdir()
    for i in range(16):
        lines = [
            f"def func_{j}(value, other={i}):\n    return value * {j} + other\n\n" for j in range(i, i + 30)
        ]
        (folder / f"mod_{i:02d}.py").write_text("".join(lines))
    return folder


@pytest.fixture
def corpus_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / "cache"))
    return write_corpus(tmp_path / "corpus")


@pytest.fixture
def tiny_config():
    """A factory: ``tiny_config(corpus_dir, steps=...)``."""
    return _tiny_config


def _tiny_config(corpus, **changes) -> TrainConfig:
    base = dict(
        model=ModelConfig(
            d_model=32,
            n_layers=2,
            n_heads=2,
            d_vocab=300,
            n_ctx=32,
            attn_only=True,
            positional="rotary",
            smear_keys=True,
        ),
        data={"source": str(corpus), "vocab_size": 300, "seq_len": 32, "val_fraction": 0.25},
        optim={"lr": 3e-3, "warmup_steps": 2},
        checkpoints={"log_spaced": 4, "every": 3},
        steps=8,
        batch_size=4,
        eval_every=4,
        log_every=1,
        eval_batches=1,
        precision="fp32",
    )
    base.update(changes)
    return TrainConfig(**base)
