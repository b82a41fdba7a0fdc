"""Late QAT (PR #1263/#1278/#1321 ``main``, ``CastedLinear._qat_enabled``): once the LR multiplier falls below a
threshold, every CastedLinear whose weight the export quantizes fake-quantizes it per row in training mode (int6:
scale max(|w|max/31, 1/31), codes in [-32, 31]) with a straight-through gradient. Which layers and at what width come
from the run's export rules (the GPTQExport callback's ``export``): a layer trains at the width its group's rule
exports it with, and a layer the export keeps float is not fake-quantized.

In the record runs the switch never took effect (a class flag flipped under torch.compile without a
recompile), so ``apply`` defaults to False: the event is logged at the step the records log it and the
weights train unquantized, which reproduces what ran. ``apply=True`` makes it real; under torch.compile the
flip recompiles the training graph once (about 10 s on H100) unless CompilePriming primed the QAT graph.
"""

from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch.callbacks import Callback

from pgolf_lit.model.layers import CastedLinear
from pgolf_lit.model.roles import parameter_roles
from pgolf_lit.quant.export import ExportConfig


def run_export_config(trainer) -> ExportConfig:
    """The export rules of the run: its GPTQExport callback's ``export`` (the defaults when it has none)."""
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(getattr(callback, "export", None), ExportConfig):
            return callback.export
    return ExportConfig()


def set_qat_bits(model, bits: Optional[int], export: Optional[ExportConfig] = None) -> int:
    """Fake-quantize every CastedLinear whose weight the export quantizes (its role's quant group has a rule in
    ``export``; not small controls such as PR #1855's smear gate, not MTP heads, which are never exported) at
    ``bits``, or at its rule's width when ``bits`` is None; ``bits`` 0 switches them off. Returns how many layers."""
    export = export if export is not None else ExportConfig()
    roles = parameter_roles(model)
    n = 0
    for name, module in model.named_modules():
        role = roles.get(f"{name}.weight")
        rule = export.rule(role) if isinstance(module, CastedLinear) and role is not None else None
        if rule is not None:
            module.qat_bits = rule.bits if bits is None else bits
            n += 1
    return n


class LateQAT(Callback):
    def __init__(self, lr_scale_below: float = 0.15, bits: Optional[int] = None, apply: bool = False):
        """
        Args:
            lr_scale_below: switch on when the step's LR multiplier falls below this (the records: 0.15).
            bits: one fake-quantization width for every exported layer (the scripts' class-wide flag: 6, codes in
                [-32, 31]); null: each layer at the width of its export rule.
            apply: really fake-quantize (False reproduces the record runs, where the switch had no effect).
        """
        self.lr_scale_below = lr_scale_below
        self.bits = bits
        self.apply = apply
        self.enabled_at_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.enabled_at_step >= 0 or self.lr_scale_below <= 0:
            return
        sched = pl_module.step_schedule()
        if sched.lr_scale < self.lr_scale_below:
            self.enabled_at_step = sched.step
            layers = set_qat_bits(pl_module.model, self.bits, run_export_config(trainer)) if self.apply else 0
            note = f"layers:{layers}" if self.apply else "inert (apply=false reproduces the record runs)"
            pl_module.record_event(
                "late_qat:enabled", f"late_qat:enabled step:{sched.step} scale:{sched.lr_scale:.4f} {note}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"enabled_at_step": self.enabled_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.enabled_at_step = state_dict["enabled_at_step"]

    def on_train_start(self, trainer, pl_module) -> None:
        # After a resume the flag is back from the checkpoint; put the layers back into QAT mode too.
        if self.enabled_at_step >= 0 and self.apply:
            set_qat_bits(pl_module.model, self.bits, run_export_config(trainer))
