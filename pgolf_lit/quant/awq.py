"""AWQ-lite mixed precision inside GPTQ (PR #1908, in PR #1945's record; upstream AWQ_LITE_*, spec frontier.md §2.2).

During the GPTQ calibration pass the root mean square of every input channel of every hooked matrix is recorded
with the Hessians (``act_rms[c] = sqrt(Σ x[:, c]² / rows)``, the same inputs). Every full group of ``group_size``
consecutive input columns of every GPTQ matrix whose bit width is below ``bits`` is scored by

    score(g) = Σ_{c in g} act_rms[c] · mean_r |W[r, c]|

(raw scores, compared across all tensors), and the ``top_k`` best groups of the whole model are quantized at
``bits`` instead, inside the same Hessian-ordered GPTQ sweep: their columns use a second per-row scale
``s_hi = fp16(max(k·σ_r / R_hi, 1e-10))`` (same clip k and row std, R_hi = 2^(bits−1) − 1), so the error feedback
sees the finer grid. The codes stay in the tensor's int8 ``NAME.q``; the group is stored beside it as
``NAME.awqg_start`` (int16 [groups]), ``NAME.awqg_s_hi`` (fp16 [rows]), ``NAME.awqg_size`` (int16, 0-d), and the
record's meta string gains ``+awqgrpint8`` (before any LQER suffix). Dequantization: W = q·s per row, then the
group's columns q·s_hi, then LQER (which is fitted on that W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor

from pgolf_lit.errors import ConfigError

from pgolf_lit.quant.awq_read import KEY_SUFFIXES, AwqGroups, meta_suffix  # noqa: F401  (the reading side)


@dataclass
class AwqSettings:
    """AWQ-lite's knobs under the upstream names (PR #1945's record: the defaults, with AWQ_LITE_ENABLED=1)."""

    bits: int = 8
    """Bit width of the protected groups (AWQ_LITE_BITS); only tensors with fewer bits are candidates."""
    top_k: int = 1
    """Groups protected in the whole model (AWQ_LITE_GROUP_TOP_K)."""
    group_size: int = 64
    """Consecutive input columns per group (AWQ_LITE_GROUP_SIZE); a tail of cols % group_size is never a candidate."""

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"export.awq.bits: must lie in [2, 8] (int8 codes), got {self.bits}")
        if self.top_k < 0:
            raise ConfigError(f"export.awq.top_k: must be >= 0, got {self.top_k}")
        if self.group_size < 1:
            raise ConfigError(f"export.awq.group_size: must be >= 1, got {self.group_size}")


def activation_rms(sumsq: Tensor, count: int) -> Tensor:
    """sqrt(Σx² / rows) per input channel, fp32 (PR #1945 ``collect_hessians``)."""
    return (sumsq.float() / count).sqrt()


def group_scores(w: Tensor, act_rms: Tensor, group_size: int) -> list[tuple[float, int, int]]:
    """(score, start, end) of every full group of ``w``'s input columns, left to right
    (PR #1945 ``_awq_lite_group_candidates``)."""
    cols = w.shape[1]
    saliency = act_rms.float() * w.float().abs().mean(dim=0)
    return [
        (float(saliency[s : s + group_size].sum()), s, s + group_size)
        for s in range(0, (cols // group_size) * group_size, group_size)
    ]


def select_groups(
    weights: Mapping[str, Tensor], act_rms: Mapping[str, Tensor], bits: Mapping[str, int], settings: AwqSettings
) -> tuple[list[tuple[float, str, int, int]], dict[str, list[tuple[int, int]]]]:
    """All candidates (score, name, start, end), best first (a stable sort on −score: ties keep state-dict then
    column order), and the ``top_k`` chosen ones by tensor. ``weights`` are the GPTQ tensors in state-dict order,
    ``bits`` their widths; a tensor without activation statistics or with ``bits >= settings.bits`` is no
    candidate (PR #1945 ``gptq_mixed_quantize``)."""
    candidates = []
    for name, w in weights.items():
        if name in act_rms and bits[name] < settings.bits and w.ndim == 2:
            candidates += [(score, name, s, e) for score, s, e in group_scores(w, act_rms[name], settings.group_size)]
    candidates.sort(key=lambda c: -c[0])
    chosen: dict[str, list[tuple[int, int]]] = {}
    for _, name, start, end in candidates[: settings.top_k]:
        chosen.setdefault(name, []).append((start, end))
    return candidates, chosen


def protect_mask(cols: int, groups: Optional[Sequence[tuple[int, int]]]) -> Optional[Tensor]:
    """A bool mask over the original columns marking the protected groups (None when there are none)."""
    if not groups:
        return None
    mask = torch.zeros(cols, dtype=torch.bool)
    for start, end in groups:
        if not 0 <= start < end <= cols:
            raise ValueError(f"AWQ group [{start}, {end}) lies outside the {cols} columns")
        mask[start:end] = True
    return mask
