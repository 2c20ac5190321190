"""Tests for sparsezoo.data.tokenizer: byte-level round trips, the content-keyed cache, errors."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

from sparsezoo.data import tokenizer as tokenizer_mod
from sparsezoo.data.corpus import Document
from sparsezoo.data.tokenizer import EOS_TOKEN, corpus_fingerprint, load_or_train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
VOCAB = 512


def _stdlib_docs(*names: str) -> list[Document]:
    return [Document(n, (STDLIB / n).read_text(encoding="utf-8")) for n in names]


@pytest.fixture(scope="module")
def train_docs() -> list[Document]:
    return [
        *_stdlib_docs("textwrap.py", "shlex.py"),
        Document("unicode.txt", "Grüße aus Köln — naïve café. 日本語のテキスト。\n" * 20),
    ]


@pytest.fixture(scope="module")
def trained(train_docs, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    tokenizer, path = load_or_train_tokenizer(train_docs, VOCAB, cache)
    return tokenizer, path, cache


@pytest.mark.parametrize(
    "text",
    [
        (STDLIB / "colorsys.py").read_text(encoding="utf-8"),
        "naïve café — Grüße 日本語 🚀🧪 \t tabs\r\nCRLF  double  spaces\n\n",
        "bytes unseen in training: \x00\x07 ∮ E⋅da = Q ⠁⠃ 𝔘𝔫𝔦",
        "a literal <|endoftext|> in text stays text",
        "",
    ],
)
def test_decode_encode_round_trips(trained, text):
    tokenizer, _, _ = trained
    ids = tokenizer.encode(text).ids
    assert tokenizer.decode(ids) == text


def test_literal_eos_string_never_becomes_the_eos_id(trained):
    tokenizer, _, _ = trained
    assert tokenizer.token_to_id(EOS_TOKEN) not in tokenizer.encode(f"x {EOS_TOKEN} y").ids


def test_layout_of_the_trained_vocabulary(trained):
    tokenizer, path, cache = trained
    assert tokenizer.token_to_id(EOS_TOKEN) == 0
    assert 257 < tokenizer.get_vocab_size() <= VOCAB
    assert path.name == "tokenizer.json"
    assert path.parent.parent == cache / "tokenizers"
    assert path.parent.name.endswith(f"-v{VOCAB}")
    # Training on real text must compress it: fewer tokens than bytes.
    text = (STDLIB / "colorsys.py").read_text(encoding="utf-8")
    n_tokens, n_bytes = len(tokenizer.encode(text).ids), len(text.encode())
    assert n_tokens < 0.75 * n_bytes


def test_cache_hit_loads_without_training(trained, train_docs, monkeypatch):
    tokenizer, path, cache = trained
    before = path.stat()

    def fail(*args, **kwargs):
        raise AssertionError("tokenizer was retrained although a cached one exists")

    monkeypatch.setattr(tokenizer_mod, "_train_tokenizer", fail)
    again, again_path = load_or_train_tokenizer(list(train_docs), VOCAB, cache)

    assert again_path == path
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert again.to_str() == tokenizer.to_str()
    assert again.encode("café").ids == tokenizer.encode("café").ids


def test_different_content_or_vocab_gets_a_different_cache_path(trained, train_docs):
    _, path, cache = trained
    changed = [*train_docs[:-1], Document("unicode.txt", train_docs[-1].text + "!")]
    _, changed_path = load_or_train_tokenizer(changed, VOCAB, cache)
    _, bigger_path = load_or_train_tokenizer(train_docs, VOCAB + 1, cache)
    assert len({path, changed_path, bigger_path}) == 3


def test_fingerprint_depends_on_content_names_and_boundaries():
    base = [Document("a", "bc")]
    assert corpus_fingerprint(base) == corpus_fingerprint([Document("a", "bc")])
    assert corpus_fingerprint(base) != corpus_fingerprint([Document("a", "bd")])
    assert corpus_fingerprint(base) != corpus_fingerprint([Document("ab", "c")])
    assert corpus_fingerprint([Document("a", "x"), Document("b", "y")]) != corpus_fingerprint(
        [Document("a", "xb"), Document("", "y")]
    )
    assert len(corpus_fingerprint(base)) == 64


@pytest.mark.parametrize("bad", [0, 256, 65536, 10**6, True, 512.0])
def test_bad_vocab_size_is_rejected(tmp_path, bad):
    with pytest.raises(ValueError, match=r"vocab_size.*(257, 65535|integer)"):
        load_or_train_tokenizer([Document("a", "text")], bad, tmp_path)
    assert not (tmp_path / "tokenizers").exists()


def test_no_documents_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="at least one document"):
        load_or_train_tokenizer([], VOCAB, tmp_path)


def test_failed_write_leaves_no_cache_or_temp_file(tmp_path, monkeypatch):
    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        load_or_train_tokenizer([Document("a", "some text " * 10)], 300, tmp_path)
    leftovers = [p for p in (tmp_path / "tokenizers").rglob("*") if p.is_file()]
    assert leftovers == []
