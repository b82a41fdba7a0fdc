"""Reading LQER corrections (PR #1855): what an artifact stores and how it dequantizes; the fitting side
(select, factor, pack) is ``lqer.py``, which describes the method and re-exports these names.

Dequantization: ``W = q·s + (qA·sA) @ (qB·sB)`` in fp32, then cast to the target dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
from torch import Tensor

ASYM = "asym"
SYM = "sym"
META_SUFFIX = {ASYM: "+lqer_asym", SYM: "+lqer"}
KEY_SUFFIXES = {ASYM: (".lqA_a", ".lqAs_a", ".lqB_a", ".lqBs_a"), SYM: (".lqA", ".lqAs", ".lqB", ".lqBs")}


@dataclass
class LqerFactors:
    """One matrix's packed correction: int8 codes and fp16 scales of A [rows, r] and B [r, cols]."""

    kind: str  # ASYM or SYM
    qA: Tensor
    sA: Tensor
    qB: Tensor
    sB: Tensor

    @property
    def meta_suffix(self) -> str:
        return META_SUFFIX[self.kind]

    def tensors(self, name: str) -> dict[str, Tensor]:
        """The four tensors under the record's keys for weight ``name``."""
        return dict(zip((name + s for s in KEY_SUFFIXES[self.kind]), (self.qA, self.sA, self.qB, self.sB)))

    @classmethod
    def from_tensors(cls, quant: Mapping[str, Tensor], name: str, kind: str) -> "LqerFactors":
        """The factors of ``name`` read back from a flat quantized dict (KeyError when one is missing)."""
        return cls(kind, *(quant[name + s] for s in KEY_SUFFIXES[kind]))


def lqer_correction(f: LqerFactors) -> Tensor:
    """(qA·sA) @ (qB·sB) in fp32 (PR #1855 train_gpt.py `dequantize_mixed`, LQER branches)."""
    if f.kind == ASYM:
        a = f.qA.float() * float(f.sA)
        g = f.qB.numel() // f.sB.numel()
        b = (f.qB.reshape(-1, g).float() * f.sB.float().view(-1, 1)).reshape(f.qB.shape)
    elif f.kind == SYM:
        a = f.qA.float() * f.sA.float().view(-1, 1)
        b = f.qB.float() * f.sB.float().view(-1, 1)
    else:
        raise ValueError(f"unknown LQER kind {f.kind!r}; expected {ASYM!r} or {SYM!r}")
    return a @ b


def lqer_dequant(
    q: Tensor, scale: Tensor, factors: Optional[LqerFactors] = None, dtype: torch.dtype = torch.float32, awq=None
) -> Tensor:
    """q·s (per row, or one 0-d scale), AWQ-lite's protected columns at their own scale (``awq``: an
    ``awq.AwqGroups``, PR #1945), plus the LQER correction if any, in fp32, then cast to ``dtype``
    (PR #1855/#1945 train_gpt.py `dequantize_mixed`)."""
    if scale.ndim > 0:
        w = q.float() * scale.float().view(q.shape[0], *[1] * (q.ndim - 1))
    else:
        w = q.float() * float(scale.item())
    if awq is not None:
        awq.apply(w, q)
    if factors is not None:
        w = w + lqer_correction(factors)
    return w.to(dtype)
