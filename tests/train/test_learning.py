"""A real learning test: a small model trained on repeated random tokens predicts the repeated half."""

import dataclasses

import torch
import torch.nn.functional as F

from interplab.model import ModelConfig
from interplab.train import TrainConfig, read_log, train


@dataclasses.dataclass(frozen=True)
class RepeatBatch:
    tokens: torch.Tensor
    targets: torch.Tensor
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor | None = None


class RepeatedTokens:
    """Random tokens repeated once; the loss counts only the predictable (repeated) half.
    Written against the interplab.tasks Task interface, independently of it."""

    def __init__(self, vocab: int = 64, half: int = 12) -> None:
        self.vocab, self.half = vocab, half

    def generate(self, n: int, seed: int = 0) -> RepeatBatch:
        g = torch.Generator().manual_seed(seed)
        first = torch.randint(0, self.vocab, (n, self.half), generator=g)
        tokens = torch.cat([first, first], dim=1)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        mask[:, self.half : -1] = True
        return RepeatBatch(tokens, torch.roll(tokens, -1, dims=1), mask)

    def loss(self, logits, batch):
        return F.cross_entropy(logits[batch.loss_mask].float(), batch.targets[batch.loss_mask])

    def metrics(self, logits, batch):
        hits = logits.argmax(-1) == batch.targets
        return {"accuracy": float(hits[batch.loss_mask].float().mean())}

    def model_config(self, **overrides):
        return ModelConfig(
            d_model=64, n_layers=2, n_heads=4, d_vocab=self.vocab, n_ctx=2 * self.half, **overrides
        )


def test_repeated_random_tokens_are_learned(tmp_path):
    task = RepeatedTokens()
    cfg = TrainConfig(
        model=ModelConfig(
            d_model=64,
            n_layers=2,
            n_heads=4,
            d_vocab=64,
            n_ctx=24,
            attn_only=True,
            positional="rotary",
            smear_keys=True,
        ),
        data={"source": "task:repeated"},
        optim={"lr": 1e-2, "warmup_steps": 20},
        checkpoints={"log_spaced": 0},
        steps=150,
        batch_size=32,
        eval_every=150,
        log_every=50,
    )
    result = train(cfg, tmp_path / "run", task=task)
    last = read_log(tmp_path / "run")[-1]
    assert last["val_accuracy"] > 0.99
    assert result.val_loss < 0.05  # from ln(64) = 4.16 at chance
    first = next(r for r in read_log(tmp_path / "run") if r.get("step") == 0)
    assert first["val_loss"] > 4.0
