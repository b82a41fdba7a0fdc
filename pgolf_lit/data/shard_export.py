"""Documents to token shards with upstream's export rules (upstream ``export_shards``).

Each document becomes ``[BOS=1] + encode(raw text)`` with no EOS; the first K documents are the validation split,
the rest the training split; a split change flushes the shard buffer, so the validation data ends on a document
boundary and train shard 0 starts with a BOS; a new shard is started every ``shard_tokens`` tokens, and a document
may continue into the next training shard. A CaseOps build (caseops.py) CaseOps-encodes each document before the
tokenizer sees it, and every val shard gets its byte sidecar ``fineweb_val_bytes_NNNNNN.bin`` (the original UTF-8
bytes of each token; 0 for BOS).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator

import numpy as np

from pgolf_lit.data.caseops import encode_caseops, original_byte_counts
from pgolf_lit.data.documents import DocumentSource
from pgolf_lit.data.shards import byte_sidecar_name, shard_name
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.data.tokenizer_train import encode_with_surfaces
from pgolf_lit.errors import DataError

ENCODE_BATCH_DOCS = 1024  # upstream MATCHED_FINEWEB_SP_BATCH_SIZE default


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
