"""Reading pgolf's native artifact container (the writer is ``artifact.py``'s ``encode_native``).

Native format (version 2), everything little-endian::

    header (64 bytes)  magic b"PGOLFQ" | u8 format version | codec name (8 bytes, NUL padded) | u8 shuffle stride
                       | u64 payload bytes | u64 decompressed bytes | sha256 of the header's first 32 bytes
                       followed by the payload (32 bytes)
    payload            codec(shuffle(raw tensor bytes, in the JSON's order | JSON | u32 JSON length))

Tensors come first, widest elements first: every element then sits at a multiple of its width (the byte
shuffle's lanes hold the same byte of every element), and the compressed size of the tensors does not depend on
the metadata. With the JSON in front, any change to it (another budget, a longer note) changed how brotli-11
coded the tensors after it: one export measured 319,237 to 322,566 bytes across notes of 0 to 3 characters.

The JSON holds the GPTConfig dict, the quantization meta (``quantized.py``), export info and the tensor index
``[[key, dtype, shape], ...]``. No pickle anywhere: loading parses JSON and copies bytes, it never runs code.
Reading checks magic, version, length, checksum, then every index entry and the meta against the tensors, and
raises ``ArtifactError`` naming the file for any failure — a damaged file never loads as a model.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.errors import ArtifactError, PgolfError
from pgolf_lit.eval.context import Weights
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.roles import parameter_roles
from pgolf_lit.quant.compress import CODECS, SHUFFLE_MAGIC, byte_unshuffle, decompress_bounded
from pgolf_lit.quant.quantized import Meta, dequantize, validate
from pgolf_lit.quant.reader import MAX_RAW_BYTES, Container, LoadedArtifact, register_container

MAGIC = b"PGOLFQ"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<6sB8sBQQ32s")
HEADER_BYTES = _HEADER.size
_CHECKED = HEADER_BYTES - 32  # the header bytes before the checksum
_JSON_LENGTH = struct.Struct("<I")

STORED_DTYPES = {
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


@dataclass
class NativeArtifact:
    config: dict[str, Any]
    meta: Meta
    quant: dict[str, Tensor]
    info: dict[str, Any]
    codec: str
    shuffle_stride: int


def _checksum(header: bytes, payload: bytes) -> bytes:
    """sha256 over every header field before the checksum, then the payload: any flipped bit is detected."""
    return hashlib.sha256(header[:_CHECKED] + payload).digest()


def is_native(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def decode_native(data: bytes, source: str) -> NativeArtifact:
    """Parse and fully validate a native file's bytes; ``source`` names the file in errors."""
    if len(data) >= len(MAGIC) and not is_native(data):
        raise ArtifactError(f"{source}: not a pgolf artifact (bad magic); upstream .ptz files are read as upstream")
    if len(data) < HEADER_BYTES:
        raise ArtifactError(f"{source}: truncated: {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    _, version, codec_field, stride, payload_len, raw_len, checksum = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{source}: format version {version} is not supported (this pgolf reads version {FORMAT_VERSION})"
        )
    codec = codec_field.rstrip(b"\0").decode("ascii", errors="replace")
    if codec not in CODECS:
        raise ArtifactError(f"{source}: unknown codec {codec!r} in the header (expected one of {sorted(CODECS)})")
    payload = data[HEADER_BYTES:]
    if len(payload) != payload_len:
        what = "truncated" if len(payload) < payload_len else "trailing bytes"
        raise ArtifactError(f"{source}: {what}: payload is {len(payload)} bytes, the header says {payload_len}")
    if _checksum(data, payload) != checksum:
        raise ArtifactError(f"{source}: checksum mismatch: the file is corrupted")
    if raw_len > MAX_RAW_BYTES:
        raise ArtifactError(f"{source}: header claims {raw_len} decompressed bytes (more than {MAX_RAW_BYTES})")
    try:
        # Streamed with the header's length as the limit (plus the shuffle's 5-byte tag): a crafted payload that
        # expands further stops there instead of filling memory.
        raw = decompress_bounded(payload, codec, raw_len + (len(SHUFFLE_MAGIC) + 1 if stride >= 2 else 0))
        raw = byte_unshuffle(raw, stride) if stride >= 2 else raw
        if len(raw) != raw_len:
            raise ValueError(f"decompressed to {len(raw)} bytes, the header says {raw_len}")
        document, quant = _parse_raw(raw)
        meta = document["meta"]
        validate(quant, meta)
        if not isinstance(document["config"], dict) or not isinstance(document["info"], dict):
            raise ValueError("config and info must be JSON objects")
    except ArtifactError:
        raise
    except Exception as e:  # any failure to parse untrusted bytes is a bad artifact, never a crash trace
        raise ArtifactError(f"{source}: malformed payload ({type(e).__name__}: {e})") from None
    return NativeArtifact(document["config"], meta, quant, document["info"], codec, stride)


def _parse_raw(raw: bytes) -> tuple[dict[str, Any], dict[str, Tensor]]:
    (json_len,) = _JSON_LENGTH.unpack_from(raw, len(raw) - _JSON_LENGTH.size)
    start = len(raw) - _JSON_LENGTH.size - json_len
    if start < 0:
        raise ValueError(f"the trailer claims a {json_len}-byte JSON document in {len(raw)} bytes")
    document = json.loads(raw[start : start + json_len].decode("utf-8"))
    if not isinstance(document, dict) or not {"config", "meta", "info", "tensors"} <= set(document):
        raise ValueError("the JSON document lacks config/meta/info/tensors")
    buffer = bytearray(memoryview(raw)[:start])  # writable, as torch.frombuffer wants (one copy, not two)
    quant: dict[str, Tensor] = {}
    offset = 0
    for entry in document["tensors"]:
        key, dtype, shape = entry
        if not isinstance(key, str) or key in quant:
            raise ValueError(f"bad or repeated tensor key {key!r}")
        if dtype not in STORED_DTYPES:
            raise ValueError(f"tensor {key}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d for d in shape):
            raise ValueError(f"tensor {key}: bad shape {shape!r}")
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * STORED_DTYPES[dtype].itemsize
        if offset + nbytes > len(buffer):
            raise ValueError(f"tensor {key}: its {nbytes} bytes run past the end of the payload")
        if numel:  # cloned: owns aligned memory (tensors of mixed widths sit at any byte offset)
            flat = torch.frombuffer(buffer, dtype=STORED_DTYPES[dtype], count=numel, offset=offset).clone()
        else:
            flat = torch.empty(0, dtype=STORED_DTYPES[dtype])
        quant[key] = flat.reshape(shape)
        offset += nbytes
    if offset != len(buffer):
        raise ValueError(f"{len(buffer) - offset} bytes after the last tensor")
    return document, quant


def read_native(data: bytes, source: str, config: Optional[GPTConfig] = None) -> LoadedArtifact:
    """A native file's model: its stored GPTConfig (``config``, when given, must equal it) and weights."""
    art = decode_native(data, source)
    try:
        stored = GPTConfig.from_dict(art.config)
    except PgolfError as e:
        raise ArtifactError(f"{source}: stored model config is invalid ({e})") from None
    if config is not None and config != stored:
        differs = sorted(k for k, v in config.to_dict().items() if art.config.get(k) != v)
        raise ArtifactError(f"{source}: exported for another model config (differs in {differs})")
    _check_stored_shapes(stored, art.quant, art.meta, source)
    return LoadedArtifact(
        stored, dequantize(art.quant, art.meta), "native", art.info, Weights.artifact(art.quant, art.meta)
    )


def _check_stored_shapes(config: GPTConfig, quant: Mapping[str, Tensor], meta: Meta, source: str) -> None:
    """The tensors a native artifact holds are exactly the ones its stored config's model has, shape for shape,
    checked on a model built on the meta device (no memory) before any real model is allocated: a crafted config
    (a huge vocab or width beside small tensors) fails here instead of allocating it. A cheap bound comes first, so
    even the meta model is only built for a config of the size of the tensors present."""
    shapes = {name: tuple(quant[f"{name}.q" if entry["kind"] == "int" else name].shape) for name, entry in meta.items()}
    largest = max((math.prod(s) for s in shapes.values()), default=0)
    if (
        config.num_layers > len(shapes)
        or config.vocab_size * config.emb_dim > largest
        or config.model_dim * max(config.mlp_hidden, 1) > largest
    ):
        raise ArtifactError(
            f"{source}: the stored model config ({config.num_layers} layers, vocab {config.vocab_size}, width "
            f"{config.model_dim}) is larger than the {len(shapes)} tensors it holds (largest {largest} elements)"
        )
    with torch.device("meta"):
        meta_model = GPT(config)
    dropped = {k for k, r in parameter_roles(meta_model).items() if not r.exported}  # as the export drops them
    expected = {k: tuple(t.shape) for k, t in meta_model.state_dict().items() if k not in dropped}
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = next((k for k in expected if k in shapes and shapes[k] != expected[k]), None)
    if missing or extra or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {extra[:3]}"
            if extra
            else f"{wrong} is {shapes[wrong]}, the config implies {expected[wrong]}"
        )
        raise ArtifactError(f"{source}: the tensors do not match the stored model config ({detail})")


NATIVE = register_container(Container("native", read_native, sniff=is_native))
