"""Hessian-aware SDClip (PR #1412, upstream HESSIAN_CLIP_LAMBDA): the SDClip row scale k·σ_row/R of GPTQ, modulated
per row by how much the Hessian says the row matters.

PR #1412 ``gptq_quantize_weight``: with d the diagonal of the damped Hessian (dead inputs set to 1, then + damping ·
mean, as GPTQ factors it; floored at 1e-8),

    col_importance = d / mean(d)
    row_importance = mean_j(|W_ij| · col_importance_j),   then divided by its mean over the rows
    scale          = fp16(max(k · σ_row · (1 + λ · (row_importance − 1)) / R, 1e-10))

so rows with above-average importance get a wider clip (fewer saturated weights), the others a finer grid. λ = 0 is
plain SDClip. Export side only: the reader sees an ordinary per-row scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf_lit.quant.rtn import SDCLIP_MIN_SCALE

DIAGONAL_FLOOR = 1e-8  # the record's clamp_min on the Hessian diagonal


def damped_diagonal(hessian: Tensor, damping: float) -> Tensor:
    """The diagonal GPTQ factors (``gptq.factor_hessian``): dead inputs set to 1, then + damping · mean."""
    d = torch.diag(hessian.float()).clone()
    d[d == 0] = 1
    return d + damping * d.mean()


def hessian_sdclip_scale(w: Tensor, hessian: Tensor, clip_sigmas: float, r: int, lam: float, damping: float) -> Tensor:
    """The fp16 row scale of Hessian-aware SDClip, the record's operations in its order."""
    w32 = w.float()
    diag = damped_diagonal(hessian, damping).clamp_min(DIAGONAL_FLOOR)
    col_importance = diag / diag.mean()
    row_importance = (w32.abs() * col_importance.unsqueeze(0)).mean(dim=1)
    row_importance = row_importance / row_importance.mean()
    adjust = 1.0 + lam * (row_importance - 1.0)
    return (clip_sigmas * w32.std(dim=1) * adjust / r).clamp_min(SDCLIP_MIN_SCALE).to(torch.float16)
