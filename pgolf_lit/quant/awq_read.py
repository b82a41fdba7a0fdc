"""AWQ-lite's reading side (PR #1945): the ``.awqg_*`` tensors of a tensor's protected groups and how they
dequantize. Loading an artifact imports this, never the selection in ``awq.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

KEY_SUFFIXES = (".awqg_start", ".awqg_s_hi", ".awqg_size")


def meta_suffix(bits: int) -> str:
    """The record's meta-string suffix of a tensor with protected groups: ``+awqgrpint8``."""
    return f"+awqgrpint{bits}"


@dataclass
class AwqGroups:
    """The protected groups of one tensor: start columns, the high-precision row scale, the group size."""

    starts: Tensor
    s_hi: Tensor
    size: Tensor

    def tensors(self, name: str) -> dict[str, Tensor]:
        return dict(zip((name + s for s in KEY_SUFFIXES), (self.starts, self.s_hi, self.size)))

    @classmethod
    def from_tensors(cls, quant: Mapping[str, Tensor], name: str) -> "AwqGroups":
        return cls(*(quant[name + s] for s in KEY_SUFFIXES))

    def apply(self, w: Tensor, q: Tensor) -> Tensor:
        """``w`` (fp32, q·s) with every protected group's columns replaced by q·s_hi, in place; returns it."""
        size = int(self.size.item())
        s_hi = self.s_hi.float().view(-1, 1)
        for start in self.starts.tolist():
            w[:, start : start + size] = q[:, start : start + size].float() * s_hi
        return w
