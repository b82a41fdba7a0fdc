"""RecurrenceActivation: switch depth recurrence on during training (PR #1421 ``train_model``'s ``recur_start_step``,
PR #1394's ``enable_looping_at``).

PR #1333/#1421 switch at the top of step 3000 (``at_step=3000``), PR #1394 when the training fraction reaches
0.5 (``at_fraction=0.5``), PR #1278 runs it from the start (``at_step=0``). Evaluation and export always run
with recurrence on, whatever the training state. The state is saved with the module's checkpoint.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.callbacks import Callback


class RecurrenceActivation(Callback):
    def __init__(self, at_step: Optional[int] = None, at_fraction: Optional[float] = None):
        """Give exactly one of the two.

        Args:
            at_step: switch on at the top of this optimizer step (PR #1333/#1421: 3000; PR #1278: 0).
            at_fraction: switch on once this fraction of the training budget is used (PR #1394: 0.5).
        """
        if (at_step is None) == (at_fraction is None):
            from pgolf_lit.errors import ConfigError

            raise ConfigError("RecurrenceActivation: give exactly one of at_step or at_fraction")
        self.at_step = at_step
        self.at_fraction = at_fraction

    def due(self, step: int, frac: float) -> bool:
        if self.at_step is not None:
            return step >= self.at_step
        return frac >= self.at_fraction

    def on_fit_start(self, trainer, pl_module) -> None:
        # Recurrent from the start (PR #1278): on before the step-0 validation and the compile priming too.
        if self.at_step == 0 and trainer.global_step == 0:
            self.on_train_batch_start(trainer, pl_module, None, 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        if model.recurrence_active or model.config.recurrence == "none":
            return
        sched = pl_module.step_schedule()
        if self.due(sched.step, sched.frac):
            model.set_recurrence(True)
            if getattr(model, "repeat_mlp", None) is not None:  # PR #1204: the repeated passes start from their layer
                from pgolf_lit.model.repeat_mlp import copy_base_mlps

                copy_base_mlps(model)
            pl_module.record_event(
                "recurrence:activated",
                f"recurrence:activated step:{sched.step} frac:{sched.frac:.3f} lr_scale:{sched.lr_scale:.4f} "
                f"schedule:{model.layer_schedule()}",
            )
