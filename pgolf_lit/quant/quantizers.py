"""Quantizers by name: how one tensor too large to keep as a float becomes integer codes and scales.

A quantizer is one file, as an eval method is (``pgolf_lit/eval/registry.py``): the file defines its function and,
if it has knobs of its own, its settings dataclass, and declares them in a module-level ``QUANTIZERS`` tuple of
``Quantizer``; ``QUANTIZER_MODULES`` below names the file once (``rtn.py``: ``rtn``; ``gptq.py``: ``gptq`` with
``GPTQSettings``). ``quantizers()`` imports those modules the first time anything asks, and ``ExportConfig``
(``export.py``) gets one section per quantizer with settings, named after it (``export.gptq``), when it is built.
A ``TensorRule`` names the quantizer and carries the knobs every quantizer reads (bits, scale rule, clip). The
export applies one rule per quant group (``ExportConfig.attn``/``mlp``/``embed``/``other``/``gate``), chosen by
each tensor's declared role (``pgolf_lit.model.roles``), and passes the quantizer its own settings section.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional

from torch import Tensor

from pgolf_lit.errors import ConfigError

# Every module that defines quantizers: the one place a quantizer is listed (see the module docstring).
QUANTIZER_MODULES: tuple[str, ...] = ("pgolf_lit.quant.rtn", "pgolf_lit.quant.gptq")

# Float tensors with at most this many elements are stored as floats (the comparison is <=), in every record.
KEEP_FLOAT_MAX_NUMEL = 65_536


@dataclass
class Quantized:
    """Integer codes (int8 storage, the weight's shape) and their scale: fp16 ``[rows]`` or a 0-d tensor."""

    q: Tensor
    scale: Tensor
    percentile: Optional[float] = None  # the winning candidate of a percentile search


def clip_range(bits: int) -> int:
    """R = 2^(bits-1) - 1: the symmetric code range [-R, R]."""
    if not 2 <= bits <= 8:
        raise ConfigError(f"bits: must lie in [2, 8] (codes are stored one per int8), got {bits}")
    return 2 ** (bits - 1) - 1


ScaleRule = Literal["quantile", "percentile_search", "sdclip", "row_amax"]
SCALE_RULES: tuple[str, ...] = ("quantile", "percentile_search", "sdclip", "row_amax")


@dataclass
class TensorRule:
    """How the large tensors of one quant group are quantized."""

    bits: int = 6
    """Code width in [2, 8]: codes lie in [-R, R] with R = 2^(bits-1) - 1, stored one per byte."""
    method: str = "gptq"
    """A registered quantizer: ``rtn`` (round to nearest) or ``gptq`` (needs a Hessian; see ``QUANTIZERS``)."""
    scale: ScaleRule = "sdclip"
    """Per-row scale: ``quantile`` (baseline int8 clip, RTN only), ``percentile_search`` (five clip percentiles, 1/R
    floor), ``sdclip`` (``clip_sigmas`` row standard deviations), ``row_amax`` (max |w| of the row, PR #1855 gates)."""
    clip_sigmas: float = 12.85
    """k of the SDClip scale k·std_row/R (PR #1394: 12.85 matrices, 20 embeddings; PR #1855: 13 attn, 11.5 MLP,
    14 embed)."""

    def validate(self, where: str) -> None:
        try:
            clip_range(self.bits)
        except ConfigError:
            raise ConfigError(f"{where}.bits: must lie in [2, 8], got {self.bits}") from None
        if self.method not in quantizers():
            raise ConfigError(
                f"{where}.method: unknown quantizer {self.method!r}; expected one of {sorted(quantizers())}"
            )
        allowed = quantizers()[self.method].scales
        if self.scale not in allowed:
            raise ConfigError(f"{where}.scale: {self.method} takes one of {list(allowed)}, got {self.scale!r}")
        if self.scale == "sdclip" and not self.clip_sigmas > 0:
            raise ConfigError(f"{where}.clip_sigmas: must be positive, got {self.clip_sigmas}")


# (name, tensor, rule, bits, hessian or None, the quantizer's settings or None) -> (codes + scale, meta fields)
QuantizeFn = Callable[[str, Tensor, TensorRule, int, Optional[Tensor], Any], tuple[Quantized, dict[str, Any]]]


@dataclass(frozen=True)
class Quantizer:
    """A quantizer: its function, the scale rules it takes, whether it needs a Hessian, and its own settings
    dataclass (None: it has none), which becomes the ``export.<name>`` section of ``ExportConfig``."""

    name: str
    quantize: QuantizeFn
    scales: tuple[str, ...]
    needs_hessian: bool = False
    settings: Optional[type] = None


_REGISTRY: dict[str, Quantizer] = {}


def quantizers() -> dict[str, Quantizer]:
    """Every quantizer that ``QUANTIZER_MODULES`` declare (each module's ``QUANTIZERS``), by name, in that order;
    the modules are imported on the first call."""
    if not _REGISTRY:
        found: dict[str, Quantizer] = {}
        for module in QUANTIZER_MODULES:
            for quantizer in importlib.import_module(module).QUANTIZERS:
                if quantizer.name in found:
                    raise ValueError(f"quantizer {quantizer.name!r} is declared twice ({module})")
                found[quantizer.name] = quantizer
        _REGISTRY.update(found)
    return _REGISTRY
