import pytest
import torch

from interplab.data import CharTokenizer, load_tokenizer, train_bpe

DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(200)]


def test_bpe_round_trip_and_save_load(tmp_path):
    tok = train_bpe(DOCS, vocab_size=300)
    assert tok.vocab_size == 300
    text = "def f12(x):\n    return x * 12\n"
    assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == tok.encode(text)
    assert (again.bos_id, again.pad_id) == (tok.bos_id, tok.pad_id)


def test_bpe_is_deterministic():
    a, b = train_bpe(DOCS, vocab_size=290), train_bpe(DOCS, vocab_size=290)
    assert a.backend.to_str() == b.backend.to_str()


def test_to_tokens_pads_left_and_right():
    tok = train_bpe(DOCS, vocab_size=300)
    short, long = "x", "def f1(x): return x"
    right = tok.to_tokens([short, long], prepend_bos=True)
    left = tok.to_tokens([short, long], prepend_bos=True, padding_side="left")
    n = len(tok.encode(short)) + 1
    assert right[0, :n].tolist() == [tok.bos_id, *tok.encode(short)]
    assert (right[0, n:] == tok.pad_id).all()
    assert left[0, -n:].tolist() == [tok.bos_id, *tok.encode(short)]
    assert right[1].tolist() == left[1].tolist()
    assert tok.to_tokens(long).shape == (1, len(tok.encode(long)))


def test_char_tokenizer(tmp_path):
    tok = CharTokenizer("()")
    assert tok.decode(tok.encode("(()")) == "(()"
    assert tok.decode(torch.tensor([tok.encode("()"), tok.encode(")(")])) == ["()", ")("]
    with pytest.raises(ValueError, match="'x' is not in the alphabet"):
        tok.encode("(x)")
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, CharTokenizer) and again.itos == tok.itos


def test_model_to_tokens_uses_attached_tokenizer(tmp_path):
    from interplab import load_model
    from interplab.model import ModelConfig, Transformer

    tok = train_bpe(DOCS, vocab_size=300)
    model = Transformer(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_vocab=300, n_ctx=32))
    model.tokenizer = tok
    model.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.to_string(loaded.to_tokens("def f3(x):")[0]) == "def f3(x):"


def test_bad_input():
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="too small"):
        train_bpe(DOCS, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer("/nonexistent/folder")
