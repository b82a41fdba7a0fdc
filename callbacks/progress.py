"""The console of a run: a progress bar that measures the wallclock budget, and a model summary without the
FLOPs column (Lightning counts FLOPs only from an ``example_input_array``, so for this module it prints zeros).

``BudgetProgressBar`` subclasses Lightning's ``TQDMProgressBar``: under a ``WallclockBudget`` the training bar
counts training seconds against the cap (elapsed / cap, ETA from the budget), otherwise optimizer steps against
``max_steps``; its postfix is the step, tokens per second and the last val_bpb. Validation and test bars have a
length (the datamodule's iterables report one). ``pgolf fit`` attaches both unless the Trainer turns bars or the
summary off; the upstream-style text lines are written through tqdm, so they never land inside a bar.
"""

from __future__ import annotations

import sys
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.model_summary import summarize


class BudgetProgressBar(TQDMProgressBar):
    def __init__(self, refresh_rate: int = 1, leave: bool = False):
        """
        Args:
            refresh_rate: update the bars every N batches.
            leave: keep finished bars on screen.
        """
        super().__init__(refresh_rate=refresh_rate, leave=leave)

    @staticmethod
    def _cap_s(pl_module) -> float | None:
        budget = getattr(pl_module, "wallclock_budget", None)
        cap = getattr(budget, "effective_cap_ms", None)
        return cap / 1000.0 if cap else None

    def on_train_start(self, trainer, pl_module) -> None:
        self._train_layout = self._layout(pl_module)
        super().on_train_start(trainer, pl_module)

    def _layout(self, pl_module) -> tuple[str, float, str]:
        """(description, total, unit) of the training bar: budget seconds under a cap, else optimizer steps."""
        cap = self._cap_s(pl_module)
        if cap is not None:
            return "train (budget)", round(cap, 1), "s"
        return "train (steps)", pl_module.max_steps, "it"

    def init_train_tqdm(self) -> Tqdm:
        """The training bar, drawn with its own total from the first frame (Lightning's first frames show the
        dataloader's nominal length, "Epoch 0: 0/100000", which stayed in every log file)."""
        description, total, unit = getattr(self, "_train_layout", (self.train_description, None, "it"))
        return Tqdm(
            desc=description,
            total=total,
            unit=unit,
            unit_scale=False,
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # One endless epoch: the bar was laid out when it was created; Lightning's reset to the epoch's length and
        # its "Epoch N" description would draw another frame first.
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.refresh_rate and step != pl_module.max_steps:
            return
        bar = self.train_progress_bar
        cap = self._cap_s(pl_module)
        bar.n = round(min(pl_module.clock.elapsed_ms() / 1000.0, cap), 1) if cap is not None else step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Close the bars, so the error that follows starts on a line of its own instead of after a bar."""
        for bar in (self._train_progress_bar, self._val_progress_bar, self._test_progress_bar):
            if bar is not None and not bar.disable:
                bar.close()

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        """Step, tokens per second and the last val_bpb (no ``v_num``; no host reads of device tensors)."""
        elapsed_s = max(pl_module.clock.elapsed_ms() / 1000.0, 1e-9)
        tokens = getattr(trainer.datamodule, "train_batch_tokens", 0) if trainer.datamodule is not None else 0
        metrics: dict[str, Any] = {"step": trainer.global_step}
        if tokens:
            metrics["tok/s"] = f"{trainer.global_step * tokens / elapsed_s:,.0f}"
        last = getattr(pl_module, "last_val_bpb", None)
        if last is not None:
            metrics["val_bpb"] = f"{last:.4f}"
        return metrics


class CompactModelSummary(ModelSummary):
    """Lightning's summary table without the FLOPs column and total (zeros without an example input)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if self._max_depth and trainer.is_global_zero:
            summary = summarize(pl_module, max_depth=self._max_depth)
            text = str(summary)
            lines = [line for line in text.splitlines() if "Total Flops" not in line]
            header = next((line for line in lines if "FLOPs" in line), None)
            if header is not None:
                cut = header.index("FLOPs")
                lines = [line[:cut].rstrip(" |") if len(line) > cut else line for line in lines]
            print("\n".join(lines))
