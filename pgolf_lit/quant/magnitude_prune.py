"""Magnitude pruning before quantization (PR #180 train_gpt.py, after SWA: "zero out smallest weights to improve
compression").

Every 2-D float tensor with more than ``min_numel`` elements has the entries with ``|w|`` strictly below the
``fraction`` quantile of its own ``|w|`` (torch.quantile's linear interpolation, over the flattened tensor, in fp32)
set to zero. The record prunes its live parameters in place, so the zeros reach every later step: the quantized
codes and the fp16 passthrough of kept tensors alike. Here the export applies it to the state dict it quantizes;
the artifact read back is the same. Distinct from ``prune.py`` (±1 codes after quantization, to fit the budget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from pgolf_lit.errors import ConfigError

# torch.quantile refuses inputs with more elements than this
_QUANTILE_MAX_NUMEL = 1 << 24


@dataclass
class MagnitudePruneSettings:
    """PR #180's magnitude pruning (hard-coded in its script, no env var: 3 % of each matrix above 65,536 elements)."""

    fraction: float = 0.03
    """Quantile of |w| below which a tensor's entries become zero."""
    min_numel: int = 65_536
    """Only 2-D tensors with more elements than this are pruned (the record's ``param.numel() > 65536``)."""

    def validate(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"export.magnitude_prune.fraction: must lie in (0, 1), got {self.fraction}")
        if self.min_numel < 0:
            raise ConfigError(f"export.magnitude_prune.min_numel: must be >= 0, got {self.min_numel}")


def flat_quantile(x: Tensor, q: float) -> Tensor:
    """torch.quantile of the flattened fp32 tensor (linear interpolation), also above torch.quantile's size limit
    (by the two order statistics it interpolates between)."""
    flat = x.float().flatten()
    if flat.numel() <= _QUANTILE_MAX_NUMEL:
        return torch.quantile(flat, q)
    pos = q * (flat.numel() - 1)
    lo = int(pos)
    low = flat.kthvalue(lo + 1).values
    high = flat.kthvalue(min(lo + 2, flat.numel())).values
    return torch.lerp(low, high, torch.tensor(pos - lo, dtype=torch.float32))


def magnitude_prune(state_dict: Mapping[str, Tensor], settings: MagnitudePruneSettings) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with the smallest-magnitude entries of each large matrix zeroed (others shared)."""
    out = dict(state_dict)
    for name, t in state_dict.items():
        if t.is_floating_point() and t.ndim == 2 and t.numel() > settings.min_numel:
            threshold = flat_quantile(t.abs(), settings.fraction)
            out[name] = t.masked_fill(t.abs() < threshold, 0.0)
    return out
