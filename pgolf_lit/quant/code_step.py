"""Per-layer code step: the integer codes of chosen blocks rounded to a multiple of ``step`` (PR #39's mixed
precision, ``INT4_LAYERS=3,4,5,6 INT4_STEP=4``: "int6" middle layers inside the int8 container).

PR #39 quantizes every matrix at int8 as the baseline does, then, for each quantized tensor of a listed block
(``blocks.N.``), replaces its codes by ``clamp(round(q / step) · step, -127, 127)`` (torch's round: half to even),
scale unchanged. Fewer distinct codes compress better under zlib; dequantization is the usual ``q · scale``, so
nothing on the reading side changes. The layer comes from the tensor's declared role (``ParamRole.layer``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from pgolf_lit.errors import ConfigError

CODE_LIMIT = 127  # PR #39 clamps the stepped codes back into the int8 range [-127, 127]


@dataclass
class CodeStepSettings:
    """Which blocks get coarser codes, and how coarse (upstream INT4_LAYERS, INT4_STEP)."""

    layers: list[int] = field(default_factory=list)
    """Physical block indices whose quantized tensors are stepped (INT4_LAYERS, e.g. [3, 4, 5, 6])."""
    step: int = 16
    """Code step: 2 ≈ int7, 4 ≈ int6, 8 ≈ int5, 16 ≈ int4 (INT4_STEP; its default 16)."""

    def validate(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, int) or not 2 <= self.step <= 64:
            raise ConfigError(f"export.code_step.step: must be an integer in [2, 64], got {self.step!r}")
        if not self.layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
            raise ConfigError(f"export.code_step.layers: expected a non-empty list of block indices, got {self.layers}")


def step_codes(q: Tensor, step: int) -> Tensor:
    """``clamp(round(q / step) · step, -127, 127)`` as int8 (PR #39 train_gpt.py, after quantize_state_dict_int8)."""
    return ((q.float() / step).round() * step).clamp(-CODE_LIMIT, CODE_LIMIT).to(torch.int8)
