"""Round-to-nearest symmetric integer quantization, one fp16 scale per row (upstream ``quantize_float_tensor``, PR #1321
``quantize_int6_per_row``).

Three ways to pick a row's scale, each as the records compute it so that codes match them bit for bit:

* ``quantize_quantile_clip`` — the baseline's int8 path: clip each row at the 99.99984 % quantile of ``|w|``,
  scale ``max(clip/R, 1/R)`` in fp32. Codes are rounded with the fp32 scale, but the *stored* scale is its fp16
  rounding, so dequantization uses a slightly different step than quantization did (a record quirk, kept).
* ``quantize_percentile_search`` — "GPTQ-lite": five clip percentiles, scale ``fp16(max(clip/R, 1/R))``, the one
  with the lowest mean squared error over the whole matrix wins (one percentile per matrix, earliest on ties).
* ``quantize_sdclip`` — clip at ``k`` row standard deviations, ``fp16(max(k·std/R, 1e-10))``, no floor (PR #1394's
  scale, here without GPTQ).

Integer codes of every width are stored one per byte (int8). Tensors that are not 2-D get one per-tensor scale.

``RtnSettings.percentile_scope: bank`` widens the percentile search from one matrix to its whole parameter bank
(``bank_percentile.py``, PR #1120).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from pgolf_lit.errors import ConfigError
from pgolf_lit.quant.quantized import dequantize_codes  # noqa: F401  (re-exported: the reading side)
from pgolf_lit.quant.quantizers import Quantized, Quantizer, TensorRule, clip_range

INT8_CLIP_QUANTILE = 99.99984 / 100.0
PERCENTILE_CANDIDATES = (0.9990, 0.9995, 0.9999, 0.99999, 1.0)
SDCLIP_MIN_SCALE = 1e-10

# torch.quantile refuses inputs with more elements than this; rows are independent, so larger matrices go in chunks.
_QUANTILE_MAX_NUMEL = 1 << 24


def row_quantile(x: Tensor, q: float) -> Tensor:
    """Per-row quantile (linear interpolation) of a 2-D tensor, in row chunks small enough for torch.quantile."""
    if x.numel() <= _QUANTILE_MAX_NUMEL:
        return torch.quantile(x, q, dim=1)
    rows_per_chunk = max(1, _QUANTILE_MAX_NUMEL // max(1, x.shape[1]))
    return torch.cat([torch.quantile(part, q, dim=1) for part in x.split(rows_per_chunk)])


def round_to_grid(w: Tensor, scale: Tensor, r: int) -> Tensor:
    """clamp(round(w / s), -R, R) with a per-row (``[rows]``) or 0-d fp32 scale; float result."""
    s = scale[:, None] if scale.ndim else scale
    return torch.clamp(torch.round(w / s), -r, r)


# ---------------------------------------------------------------------------------------------------------
# Baseline int8: quantile clip, floor 1/R, fp32 rounding scale, fp16 stored scale
# ---------------------------------------------------------------------------------------------------------


def quantize_quantile_clip(t: Tensor, bits: int = 8, quantile: float = INT8_CLIP_QUANTILE) -> Quantized:
    """The baseline int8 quantizer (``quantize_float_tensor``); 1-D/0-D tensors get an fp32 per-tensor scale."""
    r = clip_range(bits)
    w = t.float()
    if w.ndim == 2:
        clip = row_quantile(w.abs(), quantile) if w.numel() else torch.zeros(w.shape[0])
        clipped = torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None])
        scale = (clip / r).clamp_min(1.0 / r)
        q = round_to_grid(clipped, scale, r).to(torch.int8).contiguous()
        return Quantized(q, scale.to(torch.float16).contiguous())
    clip = float(torch.quantile(w.abs().flatten(), quantile).item()) if w.numel() else 0.0
    scale = torch.tensor(clip / r if clip > 0 else 1.0, dtype=torch.float32)
    q = round_to_grid(torch.clamp(w, -clip, clip), scale, r).to(torch.int8).contiguous()
    return Quantized(q, scale)


# ---------------------------------------------------------------------------------------------------------
# GPTQ-lite: five clip percentiles, one per matrix
# ---------------------------------------------------------------------------------------------------------


def percentile_row_clip(w: Tensor, percentile: float) -> Tensor:
    """Per-row clip value: the row quantile of |w|, or the row max for percentile 1.0."""
    return row_quantile(w.abs(), percentile) if percentile < 1.0 else w.abs().amax(dim=1)


def floored_scale(row_clip: Tensor, r: int) -> Tensor:
    """fp16(max(clip / R, 1 / R)): the int6 scripts' scale with its 1/R floor."""
    return (row_clip / r).clamp_min(1.0 / r).to(torch.float16)


def quantize_per_tensor_amax(t: Tensor, bits: int) -> Quantized:
    """1-D/0-D path of the int6 scripts: scale fp16(amax / R) (1.0 for an all-zero tensor), no floor."""
    r = clip_range(bits)
    w = t.float()
    amax = w.abs().max().item() if w.numel() else 0.0
    scale = torch.tensor(amax / r if amax > 0 else 1.0, dtype=torch.float16)
    return Quantized(round_to_grid(w, scale.float(), r).to(torch.int8), scale)


def quantize_percentile_search(
    t: Tensor, bits: int = 6, candidates: tuple[float, ...] = PERCENTILE_CANDIDATES
) -> Quantized:
    """Try each clip percentile on the whole matrix; keep the lowest mean squared error (strict <)."""
    w = t.float()
    if w.ndim != 2:
        return quantize_per_tensor_amax(w, bits)
    r = clip_range(bits)
    best: Optional[Quantized] = None
    best_err = float("inf")
    for pct in candidates:
        scale = floored_scale(percentile_row_clip(w, pct), r)
        q = round_to_grid(w, scale.float(), r).to(torch.int8)
        err = (w - q.float() * scale.float()[:, None]).pow(2).mean().item()
        if err < best_err:
            best, best_err = Quantized(q, scale, pct), err
    if best is None:
        raise ValueError("no percentile candidate has a finite error: the weight holds NaN or inf")
    return best


# ---------------------------------------------------------------------------------------------------------
# SDClip: k row standard deviations, no floor
# ---------------------------------------------------------------------------------------------------------


def sdclip_scale(w: Tensor, clip_sigmas: float, r: int) -> Tensor:
    """fp16(max(k · std_row / R, 1e-10)) with the unbiased row standard deviation (PR #1394)."""
    return (clip_sigmas * w.float().std(dim=1) / r).clamp_min(SDCLIP_MIN_SCALE).to(torch.float16)


def quantize_sdclip(t: Tensor, bits: int, clip_sigmas: float) -> Quantized:
    """Round to the SDClip grid; values beyond k·σ saturate at ±R. 1-D/0-D tensors use the amax path."""
    w = t.float()
    if w.ndim != 2:
        return quantize_per_tensor_amax(w, bits)
    scale = sdclip_scale(w, clip_sigmas, clip_range(bits))
    return Quantized(round_to_grid(w, scale.float(), clip_range(bits)).to(torch.int8), scale)


def quantize_row_amax(t: Tensor, bits: int) -> Quantized:
    """Scale fp16(max(|w|max_row, 1e-10) / R), codes clamp(round(w / s), -R, R): PR #1855's int8 attention gates
    (train_gpt.py ``_quantize_gate_int8_row``) at any width."""
    w = t.float()
    if w.ndim != 2:
        return quantize_per_tensor_amax(w, bits)
    r = clip_range(bits)
    scale = (w.abs().amax(dim=1).clamp_min(SDCLIP_MIN_SCALE) / r).to(torch.float16)
    return Quantized(round_to_grid(w, scale.float(), r).to(torch.int8), scale)


# ---------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class RtnSettings:
    """Round to nearest's knob beyond the per-group ``TensorRule``."""

    percentile_scope: Literal["matrix", "bank"] = "matrix"
    """What one ``percentile_search`` candidate is chosen for: each matrix, or each parameter bank (qo, kv, mlp_up,
    mlp_down: the winner has the lowest squared error over all the bank's matrices; ``bank_percentile.py``). PR
    #1120 with SKIP_GPTQ=1 (upstream env var; no GPTQ, so its 3-D banks reach ``quantize_int6_per_row`` unsplit)."""

    def validate(self) -> None:
        if self.percentile_scope not in ("matrix", "bank"):
            scope = self.percentile_scope
            raise ConfigError(f"export.rtn.percentile_scope: expected 'matrix' or 'bank', got {scope!r}")


def quantize_rtn(
    name: str, t: Tensor, rule: TensorRule, bits: int, hessian: Optional[Tensor], settings: Any
) -> tuple[Quantized, dict[str, Any]]:
    """Round to nearest with the rule's scale; returns the codes and the meta fields saying how."""
    if rule.scale == "quantile":
        return quantize_quantile_clip(t, bits), {"method": "rtn"}
    if rule.scale == "sdclip":
        return quantize_sdclip(t, bits, rule.clip_sigmas), {"method": "rtn", "clip_sigmas": rule.clip_sigmas}
    if rule.scale == "row_amax":
        return quantize_row_amax(t, bits), {"method": "rtn", "scale": "row_amax"}
    q = quantize_percentile_search(t, bits)
    if q.percentile is None:  # 1-D tensors take the per-tensor amax path
        return q, {"method": "rtn"}
    return q, {"method": "rtn", "percentile": q.percentile}


QUANTIZERS = (
    Quantizer(
        "rtn", quantize_rtn, scales=("quantile", "percentile_search", "sdclip", "row_amax"), settings=RtnSettings
    ),
)
