"""Tests for sparsezoo.data.dataset: token caches, TokenWindows and prepare_data."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsezoo.data.corpus import Document, load_corpus, split_documents
from sparsezoo.data.dataset import (
    TokenWindows,
    build_token_cache,
    count_tokens,
    default_cache_dir,
    prepare_data,
)
from sparsezoo.data.tokenizer import EOS_TOKEN, load_or_train_tokenizer

DOCS = [
    Document("a.py", "def add(a, b):\n    return a + b\n" * 30),
    Document("b.txt", "Grüße — naïve café. 日本語 🚀\n" * 20),
    Document("c.md", "# Title\n\nSome *markdown* text with a literal <|endoftext|> inside.\n" * 10),
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def tokenizer(cache):
    return load_or_train_tokenizer(DOCS, 300, cache)[0]


@pytest.fixture(scope="module")
def train_bin(tokenizer, cache) -> Path:
    return build_token_cache(DOCS, tokenizer, cache, "train")


def _memmap(path: Path) -> np.ndarray:
    return np.memmap(path, dtype=np.uint16, mode="r")


# --- build_token_cache --------------------------------------------------------------------------


def test_cache_holds_each_encoding_followed_by_eos(tokenizer, train_bin, cache):
    eos = tokenizer.token_to_id(EOS_TOKEN)
    expected = [i for doc in DOCS for i in [*tokenizer.encode(doc.text).ids, eos]]
    stored = _memmap(train_bin)

    assert stored.tolist() == expected
    assert count_tokens(train_bin) == len(expected)
    assert int((stored == eos).sum()) == len(DOCS)
    assert train_bin.parent == cache / "tokens"
    assert train_bin.name.endswith("-train.bin")


def test_cache_is_reused_when_present(tokenizer, train_bin, cache):
    before = train_bin.stat()
    again = build_token_cache(list(DOCS), tokenizer, cache, "train")
    after = again.stat()
    assert again == train_bin
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_cache_key_covers_docs_tokenizer_and_split(tokenizer, train_bin, cache):
    other_tokenizer = load_or_train_tokenizer(DOCS, 280, cache)[0]
    paths = {
        train_bin,
        build_token_cache(DOCS, tokenizer, cache, "val"),
        build_token_cache(DOCS[:2], tokenizer, cache, "train"),
        build_token_cache(DOCS, other_tokenizer, cache, "train"),
    }
    assert len(paths) == 4
    assert not list((cache / "tokens").glob("*.tmp"))


@pytest.mark.parametrize("bad", ["", "../escape", "a b", "val/1"])
def test_split_name_must_be_a_plain_name(tokenizer, tmp_path, bad):
    with pytest.raises(ValueError, match="split_name"):
        build_token_cache(DOCS, tokenizer, tmp_path, bad)


# --- TokenWindows -------------------------------------------------------------------------------


def test_window_labels_are_inputs_shifted_by_one(train_bin):
    stored = _memmap(train_bin).astype(np.int64)
    windows = TokenWindows(train_bin, seq_len=32, n_samples=20, seed=1)
    assert len(windows) == 20
    for i in range(len(windows)):
        item = windows[i]
        x, y = item["input_ids"], item["labels"]
        assert x.dtype == y.dtype == torch.long
        assert x.shape == y.shape == (32,)
        assert torch.equal(x[1:], y[:-1])
        # The window is a real slice of the token file.
        joined = torch.cat([x, y[-1:]]).numpy()
        starts = np.flatnonzero(stored[: len(stored) - 32] == joined[0])
        assert any(np.array_equal(stored[s : s + 33], joined) for s in starts)


def test_windows_are_deterministic_per_seed_and_index(train_bin):
    a = TokenWindows(train_bin, seq_len=16, n_samples=10, seed=7)
    b = TokenWindows(train_bin, seq_len=16, n_samples=10, seed=7)
    c = TokenWindows(train_bin, seq_len=16, n_samples=10, seed=8)
    forward = [a[i]["input_ids"] for i in range(10)]
    backward = [b[i]["input_ids"] for i in reversed(range(10))][::-1]
    assert all(torch.equal(f, g) for f, g in zip(forward, backward, strict=True))
    assert not all(torch.equal(f, c[i]["input_ids"]) for i, f in enumerate(forward))
    assert len({tuple(f.tolist()) for f in forward}) > 1


def test_windows_survive_pickling_without_copying_tokens(train_bin):
    windows = TokenWindows(train_bin, seq_len=16, n_samples=4, seed=0)
    first = windows[0]
    blob = pickle.dumps(windows)
    assert len(blob) < 2_000
    clone = pickle.loads(blob)
    assert torch.equal(clone[0]["input_ids"], first["input_ids"])


def test_window_index_out_of_range(train_bin):
    windows = TokenWindows(train_bin, seq_len=8, n_samples=3, seed=0)
    with pytest.raises(IndexError):
        windows[3]


def test_too_short_split_names_path_seq_len_and_count(tmp_path):
    path = tmp_path / "tiny-val.bin"
    np.arange(10, dtype=np.uint16).tofile(path)
    TokenWindows(path, seq_len=9, n_samples=1, seed=0)  # exactly seq_len + 1 tokens is enough
    with pytest.raises(ValueError, match=r"tiny-val\.bin.*10 tokens.*seq_len=10"):
        TokenWindows(path, seq_len=10, n_samples=1, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"seq_len": 0}, "seq_len"), ({"n_samples": 0}, "n_samples"), ({"seed": -1}, "seed")],
)
def test_window_arguments_are_validated(train_bin, kwargs, name):
    args = {"seq_len": 8, "n_samples": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=name):
        TokenWindows(train_bin, **args)


# --- prepare_data / default_cache_dir -----------------------------------------------------------


def test_prepare_data_end_to_end(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"f{i}.txt").write_text(f"file {i}: " + "lorem ipsum dolor sit amet\n" * 40)
    cache = tmp_path / "cache"

    bundle = prepare_data(str(corpus), vocab_size=300, val_fraction=0.34, seed=0, cache_dir=cache)

    train_docs, val_docs = split_documents(load_corpus(str(corpus)), 0.34, 0)
    assert len(val_docs) == 2
    # The tokenizer comes from the train split only.
    assert bundle.tokenizer_path == load_or_train_tokenizer(train_docs, 300, cache)[1]
    assert bundle.vocab_size == bundle.tokenizer.get_vocab_size() <= 300
    assert bundle.eos_id == bundle.tokenizer.token_to_id(EOS_TOKEN) == 0
    assert bundle.n_train_tokens == count_tokens(bundle.train_path)
    assert bundle.n_val_tokens == count_tokens(bundle.val_path)
    val_ids = _memmap(bundle.val_path).tolist()
    decoded = bundle.tokenizer.decode(val_ids, skip_special_tokens=False)
    assert decoded == "".join(d.text + EOS_TOKEN for d in val_docs)
    assert "tokenizer=" not in repr(bundle)

    again = prepare_data(str(corpus), vocab_size=300, val_fraction=0.34, seed=0, cache_dir=cache)
    assert (again.train_path, again.val_path) == (bundle.train_path, bundle.val_path)


def test_default_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEZOO_CACHE", str(tmp_path / "shared"))
    assert default_cache_dir() == tmp_path / "shared"
    monkeypatch.delenv("SPARSEZOO_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "sparsezoo"
