"""Byte-level BPE tokenizer: trained once per corpus content and vocabulary size, then cached.

The cache key is a content fingerprint of the training documents, so the same corpus reuses its
tokenizer wherever it lies on disk, and any change to the text trains a new one. Token ids must fit
in uint16 because the token caches (see `sparsezoo.data.dataset`) store them that way.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from sparsezoo.data.corpus import Document

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN,)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 65535


def corpus_fingerprint(docs: Sequence[Document]) -> str:
    """SHA-256 hex digest over the names and texts of `docs`, in order.

    Each field is length-prefixed so that moving text between neighbouring documents or names
    always changes the digest. Depends only on content, never on file locations or mtimes.
    """
    digest = hashlib.sha256(b"sparsezoo-corpus-v1")
    for doc in docs:
        for field in (doc.name, doc.text):
            data = field.encode("utf-8", "surrogatepass")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()


def load_or_train_tokenizer(
    docs: Sequence[Document], vocab_size: int, cache_dir: Path
) -> tuple[tokenizers.Tokenizer, Path]:
    """Return a byte-level BPE tokenizer for `docs` and the path of its ``tokenizer.json``.

    The tokenizer lives at ``cache_dir/tokenizers/<fingerprint[:16]>-v<vocab_size>/tokenizer.json``;
    when that file exists it is loaded without training, otherwise a tokenizer is trained on the
    documents and written atomically (temp file + rename) so an interrupted run never leaves a
    truncated cache. ``<|endoftext|>`` is id 0. `vocab_size` is an upper bound (a small corpus
    may yield fewer merges) and must lie in [257, 65535] so every id fits in uint16.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an integer, got {vocab_size!r}")
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be in [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}] (256 byte tokens + "
            f"{len(SPECIAL_TOKENS)} special token(s), ids must fit uint16), got {vocab_size}"
        )
    if not docs:
        raise ValueError("load_or_train_tokenizer needs at least one document, got none")

    fingerprint = corpus_fingerprint(docs)
    path = Path(cache_dir) / "tokenizers" / f"{fingerprint[:16]}-v{vocab_size}" / "tokenizer.json"
    if path.is_file():
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    else:
        tokenizer = _train_tokenizer(docs, vocab_size)
        _save_atomically(tokenizer, path)
    # Not stored in tokenizer.json, so set on every load: a literal "<|endoftext|>" inside corpus
    # text must stay text, never turn into a document separator.
    tokenizer.encode_special_tokens = True
    return tokenizer, path


def _train_tokenizer(docs: Sequence[Document], vocab_size: int) -> tokenizers.Tokenizer:
    """Train a GPT-2-style byte-level BPE on the document texts."""
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # The full byte alphabet guarantees every string is encodable, even bytes the corpus lacks.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((doc.text for doc in docs), trainer=trainer, length=len(docs))
    return tokenizer


def _save_atomically(tokenizer: tokenizers.Tokenizer, path: Path) -> None:
    """Write `tokenizer` to `path` through a temp file in the same directory and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer-", suffix=".tmp")
    os.close(fd)
    try:
        tokenizer.save(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
