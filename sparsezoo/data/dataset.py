"""Token caches on disk and the training/validation dataset that samples windows from them.

Each split is encoded once into a flat uint16 file (documents joined by EOS) and memory-mapped, so
the dataset costs no RAM beyond the pages in use and every DataLoader worker shares the same file.
Windows start at offsets derived from (seed, index) alone, which makes iteration order and
resumption after a restart deterministic.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tokenizers
import torch
from torch.utils.data import Dataset

from sparsezoo.data.corpus import CorpusSource, Document, load_corpus, split_documents
from sparsezoo.data.tokenizer import EOS_TOKEN, corpus_fingerprint, load_or_train_tokenizer

TOKEN_DTYPE = np.uint16
_ENCODE_CHUNK_DOCS = 256
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


def build_token_cache(
    docs: Sequence[Document], tokenizer: tokenizers.Tokenizer, cache_dir: Path, split_name: str
) -> Path:
    """Encode `docs` into ``cache_dir/tokens/<key>-<split_name>.bin`` and return that path.

    The file is a flat uint16 array: each document's token ids followed by the EOS id. The key
    hashes the documents' content and the tokenizer's full serialization, so a different corpus
    or tokenizer never reuses stale tokens; an existing file with the same key is reused as is.
    Written atomically (temp file + rename). `split_name` may use letters, digits, ``_`` and
    ``-``; the tokenizer must contain ``<|endoftext|>`` and have at most 65536 ids.
    """
    if not _SPLIT_NAME.fullmatch(split_name):
        raise ValueError(
            f"split_name must be non-empty and use only letters, digits, '_' or '-', "
            f"got {split_name!r}"
        )
    if not docs:
        raise ValueError(f"build_token_cache needs at least one document for split {split_name!r}")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN!r} token; train it with that special token")
    max_ids = np.iinfo(TOKEN_DTYPE).max + 1
    if tokenizer.get_vocab_size() > max_ids:
        raise ValueError(
            f"tokenizer vocab size {tokenizer.get_vocab_size()} exceeds {max_ids}; "
            "token ids must fit uint16"
        )

    key = hashlib.sha256()
    key.update(corpus_fingerprint(docs).encode())
    key.update(tokenizer.to_str().encode())
    # encode_special_tokens changes the ids but is not part of the tokenizer's serialization.
    key.update(f"encode_special_tokens={tokenizer.encode_special_tokens}".encode())
    path = Path(cache_dir) / "tokens" / f"{key.hexdigest()[:16]}-{split_name}.bin"
    if path.is_file():
        return path

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{split_name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            for start in range(0, len(docs), _ENCODE_CHUNK_DOCS):
                texts = [doc.text for doc in docs[start : start + _ENCODE_CHUNK_DOCS]]
                # Special tokens come only from the EOS appended here, never from a post-processor.
                for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
                    out.write(np.asarray([*encoding.ids, eos_id], dtype=TOKEN_DTYPE).tobytes())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def count_tokens(path: Path) -> int:
    """Number of tokens stored in the token cache file at `path`."""
    return Path(path).stat().st_size // np.dtype(TOKEN_DTYPE).itemsize


class TokenWindows(Dataset):
    """Fixed-length next-token windows sampled from a token cache file.

    Item ``i`` is ``{"input_ids": LongTensor[seq_len], "labels": LongTensor[seq_len]}`` where
    labels are the inputs shifted left by one. Its start offset is drawn from a numpy Generator
    seeded with ``[seed, i]``, so an item is the same whatever order, worker or process asks for
    it. The file is memory-mapped read-only and reopened lazily after pickling, so DataLoader
    workers never copy the tokens.
    """

    def __init__(self, path: Path, seq_len: int, n_samples: int, seed: int) -> None:
        """Open the token file at `path` and check it can serve windows of `seq_len` + 1 tokens."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (numpy seed sequences are unsigned), got {seed}")
        self.path = Path(path)
        self.seq_len = seq_len
        self.n_samples = n_samples
        self.seed = seed
        self.n_tokens = count_tokens(self.path)
        if self.n_tokens < seq_len + 1:
            raise ValueError(
                f"token file {str(self.path)!r} has {self.n_tokens} tokens, but seq_len={seq_len} "
                f"needs at least {seq_len + 1}; use a larger corpus or split, or a smaller seq_len"
            )
        self._tokens: np.memmap | None = None

    def __len__(self) -> int:
        """Number of windows in one pass (`n_samples`)."""
        return self.n_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The window for `index`; same (seed, index) always gives the same tokens."""
        if not 0 <= index < self.n_samples:
            raise IndexError(f"index {index} out of range for {self.n_samples} samples")
        if self._tokens is None:
            self._tokens = np.memmap(self.path, dtype=TOKEN_DTYPE, mode="r")
        rng = np.random.default_rng([self.seed, index])
        start = int(rng.integers(0, self.n_tokens - self.seq_len))
        window = np.asarray(self._tokens[start : start + self.seq_len + 1], dtype=np.int64)
        return {
            "input_ids": torch.from_numpy(window[:-1].copy()),
            "labels": torch.from_numpy(window[1:].copy()),
        }

    def __getstate__(self) -> dict[str, object]:
        """Pickle without the memmap; numpy would otherwise pickle the whole token array."""
        state = self.__dict__.copy()
        state["_tokens"] = None
        return state


@dataclass
class DataBundle:
    """Everything training needs from the data pipeline for one corpus and tokenizer.

    `vocab_size` is the tokenizer's actual size (at most the requested one); token files hold
    uint16 ids with `eos_id` after every document; the token counts are per split.
    """

    # The tokenizer's repr is its whole vocabulary and merge list; keep the bundle's repr readable.
    tokenizer: tokenizers.Tokenizer = field(repr=False)
    tokenizer_path: Path
    train_path: Path
    val_path: Path
    vocab_size: int
    eos_id: int
    n_train_tokens: int
    n_val_tokens: int


def prepare_data(
    source: CorpusSource,
    *,
    vocab_size: int,
    val_fraction: float,
    seed: int,
    cache_dir: Path,
    max_bytes: int | None = None,
    jsonl_field: str = "text",
) -> DataBundle:
    """Load a corpus, split it by document, train the tokenizer and build both token caches.

    The tokenizer is trained on the train split only, so validation text never shapes the
    vocabulary. Every stage is cached under `cache_dir`, so a second call with the same inputs
    only re-reads the corpus. See `load_corpus` for `source`, `max_bytes` and `jsonl_field`.
    """
    docs = load_corpus(source, jsonl_field=jsonl_field, max_bytes=max_bytes)
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    tokenizer, tokenizer_path = load_or_train_tokenizer(train_docs, vocab_size, cache_dir)
    train_path = build_token_cache(train_docs, tokenizer, cache_dir, "train")
    val_path = build_token_cache(val_docs, tokenizer, cache_dir, "val")
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    return DataBundle(
        tokenizer=tokenizer,
        tokenizer_path=tokenizer_path,
        train_path=train_path,
        val_path=val_path,
        vocab_size=tokenizer.get_vocab_size(),
        eos_id=eos_id,
        n_train_tokens=count_tokens(train_path),
        n_val_tokens=count_tokens(val_path),
    )


def default_cache_dir() -> Path:
    """The data cache root: ``$SPARSEZOO_CACHE`` if set and non-empty, else ``~/.cache/sparsezoo``.

    The environment variable lets a team point every run at one shared cache without editing
    configs.
    """
    override = os.environ.get("SPARSEZOO_CACHE")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "sparsezoo"
