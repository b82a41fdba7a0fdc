"""An embedded English corpus that needs no download: the help texts and docstrings of the Python standard library.

Every Python install carries two large bodies of English prose: ``pydoc_data.topics`` (the language reference
chapters that ``help("with")`` prints) and the docstrings of the pure-Python standard-library modules. Together
they give a CPU demo about 1.5 MB of text (roughly half a million tokens at vocabulary 1024), enough to train a
small model for a minute and hold out a validation split, on an air-gapped machine.

The corpus is deterministic for a given Python version: sources are read in sorted order, split into paragraphs,
de-duplicated, packed into documents, then shuffled with a fixed seed so that the validation split (the first K
documents, as upstream) is drawn from the same mix of sources as the training split.
"""

from __future__ import annotations

import ast
import random
import re
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

MAX_DOCUMENT_CHARS = 1500
# Docstrings shorter than this are mostly one-line summaries ("Return self==value."): little prose, many repeats.
MIN_DOCSTRING_CHARS = 200
SHUFFLE_SEED = 1337
# Standard-library folders that are tests, GUI demos or vendored code rather than documented library modules.
EXCLUDED_STDLIB_PARTS = frozenset(
    {"test", "tests", "idlelib", "turtledemo", "tkinter", "lib2to3", "site-packages", "dist-packages", "__pycache__"}
)

_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def split_paragraphs(text: str) -> list[str]:
    """Blank-line-separated blocks of ``text``, each stripped; empty blocks dropped."""
    return [block.strip() for block in _BLANK_LINES.split(text) if block.strip()]


def pack_paragraphs(paragraphs: Iterable[str], max_chars: int = MAX_DOCUMENT_CHARS) -> list[str]:
    """Join consecutive paragraphs (with a blank line) into documents of at most ``max_chars`` characters.

    A single paragraph longer than ``max_chars`` becomes a document of its own, uncut: cutting it mid-sentence
    would make worse text than a long document does.
    """
    documents: list[str] = []
    current: list[str] = []
    length = 0
    for paragraph in paragraphs:
        added = len(paragraph) + (2 if current else 0)
        if current and length + added > max_chars:
            documents.append("\n\n".join(current))
            current, length = [], 0
            added = len(paragraph)
        current.append(paragraph)
        length += added
    if current:
        documents.append("\n\n".join(current))
    return documents


def _pydoc_topic_paragraphs() -> Iterator[str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package pydoc_data separately: the docstrings alone still serve
        return
    for key in sorted(topics):
        yield from split_paragraphs(topics[key])


def _stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():  # a zipped or stripped standard library: fall back to the pydoc topics alone
        return []
    return sorted(
        path
        for path in root.rglob("*.py")
        if not any(part in EXCLUDED_STDLIB_PARTS or part.startswith("test") for part in path.relative_to(root).parts)
    )


def _documented_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Modules, classes and functions under ``node``, visiting statements only.

    Docstrings live only on those three node kinds, and they are only ever nested in statement lists (bodies of
    defs, ``if``, ``try``, ``with``...); skipping expressions makes this several times faster than ``ast.walk``.
    """
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        yield node
    for field in ("body", "orelse", "handlers", "finalbody"):
        for child in getattr(node, field, ()):
            if isinstance(child, (ast.stmt, ast.excepthandler)):
                yield from _documented_nodes(child)


def _stdlib_docstring_paragraphs() -> Iterator[str]:
    """Paragraphs of the long docstrings of every module, class and function, read with ``ast`` (nothing imported)."""
    for path in _stdlib_source_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # the odd non-UTF-8 or version-specific file; the corpus does not depend on any one file
        for node in _documented_nodes(tree):
            docstring = ast.get_docstring(node)
            if docstring and len(docstring) >= MIN_DOCSTRING_CHARS:
                yield from split_paragraphs(docstring)


def _unique(paragraphs: Iterable[str]) -> Iterator[str]:
    seen: set[str] = set()
    for paragraph in paragraphs:
        if paragraph not in seen:
            seen.add(paragraph)
            yield paragraph


@lru_cache(maxsize=2)
def _embedded_documents(include_docstrings: bool) -> tuple[str, ...]:
    documents = pack_paragraphs(_unique(_pydoc_topic_paragraphs()))
    if include_docstrings:
        documents += pack_paragraphs(_unique(_stdlib_docstring_paragraphs()))
    random.Random(SHUFFLE_SEED).shuffle(documents)
    return tuple(documents)


def embedded_corpus(include_docstrings: bool = True) -> list[str]:
    """The embedded corpus as a list of document strings (a fresh list; the texts are cached per process).

    ``include_docstrings=False`` keeps only the pydoc topics (about a third of the text, no source parsing): the
    quick variant for tests. Reading the docstrings parses the standard library once per process (a few seconds).
    """
    return list(_embedded_documents(include_docstrings))
