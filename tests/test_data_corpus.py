"""Tests for sparsezoo.data.corpus: discovery, strict decoding, JSONL, budgets and the split."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

import pytest

from sparsezoo.data.corpus import CorpusError, Document, load_corpus, split_documents


def _write(root: Path, rel: str, content: str | bytes) -> Path:
    """Create `root/rel` (and parents) with `content`; str is written as UTF-8."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.write_bytes(data)
    return path


# --- stdlib -------------------------------------------------------------------------------------


def test_stdlib_discovery_walks_sorted_py_files_and_skips_packages(tmp_path, monkeypatch):
    fake = tmp_path / "lib"
    _write(fake, "os.py", "import sys\n")
    _write(fake, "json/__init__.py", "# json\n")
    _write(fake, "site-packages/thirdparty.py", "x = 1\n")
    _write(fake, "dist-packages/debian.py", "y = 1\n")
    _write(fake, "__pycache__/os.cpython-311.py", "z = 1\n")
    _write(fake, "README.txt", "not python\n")
    _write(fake, "test/encoded_modules/latin1.py", "s = 'caf\xe9'\n".encode("latin-1"))
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(fake)})

    docs = load_corpus("stdlib")

    assert [d.name for d in docs] == ["json/__init__.py", "os.py"]
    assert docs[1].text == "import sys\n"


def test_real_stdlib_prefix_matches_files_on_disk():
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = load_corpus("stdlib", max_bytes=60_000)

    names = [d.name for d in docs]
    assert names == sorted(names)
    assert sum(len(d.text.encode()) for d in docs) <= 60_000
    for doc in docs:
        assert doc.name.endswith(".py")
        assert "site-packages" not in doc.name
        assert (root / doc.name).read_text(encoding="utf-8") == doc.text


@pytest.mark.slow
def test_full_stdlib_contains_os_and_no_site_packages():
    docs = load_corpus("stdlib")
    names = {d.name for d in docs}
    assert "os.py" in names
    assert "json/decoder.py" in names
    assert not any("site-packages" in n or "dist-packages" in n for n in names)
    assert sum(len(d.text) for d in docs) > 5_000_000


# --- files, globs, directories ------------------------------------------------------------------


def test_glob_with_double_star_names_relative_to_pattern_base(tmp_path):
    _write(tmp_path, "data/x.txt", "x text")
    _write(tmp_path, "data/sub/deep/y.txt", "y text")
    _write(tmp_path, "data/z.md", "z text")

    docs = load_corpus(str(tmp_path / "data" / "**" / "*.txt"))

    assert [(d.name, d.text) for d in docs] == [("sub/deep/y.txt", "y text"), ("x.txt", "x text")]


def test_several_sources_keep_order_and_drop_duplicates(tmp_path):
    _write(tmp_path, "a.txt", "alpha")
    b = _write(tmp_path, "b.txt", "beta")

    docs = load_corpus([str(b), str(tmp_path / "*.txt")])

    assert [d.text for d in docs] == ["beta", "alpha"]


def test_path_objects_are_accepted(tmp_path):
    path = _write(tmp_path, "p.txt", "path text")
    assert load_corpus(path) == load_corpus([path]) == [Document("p.txt", "path text")]


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write(tmp_path, "corpus.txt", "home text")
    assert load_corpus("~/corpus.txt") == [Document(name="corpus.txt", text="home text")]


def test_directory_is_walked_recursively_skipping_hidden_entries(tmp_path):
    _write(tmp_path, "d/b.txt", "bee")
    _write(tmp_path, "d/nested/a.txt", "ay")
    _write(tmp_path, "d/.git/objects/pack", b"\xff\xfe binary")
    _write(tmp_path, "d/.hidden.txt", "secret")

    docs = load_corpus(str(tmp_path / "d"))

    assert [(d.name, d.text) for d in docs] == [("b.txt", "bee"), ("nested/a.txt", "ay")]


def test_text_is_kept_exactly_including_unicode_and_crlf(tmp_path):
    text = "naïve café\r\n日本語 🚀\n"
    path = _write(tmp_path, "u.txt", text)
    assert load_corpus(str(path))[0].text == text


def test_empty_documents_are_dropped(tmp_path):
    _write(tmp_path, "c/empty.txt", "")
    _write(tmp_path, "c/full.txt", "content")
    assert [d.name for d in load_corpus(str(tmp_path / "c"))] == ["full.txt"]


# --- JSONL --------------------------------------------------------------------------------------


def test_jsonl_gives_one_document_per_line_from_the_field(tmp_path):
    path = _write(
        tmp_path,
        "d.jsonl",
        '{"content": "first", "id": 1}\n\n{"content": "second \\u00e9"}\n',
    )
    docs = load_corpus(str(path), jsonl_field="content")
    assert docs == [Document("d.jsonl:1", "first"), Document("d.jsonl:3", "second é")]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"other": "x"}', "missing"),
        ('{"text": 3}', "int"),
        ('["text"]', "list"),
        ('{"text": "\\ud800"}', "surrogate"),
    ],
)
def test_jsonl_bad_line_names_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path, "bad.jsonl", f'{{"text": "ok"}}\n{{"text": "ok"}}\n{bad_line}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl.*line 3") as info:
        load_corpus(str(path))
    assert message in str(info.value)


# --- errors -------------------------------------------------------------------------------------


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match=r"nope\.txt.*does not exist"):
        load_corpus(str(missing))


def test_empty_glob_is_named(tmp_path):
    with pytest.raises(CorpusError, match=r"\*\.parquet.*matched no files"):
        load_corpus(str(tmp_path / "*.parquet"))


def test_empty_file_is_an_error(tmp_path):
    path = _write(tmp_path, "empty.txt", "")
    with pytest.raises(CorpusError, match=r"empty\.txt.*no non-empty document"):
        load_corpus(str(path))


def test_empty_directory_is_an_error(tmp_path):
    (tmp_path / "void").mkdir()
    with pytest.raises(CorpusError, match="void"):
        load_corpus(str(tmp_path / "void"))


def test_non_utf8_file_is_named_not_replaced(tmp_path):
    path = _write(tmp_path, "image.bin", b"\x89PNG\r\n\x1a\n\xff\x00")
    with pytest.raises(CorpusError, match=r"image\.bin.*not valid UTF-8"):
        load_corpus(str(path))


def test_corpus_error_is_a_value_error():
    assert issubclass(CorpusError, ValueError)


# --- max_bytes ----------------------------------------------------------------------------------


def test_max_bytes_stops_before_the_document_that_overflows(tmp_path):
    for name in ("a", "b", "c"):
        _write(tmp_path, f"m/{name}.txt", name * 10)
    source = str(tmp_path / "m")

    assert [d.name for d in load_corpus(source, max_bytes=25)] == ["a.txt", "b.txt"]
    assert [d.name for d in load_corpus(source, max_bytes=30)] == ["a.txt", "b.txt", "c.txt"]
    assert [d.name for d in load_corpus(source, max_bytes=5)] == ["a.txt"]


def test_max_bytes_counts_utf8_bytes_not_characters(tmp_path):
    _write(tmp_path, "m/a.txt", "é" * 10)
    _write(tmp_path, "m/b.txt", "b")
    assert len(load_corpus(str(tmp_path / "m"), max_bytes=15)) == 1


@pytest.mark.parametrize("bad", [0, -1])
def test_max_bytes_must_be_positive(tmp_path, bad):
    path = _write(tmp_path, "a.txt", "a")
    with pytest.raises(ValueError, match="max_bytes"):
        load_corpus(str(path), max_bytes=bad)


# --- split_documents ----------------------------------------------------------------------------


def _docs(n: int) -> list[Document]:
    return [Document(f"doc{i}.txt", f"text {i}\n") for i in range(n)]


def test_split_is_by_document_and_complete():
    docs = _docs(40)
    train, val = split_documents(docs, 0.25, seed=3)
    assert len(val) == 10
    assert len(train) == 30
    assert sorted(train + val, key=docs.index) == docs
    assert not set(train) & set(val)
    assert train == [d for d in docs if d in train]


def test_split_is_deterministic_and_seeded():
    docs = _docs(40)
    assert split_documents(docs, 0.25, seed=3) == split_documents(docs, 0.25, seed=3)
    assert split_documents(docs, 0.25, seed=3)[1] != split_documents(docs, 0.25, seed=4)[1]


def test_split_uses_a_stable_hash_not_builtin_hash():
    # Pinned values: Python's salted hash() would change them from one process to the next.
    docs = _docs(10)
    assert [d.name for d in split_documents(docs, 0.3, seed=0)[1]] == [
        "doc1.txt",
        "doc6.txt",
        "doc8.txt",
    ]


def test_split_does_not_depend_on_input_order():
    docs = _docs(30)
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_documents(docs, 0.2, 7)[1]) == set(split_documents(shuffled, 0.2, 7)[1])


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_split_keeps_one_document_on_each_side(fraction):
    train, val = split_documents(_docs(2), fraction, seed=0)
    assert len(train) == 1
    assert len(val) == 1


def test_single_document_is_cut_at_a_line_boundary():
    text = "".join(f"line {i}\n" for i in range(10))
    train, val = split_documents([Document("big.txt", text)], 0.3, seed=0)

    assert train[0].text + val[0].text == text
    assert train[0].text.endswith("\n")
    assert val[0].text.splitlines() == [f"line {i}" for i in range(7, 10)]
    assert train[0].name != val[0].name


def test_single_line_document_falls_back_to_a_character_cut():
    train, val = split_documents([Document("one.txt", "abcdefghij")], 0.2, seed=0)
    assert (train[0].text, val[0].text) == ("abcdefgh", "ij")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_val_fraction(fraction):
    with pytest.raises(ValueError, match=r"val_fraction.*\(0, 1\)"):
        split_documents(_docs(3), fraction, seed=0)


def test_split_rejects_empty_input():
    with pytest.raises(ValueError, match="at least one document"):
        split_documents([], 0.1, seed=0)
