"""The upstream token-shard format: read (memory-mapped) and validate; written by ``shards_write.py`` (atomically).

A shard is a 1024-byte header of 256 little-endian int32 words (magic 20240520, version 1, token count N,
then zeros) followed by N little-endian uint16 tokens; the file size is exactly 1024 + 2N. Datasets live in
``<root>/datasets/<name>/fineweb_{train,val}_NNNNNN.bin`` (upstream train_gpt.py ``load_data_shard``,
data/cached_challenge_fineweb.py).

A CaseOps dataset (PR #1855) also has a byte sidecar ``fineweb_val_bytes_NNNNNN.bin`` per val shard: the same
format, one entry per val token, the number of bytes of the original text that token covers (0 for BOS).
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from pgolf_lit.errors import DataError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_VOCAB = 1 << 16


BYTE_SIDECAR_MARK = "_bytes_"


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def byte_sidecar_name(index: int) -> str:
    """The byte sidecar of val shard ``index`` (PR #1855 prepare_caseops_data.py)."""
    return f"fineweb_val{BYTE_SIDECAR_MARK}{index:06d}.bin"


def read_num_tokens(path: str | os.PathLike) -> int:
    """Validate the header and the file size of a shard; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise DataError(f"{path}: shard file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: expected a shard file, found a directory") from None
    if len(head) < HEADER_BYTES:  # checked before parsing: a size that is no multiple of 4 does not parse as int32
        raise DataError(f"{path}: unexpected shard header: file has {size} bytes, a header needs {HEADER_BYTES}")
    header = np.frombuffer(head, dtype="<i4")
    if int(header[0]) != SHARD_MAGIC:
        raise DataError(f"{path}: unexpected shard header: magic {int(header[0])}, expected {SHARD_MAGIC}")
    if int(header[1]) != SHARD_VERSION:
        raise DataError(f"{path}: unexpected shard header: version {int(header[1])}, expected {SHARD_VERSION}")
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        raise DataError(
            f"{path}: shard size mismatch: header says {num_tokens} tokens, so {expected} bytes expected, "
            f"file has {size} bytes (truncated or corrupted)"
        )
    return num_tokens


def load_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a validated shard's tokens as a read-only little-endian uint16 array.

    With ``vocab_size`` every token is checked to be < vocab_size (one pass over the shard).
    """
    path = Path(path)
    num_tokens = read_num_tokens(path)
    if num_tokens == 0:
        tokens = np.zeros(0, dtype="<u2")
    else:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if vocab_size is not None and num_tokens:
        check_token_range(tokens, vocab_size, path)
    return tokens


@lru_cache(maxsize=1024)
def _max_token(path: str, mtime_ns: int, size: int) -> int:
    # Keyed on mtime and size so a rewritten shard is checked again; one pass per shard per process.
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES)
    return int(tokens.max()) if tokens.size else -1


def check_token_range(tokens: np.ndarray, vocab_size: int, path: str | os.PathLike) -> None:
    st = os.stat(path)
    top = _max_token(str(path), st.st_mtime_ns, st.st_size)
    if top >= vocab_size:
        first = int(np.argmax(np.asarray(tokens) >= vocab_size))
        raise DataError(
            f"{path}: token id {top} at or above vocab_size {vocab_size} (first at index {first}); "
            f"the shards were made with another tokenizer than the model's vocab_size expects"
        )


def list_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Sorted ``fineweb_<split>_*.bin`` token shards of a dataset directory (byte sidecars ``fineweb_val_bytes_*``
    excluded, as PR #1855 train_gpt.py does); a clear error when there are none."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: dataset directory not found (expected fineweb_{split}_*.bin shards in it)")
    files = sorted(f for f in data_dir.glob(f"fineweb_{split}_*.bin") if BYTE_SIDECAR_MARK not in f.name)
    if not files:
        raise DataError(f"{data_dir}: no {split} shards matching fineweb_{split}_*.bin")
    return files


def load_validation_tokens(data_dir: str | os.PathLike, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """All val shards concatenated in name order, trimmed to ``floor((N-1)/seq_len)*seq_len + 1`` tokens.

    Returned as an int64 CPU tensor (the val split is small: 62M tokens for sp1024).
    """
    files = list_shards(data_dir, "val")
    parts = [np.asarray(load_shard(f, vocab_size)) for f in files]
    tokens = np.concatenate(parts) if len(parts) > 1 else parts[0]
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise DataError(
            f"{data_dir}: the validation split has {tokens.size} tokens, shorter than one sequence of "
            f"{seq_len} + 1 tokens"
        )
    return torch.from_numpy(tokens[: usable + 1].astype(np.int64))


def load_validation_byte_sidecar(data_dir: str | os.PathLike, num_tokens: int, *, bos_id: int = 1) -> torch.Tensor:
    """The CaseOps byte sidecar aligned with ``load_validation_tokens``: an int32 CPU tensor of its first
    ``num_tokens`` entries (pass ``val_tokens.numel()``), entry p = original UTF-8 bytes of val token p
    (PR #1855 train_gpt.py ``load_validation_byte_sidecar``).

    Every ``fineweb_val_bytes_NNNNNN.bin`` must pair with ``fineweb_val_NNNNNN.bin``, pass the shard checks, hold
    one entry per token of its shard, and give every BOS 0 bytes; otherwise a ``DataError`` naming the file.
    """
    data_dir = Path(data_dir)
    token_files = list_shards(data_dir, "val")
    sidecars = sorted(data_dir.glob(f"fineweb_val{BYTE_SIDECAR_MARK}*.bin"))
    if not sidecars:
        raise DataError(
            f"{data_dir}: no byte sidecar fineweb_val_bytes_*.bin; a CaseOps dataset needs it to count the original "
            f"text's bytes (rebuild with pgolf data build --caseops, or download --variant sp8192_caseops)"
        )
    expected = [f.with_name(f.name.replace("fineweb_val_", f"fineweb_val{BYTE_SIDECAR_MARK}", 1)) for f in token_files]
    for token_file, sidecar in zip(token_files, expected):
        if not sidecar.is_file():
            raise DataError(f"{sidecar}: byte sidecar missing for val shard {token_file.name}")
    if len(sidecars) != len(expected):
        extra = sorted(set(sidecars) - set(expected))[0]
        raise DataError(f"{extra}: byte sidecar without a matching val shard {extra.name.replace('_bytes', '', 1)}")
    parts = []
    for token_file, sidecar in zip(token_files, expected):
        counts = load_shard(sidecar)
        tokens = load_shard(token_file)
        if counts.size != tokens.size:
            raise DataError(
                f"{sidecar}: byte sidecar has {counts.size} entries, its val shard {token_file.name} has {tokens.size} "
                f"tokens; they must align one to one"
            )
        bos = np.asarray(tokens) == bos_id
        if bos.any() and int(np.asarray(counts)[bos].max()) != 0:
            first = int(np.flatnonzero(bos & (np.asarray(counts) != 0))[0])
            raise DataError(
                f"{sidecar}: entry {first} is {int(counts[first])}, but token {first} of {token_file.name} is BOS, "
                f"which covers 0 bytes (sidecar corrupted or not made for these shards)"
            )
        parts.append(counts)
    total = sum(p.size for p in parts)
    if total < num_tokens:
        raise DataError(
            f"{data_dir}: the byte sidecars hold {total} entries, fewer than the {num_tokens} validation tokens"
        )
    counts = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return torch.from_numpy(counts[:num_tokens].astype(np.int32))
