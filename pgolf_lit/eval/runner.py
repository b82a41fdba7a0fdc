"""One evaluation pass by name, timed and labelled, and its result line (spec/evaluation.md §7.4, §9).

``run_method`` is what the Fabric evaluator and the CLI call per pass; the line format keeps the upstream
labels and 8-decimal fields so existing log parsers keep working, and appends pgolf_lit's extra fields
(stride, window rule, SLOT mode, compliance) after ``eval_time``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from pgolf_lit.errors import ConfigError
from pgolf_lit.eval.slot import SlotConfig, evaluate_slot, slot_preset
from pgolf_lit.eval.ttt import TTTConfig, evaluate_ttt
from pgolf_lit.eval.windows import ForwardOptions, WindowRule, evaluate_sliding, evaluate_standard, model_device
from pgolf_lit.metrics import BitsPerByte

METHODS = ("standard", "sliding", "slot", "causal_slot", "ttt")
DEFAULT_LABELS = {
    "standard": "final_int6_roundtrip",
    "sliding": "final_int6_sliding_window",
    "slot": "final_slot",
    "causal_slot": "final_causal_slot",
    "ttt": "final_int6_ttt",
}


@dataclass
class EvalSettings:
    """Settings of every pass. ``seq_len``/``stride``/``window_rule`` and the batch sizes apply to standard and
    sliding eval; the SLOT and TTT configs carry their own (their presets are whole record procedures).
    ``slot`` is the pass labelled ``final_slot`` (standard SLOT by default, for reproduction), ``causal_slot``
    the one labelled ``final_causal_slot`` (the compliant per-window variant by default)."""

    seq_len: int = 2048
    stride: int = 64
    window_rule: WindowRule = "exact"
    standard_batch_seqs: int = 32
    sliding_batch_windows: int = 32
    slot: SlotConfig = field(default_factory=lambda: slot_preset("pr1263"))
    causal_slot: SlotConfig = field(default_factory=lambda: slot_preset("causal_per_window"))
    ttt: TTTConfig = field(default_factory=TTTConfig)
    labels: dict[str, str] = field(default_factory=dict)  # method -> label, overriding DEFAULT_LABELS
    progress: bool = False
    # Set by the caller from its precision (not a config value: it holds an autocast factory).
    forward: ForwardOptions = field(default_factory=ForwardOptions, init=False, repr=False, compare=False)


    def to_dict(self) -> dict[str, Any]:
        """Plain values only (the runtime ``forward`` options are not configuration)."""
        d = dataclasses.asdict(self)
        d.pop("forward")
        return d

    @classmethod
    def from_dict(cls, section: dict[str, Any]) -> "EvalSettings":
        """From a YAML/checkpoint mapping: nested ``slot`` / ``causal_slot`` / ``ttt`` mappings update those
        passes' defaults (a record config lists only what differs)."""
        settings = cls()
        changes: dict[str, Any] = {}
        for key, value in section.items():
            if key == "forward":
                continue
            if not hasattr(settings, key):
                raise ConfigError(f"model.evaluation: unknown field '{key}'")
            current = getattr(settings, key)
            if dataclasses.is_dataclass(current) and isinstance(value, dict):
                value = dataclasses.replace(current, **value)
            changes[key] = value
        return dataclasses.replace(settings, **changes)


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


def format_result_line(result: EvalResult) -> str:
    """``{label} val_loss:{:.8f} val_bpb:{:.8f} eval_time:{ms}ms`` then ``key:value`` extras and ``compliant:``."""
    line = (
        f"{result.label} val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f} "
        f"eval_time:{result.eval_time_ms:.0f}ms"
    )
    fields = [f"{key}:{value}" for key, value in result.extra.items()]
    fields.append(f"compliant:{'yes' if result.compliant else 'no'}")
    return " ".join([line, *fields])


def scored_counts(metric: BitsPerByte) -> tuple[int, int]:
    """(scored tokens, their bytes) summed over ranks; every rank must call it (it syncs)."""
    distributed = dist.is_available() and dist.is_initialized()
    with metric.sync_context(should_sync=distributed):
        return int(metric.token_count), int(metric.byte_count)


def _slot_extras(cfg: SlotConfig) -> dict[str, Any]:
    return {
        "slot": cfg.mode, "steps": cfg.steps, "lr": cfg.lr, "stride": cfg.stride, "window_rule": cfg.window_rule,
    }


def run_method(
    method: str,
    model: nn.Module,
    tokens: Tensor,
    luts: tuple[Tensor, Tensor, Tensor],
    settings: EvalSettings,
    rank: int = 0,
    world_size: int = 1,
) -> EvalResult:
    """Run one pass (``standard | sliding | slot | causal_slot | ttt``) on every rank and return the global result.

    Collective: with a process group every rank must call it with the same method and settings. The clock
    covers the whole pass, compilation included, and stops after the ranks' sums are reduced.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown eval method '{method}': expected one of {METHODS}")
    device = model_device(model)
    metric = BitsPerByte(luts).to(device)
    common = dict(rank=rank, world_size=world_size, progress=settings.progress and rank == 0, options=settings.forward)
    extra: dict[str, Any] = {}
    start = time.perf_counter()
    if method == "standard":
        evaluate_standard(
            model, tokens, metric, seq_len=settings.seq_len, batch_seqs=settings.standard_batch_seqs, **common
        )
        compliant = True
    elif method == "sliding":
        evaluate_sliding(
            model, tokens, metric, seq_len=settings.seq_len, stride=settings.stride,
            batch_windows=settings.sliding_batch_windows, rule=settings.window_rule, **common,
        )
        extra = {"stride": settings.stride, "window_rule": settings.window_rule}
        compliant = settings.window_rule == "exact"
    elif method in ("slot", "causal_slot"):
        cfg = settings.slot if method == "slot" else settings.causal_slot
        evaluate_slot(model, tokens, metric, cfg, **common)
        extra = _slot_extras(cfg)
        compliant = cfg.compliant
    else:
        cfg = settings.ttt
        evaluate_ttt(model, tokens, metric, cfg, **common)
        extra = {
            "stride": cfg.stride, "window_rule": cfg.window_rule, "chunk_tokens": cfg.chunk_tokens,
            "ttt_lr": cfg.lr, "ttt_epochs": cfg.epochs,
        }
        compliant = cfg.compliant
    token_count, byte_count = scored_counts(metric)
    values = metric.compute()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed_ms = 1000.0 * (time.perf_counter() - start)
    return EvalResult(
        label=settings.labels.get(method, DEFAULT_LABELS[method]),
        val_loss=float(values["loss"]),
        val_bpb=float(values["bpb"]),
        tokens=token_count,
        bytes=byte_count,
        eval_time_ms=elapsed_ms,
        compliant=compliant,
        extra=extra,
    )
