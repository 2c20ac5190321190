"""Data pipeline: corpora, byte-level BPE tokenizer, token caches and synthetic probe tasks.

Typical use: ``bundle = prepare_data("stdlib", vocab_size=8192, val_fraction=0.05, seed=0,
cache_dir=default_cache_dir())`` then ``TokenWindows(bundle.train_path, seq_len, n, seed)``.
"""

from sparsezoo.data.corpus import (
    CorpusError,
    CorpusSource,
    Document,
    load_corpus,
    split_documents,
)
from sparsezoo.data.dataset import (
    DataBundle,
    TokenWindows,
    build_token_cache,
    count_tokens,
    default_cache_dir,
    prepare_data,
)
from sparsezoo.data.mix import PasskeyMix
from sparsezoo.data.synthetic import (
    IGNORE_INDEX,
    MQARBatch,
    MQARSpec,
    PasskeyBatch,
    PasskeySpec,
    exact_match,
    make_mqar,
    make_passkey,
    token_accuracy,
)
from sparsezoo.data.tokenizer import EOS_TOKEN, corpus_fingerprint, load_or_train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "IGNORE_INDEX",
    "CorpusError",
    "CorpusSource",
    "DataBundle",
    "Document",
    "MQARBatch",
    "MQARSpec",
    "PasskeyBatch",
    "PasskeyMix",
    "PasskeySpec",
    "TokenWindows",
    "build_token_cache",
    "corpus_fingerprint",
    "count_tokens",
    "default_cache_dir",
    "exact_match",
    "load_corpus",
    "load_or_train_tokenizer",
    "make_mqar",
    "make_passkey",
    "prepare_data",
    "split_documents",
    "token_accuracy",
]
