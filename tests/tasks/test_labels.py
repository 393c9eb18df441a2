"""Every task's labels checked by an independent computation."""

import re

import pytest
import torch

from interplab.tasks import get_task
from interplab.tasks.ioi import NAMES, TEMPLATES


def test_induction_second_half_repeats_first():
    task = get_task("induction", d_vocab=20, half_len=7)
    b = task.generate(32, seed=0)
    h = 7
    assert (b.tokens[:, 0] == 0).all() and (b.tokens[:, 1:] > 0).all()
    assert torch.equal(b.tokens[:, 1 : h + 1], b.tokens[:, h + 1 :])
    for i in range(32):
        positions = b.loss_mask[i].nonzero().flatten().tolist()
        assert positions == list(range(h + 1, 2 * h))
        for p in positions:  # induction: the token after the earlier copy of the current token's slot
            assert b.targets[i, p] == b.tokens[i, p - h + 1]


def test_modadd_by_arithmetic():
    task = get_task("modadd", p=13)
    b = task.generate(200, seed=0)
    for (a, c, eq), target in zip(b.tokens.tolist(), b.targets[:, 2].tolist(), strict=True):
        assert eq == 13 and target == (a + c) % 13
    assert b.loss_mask[:, 2].all() and b.loss_mask.sum() == 200
    full = task.all_pairs()
    assert len(full) == 169 and len({tuple(t) for t in full.tokens.tolist()}) == 169
    train, test = task.split(0.3, seed=0)
    assert len(train) + len(test) == 169
    assert not {tuple(t) for t in train.tokens.tolist()} & {tuple(t) for t in test.tokens.tolist()}
    with pytest.raises(ValueError, match="train_fraction"):
        task.split(1.0, seed=0)


@pytest.mark.parametrize("dups", [True, False])
def test_sorting_by_sorted(dups):
    task = get_task("sorting", n_values=16, list_len=8, allow_duplicates=dups)
    b = task.generate(50, seed=0)
    for row, mask, targets in zip(b.tokens.tolist(), b.loss_mask.tolist(), b.targets.tolist(), strict=True):
        xs, sep, ys = row[:8], row[8], row[9:]
        assert sep == 16 and ys == sorted(xs)
        assert dups or len(set(xs)) == 8
        assert [t for t, m in zip(targets, mask, strict=True) if m] == sorted(xs)


def _template_regex(template: str) -> re.Pattern:
    parts = []
    for word in template.split(" "):
        if word in ("{A}", "{B}", "{S}"):
            parts.append(f"(?P<{word[1]}>\\w+)")
        elif word in ("{PLACE}", "{OBJECT}"):
            parts.append("\\w+")
        else:
            parts.append(re.escape(word))
    return re.compile("^\\[bos\\] (?:(?P<D>\\w+) was at the \\w+ too \\. )?" + " ".join(parts) + "$")


@pytest.mark.parametrize("p_distractor", [0.0, 0.5])
def test_ioi_by_the_template(p_distractor):
    task = get_task("ioi", p_distractor=p_distractor)
    b = task.generate(64, seed=2)
    vocab = task.vocab
    n_abba = 0
    for i in range(64):
        sentence = task.decode(b.tokens[i])
        template = TEMPLATES[int(b.meta["template"][i])]
        m = _template_regex(template).match(sentence)
        assert m is not None, sentence
        a, bname, s = m.group("A"), m.group("B"), m.group("S")
        assert {a, bname} <= set(NAMES) and a != bname and s in (a, bname)
        io = bname if s == a else a  # the name of the first clause that is not repeated
        n_abba += io == a
        end = int(b.meta["end_pos"][i])
        assert b.loss_mask[i].nonzero().flatten().tolist() == [end]
        assert vocab[int(b.targets[i, end])] == io == vocab[int(b.meta["io_token"][i])]
        assert vocab[int(b.meta["s_token"][i])] == s
        words = sentence.split(" ")
        assert words[int(b.meta["io_pos"][i])] == io and words[int(b.meta["s2_pos"][i])] == s
        assert words[int(b.meta["s1_pos"][i])] == s and int(b.meta["s1_pos"][i]) < int(b.meta["s2_pos"][i])
        assert b.attention_mask[i].sum() == len(words) == end + 1
        assert (m.group("D") is not None) == bool(b.meta["distractor"][i])
        if m.group("D"):
            assert m.group("D") not in (io, s)
        # ABC: same template and slots, three fresh distinct names
        corrupt = task.decode(b.meta["corrupted_tokens"][i])
        mc = _template_regex(template).match(corrupt)
        assert mc is not None, corrupt
        fresh = {mc.group("A"), mc.group("B"), mc.group("S")}
        assert len(fresh) == 3 and not fresh & {io, s}
        assert len(corrupt.split(" ")) == len(words)
    assert 10 < n_abba < 54  # both orders occur
