"""SentencePiece tokenizers: load with checks, build byte LUTs (training them: ``tokenizer_train.py``).

The byte LUTs turn token-level cross entropy into bits per byte (upstream ``build_sentencepiece_luts``, ``eval_val``):
for a scored position with previous token ``u`` and target ``t`` the target is worth
``base_bytes[t] + (has_leading_space[t] and not is_boundary[u])`` UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch

from pgolf_lit.errors import DataError

SPACE = "\u2581"  # SentencePiece's whitespace marker "▁"

BOS_ID = 1


class NoByteFallbackWarning(UserWarning):
    """The tokenizer maps unknown characters to <unk>, which the byte LUTs count as 0 bytes."""


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None):
    """Load a SentencePiece model; check the file exists and, if given, that its vocab equals ``vocab_size``."""
    import sentencepiece as spm

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer model not found")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError with a long C++ message
        raise DataError(f"{path}: not a readable SentencePiece model ({type(e).__name__})") from None
    if vocab_size is not None and sp.vocab_size() != vocab_size:
        raise DataError(
            f"{path}: tokenizer has vocab_size {sp.vocab_size()}, the model config expects vocab_size {vocab_size}"
        )
    return sp


def default_tokenizer_path(data_dir: str | os.PathLike, vocab_size: int) -> Path:
    """The tokenizer of a dataset folder ``<root>/datasets/<name>`` in the upstream layout:
    ``<root>/tokenizers/fineweb_<V>_bpe.model``, or ``fineweb_<V>_bpe_lossless_caps_caseops_v1_reserved.model`` when
    the folder is a CaseOps one (its name ends in ``_lossless_caps_caseops_v1_reserved``, as the public export's)."""
    from pgolf_lit.data.caseops_read import RESERVED_SUFFIX

    data_dir = Path(data_dir)
    tail = f"_{RESERVED_SUFFIX}" if data_dir.name.endswith(f"_sp{vocab_size}_{RESERVED_SUFFIX}") else ""
    return data_dir.parent.parent / "tokenizers" / f"fineweb_{vocab_size}_bpe{tail}.model"


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pieces_sha256(sp) -> str:
    """sha256 of a tokenizer's vocabulary: every id's piece and kind (normal, byte, control, unknown, unused), the
    whole input of the byte LUTs. Unlike the model file's bytes, stable across sentencepiece builds."""
    h = hashlib.sha256()
    for i in range(sp.vocab_size()):
        kind = (
            "byte"
            if sp.is_byte(i)
            else "control"
            if sp.is_control(i)
            else "unknown"
            if sp.is_unknown(i)
            else "unused"
            if sp.is_unused(i)
            else "normal"
        )
        h.update(f"{i}\t{kind}\t{sp.id_to_piece(i)}\n".encode("utf-8"))
    return h.hexdigest()


def check_tokenizer_matches_dataset(sp, tokenizer_path: str | os.PathLike, data_dir: str | os.PathLike) -> None:
    """Refuse a tokenizer other than the one a dataset was built with, when the dataset's manifest
    (``<root>/manifest.json`` beside ``<root>/datasets/<name>``) records its ``pieces_sha256`` (pgolf data build
    writes it; upstream manifests do not, and are not checked): the same vocab size with other pieces would score a
    wrong BPB without a word."""
    import json

    data_dir = Path(data_dir)
    manifest_path = data_dir.parent.parent / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        dataset = next(d for d in manifest["datasets"] if d.get("name") == data_dir.name)
        entry = next(t for t in manifest["tokenizers"] if t.get("name") == dataset["tokenizer_name"])
        expected = entry["pieces_sha256"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return  # no manifest, another layout, or an upstream manifest without the hash: nothing to compare
    got = pieces_sha256(sp)
    if got != expected:
        raise DataError(
            f"{tokenizer_path}: not the tokenizer {data_dir} was built with ({manifest_path} records "
            f"{entry.get('name')!r} with pieces_sha256 {str(expected)[:12]}…, this one has {got[:12]}…); its byte "
            f"counts would give a wrong BPB: use {data_dir.parent.parent / str(entry.get('model_path', 'tokenizers/'))}"
        )


def build_byte_luts(sp, vocab_size: int, *, warn: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(base_bytes int16, has_leading_space bool, is_boundary bool)`` of length max(sp vocab, vocab_size).

    Control, unknown and unused pieces are boundaries worth 0 bytes; a byte-fallback piece is worth 1 byte; any
    other piece is worth the UTF-8 length of its text without one leading "▁", and the "▁" becomes a conditional
    space byte (added unless the previous token is a boundary). Ids past the tokenizer's vocab are boundaries.
    """
    n_sp = sp.vocab_size()
    size = max(n_sp, vocab_size)
    base_bytes = torch.zeros(size, dtype=torch.int16)
    has_leading_space = torch.zeros(size, dtype=torch.bool)
    is_boundary = torch.ones(size, dtype=torch.bool)
    if sp.piece_to_id(SPACE) == sp.unk_id():
        raise DataError(
            f"tokenizer has no standalone '{SPACE}' piece: spaces would be counted as 3 bytes (upstream issue #897)"
        )
    byte_fallback = False
    for i in range(n_sp):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        is_boundary[i] = False
        if sp.is_byte(i):
            base_bytes[i] = 1
            byte_fallback = True
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith(SPACE):
            has_leading_space[i] = True
            piece = piece[1:]
        if SPACE in piece:
            raise DataError(
                f"tokenizer piece {i} {sp.id_to_piece(i)!r} has '{SPACE}' after its first character; "
                f"its space would be counted as 3 bytes"
            )
        base_bytes[i] = len(piece.encode("utf-8"))
    if warn and not byte_fallback:
        warnings.warn(
            "tokenizer has no byte fallback: characters outside its vocabulary become <unk>, which counts 0 bytes, "
            "so bits per byte is flattered",
            NoByteFallbackWarning,
            stacklevel=2,
        )
    return base_bytes, has_leading_space, is_boundary


def validation_byte_counts(sp, vocab_size: int, data_dir: str | os.PathLike, num_tokens: int):
    """The val split's byte accounting (``pgolf_lit.metrics.ByteCounts``): the LUTs, plus the byte sidecar when the
    split has one or the tokenizer is a CaseOps one (PR #1855: its pieces are of the transformed text, so the LUTs
    would count the case operators and overcount; a CaseOps split without its sidecar is an error, never a silent
    fall-back to LUT bytes)."""
    from pgolf_lit.data.caseops_read import is_caseops_tokenizer
    from pgolf_lit.data.shards import BYTE_SIDECAR_MARK, load_validation_byte_sidecar
    from pgolf_lit.metrics import ByteCounts

    caseops = is_caseops_tokenizer(sp)
    luts = build_byte_luts(sp, vocab_size, warn=not caseops)
    has_sidecar = any(Path(data_dir).glob(f"fineweb_val{BYTE_SIDECAR_MARK}*.bin"))
    if not (caseops or has_sidecar):
        return ByteCounts(luts)
    return ByteCounts(luts, load_validation_byte_sidecar(data_dir, num_tokens, bos_id=sp.bos_id()))


def count_bytes(tokens: torch.Tensor, luts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
    """Bytes of every target ``tokens[1:]`` given its previous token (the stream's BPB denominator)."""
    base_bytes, has_leading_space, is_boundary = luts
    prev, tgt = tokens[:-1].long(), tokens[1:].long()
    b = base_bytes[tgt].long() + (has_leading_space[tgt] & ~is_boundary[prev]).long()
    return int(b.sum())
