"""The quantized state dict: flat tensors plus one JSON-able meta entry per original tensor.

Tensors (the upstream "w" naming): a quantized ``NAME`` stores ``NAME.q`` (int8 codes, the weight's shape) and
``NAME.scale`` (fp16 ``[rows]``, or a 0-d per-tensor scale); a kept tensor stores ``NAME`` itself.

Meta, in state-dict order, ``NAME → entry``:

    {"kind": "int", "bits": 6, "dtype": "float32", "method": "gptq", ...}   quantized; dequantizes to ``dtype``
    {"kind": "float", "dtype": "float32"}                                     kept float (stored maybe fp16)
    {"kind": "raw"}                                                           non-float, stored unchanged

Optional keys of an int entry say how it was made ("method": "gptq" | "rtn", "percentile", "clip_sigmas",
"fallback", "scale"); dequantization needs only the tensors and ``dtype``. An int entry with ``"lqer": "asym" |
"sym"`` also owns its low-rank correction's four tensors (PR #1855's keys ``NAME.lqA_a``, ``.lqAs_a``, ``.lqB_a``,
``.lqBs_a``, or ``.lqA``… for the symmetric pack; ``lqer.py``), added in fp32 before the cast. An int entry with
``"awq": 8`` (PR #1945's AWQ-lite) owns ``NAME.awqg_start``, ``.awqg_s_hi``, ``.awqg_size``: those columns dequantize
with their own row scale, before the LQER correction (``awq.py``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from pgolf_lit.quant.awq_read import KEY_SUFFIXES as AWQ_KEY_SUFFIXES
from pgolf_lit.quant.awq_read import AwqGroups
from pgolf_lit.quant.lqer_read import KEY_SUFFIXES, LqerFactors, lqer_dequant

Meta = dict[str, dict[str, Any]]

FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def float_dtype(name: Any) -> torch.dtype:
    if name not in FLOAT_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {sorted(FLOAT_DTYPES)}")
    return FLOAT_DTYPES[name]


def dequantize_codes(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """q · s in fp32, cast to ``dtype`` (the records' dequantization)."""
    s = scale.float()
    if s.ndim:
        s = s.view(-1, *([1] * (q.ndim - 1)))
    return (q.float() * s).to(dtype)


def dequantize(quant: Mapping[str, Tensor], meta: Meta) -> dict[str, Tensor]:
    """The float state dict: q · s per row (or per tensor) and kept tensors, each cast to its meta dtype."""
    out = {}
    for name, info in meta.items():
        if info["kind"] == "int" and (info.get("lqer") or info.get("awq")):
            factors = LqerFactors.from_tensors(quant, name, info["lqer"]) if info.get("lqer") else None
            awq = AwqGroups.from_tensors(quant, name) if info.get("awq") else None
            out[name] = lqer_dequant(
                quant[f"{name}.q"], quant[f"{name}.scale"], factors, float_dtype(info["dtype"]), awq
            )
        elif info["kind"] == "int":
            out[name] = dequantize_codes(quant[f"{name}.q"], quant[f"{name}.scale"], float_dtype(info["dtype"]))
        elif info["kind"] == "float":
            out[name] = quant[name].to(float_dtype(info["dtype"]))
        else:
            out[name] = quant[name]
    return out


def tensor_keys(name: str, info: Mapping[str, Any]) -> tuple[str, ...]:
    if info["kind"] != "int":
        return (name,)
    lqer = tuple(name + s for s in KEY_SUFFIXES[info["lqer"]]) if info.get("lqer") else ()
    awq = tuple(name + s for s in AWQ_KEY_SUFFIXES) if info.get("awq") else ()
    return (f"{name}.q", f"{name}.scale", *awq, *lqer)


def validate(quant: Mapping[str, Tensor], meta: Meta) -> None:
    """Raise ValueError unless ``quant`` holds exactly the tensors ``meta`` describes, with consistent shapes.

    Run on everything read from disk, so that a crafted file cannot produce a wrong model silently.
    """
    if not isinstance(meta, dict):
        raise ValueError("meta is not a mapping")
    expected: set[str] = set()
    for name, info in meta.items():
        if not isinstance(name, str) or not isinstance(info, dict) or info.get("kind") not in ("int", "float", "raw"):
            raise ValueError(f"meta entry {name!r} is malformed")
        keys = tensor_keys(name, info)
        missing = [k for k in keys if k not in quant]
        if missing:
            raise ValueError(f"tensor(s) {missing} of {name!r} are missing")
        expected.update(keys)
        if info.get("lqer") is not None and info.get("lqer") not in KEY_SUFFIXES:
            raise ValueError(f"meta entry {name!r}: unknown lqer kind {info.get('lqer')!r}")
        if info["kind"] == "int":
            _check_int_entry(name, info, quant[keys[0]], quant[keys[1]])
            if info.get("lqer"):
                _check_lqer(name, quant[keys[0]], LqerFactors.from_tensors(quant, name, info["lqer"]))
            if info.get("awq"):
                _check_awq(name, quant[keys[0]], AwqGroups.from_tensors(quant, name))
        elif info["kind"] == "float":
            float_dtype(info.get("dtype"))
            if not quant[name].is_floating_point():
                raise ValueError(f"{name!r} is marked float but stored as {quant[name].dtype}")
    extra = sorted(set(quant) - expected)
    if extra:
        raise ValueError(f"tensor(s) {extra[:3]} are not described by the meta")


def _check_int_entry(name: str, info: Mapping[str, Any], q: Tensor, scale: Tensor) -> None:
    float_dtype(info.get("dtype"))
    bits = info.get("bits")
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"{name!r}: bits must be an int in [2, 8], got {bits!r}")
    if q.dtype != torch.int8:
        raise ValueError(f"{name!r}: codes must be int8, got {q.dtype}")
    if not scale.is_floating_point():
        raise ValueError(f"{name!r}: scale must be float, got {scale.dtype}")
    per_row = scale.ndim == 1 and q.ndim >= 1 and scale.shape[0] == q.shape[0]
    if not (per_row or scale.ndim == 0):
        raise ValueError(f"{name!r}: scale shape {tuple(scale.shape)} does not fit codes {tuple(q.shape)}")


def _check_awq(name: str, q: Tensor, g: AwqGroups) -> None:
    integral = not (g.starts.is_floating_point() or g.size.is_floating_point())
    size = int(g.size.item()) if integral and g.size.ndim == 0 else -1
    fits = (
        q.ndim == 2
        and integral
        and g.starts.ndim == 1
        and size > 0
        and g.s_hi.is_floating_point()
        and tuple(g.s_hi.shape) == (q.shape[0],)
        and all(0 <= s <= q.shape[1] - size for s in g.starts.tolist())
    )
    if not fits:
        raise ValueError(
            f"{name!r}: AWQ groups {tuple(g.starts.shape)}, {tuple(g.s_hi.shape)} do not fit codes {tuple(q.shape)}"
        )


def _check_lqer(name: str, q: Tensor, f: LqerFactors) -> None:
    rank = f.qA.shape[-1] if f.qA.ndim == 2 else -1
    fits = (
        q.ndim == 2
        and f.qA.dtype == f.qB.dtype == torch.int8
        and f.qA.ndim == f.qB.ndim == 2
        and f.qA.shape[0] == q.shape[0]
        and tuple(f.qB.shape) == (rank, q.shape[1])
        and f.sA.is_floating_point()
        and f.sB.is_floating_point()
        and f.sB.numel() > 0
        and f.qB.numel() % f.sB.numel() == 0
        and f.sA.numel() in (1, q.shape[0])
    )
    if not fits:
        raise ValueError(
            f"{name!r}: LQER factors {tuple(f.qA.shape)}, {tuple(f.qB.shape)} do not fit codes {tuple(q.shape)}"
        )
