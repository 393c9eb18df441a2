import itertools

import pytest
import torch

from interplab.tasks import count_equal, get_task, horizon_ok, is_balanced, paren_tokens, parens_from_file
from interplab.tasks.parens import _dyck

FIXTURE = "fixtures/paren_balancer/remix_parens.jsonl.gz"


def balanced_by_counter(s: str) -> bool:
    depth = 0
    for c in s:
        depth += 1 if c == "(" else -1
        if depth < 0:
            return False
    return depth == 0


def test_feature_functions_on_every_short_string():
    for length in range(9):
        for chars in itertools.product("()", repeat=length):
            s = "".join(chars)
            assert is_balanced(s) == balanced_by_counter(s), s
            assert count_equal(s) == (s.count("(") == s.count(")"))
            suffixes_ok = all(s[i:].count("(") <= s[i:].count(")") for i in range(len(s)))
            assert horizon_ok(s) == suffixes_ok, s


def test_tokenisation_matches_the_published_model():
    tokens = paren_tokens(["(()", ""])
    assert tokens[0, :5].tolist() == [0, 3, 3, 4, 2] and (tokens[0, 5:] == 1).all()
    assert tokens[1, :2].tolist() == [0, 2] and tokens.shape == (2, 42)
    with pytest.raises(ValueError, match="at most 40"):
        paren_tokens(["(" * 41])
    with pytest.raises(ValueError, match=r"characters \['x'\]"):
        paren_tokens(["(x)"])


def test_generator_labels_by_a_counter_and_covers_every_kind():
    batch = get_task("parens").generate(2000, seed=0)
    strings = batch.meta["strings"]
    labels = [balanced_by_counter(s) for s in strings]
    assert batch.targets[:, 0].tolist() == [int(x) for x in labels]
    assert batch.loss_mask[:, 0].all() and batch.loss_mask.sum() == 2000
    assert torch.equal(batch.attention_mask, batch.tokens != 1)
    assert all(len(s) % 2 == 0 and 2 <= len(s) <= 40 for s in strings)
    equal, horizon = batch.meta["equal_count"], batch.meta["horizon_ok"]
    kinds = {
        "balanced": (equal & horizon).float().mean(),
        "count only": (~equal & horizon).float().mean(),
        "horizon only": (equal & ~horizon).float().mean(),
        "both": (~equal & ~horizon).float().mean(),
    }
    for kind, expected in zip(kinds, (0.5, 0.15, 0.15, 0.2), strict=True):
        assert abs(float(kinds[kind]) - expected) < 0.04, (kind, kinds)
    assert torch.equal(batch.meta["count_failure"], ~equal) and torch.equal(
        batch.meta["horizon_failure"], ~horizon
    )
    lengths = {len(s) for s, b in zip(strings, labels, strict=True) if b}
    assert min(lengths) == 2 and max(lengths) == 40


def test_dyck_sampler_is_balanced_and_near_uniform():
    import numpy as np

    rng = np.random.default_rng(0)
    counts: dict[str, int] = {}
    for _ in range(1400):
        s = _dyck(rng, 3)
        assert balanced_by_counter(s)
        counts[s] = counts.get(s, 0) + 1
    assert len(counts) == 5  # Catalan(3)
    assert all(200 < c < 360 for c in counts.values()), counts


def test_loader_on_the_published_data_set(shared_dir):
    path = shared_dir / FIXTURE
    batch = parens_from_file(path, limit=3000)
    strings = batch.meta["strings"]
    assert len(batch) == 3000
    assert batch.targets[:, 0].tolist() == [int(balanced_by_counter(s)) for s in strings]
    for key, fn in (("equal_count", count_equal), ("horizon_ok", horizon_ok), ("balanced", is_balanced)):
        assert batch.meta[key].tolist() == [fn(s) for s in strings]
    full = parens_from_file(path)
    assert len(full) == 100_000
    assert abs(float(full.meta["balanced"].float().mean()) - 0.264) < 0.001
    task = get_task("parens", source=str(path))
    a, b = task.generate(500, seed=1), task.generate(500, seed=1)
    assert torch.equal(a.tokens, b.tokens) and len(set(a.meta["strings"])) > 400
    assert set(a.meta["strings"]) <= set(full.meta["strings"])


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        parens_from_file(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["()", true]\n["(()", true]\n')
    with pytest.raises(ValueError, match="example 1 '\\(\\(\\)' is labelled balanced=True"):
        parens_from_file(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no examples"):
        parens_from_file(empty)
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("not json\n")
    with pytest.raises(ValueError, match="garbage.jsonl:1"):
        parens_from_file(garbage)
