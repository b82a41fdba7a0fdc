"""WallclockBudget: the records' 600-second training cap (upstream ``main``: ``max_wallclock_ms``, ``stop_after_step``).

The budget runs on the module's training clock (validation and compile priming excluded; Lightning's
``Timer`` counts validation, so it does not fit). A ``reserve`` (GPTQ seconds in PR #1333/#1421/#1394) is
taken off the cap; the effective cap is both the stop threshold and the denominator of the training
fraction the LR schedule and other callbacks read. Every rank checks after every step and the decision is
all-reduced (any rank over the cap stops all of them at the same step).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from pgolf_lit.optim.schedule import effective_cap_ms


class WallclockBudget(Callback):
    def __init__(self, max_seconds: float = 600.0, reserve_seconds: float = 0.0):
        """
        Args:
            max_seconds: the training cap (upstream MAX_WALLCLOCK_SECONDS); 0 or less means no cap.
            reserve_seconds: taken off the cap for work after training (upstream GPTQ_RESERVE_SECONDS).
        """
        self.max_seconds = max_seconds
        self.reserve_seconds = reserve_seconds
        self.effective_cap_ms = effective_cap_ms(max_seconds, reserve_seconds)  # validates; None = no cap
        self.stopped_at_step = -1

    def scale_training_time(self, factor: float) -> None:
        """Step-matched mode (``record.step_matched``): the training part of the budget (cap minus reserve) runs
        ``factor`` times longer; the reserve stays, since the export after training does not depend on the world."""
        if self.effective_cap_ms is None:
            return
        self.max_seconds = self.reserve_seconds + (self.max_seconds - self.reserve_seconds) * factor
        self.effective_cap_ms = effective_cap_ms(self.max_seconds, self.reserve_seconds)

    def fraction(self, pl_module) -> float:
        if self.effective_cap_ms is None:
            return 0.0
        return pl_module.clock.elapsed_ms() / self.effective_cap_ms

    def setup(self, trainer, pl_module, stage: str) -> None:
        pl_module.wallclock_budget = self

    def on_train_start(self, trainer, pl_module) -> None:
        if self.reserve_seconds > 0 and self.effective_cap_ms is not None:
            pl_module.log_text(f"gptq:reserving {self.reserve_seconds:g}s, effective={self.effective_cap_ms:.0f}ms")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.effective_cap_ms is None:
            return
        elapsed = pl_module.clock.elapsed_ms()
        reached = trainer.strategy.reduce_boolean_decision(elapsed >= self.effective_cap_ms, all=False)
        if reached and self.stopped_at_step < 0:
            self.stopped_at_step = trainer.global_step
            trainer.should_stop = True
            pl_module.record_event(
                "stopping_early",
                f"stopping_early: wallclock_cap train_time:{elapsed:.0f}ms "
                f"step:{trainer.global_step}/{pl_module.max_steps}",
            )

    def state_dict(self) -> dict[str, Any]:
        return {"stopped_at_step": self.stopped_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stopped_at_step = state_dict["stopped_at_step"]
