"""Reading PR #2130/#2135's PGRP v2 artifact (``_unpack_pergroup``): the bounded reader; the writer is
``pergroup_v2.py``, which describes the layout. PR #1855's PGRP (v1) shares its magic: the two are told apart by the
u32 after it (v1: the stream count 9, v2: the version 2).

Frame (little-endian): ``b"PGRP"``, u32 version 2, u32 n; per codes tensor (names sorted): u16 name length, name,
u32 rows, u32 cols, rows × u16 row order (stored raw); u8 method (1 = lrzip, 0 = brotli); u32 size + the codes
stream (every tensor's rows in its order, transposed, concatenated); u32 size + the remainder stream (brotli of the
byte-shuffled ``torch.save({"w": tensors, "m": meta})``).

As for v1, reading never runs pickled code and is bounded: the codes stream must expand to exactly the sizes the
frame lists, lrzip runs with limits, the remainder's zip records are checked against their CRC-32, row orders must
be permutations, and anything malformed raises ``PergroupError`` naming the source.
"""

from __future__ import annotations

import io
import struct
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.errors import PgolfError
from pgolf_lit.eval.context import Weights
from pgolf_lit.quant.brotli_bounded import brotli_decompress_bounded
from pgolf_lit.quant.pergroup_read import (
    PACK_MAGIC,
    PergroupError,
    PergroupSettings,
    _check_zip_records,
    lrzip_decompress,
    quantized_from_pergroup,
    validate_quant,
)
from pgolf_lit.quant.quantized import dequantize
from pgolf_lit.quant.reader import Container, LoadedArtifact, record_config_required, record_dtypes, register_container

VERSION = 2
HEADER = PACK_MAGIC + struct.pack("<I", VERSION)
SHUFFLE_MAGIC = b"BSHF"
LRZIP, BROTLI = 1, 0  # the frame's method byte of the codes stream


def is_pergroup_v2(data: bytes) -> bool:
    return data[:8] == HEADER


def byte_unshuffle(data: bytes) -> bytes:
    """Undo ``pergroup_v2.byte_shuffle`` (the record's ``_byte_unshuffle``): bytes without its header pass through."""
    if len(data) < 5 or data[:4] != SHUFFLE_MAGIC:
        return data
    stride, payload = data[4], np.frombuffer(data, dtype=np.uint8, offset=5)
    if stride < 2:
        return bytes(payload)
    out = np.empty_like(payload)
    start = 0
    for pos in range(stride):
        part = out[pos::stride]
        part[:] = payload[start : start + part.size]
        start += part.size
    return out.tobytes()


class _Frame:
    """A cursor over the frame that names what is missing when the bytes end early."""

    def __init__(self, data: bytes):
        self.data, self.at = data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise ValueError(f"truncated: {what} needs {n} bytes at offset {self.at}, {len(self.data)} in all")
        self.at += n
        return self.data[self.at - n : self.at]

    def u(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]


def decode_pergroup_v2(
    data: bytes, source: str = "PGRP v2 artifact", settings: PergroupSettings = PergroupSettings()
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The quantized dict and meta strings of a PGRP v2 artifact: the remainder's tensors (stored order), then the
    codes in their original row order."""
    if not is_pergroup_v2(data):
        raise PergroupError(f"{source}: not a PGRP v2 artifact (expected {HEADER!r} first, got {bytes(data[:8])!r})")
    try:
        frame = _Frame(data)
        frame.take(8, "the header")
        entries = []
        for i in range(frame.u("<I", "the tensor count")):
            name = frame.take(frame.u("<H", f"name length {i}"), f"name {i}").decode("utf-8")
            rows, cols = frame.u("<I", f"{name}'s rows"), frame.u("<I", f"{name}'s cols")
            order = np.frombuffer(frame.take(2 * rows, f"{name}'s row order"), dtype="<u2").astype(np.int64)
            if not np.array_equal(np.sort(order), np.arange(rows)):
                raise ValueError(f"{name}'s row order is not a permutation of {rows} rows")
            entries.append((name, rows, cols, order))
        method = frame.u("<B", "the codes method")
        codes_stream = frame.take(frame.u("<I", "the codes size"), "the codes stream")
        rem_stream = frame.take(frame.u("<I", "the remainder size"), "the remainder stream")
        if frame.at != len(data):
            raise ValueError(f"trailing bytes: the frame ends at {frame.at} of {len(data)}")
        expected = sum(rows * cols for _, rows, cols, _ in entries)
        if expected > settings.max_raw_bytes:
            raise ValueError(f"the frame claims {expected} bytes of codes, more than {settings.max_raw_bytes}")
        if method == LRZIP:
            codes = lrzip_decompress(codes_stream, expected, settings, what="the codes stream")
        elif method == BROTLI:
            codes = brotli_decompress_bounded(codes_stream, expected, "the codes stream")
        else:
            raise ValueError(f"unknown codes method {method} (1 = lrzip, 0 = brotli)")
        if len(codes) != expected:
            raise ValueError(f"the codes stream holds {len(codes)} bytes, the frame lists {expected}")
        raw = byte_unshuffle(brotli_decompress_bounded(rem_stream, settings.max_raw_bytes, "the remainder stream"))
        _check_zip_records(raw)
        try:
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # untrusted bytes: any failure is a bad artifact
            raise ValueError(f"the remainder stream does not load safely ({type(e).__name__}: {e})") from None
        if not isinstance(obj, dict) or set(obj) != {"w", "m"} or not isinstance(obj["w"], dict):
            raise ValueError("the remainder is not a dict of 'w' (tensors) and 'm' (meta)")
        quant, meta = dict(obj["w"]), obj["m"]
        flat = np.frombuffer(codes, dtype=np.int8)
        offset = 0
        for name, rows, cols, order in entries:
            if name in quant:
                raise ValueError(f"{name} is both a codes tensor and in the remainder")
            sorted_rows = flat[offset : offset + rows * cols].reshape(cols, rows).T
            offset += rows * cols
            restored = np.empty_like(sorted_rows)
            restored[order] = sorted_rows
            quant[name] = torch.from_numpy(restored)
        validate_quant(quant, meta)
    except PgolfError:
        raise
    except ValueError as e:
        raise PergroupError(f"{source}: {e}") from None
    except Exception as e:  # any other failure on untrusted bytes is a bad artifact, never a crash trace
        raise PergroupError(f"{source}: malformed PGRP v2 artifact ({type(e).__name__}: {e})") from None
    return quant, meta


def read_pergroup_v2_artifact(data: bytes, source: str, config: Optional[GPTConfig] = None) -> LoadedArtifact:
    """A PGRP v2 file's model: the record's ``config`` (the file holds none) and its dequantized weights."""
    config = record_config_required(config, source)
    quant, meta = quantized_from_pergroup(*decode_pergroup_v2(data, source), record_dtypes(config))
    weights = Weights.artifact(quant, meta)
    return LoadedArtifact(config, dequantize(quant, meta), "pergroup_v2", {"codec": "pergroup_v2"}, weights)


PERGROUP_V2 = register_container(Container("pergroup_v2", read_pergroup_v2_artifact, sniff=is_pergroup_v2))
