"""Artifact files: the native pgolf container, and the upstream record containers (read and byte-exact write).

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

Upstream formats are ``torch.save`` dicts, compressed as their record did (``compress.py``):
``baseline`` (``int8_clean_per_row_v1``), ``pr1263`` (``{"w", "m"}`` with ``{"type": "int6"}`` meta; also PR #1278
and #1321), ``pr1333`` (adds ``"method"``; also PR #1334/#1421), ``pr1394`` (``"gptq (int6)"`` strings). They are
read with ``torch.load(weights_only=True)`` and written to the same bytes the record scripts produce.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from pgolf_lit.errors import ArtifactError
from pgolf_lit.quant.compress import SHUFFLE_MAGIC, CODECS, byte_unshuffle, compress, get_codec, sniff_codec
from pgolf_lit.quant.quantized import Meta, dequantize, dtype_name, float_dtype, tensor_keys, validate

PathLike = Union[str, Path]

MAGIC = b"PGOLFQ"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<6sB8sBQQ32s")
HEADER_BYTES = _HEADER.size
_CHECKED = HEADER_BYTES - 32  # the header bytes before the checksum
_JSON_LENGTH = struct.Struct("<I")
MAX_RAW_BYTES = 1 << 30  # far above any 16 MB artifact (records: < 100 MB raw); a larger claim is damaged or crafted

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


# ---------------------------------------------------------------------------------------------------------
# Native format
# ---------------------------------------------------------------------------------------------------------


@dataclass
class NativeArtifact:
    config: dict[str, Any]
    meta: Meta
    quant: dict[str, Tensor]
    info: dict[str, Any]
    codec: str
    shuffle_stride: int


def encode_native(
    quant: Mapping[str, Tensor],
    meta: Meta,
    config: Mapping[str, Any],
    info: Mapping[str, Any],
    codec: str = "brotli",
    shuffle_stride: int = 0,
) -> bytes:
    """The complete native file as bytes (deterministic: equal inputs give equal bytes)."""
    if sys.byteorder != "little":
        raise ArtifactError("the native artifact format is little-endian; this machine is big-endian")
    validate(quant, meta)
    get_codec(codec)
    if not 0 <= shuffle_stride <= 255:
        raise ArtifactError(f"shuffle stride must lie in [0, 255], got {shuffle_stride}")
    keys = [k for name, entry in meta.items() for k in tensor_keys(name, entry)]
    keys.sort(key=lambda k: -quant[k].element_size())  # widest first: every element aligned to its width
    index = [[k, dtype_name(quant[k].dtype), list(quant[k].shape)] for k in keys]
    for key, dtype, _ in index:
        if dtype not in STORED_DTYPES:
            raise ArtifactError(f"tensor {key}: dtype {dtype} cannot be stored in a pgolf artifact")
    document = {"config": dict(config), "meta": meta, "info": dict(info), "tensors": index}
    text = json.dumps(document, separators=(",", ":"), allow_nan=False).encode("utf-8")
    raw = b"".join([_tensor_bytes(quant[k]) for k in keys] + [text, _JSON_LENGTH.pack(len(text))])
    payload = compress(raw, codec, shuffle_stride)
    fields = _HEADER.pack(MAGIC, FORMAT_VERSION, codec.encode("ascii"), shuffle_stride, len(payload), len(raw), b"")
    return fields[:_CHECKED] + _checksum(fields, payload) + payload


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


def decompress_bounded(blob: bytes, codec: str, limit: int) -> bytes:
    """``codec``'s decompression of ``blob``, streamed and stopped past ``limit`` bytes (ValueError then, and for a
    truncated stream or data after its end): the memory an untrusted file can claim is bounded by ``limit``."""
    import lzma
    import zlib

    import zstandard

    from pgolf_lit.quant.pergroup import brotli_decompress_bounded

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


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


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


# ---------------------------------------------------------------------------------------------------------
# Upstream containers
# ---------------------------------------------------------------------------------------------------------

UPSTREAM_STYLES = ("baseline", "pr1263", "pr1333", "pr1394")
# The container layout each record writes (PR #1278/#1321 share PR #1263's, PR #1334/#1421 PR #1333's).
RECORD_UPSTREAM_STYLE = {
    "baseline": "baseline",
    "pr1263": "pr1263",
    "pr1278": "pr1263",
    "pr1321": "pr1263",
    "pr1333": "pr1333",
    "pr1334": "pr1333",
    "pr1421": "pr1333",
    "pr1394": "pr1394",
}
BASELINE_FORMAT = "int8_clean_per_row_v1"
# One shared object per type string, as the scripts' literals are (see upstream_container).
_INT_TYPE = {bits: f"int{bits}" for bits in range(2, 9)}


def upstream_container(quant: Mapping[str, Tensor], meta: Meta, style: str) -> dict[str, Any]:
    """The dict a record script passes to ``torch.save``, in its key order.

    Byte-exactness detail: pickle stores an object once and refers back to it when the *same object* recurs, so
    the bytes depend on which strings are shared objects. This builder shares exactly what the scripts share:
    each tensor name across the dicts that use it, and constant strings (``"passthrough"``, ``"int6"``), while
    dtype names and ``"gptq (intN)"`` are fresh strings per entry, as the scripts build them per call.
    """
    if style == "baseline":
        return _baseline_container(quant, meta)
    if style not in UPSTREAM_STYLES:
        raise ArtifactError(f"unknown upstream container style {style!r}; expected one of {list(UPSTREAM_STYLES)}")
    w: dict[str, Tensor] = {}
    m: dict[str, Any] = {}
    for name, info in meta.items():
        if info["kind"] == "int":
            w[name + ".q"] = quant[name + ".q"]
            w[name + ".scale"] = quant[name + ".scale"]
            m[name] = _upstream_int_meta(name, info, quant[name + ".scale"], style)
        else:
            w[name] = quant[name]
            m[name] = _upstream_kept_meta(quant[name], style)
    return {"w": w, "m": m}


def _upstream_int_meta(name: str, info: Mapping[str, Any], scale: Tensor, style: str) -> Any:
    bits = info["bits"]
    if style == "pr1394":
        if info.get("method") != "gptq":
            method = info.get("method")
            raise ArtifactError(f"{name}: PR #1394's container only holds GPTQ tensors, this one is {method}")
        return f"gptq (int{bits})"
    if style == "pr1333" and bits == 6 and scale.ndim == 1:
        return {"type": _INT_TYPE[bits], "method": "gptq" if info.get("method") == "gptq" else "clip_search"}
    return {"type": _INT_TYPE[bits]}


def _upstream_kept_meta(t: Tensor, style: str) -> str:
    if style == "pr1394":
        return "passthrough (float16)"
    # the int6 scripts keep small floats as fp16 ("passthrough") and large control tensors as fp32
    return "passthrough_ctrl" if t.dtype == torch.float32 else "passthrough"


def _baseline_container(quant: Mapping[str, Tensor], meta: Meta) -> dict[str, Any]:
    quantized, scales, dtypes, passthrough = {}, {}, {}, {}
    qmeta, orig_dtypes = {}, {}
    for name, info in meta.items():
        if info["kind"] == "int":
            scale = quant[name + ".scale"]
            if scale.ndim > 0:
                qmeta[name] = {"scheme": "per_row", "axis": 0}
            quantized[name] = quant[name + ".q"]
            scales[name] = scale
            dtypes[name] = dtype_name(float_dtype(info["dtype"]))  # a fresh string per entry
            continue
        t = quant[name]
        passthrough[name] = t
        if info["kind"] == "float" and t.dtype == torch.float16 and info["dtype"] in ("float32", "bfloat16"):
            orig_dtypes[name] = dtype_name(float_dtype(info["dtype"]))
    obj: dict[str, Any] = {
        "__quant_format__": BASELINE_FORMAT,
        "quantized": quantized,
        "scales": scales,
        "dtypes": dtypes,
        "passthrough": passthrough,
    }
    if qmeta:
        obj["qmeta"] = qmeta
    if orig_dtypes:
        obj["passthrough_orig_dtypes"] = orig_dtypes
    return obj


def encode_upstream(
    quant: Mapping[str, Tensor], meta: Meta, style: str, codec: str, shuffle_stride: int = 0
) -> bytes:
    """``torch.save`` of the record's container, byte-shuffled when asked, then compressed: the record's file."""
    buffer = io.BytesIO()
    torch.save(upstream_container(quant, meta, style), buffer)
    return compress(buffer.getvalue(), codec, shuffle_stride)


@dataclass
class UpstreamArtifact:
    state_dict: dict[str, Tensor]
    quant: dict[str, Tensor]
    meta: Meta
    style: str
    codec: str
    shuffled: bool


def read_upstream_artifact(
    path: PathLike,
    template_dtypes: Optional[Mapping[str, Union[torch.dtype, str]]] = None,
    codec: Optional[str] = None,
) -> UpstreamArtifact:
    """Decompress (codec sniffed from the bytes unless given), unshuffle, load safely, dequantize.

    ``template_dtypes`` are the dtypes of the model the weights go into (the scripts dequantize against their
    freshly built model: bf16 tables, fp32 elsewhere); unnamed tensors dequantize to float32. The baseline
    container records its own dtypes and ignores the template.
    """
    return decode_upstream(read_bytes(path), str(path), template_dtypes, codec)


def decode_upstream(
    data: bytes,
    source: str,
    template_dtypes: Optional[Mapping[str, Union[torch.dtype, str]]] = None,
    codec: Optional[str] = None,
) -> UpstreamArtifact:
    """``read_upstream_artifact`` on bytes already in memory; ``source`` names the file in errors."""
    obj, codec, shuffled = load_upstream_container(data, source, codec)
    try:
        quant, meta, style = quant_from_upstream(obj, template_dtypes)
        validate(quant, meta)
    except ArtifactError:
        raise
    except Exception as e:
        raise ArtifactError(f"{source}: not a record container ({type(e).__name__}: {e})") from None
    return UpstreamArtifact(dequantize(quant, meta), quant, meta, style, codec, shuffled)


def load_upstream_container(data: bytes, source: str, codec: Optional[str] = None) -> tuple[Any, str, bool]:
    """The container object of an upstream artifact's bytes, with the codec used and whether it was shuffled."""
    names = [codec] if codec else [sniff_codec(data)]
    if not codec and names[0] == "zlib":
        names.append("brotli")  # a brotli stream can happen to look like a zlib header
    raw = None
    for name in names:
        try:
            raw = decompress_bounded(data, name, MAX_RAW_BYTES)  # no header states the size: the format's ceiling
            codec = name
            break
        except Exception:  # a failed trial decode; the error below names the file and the codecs tried
            continue
    if raw is None:
        raise ArtifactError(f"{source}: does not decompress as {' or '.join(names)} (within {MAX_RAW_BYTES} bytes)")
    unshuffled = byte_unshuffle(raw)
    try:
        obj = torch.load(io.BytesIO(unshuffled), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{source}: the container does not load safely ({type(e).__name__}: {e})") from None
    return obj, codec, unshuffled is not raw


def quant_from_upstream(
    obj: Any, template_dtypes: Optional[Mapping[str, Union[torch.dtype, str]]] = None
) -> tuple[dict[str, Tensor], Meta, str]:
    """Flat tensors, meta and container style of a loaded upstream container."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict container, got {type(obj).__name__}")
    if obj.get("__quant_format__") == BASELINE_FORMAT:
        return _quant_from_baseline(obj)
    if set(obj) != {"w", "m"}:
        raise ValueError(f"unknown container keys {sorted(map(str, obj))}")
    w, m = obj["w"], obj["m"]
    template = {k: (v if isinstance(v, torch.dtype) else float_dtype(v)) for k, v in (template_dtypes or {}).items()}
    quant: dict[str, Tensor] = {}
    meta: Meta = {}
    for name, info in m.items():
        target = template.get(name, torch.float32)
        if isinstance(info, str) and "passthrough" in info:
            t = w[name]
            quant[name] = t
            if not t.is_floating_point():
                meta[name] = {"kind": "raw"}
            else:
                keep = t.dtype == torch.float16 and target in (torch.float32, torch.bfloat16)
                meta[name] = {"kind": "float", "dtype": dtype_name(target if keep else t.dtype)}
            continue
        bits, method = _parse_upstream_int_meta(name, info)
        quant[name + ".q"], quant[name + ".scale"] = w[name + ".q"], w[name + ".scale"]
        meta[name] = {"kind": "int", "bits": bits, "dtype": dtype_name(target)}
        if method:
            meta[name]["method"] = method
    return quant, meta, _detect_style(m)


def _parse_upstream_int_meta(name: str, info: Any) -> tuple[int, Optional[str]]:
    if isinstance(info, str) and info.startswith("gptq (int") and info.endswith(")"):
        return int(info[len("gptq (int") : -1]), "gptq"
    if isinstance(info, dict) and str(info.get("type", "")).startswith("int"):
        method = {"gptq": "gptq", "clip_search": "rtn"}.get(info.get("method"))
        return int(info["type"][3:]), method
    raise ValueError(f"{name}: unknown meta {info!r}")


def _detect_style(m: Mapping[str, Any]) -> str:
    values = list(m.values())
    if any(isinstance(v, str) and (v.startswith("gptq (") or v == "passthrough (float16)") for v in values):
        return "pr1394"
    if any(isinstance(v, dict) and "method" in v for v in values):
        return "pr1333"
    return "pr1263"


def _quant_from_baseline(obj: Mapping[str, Any]) -> tuple[dict[str, Tensor], Meta, str]:
    quant: dict[str, Tensor] = {}
    meta: Meta = {}
    for name, q in obj["quantized"].items():
        quant[name + ".q"], quant[name + ".scale"] = q, obj["scales"][name]
        meta[name] = {"kind": "int", "bits": 8, "dtype": obj["dtypes"][name], "method": "rtn"}
    orig_dtypes = obj.get("passthrough_orig_dtypes", {})
    for name, t in obj["passthrough"].items():
        quant[name] = t
        if t.is_floating_point():
            meta[name] = {"kind": "float", "dtype": orig_dtypes.get(name, dtype_name(t.dtype))}
        else:
            meta[name] = {"kind": "raw"}
    return quant, meta, "baseline"


def read_bytes(path: PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact ({e.strerror or e})") from None
