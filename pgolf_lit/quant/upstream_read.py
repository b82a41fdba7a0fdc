"""Reading the upstream record containers (the byte-exact writers are ``artifact.py``'s).

Upstream formats are ``torch.save`` dicts, compressed as their record did (``compress.py``):
``baseline`` (``int8_clean_per_row_v1``), ``pr1263`` (``{"w", "m"}`` with ``{"type": "int6"}`` meta; also PR #1278
and #1321), ``pr1333`` (adds ``"method"``; also PR #1334/#1421), ``pr1394`` (``"gptq (int6)"`` strings). They are
read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.errors import ArtifactError
from pgolf_lit.eval.context import Weights
from pgolf_lit.quant.compress import byte_unshuffle, decompress_bounded, sniff_codec
from pgolf_lit.quant.quantized import Meta, dequantize, dtype_name, float_dtype, validate
from pgolf_lit.quant.reader import (
    MAX_RAW_BYTES,
    Container,
    LoadedArtifact,
    read_bytes,
    record_config_required,
    record_dtypes,
    register_container,
)

PathLike = Union[str, Path]
BASELINE_FORMAT = "int8_clean_per_row_v1"


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


def read_upstream(data: bytes, source: str, config: Optional[GPTConfig] = None) -> LoadedArtifact:
    """A record script's file (no magic: tried after every other container) with the record's ``config``."""
    config = record_config_required(config, source)
    art = decode_upstream(data, source, record_dtypes(config))
    info = {"codec": art.codec, "shuffled": art.shuffled}
    return LoadedArtifact(config, art.state_dict, art.style, info, Weights.artifact(art.quant, art.meta))


UPSTREAM = register_container(Container("upstream", read_upstream))
