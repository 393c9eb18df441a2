import json

import pytest
import torch

from interplab.data import build_token_store, open_corpus, stdlib_files, train_bpe


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    a, b = open_corpus("python-stdlib"), open_corpus("python-stdlib")
    assert a.units == b.units and len(a.units) > 100
    assert not any("/test/" in u or "site-packages" in u for u in a.units)
    val_a, val_b = list(a.documents("validation")), list(b.documents("validation"))
    assert val_a == val_b and 0 < len(val_a) < len(a.units) // 5
    # every file is in exactly one split (check the split with an independent count of documents)
    n_train = sum(1 for _ in a.documents("train"))
    assert n_train + len(val_a) == len(a.units)
    assert a.fingerprint() == b.fingerprint()


def test_stdlib_files_sorted_by_relative_path():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    rel = [f.relative_to(root).as_posix() for f in stdlib_files()]
    assert rel == sorted(rel)


def _write_corpus(folder, n=12):
    folder.mkdir()
    for i in range(n):
        (folder / f"f{i:02d}.py").write_text(
            "".join(f"def g{j}(x):\n    return x + {j}\n" for j in range(i, i + 40))
        )
    return folder


def test_token_store_matches_tokenizer_and_is_cached(tmp_path):
    corpus = open_corpus(_write_corpus(tmp_path / "c"), val_fraction=0.3)
    tok = train_bpe(corpus.documents("train"), vocab_size=300)
    store = build_token_store(corpus, tok, "train", cache=tmp_path / "cache")
    expected = []
    for doc in corpus.documents("train"):
        expected += [tok.bos_id, *tok.encode(doc)]
    assert store.n_tokens == len(expected)
    assert store.array().tolist() == expected
    seqs = store.sequences(torch.tensor([2, 0]), seq_len=16)
    assert seqs.tolist() == [expected[32:48], expected[0:16]]
    again = build_token_store(corpus, tok, "train", cache=tmp_path / "cache")
    assert again.path == store.path and len(list((tmp_path / "cache" / "stores").glob("*.bin"))) == 1
    (tmp_path / "c" / "f00.py").write_text("changed = 1\n" * 30)  # content change: a new store
    changed = build_token_store(
        open_corpus(tmp_path / "c", val_fraction=0.3), tok, "train", cache=tmp_path / "cache"
    )
    assert changed.path != store.path


def test_jsonl_corpus(tmp_path):
    file = tmp_path / "d.jsonl"
    file.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(50)))
    corpus = open_corpus(file, val_fraction=0.2)
    train, val = list(corpus.documents("train")), list(corpus.documents("validation"))
    assert sorted(train + val, key=lambda s: int(s.split()[1])) == [f"doc {i}" for i in range(50)]
    assert val and train
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1 has no string field 'text'"):
        list(open_corpus(bad).documents("train"))


def test_bad_corpora(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_corpus(tmp_path / "missing.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    (empty / "b.txt").write_text("")
    corpus = open_corpus(empty, val_fraction=0.0)
    tok = train_bpe(["some text to learn from"] * 10, vocab_size=270)
    with pytest.raises(ValueError, match="has no text in its train split"):
        build_token_store(corpus, tok, "train", cache=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "stores").glob("*.bin"))
    with pytest.raises(ValueError, match="no text files"):
        open_corpus(tmp_path / "cache" / "stores")
