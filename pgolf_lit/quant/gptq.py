"""Full GPTQ (Frantar et al., 2023) as the record scripts run it (PR #1263 ``quantize_int6_gptq``,
PR #1334/#1394 ``gptq_quantize_weight``).

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
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from pgolf_lit.errors import ArtifactError, ConfigError
from pgolf_lit.quant.hessian_sdclip import hessian_sdclip_scale
from pgolf_lit.quant.quantizers import Quantized, Quantizer, TensorRule, clip_range
from pgolf_lit.quant.rtn import PERCENTILE_CANDIDATES, floored_scale, percentile_row_clip, quantize_rtn, sdclip_scale

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


def gptq_sweep(
    w_perm: Tensor,
    upper: Tensor,
    scale: Tensor,
    r: int,
    block_size: int = BLOCK_SIZE,
    protect_perm: Optional[Tensor] = None,
    scale_hi: Optional[Tensor] = None,
    r_hi: int = 0,
) -> Tensor:
    """Quantize the act-ordered weight column by column with error feedback; int8 codes in act-order.

    ``scale`` is the fp32 value of the stored fp16 row scale. Propagated values may leave [-R·s, R·s]; the clamp
    saturates them. ``protect_perm`` (bool, act-order) marks AWQ-lite's protected columns, quantized on the finer
    grid ``scale_hi`` / ``r_hi`` inside the same sweep (PR #1945 ``gptq_quantize_weight``; ``awq.py``).
    """
    rows, cols = w_perm.shape
    codes = torch.zeros(rows, cols, dtype=torch.int8, device=w_perm.device)
    work = w_perm.clone()
    protected = protect_perm.tolist() if protect_perm is not None else [False] * cols
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = work[:, start:end].clone()
        u_block = upper[start:end, start:end]
        errors = torch.zeros(rows, end - start, device=w_perm.device)
        for j in range(end - start):
            column = block[:, j]
            if protected[start + j]:
                q = torch.clamp(torch.round(column / scale_hi), -r_hi, r_hi)
                recon = q * scale_hi
            else:
                q = torch.clamp(torch.round(column / scale), -r, r)
                recon = q * scale
            codes[:, start + j] = q.to(torch.int8)
            err = (column - recon) / u_block[j, j]
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
    hessian_clip_lambda: float = 0.0,
) -> Quantized:
    """One sweep with the SDClip scale fp16(k · std_row / R) of the original weight (no floor); with
    ``hessian_clip_lambda`` > 0 the scale of Hessian-aware SDClip (PR #1412, ``hessian_sdclip.py``)."""
    w32 = w.float()
    factor = factor_hessian(hessian, damping)
    r = clip_range(bits)
    if hessian_clip_lambda > 0:
        scale = hessian_sdclip_scale(w32, hessian, clip_sigmas, r, hessian_clip_lambda, damping)
    else:
        scale = sdclip_scale(w32, clip_sigmas, r)
    codes = gptq_sweep(permuted_weight(w32, factor), factor.upper, scale.float(), r, block_size)
    return Quantized(codes[:, factor.inv_perm], scale)


def gptq_sdclip_protected(
    w: Tensor,
    hessian: Tensor,
    bits: int,
    clip_sigmas: float,
    protect: Tensor,
    protect_bits: int,
    damping: float = DAMPING,
    block_size: int = BLOCK_SIZE,
) -> tuple[Quantized, Tensor]:
    """``gptq_sdclip`` with AWQ-lite's protected columns (``protect``: bool over the original columns) on the
    ``protect_bits`` grid of the same clip: (codes and the row scale, s_hi = fp16(max(k·σ_r / R_hi, 1e-10)))."""
    w32 = w.float()
    factor = factor_hessian(hessian, damping)
    r, r_hi = clip_range(bits), clip_range(protect_bits)
    scale, scale_hi = sdclip_scale(w32, clip_sigmas, r), sdclip_scale(w32, clip_sigmas, r_hi)
    codes = gptq_sweep(
        permuted_weight(w32, factor),
        factor.upper,
        scale.float(),
        r,
        block_size,
        protect.to(w32.device)[factor.perm],
        scale_hi.float(),
        r_hi,
    )
    return Quantized(codes[:, factor.inv_perm], scale), scale_hi


def hessian_weighted_error(w: Tensor, w_hat: Tensor, hessian: Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) in float64: the layer-output error GPTQ minimizes (for X with H = XᵀX)."""
    d = w.double() - w_hat.double()
    return float(torch.einsum("ij,jk,ik->", d, hessian.double(), d))


# ---------------------------------------------------------------------------------------------------------
# Settings and registration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class GPTQSettings:
    """GPTQ's knobs beyond the per-group ``TensorRule``: Hessian collection and the sweep."""

    damping: float = DAMPING
    """Added to the Hessian diagonal before the Cholesky factor, relative to its mean (every record: 0.01)."""
    block_size: int = BLOCK_SIZE
    """Columns per lazy-update block (every record: 128)."""
    fallback: Literal["rtn", "error"] = "rtn"
    """No Hessian for a tensor, or a failed Cholesky: RTN with the rule's scale (records before PR #1394), or stop."""
    device: str = "cpu"
    """Where the sweep runs; the records use the CPU, "cuda" is far faster but may flip codes at rounding ties."""
    hessian_modules: Literal["large", "all", "layers"] = "large"
    """Hook the mlp/attn matrices above the keep-float size (PR #1333/#1394), every CastedLinear (PR #1263), or the
    mlp/attn matrices of the transformer layers only (PR #1204; ``hessians.py``)."""
    hessian_damping: float = 0.0
    """Damping added at collection, on top of ``damping`` (PR #1263: 0.01)."""
    calibration_batches: Optional[int] = None
    """Cap on the calibration batches taken from what the exporter is given (None: all of them)."""
    hessian_clip_lambda: float = 0.0
    """Hessian-aware SDClip (PR #1412: 0.175; upstream HESSIAN_CLIP_LAMBDA): the sdclip scale of every GPTQ tensor
    × (1 + λ · (row importance − 1)), see ``hessian_sdclip.py``; 0 = plain SDClip."""

    def validate(self) -> None:
        if self.fallback not in ("rtn", "error"):
            raise ConfigError(f"export.gptq.fallback: expected 'rtn' or 'error', got {self.fallback!r}")
        if self.hessian_modules not in ("large", "all", "layers"):
            raise ConfigError(
                f"export.gptq.hessian_modules: expected 'large', 'all' or 'layers', got {self.hessian_modules!r}"
            )
        if not self.damping >= 0 or not self.hessian_damping >= 0:
            raise ConfigError("export.gptq.damping/hessian_damping: must be >= 0")
        if self.block_size < 1:
            raise ConfigError(f"export.gptq.block_size: must be >= 1, got {self.block_size}")
        if not self.hessian_clip_lambda >= 0:
            raise ConfigError(f"export.gptq.hessian_clip_lambda: must be >= 0, got {self.hessian_clip_lambda}")
        if self.calibration_batches is not None and self.calibration_batches < 1:
            raise ConfigError(f"export.gptq.calibration_batches: must be >= 1 or null, got {self.calibration_batches}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ConfigError(f"export.gptq.device: not a torch device: {self.device!r}") from None


def quantize_gptq(
    name: str, t: Tensor, rule: TensorRule, bits: int, hessian: Optional[Tensor], settings: GPTQSettings
) -> tuple[Quantized, dict[str, Any]]:
    """GPTQ with the rule's scale on a 2-D tensor; 1-D tensors, a missing Hessian or a failed Cholesky follow
    ``settings.fallback`` (RTN with the same scale, labelled GPTQ as the records label it, or an error)."""
    if t.ndim != 2:
        return quantize_rtn(name, t, rule, bits, None, settings)
    if hessian is None:
        if settings.fallback == "error":
            raise ArtifactError(f"{name}: GPTQ needs a Hessian and none was collected (gptq.fallback='error')")
        return quantize_rtn(name, t, rule, bits, None, settings)
    w, h = t.to(settings.device), hessian.to(settings.device)
    try:
        if rule.scale == "sdclip":
            lam = settings.hessian_clip_lambda
            q = gptq_sdclip(w, h, bits, rule.clip_sigmas, settings.damping, settings.block_size, lam)
            how: dict[str, Any] = {"method": "gptq", "clip_sigmas": rule.clip_sigmas}
            if lam:
                how["hessian_clip_lambda"] = lam
        else:
            q = gptq_percentile_search(w, h, bits, settings.damping, settings.block_size)
            how = {"method": "gptq", "percentile": q.percentile}
        return Quantized(q.q.cpu(), q.scale.cpu(), q.percentile), how
    except torch.linalg.LinAlgError:
        if settings.fallback == "error":
            raise ArtifactError(
                f"{name}: GPTQ Cholesky failed (Hessian not positive definite after damping); "
                "collect more calibration data or set gptq.fallback='rtn'"
            ) from None
        q, how = quantize_rtn(name, t, rule, bits, None, settings)
        return q, {**how, "method": "gptq", "fallback": "rtn"}  # the records label this tensor GPTQ


QUANTIZERS = (
    Quantizer("gptq", quantize_gptq, scales=("percentile_search", "sdclip"), needs_hessian=True, settings=GPTQSettings),
)
