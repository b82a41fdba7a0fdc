"""How an evaluation pass runs and what its result line says, decided in one place.

``pgolf test`` (the Trainer), ``pgolf eval`` (Fabric) and the fit-end scores of ``GPTQExport`` all build their
evaluation with ``evaluation_context``: the precision and compilation of the forwards (``forward_options``), the
settings of every pass, and which weights are scored. The label of a result line follows from the weights, so the
same label always means the same computation: ``final_int6_roundtrip`` is an int6 artifact scored by the standard
pass, ``pre-quantization post-ema`` the float EMA weights, never the other way round.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Optional

import torch


@dataclass(frozen=True)
class ForwardOptions:
    """The precision context and compilation of model forwards. The default is plain eager fp32 (CPU, tests);
    ``ForwardOptions.bf16()`` is the records' setting on CUDA (bf16 autocast, ``torch.compile`` with
    ``dynamic=False`` created inside the call so compile time counts as eval time)."""

    autocast: Callable[[], AbstractContextManager] = nullcontext
    compile: bool = False

    @classmethod
    def bf16(cls, device_type: str = "cuda", compile: bool = True) -> "ForwardOptions":
        return cls(autocast=partial(torch.autocast, device_type=device_type, dtype=torch.bfloat16), compile=compile)

    def compiled(self, fn: Callable, dynamic: bool = False) -> Callable:
        return torch.compile(fn, dynamic=dynamic) if self.compile else fn


def forward_options(precision: str, device: torch.device, compile: bool) -> ForwardOptions:
    """The records' eval forwards: bf16 autocast (+ compile) for a ``bf16`` precision on CUDA; fp32 otherwise
    (compiling only on CUDA, where the records do)."""
    if str(precision).startswith("bf16") and device.type == "cuda":
        return ForwardOptions.bf16(compile=compile)
    return ForwardOptions(compile=compile and device.type == "cuda")


@dataclass(frozen=True)
class Weights:
    """Which weights a pass scores: a quantized artifact (``tag`` such as ``int6``) or float weights (``note``
    such as ``post-ema`` when an averaging callback produced them)."""

    quantized: bool = False
    tag: str = ""
    note: str = ""

    @classmethod
    def float_weights(cls, note: str = "") -> "Weights":
        return cls(False, "", note)

    @classmethod
    def artifact(cls, quant: Mapping[str, torch.Tensor], meta: Mapping[str, Mapping[str, Any]]) -> "Weights":
        """The quantized weights of an artifact, tagged with the code width that holds most of its codes (``int6``
        for the records' int6 matrices beside an int8 embedding); ``fp16`` when nothing is quantized."""
        widths: dict[int, int] = {}
        for name, entry in meta.items():
            if entry.get("kind") == "int":
                bits = int(entry["bits"])
                widths[bits] = widths.get(bits, 0) + quant[f"{name}.q"].numel()
        if not widths:
            return cls(True, "fp16", "")
        return cls(True, f"int{max(widths, key=widths.get)}", "")

    def describe(self) -> str:
        if self.quantized:
            return f"quantized {self.tag}"
        return "float" + (f" {self.note}" if self.note else "")


@dataclass(frozen=True)
class EvalContext:
    """Everything a pass needs besides the model and the data: settings, forwards, weights."""

    settings: Any  # EvalSettings (pgolf_lit.eval.runner): every pass's settings
    forward: ForwardOptions
    weights: Weights

    def label(self, quantized_label: str, float_suffix: str, method: str) -> str:
        """The result-line label of ``method``: the upstream label for a quantized artifact (``labels`` in the
        settings override it, e.g. PR #1394's ``quantized``), ``pre-quantization[ note][ suffix]`` for floats."""
        if self.weights.quantized:
            override = (self.settings.labels or {}).get(method)
            return override or quantized_label.format(q=self.weights.tag)
        parts = ["pre-quantization", self.weights.note, float_suffix]
        return " ".join(p for p in parts if p)


def evaluation_context(
    settings: Any,
    *,
    precision: str,
    device: torch.device,
    compile: bool,
    weights: Optional[Weights] = None,
) -> EvalContext:
    """The one way an evaluation is set up (``pgolf test``, ``pgolf eval``, ``GPTQExport``)."""
    return EvalContext(settings, forward_options(precision, device, compile), weights or Weights())
