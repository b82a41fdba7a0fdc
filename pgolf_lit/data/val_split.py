"""The validation split of a data build: its size, and the guard that keeps validation documents out of training.

A validation document never lands in training (the PR #1855 record folder's prepare_caseops_data.py trap, where
``--val-docs 10000`` against the official 50,000 trained on 40,000 validation documents): a ``--val-docs`` below
what the input's ``<stem>.source_manifest.json`` declares stops the build, and a training document whose text
repeats a validation document is dropped from the training split, with the count in the output and in the
manifest's ``val_disjointness`` (``--keep-val-copies`` keeps them, for a byte-exact rebuild of an upstream export
that had them; the manifest then counts them as validation documents in training).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pgolf_lit.data.caseops import find_operator
from pgolf_lit.data.documents import DocumentSource
from pgolf_lit.errors import DataError

OFFICIAL_VAL_DOCS = 50_000


@dataclass
class DocumentScan:
    """What one read of every document tells before anything is trained or written."""

    num_docs: int = 0
    any_text: bool = False
    # Content digest -> (index, where) of its first occurrence among the first ``val_cap`` documents, and the later
    # occurrences of those digests: a later copy past the validation split is a training copy of a val document.
    first: dict = field(default_factory=dict)
    copies: dict = field(default_factory=dict)

    def train_copies_of_val(self, val_docs: int) -> list[tuple[int, str, str]]:
        """``(index, where, where in val)`` of each training document that repeats a validation document."""
        found = []
        for digest, (index, val_where) in self.first.items():
            if index < val_docs:
                found += [(i, where, val_where) for i, where in self.copies.get(digest, ()) if i >= val_docs]
        return sorted(found)


def disjointness_entry(copies: Sequence[tuple[int, str, str]], kept: bool) -> dict:
    """The data manifest's ``val_disjointness``: train/val disjointness checked by exact document text, the training
    copies of validation documents found, how many were dropped (all, unless kept for a byte-exact rebuild of an
    upstream export that had them), and so how many validation documents are in training. ``pgolf record`` refuses
    a run whose data has ``val_docs_in_train`` > 0."""
    entry = {
        "checked": "exact document text",
        "train_copies_of_val_docs": len(copies),
        "dropped": 0 if kept else len(copies),
        "val_docs_in_train": len(copies) if kept else 0,
    }
    if copies:
        entry["first_copy"] = {"train": copies[0][1], "val": copies[0][2]}
    return entry


def disjointness_line(entry: dict) -> str:
    """One line on what the build did with training copies of validation documents."""
    found = entry["train_copies_of_val_docs"]
    if not found:
        return "train/val disjoint: no training document repeats a validation document"
    copies = f"{found} training cop{'y' if found == 1 else 'ies'} of validation documents"
    first = f"(the first: {entry['first_copy']['train']} repeats {entry['first_copy']['val']})"
    if entry["dropped"]:
        return f"train/val disjoint: dropped {copies} from the training split {first}"
    return f"WARNING: kept {copies} in the training split (--keep-val-copies) {first}"


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def scan_documents(source: DocumentSource, *, val_cap: int, caseops: bool) -> DocumentScan:
    """Count the documents and read (and so validate) every input before any training.

    Also fingerprints the documents, so that the training copies of a validation document are found (for the first
    ``val_cap`` documents, the largest validation split the build can choose), and, in a plain build, refuses
    text that holds a CaseOps operator character: that is CaseOps-encoded text, whose operator bytes a plain
    tokenizer would score as text.
    """
    scan = DocumentScan()
    for index, (where, text) in enumerate(source.located()):
        scan.num_docs += 1
        if not text.strip():
            continue  # empty documents are all alike and leak nothing
        scan.any_text = True
        if not caseops and (position := find_operator(text)) >= 0:
            raise DataError(
                f"{where}: character {position} is U+{ord(text[position]):04X}, a CaseOps operator; a plain build "
                f"would count the operators' bytes as text: build the original text with --caseops"
            )
        digest = _digest(text)
        if digest in scan.first:
            scan.copies.setdefault(digest, []).append((index, where))
        elif index < val_cap:
            scan.first[digest] = (index, where)
    return scan


def declared_val_docs(files: Sequence[Path]) -> tuple[Path, int] | None:
    """The validation size that the first input's source manifest (``<stem>.source_manifest.json`` beside a
    ``.jsonl``, as the official ``docs_selected.jsonl`` has) declares, or None."""
    if not files or files[0].suffix != ".jsonl":
        return None
    sidecar = files[0].with_name(f"{files[0].stem}.source_manifest.json")
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{sidecar}: unreadable source manifest ({e})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{sidecar}: expected a JSON object")
    if meta.get("docs_val") is None:
        return None
    try:
        return sidecar, int(meta["docs_val"])
    except (TypeError, ValueError):
        raise DataError(f"{sidecar}: docs_val {meta['docs_val']!r} is not an integer") from None


def default_val_docs(num_docs: int) -> int:
    """Upstream's 50,000, but never more than a tenth of the documents (and at least one)."""
    return max(1, min(OFFICIAL_VAL_DOCS, num_docs // 10))
