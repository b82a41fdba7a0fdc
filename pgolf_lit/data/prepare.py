"""Text or JSONL documents to token shards, with upstream's export rules (``pgolf data build``).

The output tree is the one the official download produces (upstream data/download_hf_docs_and_tokenize.py ``main``),
so every loader, the downloader's ``--hub-root`` and the record scripts read it unchanged::

    OUT/manifest.json
    OUT/tokenizers/fineweb_<V>_bpe.model, .vocab
    OUT/datasets/<name>_sp<V>/fineweb_val_000000.bin, fineweb_train_000000.bin, ...

Export rules (upstream ``export_shards``): the tokenizer is SentencePiece BPE trained with the upstream settings
on every document (validation included); each document becomes ``[BOS=1] + encode(raw text)`` with no EOS; the
first K documents are the validation split, the rest the training split; a split change flushes the shard
buffer, so the validation data ends on a document boundary and train shard 0 starts with a BOS; a new shard is
started every ``shard_tokens`` tokens, and a document may continue into the next training shard.

``--caseops`` builds the PR #1855 CaseOps variant (caseops.py): each document is CaseOps-encoded before the
tokenizer sees it, the tokenizer reserves the four operators as pieces 4..7, names end in
``_lossless_caps_caseops_v1_reserved`` as the public CaseOps export's, and every val shard gets its byte sidecar
``fineweb_val_bytes_NNNNNN.bin`` (the original UTF-8 bytes of each token; 0 for BOS).

A validation document never lands in training (the PR #1855 record folder's prepare_caseops_data.py trap, where
``--val-docs 10000`` against the official 50,000 trained on 40,000 validation documents): a ``--val-docs`` below
what the input's ``<stem>.source_manifest.json`` declares stops the build, and a training document whose text
repeats a validation document is dropped from the training split, with the count in the output and in the
manifest's ``val_disjointness`` (``--keep-val-copies`` keeps them, for a byte-exact rebuild of an upstream export
that had them; the manifest then counts them as validation documents in training). The manifest also records
every shard's sha256 (the run manifests name them).

The build is staged in a hidden folder inside OUT and moved into place (a few renames) only once the tokenizer and
every shard are written; the manifest is written last, atomically. A build that fails or is interrupted before
then (bad input, full disk, Ctrl-C or SIGTERM during the export) leaves OUT as it was; the staging folder of a
build that was killed outright (SIGKILL, power loss) is removed by the next build into OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from pgolf_lit.data.caseops import (
    OPERATORS,
    RESERVED_SUFFIX,
    TRANSFORM_NAME,
    encode_caseops,
    find_operator,
    is_caseops_tokenizer,
    original_byte_counts,
)
from pgolf_lit.data.corpus import embedded_corpus, split_paragraphs
from pgolf_lit.data.file_hashes import sha256_files
from pgolf_lit.data.shards import MAX_VOCAB, byte_sidecar_name, shard_name
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.data.tokenizer import file_sha256, load_tokenizer, pieces_sha256
from pgolf_lit.data.tokenizer_train import encode_with_surfaces, train_tokenizer
from pgolf_lit.errors import DataError, PgolfError
from pgolf_lit.fileio import atomic_write_text

DEFAULT_NAME = "fineweb10B"
DEFAULT_SHARD_TOKENS = 100_000_000
OFFICIAL_VAL_DOCS = 50_000
ENCODE_BATCH_DOCS = 1024  # upstream MATCHED_FINEWEB_SP_BATCH_SIZE default
TXT_MODES = ("paragraphs", "file")
INPUT_SUFFIXES = (".txt", ".jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Documents


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


def iter_txt_texts(path: Path, txt_mode: str) -> Iterator[str]:
    """A .txt file as documents: each blank-line-separated paragraph (``paragraphs``) or the whole file (``file``)."""
    text = _read_text(path)
    if txt_mode == "file":
        yield text
    else:
        yield from split_paragraphs(text)


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


# ---------------------------------------------------------------------------------------------------------------
# Encoding and shard writing


def encode_documents(sp, texts: list[str], vocab_size: int, num_threads: int) -> np.ndarray:
    """``[BOS] + ids`` for each raw text, concatenated, as uint16; every id is checked to be below ``vocab_size``.

    The raw text goes to the encoder (no strip, no NUL replacement), as upstream: the tokenizer's own
    normalization is the only one.
    """
    return _with_bos(sp, sp.encode(texts, out_type=int, num_threads=num_threads), vocab_size)


def _with_bos(sp, encoded: list[list[int]], vocab_size: int) -> np.ndarray:
    """The documents' ids, each after a BOS, concatenated as uint16 (ids checked against ``vocab_size``)."""
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    doc_starts = np.cumsum(lengths) - lengths
    tokens = np.empty(int(lengths.sum()), dtype=np.int64)
    is_body = np.ones(tokens.size, dtype=bool)
    is_body[doc_starts] = False
    tokens[doc_starts] = sp.bos_id()
    body = itertools.chain.from_iterable(encoded)
    tokens[is_body] = np.fromiter(body, dtype=np.int64, count=tokens.size - len(encoded))
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        bad = int(tokens[(tokens < 0) | (tokens >= vocab_size)][0])
        raise DataError(f"token id {bad} outside the tokenizer's declared vocab_size {vocab_size}")
    return tokens.astype(np.uint16)


def encode_caseops_documents(
    sp, texts: list[str], vocab_size: int, num_threads: int, *, with_bytes: bool, first_index: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """``[BOS] + encode(encode_caseops(text))`` for each text (PR #1855 prepare_caseops_data.py), and with
    ``with_bytes`` the byte sidecar of those tokens: 0 for BOS, then each token's original UTF-8 bytes.

    Both come from one encoding of each text (ids and surfaces together), so they are aligned by construction.
    ``first_index`` numbers the documents in error messages.
    """
    transformed = [encode_caseops(text) for text in texts]
    if not with_bytes:
        return encode_documents(sp, transformed, vocab_size, num_threads), None
    pieces = encode_with_surfaces(sp, transformed, num_threads)
    tokens = _with_bos(sp, [ids for ids, _ in pieces], vocab_size)
    counts = np.zeros(tokens.size, dtype=np.int64)
    position = 0
    for k, (ids, surfaces) in enumerate(pieces):
        doc_counts = original_byte_counts(surfaces)
        if doc_counts and max(doc_counts) > np.iinfo(np.uint16).max:
            raise DataError(
                f"document {first_index + k}: one token covers {max(doc_counts)} bytes of text, more than a uint16 "
                f"byte-sidecar entry holds"
            )
        counts[position + 1 : position + 1 + len(ids)] = doc_counts
        position += 1 + len(ids)
    return tokens, counts.astype(np.uint16)


class ShardWriter:
    """Buffers one split's token stream and writes a ``fineweb_<split>_NNNNNN.bin`` shard every ``shard_tokens``.

    With ``byte_sidecar`` a parallel stream of per-token byte counts is written alongside, shard for shard, as
    ``fineweb_val_bytes_NNNNNN.bin`` (same format; PR #1855 prepare_caseops_data.py).
    """

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, *, byte_sidecar: bool = False):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.buffer = np.empty(shard_tokens, dtype=np.uint16)  # pages are only touched as they fill
        self.byte_buffer = np.empty(shard_tokens, dtype=np.uint16) if byte_sidecar else None
        self.fill = 0
        self.files = 0
        self.tokens = 0

    def append(self, tokens: np.ndarray, byte_counts: np.ndarray | None = None) -> None:
        if (byte_counts is None) != (self.byte_buffer is None) or (
            byte_counts is not None and byte_counts.size != tokens.size
        ):
            raise ValueError("byte counts must be given exactly when the writer has a sidecar, one per token")
        position = 0
        while position < tokens.size:
            take = min(self.shard_tokens - self.fill, tokens.size - position)
            self.buffer[self.fill : self.fill + take] = tokens[position : position + take]
            if byte_counts is not None:
                self.byte_buffer[self.fill : self.fill + take] = byte_counts[position : position + take]
            self.fill += take
            position += take
            if self.fill == self.shard_tokens:
                self.flush()
        self.tokens += tokens.size

    def flush(self) -> None:
        if self.fill:
            write_shard(self.out_dir / shard_name(self.split, self.files), self.buffer[: self.fill])
            if self.byte_buffer is not None:
                write_shard(self.out_dir / byte_sidecar_name(self.files), self.byte_buffer[: self.fill])
            self.files += 1
            self.fill = 0


def _batched(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    while batch := list(itertools.islice(texts, size)):
        yield batch


def export_shards(
    source: DocumentSource,
    sp,
    out_dir: Path,
    *,
    num_docs: int,
    val_docs: int,
    vocab_size: int,
    shard_tokens: int,
    num_threads: int,
    progress: bool,
    caseops: bool = False,
    leave_out: frozenset[int] = frozenset(),
) -> dict[str, int]:
    """Encode every document into val then train shards under ``out_dir``; return upstream's ``stats`` dict.

    With ``caseops`` every text is CaseOps-encoded first, and the val split gets its byte sidecar. ``leave_out``:
    indices of training documents not to write (the training copies of validation documents).
    """
    from tqdm.auto import tqdm

    documents = iter(source)
    train_docs = (text for index, text in enumerate(documents, start=val_docs) if index not in leave_out)
    stats: dict[str, int] = {}
    total = num_docs - len(leave_out)
    with tqdm(total=total, unit="doc", desc=f"tokenizing {out_dir.name}", disable=not progress) as bar:
        for split, split_docs in (("val", itertools.islice(documents, val_docs)), ("train", train_docs)):
            sidecar = caseops and split == "val"
            writer = ShardWriter(out_dir, split, shard_tokens, byte_sidecar=sidecar)
            doc_count = 0
            for batch in _batched(split_docs, ENCODE_BATCH_DOCS):
                if caseops:
                    writer.append(
                        *encode_caseops_documents(
                            sp,
                            batch,
                            vocab_size,
                            num_threads,
                            with_bytes=sidecar,
                            first_index=doc_count,
                        )
                    )
                else:
                    writer.append(encode_documents(sp, batch, vocab_size, num_threads))
                doc_count += len(batch)
                bar.update(len(batch))
            writer.flush()
            stats.update({f"docs_{split}": doc_count, f"files_{split}": writer.files, f"tokens_{split}": writer.tokens})
    for key in ("docs", "files", "tokens"):
        stats[f"{key}_total"] = stats[f"{key}_val"] + stats[f"{key}_train"]
    if stats["docs_total"] + len(leave_out) != num_docs:
        raise DataError(
            f"the inputs changed while building: counted {num_docs} documents, encoded {stats['docs_total']}"
            + (f" and left out {len(leave_out)}" if leave_out else "")
        )
    return {k: stats[k] for k in sorted(stats)}


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def _prepare_tokenizer(
    source: DocumentSource,
    vocab_size: int,
    model_prefix: Path,
    *,
    reuse_path: Path | None,
    train_docs: int | None,
    num_threads: int,
    caseops: bool = False,
) -> Path:
    """Copy a given model (and its .vocab) to ``model_prefix``, or train one there; check its vocabulary size.

    With ``caseops`` the tokenizer is trained on CaseOps-encoded text with the four operators reserved as
    user-defined pieces 4..7 (PR #1855 download_hf_docs_and_tokenize.py, ``reserve_text_transform_controls``),
    and a given model must be such a tokenizer; a plain build refuses one.
    """
    model_path = model_prefix.with_suffix(".model")
    if reuse_path is not None:
        given = load_tokenizer(reuse_path, vocab_size)  # a clear error for a missing file or a vocab-size mismatch
        if caseops and not is_caseops_tokenizer(given):
            pieces = [given.id_to_piece(i) for i in range(4, min(8, given.vocab_size()))]
            raise DataError(
                f"{reuse_path}: not a CaseOps tokenizer: pieces 4..7 are {pieces}, a --caseops build needs the "
                f"operators U+E001..U+E004 there (train one with --caseops, without --tokenizer)"
            )
        if not caseops and is_caseops_tokenizer(given):
            raise DataError(
                f"{reuse_path}: a CaseOps tokenizer (pieces 4..7 are the operators U+E001..U+E004): pass --caseops, "
                f"or its documents would not be CaseOps-encoded"
            )
        model_prefix.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(reuse_path, model_path)
        if reuse_path.with_suffix(".vocab").is_file():
            shutil.copyfile(reuse_path.with_suffix(".vocab"), model_prefix.with_suffix(".vocab"))
        return model_path
    texts = itertools.islice(source, train_docs) if train_docs is not None else iter(source)
    overrides = {}
    if caseops:
        texts = map(encode_caseops, texts)
        overrides["user_defined_symbols"] = list(OPERATORS)
    try:
        # minloglevel=1 keeps SentencePiece's warnings (e.g. skipped over-long documents) but not its info flood.
        train_tokenizer(texts, vocab_size, model_prefix, num_threads=num_threads, minloglevel=1, **overrides)
    except RuntimeError as e:  # SentencePiece reports bad settings for this text as a one-line RuntimeError
        raise DataError(f"SentencePiece training failed for vocab_size {vocab_size}: {e}") from None
    learned = load_tokenizer(model_path).vocab_size()
    if learned != vocab_size:
        raise DataError(
            f"the input text only supports {learned} SentencePiece pieces, fewer than --vocab-size {vocab_size}: "
            f"give more text or a smaller vocabulary"
        )
    if caseops and not is_caseops_tokenizer(load_tokenizer(model_path)):
        raise DataError(f"{model_path}: SentencePiece did not put the CaseOps operators at ids 4..7")
    return model_path


# ---------------------------------------------------------------------------------------------------------------
# Manifest


def recommended_bigram_vocab_size(vocab_size: int) -> int:
    return ((vocab_size + 127) // 128) * 128 * 5


def _merge_entries(existing: list, new_entry: dict) -> list:
    """Existing manifest entries with the new one replacing any of the same name (other variants are kept)."""
    kept = [e for e in existing if isinstance(e, dict) and e.get("name") != new_entry["name"]]
    return kept + [new_entry]


def _read_existing_manifest(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        existing = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # an unreadable manifest in our own output folder is replaced, not merged
    return existing if isinstance(existing, dict) else {}


def _build_manifest(
    existing: dict,
    *,
    source: DocumentSource,
    dataset_name: str,
    vocab_size: int,
    val_docs: int,
    shard_tokens: int,
    model_path: Path,
    vocab_file: Path | None,
    reuse_path: Path | None,
    train_docs: int | None,
    stats: dict[str, int],
    sp,
    tokenizer_name: str,
    caseops: bool = False,
    disjointness: dict | None = None,
    shard_sha256: dict[str, str] | None = None,
) -> dict:
    """The upstream manifest (download_hf_docs_and_tokenize.py ``main``); paths relative to the output root, other
    variants kept.

    A CaseOps build adds the fields of PR #1855 download_hf_docs_and_tokenize.py: ``text_transform`` and
    ``reserve_text_transform_controls`` on the tokenizer, ``val_bytes_glob`` on the dataset. pgolf adds, per
    dataset, ``val_disjointness`` (what the build did with training copies of validation documents) and
    ``sha256`` (of every shard it wrote, by file name).
    """
    spec: dict = {
        "name": tokenizer_name,
        "kind": "sentencepiece_bpe",
        "vocab_size": vocab_size,
        "dataset_suffix": variant_names("", vocab_size, caseops).suffix,
    }
    transform = {"text_transform": TRANSFORM_NAME, "reserve_text_transform_controls": True} if caseops else {}
    spec.update(transform)
    if train_docs is not None:
        spec["tokenizer_train_docs"] = train_docs
    if reuse_path is not None:
        spec["reuse_model_path"] = str(reuse_path)
    ids = {
        "vocab_size": vocab_size,
        "bos_id": int(sp.bos_id()),
        "eos_id": int(sp.eos_id()),
        "recommended_bigram_vocab_size": recommended_bigram_vocab_size(vocab_size),
    }
    tokenizer_entry = {
        "name": tokenizer_name,
        "kind": "sentencepiece_bpe",
        **ids,
        "source_spec": spec,
        "model_path": f"tokenizers/{model_path.name}",
        **({"vocab_path": f"tokenizers/{vocab_file.name}"} if vocab_file is not None else {}),
        "sha256": file_sha256(model_path),
        "pieces_sha256": pieces_sha256(sp),  # checked when a dataset is loaded (check_tokenizer_matches_dataset)
        **transform,
    }
    dataset_path = f"datasets/{dataset_name}"
    dataset_entry = {
        "name": dataset_name,
        "tokenizer_name": tokenizer_name,
        "tokenizer_kind": "sentencepiece_bpe",
        "path": dataset_path,
        "train_glob": f"{dataset_path}/fineweb_train_*.bin",
        "val_glob": f"{dataset_path}/fineweb_val_*.bin",
        **({"val_bytes_glob": f"{dataset_path}/fineweb_val_bytes_*.bin"} if caseops else {}),
        **ids,
        "stats": stats,
        **({"val_disjointness": disjointness} if disjointness is not None else {}),
        **({"sha256": shard_sha256} if shard_sha256 is not None else {}),
    }
    return {
        "version": "10B",
        "num_docs": stats["docs_total"],
        "num_val_docs": val_docs,
        "shuffle_seed": None,
        "shard_size": shard_tokens,
        "append_eos": False,
        "docs_jsonl": None,  # built from local inputs, listed in docs_meta.sources; there is no docs_selected.jsonl
        "docs_meta": {
            "remote_repo_id": None,
            "remote_root": None,
            "num_docs": stats["docs_total"],
            "docs_sha256": None,
            "source_manifest": None,
            "sources": source.describe(),
        },
        "tokenizer_specs": _merge_entries(existing.get("tokenizer_specs", []), spec),
        "tokenizers": _merge_entries(existing.get("tokenizers", []), tokenizer_entry),
        "datasets": _merge_entries(existing.get("datasets", []), dataset_entry),
    }


# ---------------------------------------------------------------------------------------------------------------
# Build


_STAGING_PREFIX = ".pgolf-build-"


def _owner_tag() -> str:
    """Host and process of a staging folder's name, so a later build can tell a dead build's folder from a live one."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete the staging folders (and renamed-away old outputs) in ``out_dir`` left by builds on this host whose
    process no longer runs (killed with SIGKILL, or the machine went down); returns what was removed."""
    host = socket.gethostname().replace("-", "_")
    candidates = list(out_dir.glob(f"{_STAGING_PREFIX}*"))
    candidates += [p for sub in ("datasets", "tokenizers") for p in (out_dir / sub).glob(".*.old-*")]
    removed = []
    for path in candidates:
        tag = (
            path.name[len(_STAGING_PREFIX) :]
            if path.name.startswith(_STAGING_PREFIX)
            else f"{host}-" + path.name.rsplit(".old-", 1)[-1] + "-"
        )
        owner_host, _, rest = tag.partition("-")
        pid = rest.split("-", 1)[0]
        if owner_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class _Terminated(BaseException):
    """SIGTERM inside a build: unwinds it like Ctrl-C (its cleanup runs), then the signal is delivered again."""


@contextlib.contextmanager
def _terminate_after_cleanup():
    """While the build runs, SIGTERM (a scheduler's stop, ``kill``) raises, so the ``finally`` that removes the
    staging folder runs; the process then ends by the signal as it would have (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # a handler that chose not to end the process
    finally:
        signal.signal(signal.SIGTERM, previous)


def _move_into_place(staged: Path, final: Path) -> None:
    """Replace ``final`` (a file or a folder) by ``staged``; an old folder is renamed away before it is deleted."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old)
    else:
        os.replace(staged, final)


def build_dataset(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    name: str = DEFAULT_NAME,
    val_docs: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_path: str | os.PathLike | None = None,
    tokenizer_train_docs: int | None = None,
    txt_mode: str = "paragraphs",
    embedded: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
    caseops: bool = False,
    keep_val_copies: bool = False,
) -> dict:
    """Build ``out_dir`` (tokenizer, val/train shards, manifest.json) from text inputs; return the manifest.

    ``inputs``: .txt/.jsonl files or folders of them; ``embedded`` appends the built-in corpus (corpus.py), so
    ``build_dataset([], 1024, "data", embedded=True)`` works offline. ``val_docs`` defaults to the validation size
    that the first input's source manifest declares (as upstream), else ``default_val_docs(number of documents)``.
    ``tokenizer_path`` reuses a SentencePiece model instead of training. ``tokenizer_train_docs`` limits tokenizer
    training to the first N documents (as upstream's option).

    ``caseops`` builds the PR #1855 CaseOps variant: documents are CaseOps-encoded (caseops.py) before
    tokenization, the tokenizer reserves the operators, names carry ``_lossless_caps_caseops_v1_reserved``, and
    the val split gets its byte sidecar ``fineweb_val_bytes_NNNNNN.bin``.

    A smaller ``val_docs`` than the source manifest declares stops the build before anything is written. A training
    document whose text repeats a validation document is left out of the training split (the count is the
    manifest's ``val_disjointness``), unless ``keep_val_copies`` (a byte-exact rebuild of an upstream export that
    had such copies: the manifest then says how many validation documents are in training).
    """
    out_dir = Path(out_dir)
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise DataError(f"vocab_size {vocab_size}: shard tokens are uint16, so the vocabulary must be 1..{MAX_VOCAB}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens {shard_tokens}: must be positive")
    reuse_path = Path(tokenizer_path) if tokenizer_path is not None else None
    files = find_input_files(inputs)
    if not files and not embedded:
        listed = ", ".join(str(i) for i in inputs) or "none given"
        raise DataError(f"no input files: expected .txt or .jsonl files (inputs: {listed}), or use --embedded")
    source = DocumentSource(files, txt_mode=txt_mode, embedded=embedded)
    declared = declared_val_docs(files)
    if declared is not None and val_docs is not None and val_docs < declared[1]:
        raise DataError(
            f"val_docs {val_docs}: {declared[0]} declares the first {declared[1]} documents the validation set, so "
            f"{declared[1] - val_docs} validation documents would land in training; pass --val-docs {declared[1]} "
            f"or more"
        )
    if val_docs is None and declared is not None:
        val_docs = declared[1]
    scan = scan_documents(source, val_cap=val_docs if val_docs is not None else OFFICIAL_VAL_DOCS, caseops=caseops)
    num_docs = scan.num_docs
    if not scan.any_text:
        raise DataError(f"empty text set: the inputs ({', '.join(source.describe())}) hold no non-blank text")
    val_docs = default_val_docs(num_docs) if val_docs is None else val_docs
    if not 1 <= val_docs < num_docs:
        raise DataError(
            f"val_docs {val_docs}: the inputs hold {num_docs} documents; the validation split needs at least 1 and "
            f"must leave at least 1 for training"
        )
    copies = scan.train_copies_of_val(val_docs)
    disjointness = disjointness_entry(copies, kept=keep_val_copies)
    leave_out = frozenset() if keep_val_copies else frozenset(index for index, _, _ in copies)
    threads = num_threads or os.cpu_count() or 1
    names = variant_names(name, vocab_size, caseops)

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    with _terminate_after_cleanup():
        return _build_staged(
            out_dir,
            source,
            vocab_size,
            names,
            reuse_path=reuse_path,
            tokenizer_train_docs=tokenizer_train_docs,
            threads=threads,
            num_docs=num_docs,
            val_docs=val_docs,
            shard_tokens=shard_tokens,
            progress=progress,
            caseops=caseops,
            disjointness=disjointness,
            leave_out=leave_out,
        )


def _build_staged(
    out_dir,
    source,
    vocab_size,
    names,
    *,
    reuse_path,
    tokenizer_train_docs,
    threads,
    num_docs,
    val_docs,
    shard_tokens,
    progress,
    caseops,
    disjointness,
    leave_out,
) -> dict:
    """``build_dataset`` after its checks: everything is written into a staging folder, then moved into place."""
    dataset_name, model_name = names.dataset, names.model
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX + _owner_tag(), dir=out_dir))
    try:
        model_path = _prepare_tokenizer(
            source,
            vocab_size,
            staging / "tokenizers" / model_name,
            reuse_path=reuse_path,
            train_docs=tokenizer_train_docs,
            num_threads=threads,
            caseops=caseops,
        )
        sp = load_tokenizer(model_path, vocab_size)
        if sp.bos_id() < 0:
            raise DataError(
                f"{reuse_path or model_path}: the tokenizer has no BOS piece; every document starts with one"
            )
        staged_dataset = staging / "datasets" / dataset_name
        staged_dataset.mkdir(parents=True)
        stats = export_shards(
            source,
            sp,
            staged_dataset,
            num_docs=num_docs,
            val_docs=val_docs,
            vocab_size=vocab_size,
            shard_tokens=shard_tokens,
            num_threads=threads,
            progress=progress,
            caseops=caseops,
            leave_out=leave_out,
        )
        # Hashed here, once: the run manifests name every shard's sha256 (file_hashes caches them by identity,
        # which the renames below keep).
        shard_hashes = sha256_files(sorted(staged_dataset.iterdir()))
        vocab_file = model_path.with_suffix(".vocab")
        manifest_path = out_dir / "manifest.json"
        manifest = _build_manifest(
            _read_existing_manifest(manifest_path),
            source=source,
            dataset_name=dataset_name,
            vocab_size=vocab_size,
            val_docs=val_docs,
            shard_tokens=shard_tokens,
            model_path=model_path,
            vocab_file=vocab_file if vocab_file.is_file() else None,
            reuse_path=reuse_path,
            train_docs=tokenizer_train_docs,
            stats=stats,
            sp=sp,
            tokenizer_name=names.tokenizer,
            caseops=caseops,
            disjointness=disjointness,
            shard_sha256={path.name: digest for path, digest in shard_hashes.items()},
        )
        for artifact in (model_path, vocab_file):  # a reused model without .vocab must not keep a stale one
            final = out_dir / "tokenizers" / artifact.name
            if artifact.is_file():
                _move_into_place(artifact, final)
            else:
                final.unlink(missing_ok=True)
        final_dataset = out_dir / "datasets" / dataset_name
        _move_into_place(staged_dataset, final_dataset)
        sha256_files(final_dataset / p.name for p in shard_hashes)  # no hashing: the cache learns the new paths
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


class VariantNames(NamedTuple):
    suffix: str  # upstream dataset_suffix: sp<V>, or sp<V>_lossless_caps_caseops_v1_reserved
    dataset: str  # <name>_<suffix>
    model: str  # tokenizer file stem: fineweb_<V>_bpe[_lossless_caps_caseops_v1_reserved]
    tokenizer: str  # manifest tokenizer name: sp_bpe_<V>[_lossless_caps_caseops_v1_reserved]


def variant_names(name: str, vocab_size: int, caseops: bool = False) -> VariantNames:
    """The upstream names of a build's dataset and tokenizer (the CaseOps ones as the public CaseOps export)."""
    tail = f"_{RESERVED_SUFFIX}" if caseops else ""
    return VariantNames(
        f"sp{vocab_size}{tail}",
        f"{name}_sp{vocab_size}{tail}",
        f"fineweb_{vocab_size}_bpe{tail}",
        f"sp_bpe_{vocab_size}{tail}",
    )


def build_embedded_dataset(
    dataset_dir: str | os.PathLike,
    vocab_size: int,
    *,
    shard_tokens: int = 100_000,
    progress: bool = True,
    caseops: bool | None = None,
) -> dict:
    """Build the embedded corpus so that ``dataset_dir`` (``<root>/datasets/<name>_sp<V>``) holds its shards.

    For a data module that is pointed at a dataset folder and wants it created offline on first use; the tokenizer
    lands in ``<root>/tokenizers/`` as usual. The small default shard size splits the ~0.5M training tokens into
    several shards, so the shuffled and coprime loaders have shards to mix and to share among ranks.

    ``caseops`` builds the CaseOps variant (folder ``<name>_sp<V>_lossless_caps_caseops_v1_reserved``, tokenizer
    ``fineweb_<V>_bpe_lossless_caps_caseops_v1_reserved.model``, val byte sidecar): a tiny twin of the PR #1855 data.
    By default it follows the folder name, so a data module pointed at a CaseOps folder gets CaseOps data.
    """
    dataset_dir = Path(dataset_dir)
    if caseops is None:
        caseops = dataset_dir.name.endswith(variant_names("", vocab_size, True).dataset)
    suffix = variant_names("", vocab_size, caseops).dataset
    if dataset_dir.parent.name != "datasets" or not dataset_dir.name.endswith(suffix) or dataset_dir.name == suffix:
        raise DataError(f"{dataset_dir}: expected a dataset folder named <root>/datasets/<name>{suffix}")
    return build_dataset(
        [],
        vocab_size,
        dataset_dir.parent.parent,
        name=dataset_dir.name[: -len(suffix)],
        embedded=True,
        shard_tokens=shard_tokens,
        progress=progress,
        caseops=caseops,
    )


# ---------------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf data build",
        description=(
            "Tokenize text into upstream-format token shards: train a SentencePiece BPE tokenizer with the official "
            "export settings, write OUT/tokenizers/fineweb_<V>_bpe.model, OUT/datasets/<name>_sp<V>/fineweb_"
            "{val,train}_NNNNNN.bin and OUT/manifest.json. Each document is [BOS] + its tokens (no EOS); the first "
            "--val-docs documents are the validation split, and training copies of them are dropped."
        ),
    )
    parser.add_argument(
        "--input",
        dest="inputs",
        action="extend",
        nargs="+",
        default=[],
        metavar="PATH",
        help='a .jsonl file (one JSON object per line, its "text" is one document), a .txt file (see --txt-mode), '
        "or a folder searched recursively for both; repeatable. Documents are read in the order given.",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        help="add the built-in offline corpus (Python's own documentation, ~0.5M tokens at V=1024)",
    )
    parser.add_argument("--vocab-size", type=int, required=True, help="SentencePiece vocabulary size V (<= 65536)")
    parser.add_argument("--out", required=True, help="output root (the data root the loaders and records read)")
    parser.add_argument(
        "--val-docs",
        type=int,
        default=None,
        help=f"validation documents, taken from the start (default: docs_val of the first input's "
        f"<stem>.source_manifest.json, else {OFFICIAL_VAL_DOCS}, at most a tenth of the documents)",
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help="tokens per shard (default 100,000,000, as upstream)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        metavar="MODEL",
        help="reuse this SentencePiece .model (and its .vocab, if beside it) instead of training one",
    )
    parser.add_argument(
        "--tokenizer-train-docs",
        type=int,
        default=None,
        metavar="N",
        help="train the tokenizer on the first N documents only (default: all)",
    )
    parser.add_argument(
        "--txt-mode",
        choices=TXT_MODES,
        default="paragraphs",
        help="how a .txt file splits into documents: 'paragraphs' (default) makes each blank-line-"
        "separated block a document; 'file' makes the whole file one document (SentencePiece "
        "leaves documents over 4192 bytes out of tokenizer training, but still encodes them)",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help="dataset name prefix (default fineweb10B)")
    parser.add_argument(
        "--caseops",
        action="store_true",
        help="the PR #1855 CaseOps variant: rewrite capitalization into operator characters "
        "(lossless_caps_caseops_v1) before tokenizing, reserve the operators as pieces 4..7, and "
        "write the val byte sidecar fineweb_val_bytes_NNNNNN.bin (original UTF-8 bytes per token)",
    )
    parser.add_argument(
        "--keep-val-copies",
        action="store_true",
        help="keep training documents whose text repeats a validation document (default: drop them and say how "
        "many); only for a byte-exact rebuild of an upstream export that had them: pgolf record refuses runs on "
        "such data",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    manifest = build_dataset(
        args.inputs,
        args.vocab_size,
        args.out,
        name=args.name,
        val_docs=args.val_docs,
        shard_tokens=args.shard_tokens,
        tokenizer_path=args.tokenizer,
        tokenizer_train_docs=args.tokenizer_train_docs,
        txt_mode=args.txt_mode,
        embedded=args.embedded,
        progress=args.progress,
        caseops=args.caseops,
        keep_val_copies=args.keep_val_copies,
    )
    name = variant_names(args.name, args.vocab_size, args.caseops).dataset
    dataset = next(d for d in manifest["datasets"] if d["name"] == name)
    s = dataset["stats"]
    print(
        f"{Path(args.out) / dataset['path']}: {s['docs_val']} val docs / {s['tokens_val']} tokens in {s['files_val']} "
        f"shard(s), {s['docs_train']} train docs / {s['tokens_train']} tokens in {s['files_train']} shard(s); "
        f"manifest {Path(args.out) / 'manifest.json'}"
    )
    print(disjointness_line(dataset["val_disjointness"]))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PgolfError as e:
        sys.exit(f"error: {e}")
