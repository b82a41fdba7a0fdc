"""Artifact files: writing the native pgolf container and the upstream record containers (byte-exact).

The readers live apart, so that reading an artifact never imports a writer (``code_size.py`` counts the readers):
``native_read.py`` (the native format, described there) and ``upstream_read.py``; this module re-exports their
names. Upstream formats are ``torch.save`` dicts, compressed as their record did (``compress.py``):
``baseline`` (``int8_clean_per_row_v1``), ``pr1263`` (``{"w", "m"}`` with ``{"type": "int6"}`` meta; also PR #1278
and #1321), ``pr1333`` (adds ``"method"``; also PR #1334/#1421), ``pr1394`` (``"gptq (int6)"`` strings), written to
the same bytes the record scripts produce.
"""

from __future__ import annotations

import io
import json
import sys
from typing import Any, Mapping

import torch
from torch import Tensor

from pgolf_lit.errors import ArtifactError
from pgolf_lit.quant.compress import compress, decompress_bounded, get_codec  # noqa: F401
from pgolf_lit.quant.native_read import (  # noqa: F401  (re-exported: the reader's names)
    _CHECKED,
    _HEADER,
    _JSON_LENGTH,
    FORMAT_VERSION,
    HEADER_BYTES,
    MAGIC,
    STORED_DTYPES,
    NativeArtifact,
    _checksum,
    _parse_raw,
    decode_native,
    is_native,
)
from pgolf_lit.quant.quantized import Meta, dtype_name, float_dtype, tensor_keys, validate
from pgolf_lit.quant.reader import MAX_RAW_BYTES, read_bytes  # noqa: F401
from pgolf_lit.quant.upstream_read import (  # noqa: F401
    BASELINE_FORMAT,
    UpstreamArtifact,
    decode_upstream,
    load_upstream_container,
    quant_from_upstream,
    read_upstream_artifact,
)

# ---------------------------------------------------------------------------------------------------------
# Native format
# ---------------------------------------------------------------------------------------------------------


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


def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


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


def encode_upstream(quant: Mapping[str, Tensor], meta: Meta, style: str, codec: str, shuffle_stride: int = 0) -> bytes:
    """``torch.save`` of the record's container, byte-shuffled when asked, then compressed: the record's file."""
    buffer = io.BytesIO()
    torch.save(upstream_container(quant, meta, style), buffer)
    return compress(buffer.getvalue(), codec, shuffle_stride)
