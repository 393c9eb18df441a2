"""interplab.data: tokenizers, corpora and memory-mapped token stores."""

from interplab.data.corpus import STDLIB, Corpus, Split, open_corpus, stdlib_files
from interplab.data.store import TokenStore, build_token_store, cache_dir, corpus_tokenizer
from interplab.data.tokenizer import CharTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = [
    "STDLIB",
    "CharTokenizer",
    "Corpus",
    "Split",
    "TokenStore",
    "Tokenizer",
    "build_token_store",
    "cache_dir",
    "corpus_tokenizer",
    "load_tokenizer",
    "open_corpus",
    "stdlib_files",
    "train_bpe",
]
