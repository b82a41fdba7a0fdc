"""The documents a data build reads: .txt and .jsonl inputs (or folders of them), then the embedded corpus.

A JSONL line is one document (its ``"text"``); a .txt file is one document per blank-line-separated paragraph, or
one document for the whole file (``txt_mode="file"``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from pgolf_lit.data.corpus import embedded_corpus, split_paragraphs
from pgolf_lit.errors import DataError

TXT_MODES = ("paragraphs", "file")
INPUT_SUFFIXES = (".txt", ".jsonl")


def find_input_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files and directories (searched recursively, in sorted order) into the .txt/.jsonl files to read."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in INPUT_SUFFIXES)
        elif path.is_file():
            if path.suffix not in INPUT_SUFFIXES:
                raise DataError(f"{path}: unsupported input file type; expected a .txt or .jsonl file")
            files.append(path)
        else:
            raise DataError(f"{path}: input not found (expected a .txt or .jsonl file, or a directory of them)")
    return files


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte offset {e.start})") from None


def _iter_jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}:{line_number}: unreadable JSON line ({e})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{path}:{line_number}: expected a JSON object with a string "text" field')
            yield line_number, text


class DocumentSource:
    """The documents of the input files in order, then the embedded corpus if asked; iterable any number of times.

    The build reads the documents three times (count, tokenizer training, encoding) instead of holding them in
    memory, so an input the size of the official ``docs_selected.jsonl`` does not need to fit in RAM.
    """

    def __init__(self, files: Sequence[Path], *, txt_mode: str = "paragraphs", embedded: bool = False):
        if txt_mode not in TXT_MODES:
            raise DataError(f"txt_mode {txt_mode!r}: expected one of {', '.join(TXT_MODES)}")
        self.files = list(files)
        self.txt_mode = txt_mode
        self.embedded = embedded

    def __iter__(self) -> Iterator[str]:
        for _, text in self.located():
            yield text

    def located(self) -> Iterator[tuple[str, str]]:
        """``(where, text)`` of each document: ``file:line`` for JSONL, ``file paragraph k`` for text files."""
        for path in self.files:
            if path.suffix == ".jsonl":
                for line_number, text in _iter_jsonl_lines(path):
                    yield f"{path}:{line_number}", text
            elif self.txt_mode == "file":
                yield str(path), _read_text(path)
            else:
                for k, text in enumerate(split_paragraphs(_read_text(path)), start=1):
                    yield f"{path} paragraph {k}", text
        if self.embedded:
            for k, text in enumerate(embedded_corpus()):
                yield f"embedded document {k}", text

    def describe(self) -> list[str]:
        return [str(p) for p in self.files] + (["embedded:python-stdlib-docs"] if self.embedded else [])
