"""Byte shuffle and the records' general-purpose compressors (PR #1334/#1394 ``_byte_shuffle``, ``_compress``).

Codecs are looked up by name in ``CODECS``; each name fixes its settings, so a name alone reproduces a record's
bytes (given the same library build):

    zlib    zlib level 9               (baseline)
    lzma    xz container, preset 6     (PR #1278/#1321; PR #1333+ with COMPRESSOR=lzma)
    lzma9   xz container, preset 9     (PR #1019)
    zstd    zstandard level 22         (PR #1263)
    brotli  brotli quality 11          (PR #1333/#1334/#1421/#1394)

``decompress_bounded`` is the readers' side: a decompression that stops at the size the container allows.

The byte shuffle (PR #1218 lineage) regroups bytes by their position modulo a stride: for fp16 data, all low
bytes then all high bytes. Its output is ``b"BSHF"`` + one stride byte + the regrouped bytes.
"""

from __future__ import annotations

import lzma
import zlib
from dataclasses import dataclass
from typing import Callable, Optional

import brotli
import numpy as np
import zstandard

from pgolf_lit.quant.brotli_bounded import brotli_decompress_bounded

SHUFFLE_MAGIC = b"BSHF"


@dataclass(frozen=True)
class Codec:
    name: str
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes], bytes]


def _zstd_decompress(data: bytes) -> bytes:
    # stream_reader handles frames that do not state their content size
    with zstandard.ZstdDecompressor().stream_reader(data) as reader:
        return reader.read()


CODECS: dict[str, Codec] = {
    "zlib": Codec("zlib", lambda d: zlib.compress(d, level=9), zlib.decompress),
    "lzma": Codec("lzma", lambda d: lzma.compress(d, preset=6), lzma.decompress),
    "lzma9": Codec("lzma9", lambda d: lzma.compress(d, preset=9), lzma.decompress),
    "zstd": Codec("zstd", lambda d: zstandard.ZstdCompressor(level=22).compress(d), _zstd_decompress),
    "brotli": Codec("brotli", lambda d: brotli.compress(d, quality=11), brotli.decompress),
}


def get_codec(name: str) -> Codec:
    if name not in CODECS:
        raise ValueError(f"unknown codec {name!r}; expected one of {sorted(CODECS)}")
    return CODECS[name]


def byte_shuffle(data: bytes, stride: int = 2) -> bytes:
    """``BSHF`` + stride + the bytes at offsets 0, s, 2s, … then 1, 1+s, …; unchanged if stride < 2 or too short."""
    if stride < 2 or len(data) < stride:
        return data
    if stride > 255:
        raise ValueError(f"byte shuffle stride must fit one byte, got {stride}")
    src = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + np.concatenate([src[p::stride] for p in range(stride)]).tobytes()


def byte_unshuffle(data: bytes, stride: Optional[int] = None) -> bytes:
    """Inverse of ``byte_shuffle``; data without the header comes back unchanged.

    ``stride=None`` trusts the header (upstream's auto-detection). With an expected stride, only a header with
    that stride and at least ``stride`` payload bytes counts, so no unshuffled input is ever mistaken for one.
    """
    if len(data) < 5 or data[:4] != SHUFFLE_MAGIC:
        return data
    found = data[4]
    if stride is not None and (found != stride or len(data) - 5 < stride):
        return data
    if found < 2:
        return data[5:]
    payload = np.frombuffer(data, dtype=np.uint8, offset=5)
    n = len(payload)
    out = np.empty(n, dtype=np.uint8)
    offset = 0
    for p in range(found):
        length = n // found + (1 if p < n % found else 0)
        out[p::found] = payload[offset : offset + length]
        offset += length
    return out.tobytes()


def compress(data: bytes, codec: str, shuffle_stride: int = 0) -> bytes:
    """Byte shuffle (when ``shuffle_stride >= 2``) then the codec."""
    return get_codec(codec).compress(byte_shuffle(data, shuffle_stride))


def decompress(blob: bytes, codec: str, shuffle_stride: int = 0) -> bytes:
    """The codec's inverse, then unshuffle when a shuffle stride was used."""
    raw = get_codec(codec).decompress(blob)
    return byte_unshuffle(raw, shuffle_stride) if shuffle_stride >= 2 else raw


def decompress_bounded(blob: bytes, codec: str, limit: int) -> bytes:
    """``codec``'s decompression of ``blob``, streamed and stopped past ``limit`` bytes (ValueError then, and for a
    truncated stream or data after its end): the memory an untrusted file can claim is bounded by ``limit``."""
    get_codec(codec)
    if codec == "brotli":
        return brotli_decompress_bounded(blob, limit, "the payload")
    if codec == "zstd":
        out = bytearray()
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            while len(out) <= limit:
                chunk = reader.read(min(1 << 20, limit + 1 - len(out)))
                if not chunk:
                    break
                out += chunk
    else:
        d = zlib.decompressobj() if codec == "zlib" else lzma.LZMADecompressor()
        out = d.decompress(blob, limit + 1)
        if len(out) <= limit and (not d.eof or d.unused_data):
            raise ValueError(f"{codec} stream is truncated or followed by other data")
    if len(out) > limit:
        raise ValueError(f"decompresses to more than the {limit} bytes the header allows")
    return bytes(out)


def sniff_codec(blob: bytes) -> str:
    """Name the codec of a compressed blob from its leading bytes; brotli has no magic, so it is the fallback."""
    if blob.startswith(b"\xfd7zXZ\x00"):
        return "lzma"  # lzma and lzma9 decode the same way
    if blob.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if len(blob) >= 2 and (blob[0] & 0x0F) == 8 and ((blob[0] << 8) | blob[1]) % 31 == 0:  # deflate, valid FCHECK
        return "zlib"
    return "brotli"
