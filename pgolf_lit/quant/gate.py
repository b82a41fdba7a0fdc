"""QuantGate: symmetric int8 per-row quantization of the attention gate weights (PR #1855 ``GATED_ATTN_QUANT_GATE``).

A gate weight ``NAME`` (2-D, e.g. the sparse gate's [heads, gate_window]) is stored as two tensors instead of
fp16: ``NAME.gq`` int8 codes in [-127, 127] and ``NAME.gs`` one fp16 scale per row, ``s_r = fp16(max|W_r| / 127)``
floored at 1e-10; its meta string is ``"gate_int8_row"``. Dequantization is ``gq · gs`` per row in fp32, then cast
to the dtype of the tensor it replaces. The record routes a tensor here *before* its small-tensor fp16
passthrough rule, so the gate never becomes fp16.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# How the PGRP container stores a gate (its reader's names, re-exported).
from pgolf_lit.quant.pergroup_read import CODES_SUFFIX, GATE_META, SCALE_SUFFIX  # noqa: F401

GATE_CODE_MAX = 127
GATE_MIN_SCALE = 1e-10


@dataclass(frozen=True)
class GateSettings:
    """Which tensors the record sends to the int8 gate path (PR #1855 train_gpt.py `gptq_mixed_quantize`).

    name_suffix: a tensor qualifies when its name ends with this.
    min_numel, max_numel: inclusive element-count bounds (the script's: the sparse gate [8, 12] = 96 and the
        dense gate [8, 512] = 4096 both fit).
    """

    name_suffix: str = ".attn_gate_w"
    min_numel: int = 32
    max_numel: int = 8192


def gate_shape_qualifies(t: Tensor, settings: GateSettings = GateSettings()) -> bool:
    """The record's size rule for a gate tensor: a 2-D float of ``min_numel..max_numel`` elements (smaller gates
    stay floats). The exporter applies it to the tensors whose declared role is a gate."""
    return t.is_floating_point() and t.ndim == 2 and settings.min_numel <= t.numel() <= settings.max_numel


def dequantize_gate_rows(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``codes · scale`` per row in fp32, cast to ``dtype`` (PR #1855 train_gpt.py `dequantize_mixed`, gate branch)."""
    return (codes.float() * scale.float().view(-1, 1)).to(dtype)
