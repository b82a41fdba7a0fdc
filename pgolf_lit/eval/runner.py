"""One evaluation pass by name, timed and labelled, and its result line (upstream ``eval_val*`` log lines).

``EvalSettings`` holds the window geometry every pass shares (``seq_len``, ``stride``) and one settings section
per registered method, built from the registry (``registry.eval_methods()``, which imports every module of
``METHOD_MODULES`` first) when this module is imported, so a new method needs no edit here. This module imports no
method by name, so the wrapped evaluation program of ``code_size.py`` carries only its config's methods.
``run_method`` is what ``pgolf test``, ``pgolf eval`` and ``GPTQExport`` call per pass, with an ``EvalContext``
(``context.py``) saying how the forwards run and which weights are scored. The line format keeps the upstream
labels and 8-decimal fields so existing log parsers keep working, and appends pgolf_lit's extra fields (stride,
window rule, SLOT mode, compliance) after ``eval_time``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf_lit.errors import CheckedConfig, ConfigError
from pgolf_lit.eval.context import EvalContext, evaluation_context
from pgolf_lit.eval.registry import PassSetup, eval_methods
from pgolf_lit.metrics import BitsPerByte, ByteCounts, as_byte_counts


@dataclass
class EvalBase(CheckedConfig):
    """Settings shared by every pass (``from_dict`` reads the method sections too)."""

    SECTION = "model.evaluation"

    seq_len: int = 2048
    """Window length of every pass (upstream EVAL_SEQ_LEN, else TRAIN_SEQ_LEN); also trims the val split."""
    include_tail: bool = False
    """Score the whole val split, not only its first ``k·seq_len + 1`` tokens: each pass then also scores the last,
    shorter window (upstream EVAL_INCLUDE_TAIL=1, PR #2014: 47,853,343 targets instead of 47,851,520)."""
    stride: int = 64
    """Positions between sliding windows (sliding, SLOT and TTT passes)."""
    labels: dict[str, str] = field(default_factory=dict)
    """Result-line labels of artifact passes by method, replacing the upstream defaults (e.g. the baseline's
    ``final_int8_zlib_roundtrip``, PR #1394's ``quantized``); float weights are always ``pre-quantization ...``."""
    progress: bool = False
    """Progress bars for long passes (SLOT, TTT)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.seq_len <= 0:
            raise ConfigError(f"evaluation.seq_len: must be positive, got {self.seq_len}")
        if not 0 < self.stride <= self.seq_len:
            raise ConfigError(f"evaluation.stride: must lie in [1, seq_len={self.seq_len}], got {self.stride}")
        unknown = sorted(set(self.labels) - set(eval_methods()))
        if unknown:
            raise ConfigError(
                f"evaluation.labels: unknown method(s) {unknown}; expected some of {list(eval_methods())}"
            )

    @classmethod
    def from_dict(cls, section: Mapping[str, Any]):
        """From a YAML/checkpoint mapping; nested method sections update that method's defaults (a config lists
        only what differs). Unknown keys name the field."""
        changes: dict[str, Any] = {}
        for key, value in (section or {}).items():
            if key in eval_methods():
                settings_cls = eval_methods()[key].settings
                known = {f.name for f in dataclasses.fields(settings_cls)}
                if not isinstance(value, Mapping) or set(value) - known:
                    bad = sorted(set(value) - known) if isinstance(value, Mapping) else value
                    raise ConfigError(
                        f"model.evaluation.{key}: unknown field(s) {bad}; expected some of {sorted(known)}"
                    )
                value = settings_cls(**value)
            elif key not in {f.name for f in dataclasses.fields(EvalBase)}:
                raise ConfigError(f"model.evaluation: unknown field '{key}'")
            changes[key] = value
        return cls(**changes)


EvalSettings = dataclasses.make_dataclass(
    "EvalSettings",
    [(name, m.settings, field(default_factory=m.settings)) for name, m in eval_methods().items()],
    bases=(EvalBase,),
)
EvalSettings.__module__ = __name__
EvalSettings.__doc__ = (
    "Settings of every evaluation pass: the shared window geometry, then one section per registered method "
    f"({', '.join(eval_methods())})."
)


@dataclass
class EvalResult:
    label: str
    val_loss: float
    val_bpb: float
    tokens: int  # scored positions, summed over ranks
    bytes: int  # UTF-8 bytes of the scored targets, summed over ranks
    eval_time_ms: float
    compliant: bool
    extra: dict[str, Any] = field(default_factory=dict)  # printed after eval_time, in insertion order
    method: str = ""
    weights: str = ""  # what was scored: "quantized int6", "float post-ema", ...
    # What eval_time counts besides the scoring forwards: "compile" (forwards compiled inside the pass) and
    # "precompute" (work a method does before scoring, e.g. a hint table); empty when nothing else.
    eval_time_includes: tuple[str, ...] = ()


def format_result_line(result: EvalResult) -> str:
    """``{label} val_loss:{:.8f} val_bpb:{:.8f} eval_time:{ms}ms eval_time_includes:{what}`` then ``key:value``
    extras and ``compliant:``. ``what`` is ``compile``, ``precompute``, both joined by ``+``, or ``none``."""
    line = (
        f"{result.label} val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} "
        f"eval_time:{result.eval_time_ms:.0f}ms eval_time_includes:{'+'.join(result.eval_time_includes) or 'none'}"
    )
    fields = [f"{key}:{value}" for key, value in result.extra.items()]
    fields.append(f"compliant:{'yes' if result.compliant else 'no'}")
    return " ".join([line, *fields])


def scored_counts(metric: BitsPerByte) -> tuple[int, int]:
    """(scored tokens, their bytes) summed over ranks; every rank must call it (it syncs)."""
    distributed = dist.is_available() and dist.is_initialized()
    with metric.sync_context(should_sync=distributed):
        return int(metric.token_count), int(metric.byte_count)


def run_method(
    method: str,
    model: nn.Module,
    tokens: Tensor,
    byte_counts: Union[ByteCounts, tuple[Tensor, Tensor, Tensor]],
    context: EvalContext,
    rank: int = 0,
    world_size: int = 1,
) -> EvalResult:
    """Run one registered pass on every rank and return the global result.

    ``byte_counts``: the split's byte LUTs, or a ``ByteCounts`` whose sidecar then counts the bytes (CaseOps data);
    the result line says which (``bytes:sidecar|lut``). The model is put in evaluation state first (eval mode, depth
    recurrence on, as every record evaluates).
    Collective: with a process group every rank must call it with the same method and context. The clock covers
    the whole pass, compilation included, and stops after the ranks' sums are reduced.
    """
    if method not in eval_methods():
        raise ConfigError(f"unknown eval method '{method}': expected one of {list(eval_methods())}")
    entry = eval_methods()[method]
    settings = context.settings
    if hasattr(model, "set_recurrence"):
        model.set_recurrence(True)
    model.eval()
    device = next(model.parameters()).device
    counts = as_byte_counts(byte_counts)
    if counts.sidecar is not None and counts.sidecar.numel() < tokens.numel():
        raise ConfigError(
            f"eval: the byte sidecar has {counts.sidecar.numel()} entries for {tokens.numel()} val tokens; "
            "they must align"
        )
    metric = BitsPerByte(counts).to(device)
    setup = PassSetup(
        seq_len=settings.seq_len,
        stride=settings.stride,
        rank=rank,
        world_size=world_size,
        options=context.forward,
        progress=settings.progress and rank == 0,
    )
    start = time.perf_counter()
    outcome = entry.run(model, tokens, metric, getattr(settings, method), setup)
    token_count, byte_count = scored_counts(metric)
    values = metric.compute()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed_ms = 1000.0 * (time.perf_counter() - start)
    return EvalResult(
        label=context.label(entry.quantized_label, entry.float_suffix, method),
        val_loss=float(values["loss"]),
        val_bpb=float(values["bpb"]),
        tokens=token_count,
        bytes=byte_count,
        eval_time_ms=elapsed_ms,
        compliant=outcome.compliant,
        extra={**outcome.extra, "bytes": metric.byte_source},
        method=method,
        weights=context.weights.describe(),
        eval_time_includes=tuple(
            what
            for what, included in (("compile", context.forward.compile), ("precompute", outcome.precompute))
            if included
        ),
    )


__all__ = [
    "EvalResult",
    "EvalSettings",
    "evaluation_context",
    "format_result_line",
    "run_method",
    "scored_counts",
]
