"""A corpus' split, tokenizer, tokens and training are functions of what it holds, never of where it lives;
and the cache never gives one corpus another's tokenizer or tokens."""

import shutil

import pytest
import torch

from interplab.data import build_token_store, corpus_tokenizer, open_corpus, stdlib_files
from interplab.data import corpus as corpus_module


def _write_nested(folder, n=24, seed=0):
    """Text files in nested folders (so relative paths, not basenames, tell files apart)."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        sub = folder / ("pkg_a" if i % 3 == 0 else "pkg_b/inner" if i % 3 == 1 else "")
        sub.mkdir(parents=True, exist_ok=True)
        words = torch.randint(0, 50, (200,), generator=gen).tolist()
        (sub / f"mod_{i % 8}.py").write_text("".join(f"x{w} = {i}\n" for w in words))
    return folder


def _store_tokens(corpus, tok, split, cache):
    return build_token_store(corpus, tok, split, cache=cache).array().tolist()


def _fresh_tokens(corpus, tok, split):
    out = []
    for doc in corpus.documents(split):
        if doc:
            out += [tok.bos_id, *tok.encode(doc)]
    return out


@pytest.mark.parametrize("val_fraction", [0.2, 0.45])
def test_a_copy_elsewhere_has_the_same_split_tokenizer_and_tokens(tmp_path, val_fraction):
    a = _write_nested(tmp_path / "a")
    b = tmp_path / "deeper" / "other name" / "b"
    shutil.copytree(a, b)
    ca, cb = open_corpus(a, val_fraction=val_fraction), open_corpus(b, val_fraction=val_fraction)
    assert ca.assignment() == cb.assignment()
    assert {"pkg_a/mod_0.py", "pkg_b/inner/mod_1.py", "mod_2.py"} <= set(ca.assignment())
    assert 0 < sum(s.value == "validation" for s in ca.assignment().values()) < len(ca.units)
    for split in ("train", "validation"):
        assert list(ca.documents(split)) == list(cb.documents(split))
    assert ca.fingerprint() == cb.fingerprint()
    # separate caches: everything computed twice, from scratch, must agree
    ta = corpus_tokenizer(ca, 300, cache=tmp_path / "cache_a")
    tb = corpus_tokenizer(cb, 300, cache=tmp_path / "cache_b")
    assert ta.backend.to_str() == tb.backend.to_str()
    for split in ("train", "validation"):
        assert _store_tokens(ca, ta, split, tmp_path / "cache_a") == _store_tokens(
            cb, tb, split, tmp_path / "cache_b"
        )
    # a shared cache: the copy reuses the store, which is what it would have computed itself
    store = build_token_store(cb, ta, "train", cache=tmp_path / "cache_a")
    assert store.path == build_token_store(ca, ta, "train", cache=tmp_path / "cache_a").path
    assert store.array().tolist() == _fresh_tokens(cb, ta, "train")


def test_stdlib_split_does_not_depend_on_the_install_path(tmp_path, monkeypatch):
    real = corpus_module.stdlib_root()
    chosen = [
        f for f in stdlib_files() if f.relative_to(real).parts[0] in ("json", "email", "abc.py", "ast.py")
    ]
    assert len(chosen) > 10
    installs = [tmp_path / "usr" / "lib" / "python3", tmp_path / "opt" / "py" / "Lib"]
    corpora = []
    for install in installs:
        for f in chosen:
            target = install / f.relative_to(real)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
        monkeypatch.setattr(corpus_module, "stdlib_root", lambda install=install: install)
        corpora.append(open_corpus("python-stdlib", val_fraction=0.3))
    one, two = corpora
    assert one.units != two.units
    assert one.assignment() == two.assignment() and "email/parser.py" in one.assignment()
    assert one.fingerprint() == two.fingerprint()
    assert list(one.documents("validation")) == list(two.documents("validation"))


def _pair_differing_in_split(tmp_path):
    """Two corpora with the same file contents whose only difference is one file's relative path, chosen so
    that it lands in the other split."""
    base = _write_nested(tmp_path / "one", n=12)
    other = tmp_path / "two"
    shutil.copytree(base, other)
    corpus = open_corpus(base, val_fraction=0.4)
    val = [rel for rel, s in corpus.assignment().items() if s.value == "validation"][0]
    for k in range(1000):
        new = f"moved_{k}/{val.rsplit('/', 1)[-1]}"
        if not corpus_module._is_validation(new, 0.4):
            break
    (other / new).parent.mkdir()
    (other / val).rename(other / new)
    return corpus, open_corpus(other, val_fraction=0.4)


def test_the_cache_never_confuses_corpora_that_differ_only_in_their_split(tmp_path):
    one, two = _pair_differing_in_split(tmp_path)
    assert sorted(open(u).read() for u in one.units) == sorted(open(u).read() for u in two.units)
    assert list(one.documents("train")) != list(two.documents("train"))
    assert one.fingerprint() != two.fingerprint()
    cache = tmp_path / "cache"
    tok_one, tok_two = corpus_tokenizer(one, 300, cache=cache), corpus_tokenizer(two, 300, cache=cache)
    assert len(list((cache / "tokenizers").glob("*.json"))) == 2
    for corpus, tok in ((one, tok_one), (two, tok_two), (one, tok_two), (two, tok_one)):
        for split in ("train", "validation"):
            assert _store_tokens(corpus, tok, split, cache) == _fresh_tokens(corpus, tok, split)
    # the validation fraction decides the split too
    wider = open_corpus(tmp_path / "one", val_fraction=0.6)
    assert wider.fingerprint() != one.fingerprint()
    assert _store_tokens(wider, tok_one, "train", cache) == _fresh_tokens(wider, tok_one, "train")


def test_fingerprint_covers_paths_order_and_boundaries(tmp_path):
    def corpus(name, files):
        root = tmp_path / name
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        return open_corpus(root).fingerprint()

    base = corpus("base", {"a/x.py": "one", "b/y.py": "two"})
    assert corpus("same", {"a/x.py": "one", "b/y.py": "two"}) == base
    assert corpus("basename", {"c/x.py": "one", "b/y.py": "two"}) != base  # same basenames, other folder
    assert corpus("swapped", {"a/x.py": "two", "b/y.py": "one"}) != base  # document order
    assert corpus("boundary", {"a/x.py": "on", "b/y.py": "etwo"}) != base  # where one document ends
    # a single file is split by record: its name and folder do not matter, its contents do
    for name in ("s1", "s2"):
        (tmp_path / name).mkdir()
    (tmp_path / "s1" / "t.txt").write_text("line\n" * 500)
    (tmp_path / "s2" / "u.txt").write_text("line\n" * 500)
    assert (
        open_corpus(tmp_path / "s1" / "t.txt").fingerprint()
        == open_corpus(tmp_path / "s2" / "u.txt").fingerprint()
    )


def test_training_on_a_copy_elsewhere_is_bit_identical(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from interplab.model import ModelConfig
    from interplab.train import TrainConfig, read_log, train

    a = _write_nested(tmp_path / "a", n=16, seed=3)
    b = tmp_path / "elsewhere" / "copy"
    shutil.copytree(a, b)
    runs = []
    for name, source in (("a", a), ("b", b)):
        monkeypatch.setenv("INTERPLAB_CACHE", str(tmp_path / f"cache_{name}"))  # nothing shared
        cfg = TrainConfig(
            model=ModelConfig(d_model=32, n_layers=1, n_heads=2, d_vocab=300, n_ctx=32, attn_only=True),
            data={"source": str(source), "vocab_size": 300, "seq_len": 32, "val_fraction": 0.25},
            optim={"lr": 3e-3, "warmup_steps": 2},
            steps=4, batch_size=4, eval_every=2, log_every=1, eval_batches=1, precision="fp32",
        )  # fmt: skip
        train(cfg, tmp_path / f"run_{name}")
        runs.append(tmp_path / f"run_{name}")
    wa, wb = (load_file(str(r / "final" / "model.safetensors")) for r in runs)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    def metrics(run):
        return [{k: v for k, v in r.items() if k in ("step", "loss", "val_loss")} for r in read_log(run)]

    assert metrics(runs[0]) == metrics(runs[1]) and any("val_loss" in r for r in metrics(runs[0]))
