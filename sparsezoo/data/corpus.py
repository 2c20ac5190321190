"""Text corpora: discovery, loading and the document-level train/validation split.

A corpus is a list of `Document`s. Sources are either the word ``"stdlib"`` (the running
interpreter's own standard-library sources, an offline ~30 MB real-text corpus) or paths and glob
patterns pointing at text and JSONL files. Loading never guesses an encoding: user files must be
UTF-8, and anything else is an error that names the file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

STDLIB_SOURCE = "stdlib"
_EXCLUDED_STDLIB_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_GLOB_CHARS = frozenset("*?[")

CorpusSource = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
"""``"stdlib"``, one path or glob pattern, or a sequence of them."""


class CorpusError(ValueError):
    """A corpus source that cannot be turned into documents.

    Raised for missing paths, patterns that match nothing, files that are not UTF-8, malformed
    JSONL lines and sources that yield no non-empty document. The message names the offending
    source (file, line or pattern) and what is allowed instead.
    """


@dataclass(frozen=True)
class Document:
    """One unit of text that is never split across train and validation.

    `name` identifies the document stably across machines (a path relative to the source root, with
    ``:<line>`` appended for JSONL records), so it can feed deterministic hashing; `text` is the
    full decoded content.
    """

    name: str
    text: str


def load_corpus(
    source: CorpusSource, *, jsonl_field: str = "text", max_bytes: int | None = None
) -> list[Document]:
    """Load the documents of a corpus source in a deterministic order.

    `source` is ``"stdlib"`` (the interpreter's standard-library ``.py`` files, excluding
    site-packages/dist-packages, sorted by relative path) or one or more paths/glob patterns
    (``~`` and ``**`` supported). ``.jsonl`` files give one document per line from `jsonl_field`;
    other files are read as UTF-8 text; directories are walked recursively (hidden entries such as
    ``.git`` are skipped). Empty documents are dropped. With `max_bytes`, loading stops before the
    document that would push the total UTF-8 size past it, but always keeps the first document.
    Raises `CorpusError` naming the source when something is missing, malformed or yields nothing.
    """
    if max_bytes is not None and (isinstance(max_bytes, bool) or max_bytes <= 0):
        raise ValueError(f"max_bytes must be a positive integer or None, got {max_bytes!r}")
    specs = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    sources = [os.fspath(spec) for spec in specs]
    if not sources:
        raise CorpusError("corpus source is empty; give 'stdlib' or at least one path or pattern")

    docs: list[Document] = []
    total = 0
    for doc in _iter_documents(sources, jsonl_field):
        if not doc.text:
            continue
        size = len(doc.text.encode("utf-8"))
        if max_bytes is not None and docs and total + size > max_bytes:
            break
        docs.append(doc)
        total += size
    if not docs:
        raise CorpusError(
            f"corpus source {sources!r} contains no non-empty document; "
            "give files with text (UTF-8) or JSONL records with a non-empty "
            f"{jsonl_field!r} field"
        )
    return docs


def split_documents(
    docs: list[Document], val_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """Split documents into (train, validation) by whole documents, deterministically.

    Each document gets a stable SHA-256 score from ``(seed, name)`` (not Python's salted
    ``hash()``); the ``round(len(docs) * val_fraction)`` lowest-scoring documents, clamped so each
    side keeps at least one, go to validation, and both sides keep the input order. Ranking by
    name rather than position keeps the split unchanged when the same files load in another
    order. A single document cannot be split that way, so its text is cut at the line boundary
    nearest ``(1 - val_fraction)`` of its length instead: users training on one large file still
    get a held-out validation tail. `val_fraction` must be strictly between 0 and 1.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in the open interval (0, 1), got {val_fraction!r}")
    if not docs:
        raise ValueError("split_documents needs at least one document, got an empty list")
    if len(docs) == 1:
        return _split_single_document(docs[0], val_fraction)

    n_val = min(max(round(len(docs) * val_fraction), 1), len(docs) - 1)
    ranked = sorted(range(len(docs)), key=lambda i: (_split_score(docs[i].name, seed), i))
    val_indices = set(ranked[:n_val])
    train = [doc for i, doc in enumerate(docs) if i not in val_indices]
    val = [doc for i, doc in enumerate(docs) if i in val_indices]
    return train, val


def _split_score(name: str, seed: int) -> int:
    """Stable per-(seed, name) score; hashlib instead of hash() because hash() is salted."""
    digest = hashlib.sha256(f"{seed}\0{name}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


def _split_single_document(
    doc: Document, val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Cut one document at the line boundary closest to the requested train share."""
    text = doc.text
    if len(text) < 2:
        raise CorpusError(
            f"document {doc.name!r} has {len(text)} character(s); a single-document corpus needs "
            "at least 2 characters to give both a train and a validation part"
        )
    target = len(text) * (1.0 - val_fraction)
    # Candidate cut points are the starts of lines 2..n; a one-line text falls back to a
    # character cut because it has no line boundary to use.
    boundaries = [i + 1 for i, ch in enumerate(text[:-1]) if ch == "\n"]
    if boundaries:
        cut = min(boundaries, key=lambda b: (abs(b - target), b))
    else:
        cut = min(max(round(target), 1), len(text) - 1)
    train = Document(name=f"{doc.name}#train", text=text[:cut])
    val = Document(name=f"{doc.name}#val", text=text[cut:])
    return [train], [val]


def _iter_documents(sources: Sequence[str], jsonl_field: str) -> Iterator[Document]:
    """Yield documents lazily, so `max_bytes` stops reading as soon as the budget is spent."""
    seen: set[Path] = set()
    for spec in sources:
        if spec == STDLIB_SOURCE:
            yield from _iter_stdlib()
            continue
        for path, name in _resolve_source(spec):
            resolved = path.resolve()
            if resolved in seen:
                continue
            seen.add(resolved)
            yield from _read_file(path, name, jsonl_field)


def _stdlib_root() -> Path:
    """Directory holding the running interpreter's standard-library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def _iter_stdlib() -> Iterator[Document]:
    """Yield the standard library's ``.py`` files sorted by relative path.

    Files that are not valid UTF-8 are skipped rather than reported: CPython's own test suite ships
    a handful of deliberately mis-encoded fixtures (e.g. ``test/encoded_modules``) that are not
    the user's fault.
    """
    root = _stdlib_root()
    if not root.is_dir():
        raise CorpusError(
            f"corpus source 'stdlib': the interpreter's standard library {str(root)!r} is not a "
            "directory; give explicit paths or glob patterns instead"
        )
    for path, name in _walk(root, excluded_dirs=_EXCLUDED_STDLIB_DIRS, suffix=".py"):
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield Document(name=name, text=text)


def _walk(
    root: Path, *, excluded_dirs: Iterable[str] = (), suffix: str = ""
) -> list[tuple[Path, str]]:
    """All files under `root` as (path, posix path relative to root), sorted by relative path.

    Hidden entries are skipped because a data directory under version control would otherwise
    pull in binary ``.git`` objects.
    """
    excluded = frozenset(excluded_dirs)
    found: list[tuple[Path, str]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in excluded and not d.startswith(".")]
        for filename in filenames:
            if filename.startswith(".") or not filename.endswith(suffix):
                continue
            path = Path(dirpath, filename)
            found.append((path, path.relative_to(root).as_posix()))
    found.sort(key=lambda item: item[1])
    return found


def _resolve_source(spec: str) -> list[tuple[Path, str]]:
    """Expand one path or glob pattern into (file path, document name) pairs."""
    expanded = os.path.expanduser(spec)
    if any(ch in _GLOB_CHARS for ch in expanded):
        matches = sorted(glob.glob(expanded, recursive=True))
        if not matches:
            raise CorpusError(
                f"corpus pattern {spec!r} matched no files; give an existing file, directory or "
                "glob pattern (e.g. 'data/**/*.txt'), or 'stdlib'"
            )
        base = _glob_base(expanded)
        files: list[tuple[Path, str]] = []
        for match in matches:
            path = Path(match)
            if path.is_dir():
                files.extend((p, f"{_relative_name(path, base)}/{rel}") for p, rel in _walk(path))
            elif path.is_file():
                files.append((path, _relative_name(path, base)))
        return files

    path = Path(expanded)
    if path.is_dir():
        files = _walk(path)
        if not files:
            raise CorpusError(
                f"corpus directory {spec!r} contains no (non-hidden) files; "
                "give a directory with text or .jsonl files"
            )
        return files
    if path.is_file():
        return [(path, path.name)]
    raise CorpusError(
        f"corpus path {spec!r} does not exist; give an existing file, directory or glob pattern, "
        "or 'stdlib'"
    )


def _glob_base(pattern: str) -> Path:
    """Longest leading directory of `pattern` without glob characters (names are relative to it)."""
    parts = Path(pattern).parts
    literal: list[str] = []
    for part in parts[:-1]:
        if any(ch in _GLOB_CHARS for ch in part):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")


def _relative_name(path: Path, base: Path) -> str:
    """Posix path of `path` relative to `base`, so names do not depend on where the corpus lies."""
    return Path(os.path.relpath(path, base)).as_posix()


def _read_file(path: Path, name: str, jsonl_field: str) -> Iterator[Document]:
    """Decode one file strictly as UTF-8 and yield its document(s)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CorpusError(f"corpus file {str(path)!r} is unreadable: {exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"corpus file {str(path)!r} is not valid UTF-8 (byte {exc.start}); only UTF-8 text "
            "and .jsonl files are allowed"
        ) from exc
    if path.suffix == ".jsonl":
        yield from _parse_jsonl(path, name, text, jsonl_field)
    else:
        yield Document(name=name, text=text)


def _parse_jsonl(path: Path, name: str, text: str, field: str) -> Iterator[Document]:
    """One document per non-blank JSONL line, taken from the string field `field`."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{str(path)!r} line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"corpus file {where}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            problem = f"got a JSON {type(record).__name__}"
        elif field not in record:
            problem = f"the field is missing (fields: {sorted(record)})"
        elif not isinstance(record[field], str):
            problem = f"the field is a {type(record[field]).__name__}"
        else:
            problem = ""
        if problem:
            raise CorpusError(
                f"corpus file {where}: expected a JSON object with a string field {field!r}; "
                f"{problem}"
            )
        value = record[field]
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            # json.loads accepts lone surrogate escapes ("\ud800") that no tokenizer can encode.
            raise CorpusError(
                f"corpus file {where}: field {field!r} holds a lone surrogate, which is not "
                "valid Unicode text"
            ) from exc
        yield Document(name=f"{name}:{lineno}", text=value)
