"""LQER: low-rank reconstruction of the worst GPTQ quantization errors (PR #1855 train_gpt.py `gptq_mixed_quantize`).

After GPTQ, every quantized matrix has an error ``E = W − q·s`` (plain fp32 difference). The ``top_k`` matrices
with the largest ‖E‖_F get a rank-``r`` correction ``A @ B`` from the truncated SVD of E (``A = U_r·S_r``,
``B = Vh_r``), stored in very few bits:

* asymmetric (``"asym"``, used when ``B.numel()`` is a multiple of the group): A with one fp16 scale for the whole
  matrix, ``sA = fp16(max|A| / 1.5)``, codes in [-2, 1]; B flattened row-major in groups of ``asym_group``
  values, one fp16 scale per group ``fp16(max|B_g| / 7.5)``, codes in [-8, 7]. Keys ``NAME.lqA_a`` (int8
  [rows, r]), ``NAME.lqAs_a`` (fp16 0-d), ``NAME.lqB_a`` (int8 [r, cols]), ``NAME.lqBs_a`` (fp16 [r·cols/g]);
  the meta string gets ``"+lqer_asym"``.
* symmetric fallback (``"sym"``): one fp16 scale per row of A and of B, codes in ±(2^(bits−1)−1). Keys
  ``NAME.lqA``, ``NAME.lqAs``, ``NAME.lqB``, ``NAME.lqBs``; meta ``"+lqer"``.

Dequantization: ``W = q·s + (qA·sA) @ (qB·sB)`` in fp32, then cast to the target dtype.

The factors are exact against the record only with the same LAPACK *and thread count*: MKL's fp32 SVD of the
same matrix differs in the last bits between 1 and 2 threads. ``LqerSettings.svd_threads`` therefore pins the
SVD to one thread by default (the fixtures were made that way), so the factors do not depend on the machine's
core count; ``None`` runs it with torch's current thread count, as the record did.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor

from pgolf_lit.errors import ConfigError
from pgolf_lit.quant.lqer_read import (  # noqa: F401  (the reading side, re-exported)
    ASYM,
    KEY_SUFFIXES,
    META_SUFFIX,
    SYM,
    LqerFactors,
    lqer_correction,
    lqer_dequant,
)
from pgolf_lit.quant.awq import KEY_SUFFIXES as AWQ_KEY_SUFFIXES
from pgolf_lit.quant.awq import AwqGroups

MIN_SCALE = 1e-10
ASYM_A_RANGE = (-2, 1)
ASYM_A_DIVISOR = 1.5
ASYM_B_RANGE = (-8, 7)
ASYM_B_DIVISOR = 7.5


@dataclass(frozen=True)
class LqerSettings:
    """The record's LQER knobs (env names in brackets).

    rank: rank r of the correction [LQER_RANK].
    top_k: how many GPTQ matrices, largest ‖W − q·s‖_F first, get one [LQER_TOP_K].
    asym: use the asymmetric pack when B's size allows it [LQER_ASYM_ENABLED].
    asym_group: values per fp16 scale in the asymmetric B [LQER_ASYM_GROUP].
    factor_bits: code width of both factors in the symmetric fallback [LQER_FACTOR_BITS].
    svd_threads: torch threads for the SVD (1: reproducible across machines; None: torch's current setting).
    """

    rank: int = 4
    top_k: int = 3
    asym: bool = True
    asym_group: int = 64
    factor_bits: int = 4
    svd_threads: Optional[int] = 1

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lqer rank must be >= 1, got {self.rank}")
        if self.top_k < 0:
            raise ConfigError(f"lqer top_k must be >= 0, got {self.top_k}")
        if self.asym_group < 1:
            raise ConfigError(f"lqer asym_group must be >= 1, got {self.asym_group}")
        if not 2 <= self.factor_bits <= 8:
            raise ConfigError(f"lqer factor_bits must lie in [2, 8], got {self.factor_bits}")
        if self.svd_threads is not None and self.svd_threads < 1:
            raise ConfigError(f"lqer svd_threads must be >= 1 or None, got {self.svd_threads}")


def quantization_error(w: Tensor, q: Tensor, scale: Tensor, awq=None) -> Tensor:
    """E = W − q·s in fp32, s one value per row, AWQ-lite's protected columns at their own scale (``awq``, PR #1945:
    LQER is fitted after AWQ) (PR #1855/#1945 train_gpt.py `gptq_mixed_quantize`, LQER candidates)."""
    w_q = q.float() * scale.float().view(-1, 1)
    if awq is not None:
        awq.apply(w_q, q)
    return w.float() - w_q


def lqer_select(scores: Mapping[str, float], top_k: int) -> list[str]:
    """The ``top_k`` names of largest score, ties in the mapping's order (the script's stable sort on −‖E‖_F)."""
    return [name for name, _ in sorted(scores.items(), key=lambda kv: -kv[1])[:top_k]]


@contextlib.contextmanager
def _torch_threads(n: Optional[int]) -> Iterator[None]:
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def lqer_factor(error: Tensor, rank: int, svd_threads: Optional[int] = 1) -> tuple[Tensor, Tensor]:
    """A = U_r·S_r [rows, r], B = Vh_r [r, cols] of the thin SVD of E (PR #1855 train_gpt.py `gptq_mixed_quantize`)."""
    if error.ndim != 2:
        raise ValueError(f"LQER factors a 2-D error matrix, got shape {tuple(error.shape)}")
    with _torch_threads(svd_threads if error.device.type == "cpu" else None):
        u, s, vh = torch.linalg.svd(error, full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).contiguous(), vh[:r, :].contiguous()


def lqer_pack_asym(a: Tensor, b: Tensor, group: int = 64) -> LqerFactors:
    """A in [-2, 1] with one fp16 scale, B in [-8, 7] per ``group`` values (PR #1855 train_gpt.py `_lqer_pack_asym`)."""
    if b.numel() % group:
        raise ValueError(f"asymmetric LQER needs B.numel() ({b.numel()}) to be a multiple of the group ({group})")
    s_a = (a.abs().amax().clamp_min(MIN_SCALE) / ASYM_A_DIVISOR).to(torch.float16)
    q_a = torch.clamp(torch.round(a / s_a.float()), *ASYM_A_RANGE).to(torch.int8)
    groups = b.reshape(-1, group)
    s_b = (groups.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_SCALE) / ASYM_B_DIVISOR).to(torch.float16).reshape(-1)
    q_b = torch.clamp(torch.round(groups / s_b.float().reshape(-1, 1)), *ASYM_B_RANGE).to(torch.int8).reshape(b.shape)
    return LqerFactors(ASYM, q_a, s_a, q_b, s_b)


def lqer_pack_sym(a: Tensor, b: Tensor, bits: int = 4) -> LqerFactors:
    """Both factors with one fp16 scale per row, codes in ±(2^(bits−1)−1) (PR #1855 train_gpt.py `_lqer_pack`)."""
    r = 2 ** (bits - 1) - 1
    s_a = (a.abs().amax(dim=1).clamp_min(MIN_SCALE) / r).to(torch.float16)
    s_b = (b.abs().amax(dim=1).clamp_min(MIN_SCALE) / r).to(torch.float16)
    q_a = torch.clamp(torch.round(a / s_a.float().view(-1, 1)), -r, r).to(torch.int8)
    q_b = torch.clamp(torch.round(b / s_b.float().view(-1, 1)), -r, r).to(torch.int8)
    return LqerFactors(SYM, q_a, s_a, q_b, s_b)


def lqer_pack(a: Tensor, b: Tensor, settings: LqerSettings = LqerSettings()) -> LqerFactors:
    """The asymmetric pack when enabled and B's size is a multiple of the group, else the symmetric one."""
    if settings.asym and b.numel() % settings.asym_group == 0:
        return lqer_pack_asym(a, b, settings.asym_group)
    return lqer_pack_sym(a, b, settings.factor_bits)


def lqer_apply(
    weights: Mapping[str, Tensor],
    quant: Mapping[str, Tensor],
    names: Sequence[str],
    settings: LqerSettings = LqerSettings(),
) -> dict[str, LqerFactors]:
    """Every LQER step on finished GPTQ results: score, select, factor, pack
    (PR #1855 train_gpt.py `gptq_mixed_quantize`).

    ``names`` are the GPTQ-quantized weights in state-dict order (the candidates; ties keep this order);
    ``weights[name]`` is the float weight that was quantized, ``quant[name + ".q"]`` / ``quant[name + ".scale"]``
    its codes and per-row fp16 scale (and AWQ-lite's ``.awqg_*`` when present: the error is taken after AWQ).
    Returns the chosen names, largest error first, with their factors: the caller adds ``factors.tensors(name)``
    to the quantized dict and ``factors.meta_suffix`` to the name's meta.
    """

    def error_of(name: str) -> Tensor:
        awq = AwqGroups.from_tensors(quant, name) if name + AWQ_KEY_SUFFIXES[0] in quant else None
        return quantization_error(weights[name], quant[name + ".q"], quant[name + ".scale"], awq)

    scores = {}
    for name in names:
        scores[name] = float(error_of(name).norm())
    out: dict[str, LqerFactors] = {}
    for name in lqer_select(scores, settings.top_k):
        error = error_of(name)
        a, b = lqer_factor(error, settings.rank, settings.svd_threads)
        out[name] = lqer_pack(a, b, settings)
    return out
