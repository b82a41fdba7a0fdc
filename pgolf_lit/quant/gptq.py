"""Full GPTQ (Frantar et al., 2023) as the record scripts run it (spec/quantization.md §4).

Quantize one column at a time, in descending order of the Hessian diagonal ("act-order"), and push each column's
rounding error onto the columns not yet quantized through the upper Cholesky factor of H⁻¹. Columns go in
blocks of 128: inside a block the update is immediate, across blocks it is applied lazily as one matmul.

The per-row scale is fixed *before* the sweep, in one of two ways:

* ``gptq_percentile_search`` (PR #1263, PR #1333/#1334/#1421): for each of the five clip percentiles run a full
  sweep with the floored scale of that percentile; keep the lowest plain mean squared error.
* ``gptq_sdclip`` (PR #1394): one sweep with the scale ``k·std_row / R``.

All arithmetic is fp32 with the scripts' operations in the scripts' order: any reordering (or float64) flips a
few codes at rounding ties. The records run it on CPU; the functions run on the device of their inputs, so a GPU
is much faster but, like any other arithmetic change, may differ from the CPU codes at ties.
``factor_hessian`` raises ``torch.linalg.LinAlgError`` when H is not positive definite after damping; what to do
then is the caller's policy (the records fall back to RTN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pgolf_lit.quant.rtn import (
    PERCENTILE_CANDIDATES,
    Quantized,
    clip_range,
    floored_scale,
    percentile_row_clip,
    sdclip_scale,
)

BLOCK_SIZE = 128
DAMPING = 0.01  # added to the diagonal, relative to its mean


@dataclass
class HessianFactor:
    """The act-order permutation of a damped Hessian and the upper Cholesky factor U of its inverse (H⁻¹ = UᵀU)."""

    perm: Tensor
    inv_perm: Tensor
    dead: Tensor  # bool [cols], original column order: inputs that never fired (H[j, j] == 0)
    upper: Tensor


def factor_hessian(hessian: Tensor, damping: float = DAMPING) -> HessianFactor:
    """Dead columns get H[j, j] = 1, then H += damping · mean(diag H) · I, act-order, Cholesky of the inverse."""
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damping * h.diag().mean())
    perm = torch.argsort(h.diag(), descending=True)
    inv_perm = torch.argsort(perm)
    h = h[perm][:, perm]
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return HessianFactor(perm, inv_perm, dead, torch.linalg.cholesky(inverse, upper=True))


def permuted_weight(w: Tensor, factor: HessianFactor) -> Tensor:
    """The fp32 weight with columns in act-order and dead columns zeroed."""
    wp = w.float()[:, factor.perm].clone()
    wp[:, factor.dead[factor.perm]] = 0
    return wp


def gptq_sweep(w_perm: Tensor, upper: Tensor, scale: Tensor, r: int, block_size: int = BLOCK_SIZE) -> Tensor:
    """Quantize the act-ordered weight column by column with error feedback; int8 codes in act-order.

    ``scale`` is the fp32 value of the stored fp16 row scale. Propagated values may leave [-R·s, R·s]; the clamp
    saturates them.
    """
    rows, cols = w_perm.shape
    codes = torch.zeros(rows, cols, dtype=torch.int8, device=w_perm.device)
    work = w_perm.clone()
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = work[:, start:end].clone()
        u_block = upper[start:end, start:end]
        errors = torch.zeros(rows, end - start, device=w_perm.device)
        for j in range(end - start):
            column = block[:, j]
            q = torch.clamp(torch.round(column / scale), -r, r)
            codes[:, start + j] = q.to(torch.int8)
            err = (column - q * scale) / u_block[j, j]
            errors[:, j] = err
            block[:, j:] -= err.unsqueeze(1) * u_block[j, j:].unsqueeze(0)
        if end < cols:
            work[:, end:] -= errors @ upper[start:end, end:]
    return codes


def gptq_percentile_search(
    w: Tensor,
    hessian: Tensor,
    bits: int = 6,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
    candidates: tuple[float, ...] = PERCENTILE_CANDIDATES,
) -> Quantized:
    """One full sweep per clip percentile (scale from the original weight, 1/R floor); lowest MSE wins (strict <)."""
    w32 = w.float()
    factor = factor_hessian(hessian, damping)
    w_perm = permuted_weight(w32, factor)
    r = clip_range(bits)
    best_codes, best_scale, best_pct, best_err = None, None, None, float("inf")
    for pct in candidates:
        scale = floored_scale(percentile_row_clip(w32, pct), r)
        codes = gptq_sweep(w_perm, factor.upper, scale.float(), r, block_size)
        err = (w_perm - codes.float() * scale.float()[:, None]).pow(2).mean().item()
        if err < best_err:
            best_codes, best_scale, best_pct, best_err = codes, scale, pct, err
    if best_codes is None:
        raise ValueError("no percentile candidate has a finite error: the weight or Hessian holds NaN or inf")
    return Quantized(best_codes[:, factor.inv_perm], best_scale, best_pct)


def gptq_sdclip(
    w: Tensor,
    hessian: Tensor,
    bits: int,
    clip_sigmas: float,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
) -> Quantized:
    """One sweep with the SDClip scale fp16(k · std_row / R) of the original weight (no floor)."""
    w32 = w.float()
    factor = factor_hessian(hessian, damping)
    r = clip_range(bits)
    scale = sdclip_scale(w32, clip_sigmas, r)
    codes = gptq_sweep(permuted_weight(w32, factor), factor.upper, scale.float(), r, block_size)
    return Quantized(codes[:, factor.inv_perm], scale)


def hessian_weighted_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) in float64: the layer-output error GPTQ minimizes (for X with H = XᵀX)."""
    d = w.double() - w_hat.double()
    return float(torch.einsum("ij,jk,ik->", d, hessian.double(), d))
