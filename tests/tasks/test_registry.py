from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F

from interplab.model import Transformer
from interplab.tasks import Task, TaskBatch, get_task, list_tasks, task_from_dict
from interplab.tasks.base import _REGISTRY

ALL = ["induction", "ioi", "modadd", "parens", "sorting"]
SMALL = {"induction": {"d_vocab": 16, "half_len": 6}, "modadd": {"p": 11}, "sorting": {"n_values": 12}}


def test_list_tasks_has_the_builtins():
    assert set(ALL) <= set(list_tasks())


def test_unknown_task_lists_valid_names():
    with pytest.raises(KeyError, match="unknown task 'nope'.*induction.*parens"):
        get_task("nope")


def test_unknown_parameter_lists_valid_parameters():
    with pytest.raises(TypeError, match=r"no parameters \['bogus'\].*half_len"):
        get_task("induction", bogus=1)


def test_subclass_registers_and_duplicate_is_refused():
    @dataclass(frozen=True, kw_only=True)
    class Copy(Task):
        name: ClassVar[str] = "_test_copy"

        @property
        def d_vocab(self) -> int:
            return 3

        @property
        def seq_len(self) -> int:
            return 2

        @property
        def vocab(self) -> list[str]:
            return ["a", "b", "c"]

        def generate(self, n, *, seed):
            tokens = torch.zeros(n, 2, dtype=torch.long)
            return TaskBatch(tokens=tokens, targets=tokens, loss_mask=tokens == 0)

        def model_config(self, **overrides):
            return self._config(dict(d_model=8, n_layers=1, n_heads=1, d_vocab=3, n_ctx=2), overrides)

        def task_metrics(self, logits, batch):
            return {}

    try:
        assert "_test_copy" in list_tasks()
        assert isinstance(get_task("_test_copy"), Copy)
        with pytest.raises(ValueError, match="already registered"):

            class Other(Copy):
                name: ClassVar[str] = "_test_copy"

        with pytest.raises(ValueError, match="already registered"):

            class Again(Copy):
                name: ClassVar[str] = "parens"
    finally:
        _REGISTRY.pop("_test_copy", None)


@pytest.mark.parametrize("name", ALL)
def test_deterministic_under_seed(name):
    task = get_task(name, **SMALL.get(name, {}))
    a, b, c = task.generate(16, seed=3), task.generate(16, seed=3), task.generate(16, seed=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    assert torch.equal(a.loss_mask, b.loss_mask)
    for key, value in a.meta.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b.meta[key]), key
        else:
            assert value == b.meta[key], key
    assert not torch.equal(a.tokens, c.tokens)


@pytest.mark.parametrize("name", ALL)
def test_shapes_vocab_and_model_config(name):
    task = get_task(name, **SMALL.get(name, {}))
    batch = task.generate(5, seed=0)
    assert batch.tokens.shape == (5, task.seq_len) and batch.tokens.dtype == torch.long
    assert batch.targets.dtype == torch.long and batch.loss_mask.dtype == torch.bool
    assert batch.loss_mask.any(dim=1).all()
    assert 0 <= int(batch.tokens.min()) and int(batch.tokens.max()) < task.d_vocab
    assert int(batch.targets[batch.loss_mask].max()) < task.d_vocab_out
    assert len(task.vocab) == task.d_vocab == len(set(task.vocab))
    cfg = task.model_config(d_model=32, n_heads=2)
    assert (cfg.d_model, cfg.d_head, cfg.d_vocab, cfg.d_vocab_out) == (32, 16, task.d_vocab, task.d_vocab_out)
    assert cfg.n_ctx >= task.seq_len
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        task.model_config(widht=3)


@pytest.mark.parametrize("name", ALL)
def test_loss_and_metrics_match_a_loop(name):
    task = get_task(name, **SMALL.get(name, {}))
    batch = task.generate(6, seed=1)
    model = Transformer(task.model_config(d_model=32, n_heads=2))
    logits = model(batch.tokens, attention_mask=batch.attention_mask)
    losses, right = [], []
    for i in range(6):
        for p in range(task.seq_len):
            if batch.loss_mask[i, p]:
                losses.append(F.cross_entropy(logits[i, p], batch.targets[i, p]))
                right.append(float(logits[i, p].argmax() == batch.targets[i, p]))
    torch.testing.assert_close(task.loss(logits, batch), torch.stack(losses).mean())
    metrics = task.metrics(logits, batch)
    assert metrics["accuracy"] == pytest.approx(sum(right) / len(right))
    assert metrics["loss"] == pytest.approx(float(torch.stack(losses).mean().detach()), rel=1e-5)
    with pytest.raises(ValueError, match="expects"):
        task.loss(logits[:, :-1], batch)


@pytest.mark.parametrize("name", ALL)
def test_to_dict_round_trip(name):
    task = get_task(name, **SMALL.get(name, {}))
    assert task_from_dict(task.to_dict()) == task


def test_select_and_bad_n():
    task = get_task("ioi")
    batch = task.generate(6, seed=0)
    sub = batch.select([4, 1])
    assert torch.equal(sub.tokens, batch.tokens[[4, 1]])
    assert torch.equal(sub.meta["corrupted_tokens"], batch.meta["corrupted_tokens"][[4, 1]])
    assert sub.meta["names"] == [batch.meta["names"][4], batch.meta["names"][1]]
    assert len(batch.select(slice(0, 3))) == 3
    for bad in (0, -2, 2.5):
        with pytest.raises(ValueError, match="n must be a positive int"):
            task.generate(bad, seed=0)


def test_bad_parameters_name_the_value():
    with pytest.raises(ValueError, match="half_len must be an int >= 2, got 1"):
        get_task("induction", half_len=1)
    with pytest.raises(ValueError, match="p must be an int >= 2, got 1"):
        get_task("modadd", p=1)
    with pytest.raises(ValueError, match="n_names"):
        get_task("ioi", n_names=3)
    with pytest.raises(ValueError, match="sum to 1"):
        get_task("parens", p_balanced=0.9)
    with pytest.raises(ValueError, match="allow_duplicates"):
        get_task("sorting", n_values=4, list_len=6, allow_duplicates=False)
