"""RecurrenceActivation: switch depth recurrence on during training (PR #1421 ``train_model``'s ``recur_start_step``,
PR #1394's ``enable_looping_at``).

PR #1333/#1421 switch at the top of step 3000 (``at_step=3000``), PR #1394 when the training fraction reaches
0.5 (``at_fraction=0.5``), PR #1278 runs it from the start (``at_step=0``). Evaluation and export always run
with recurrence on, whatever the training state. The state is saved with the module's checkpoint.

A second loop phase (PR #1412's progressive recurrence, upstream LOOP_PHASE2_AT): with ``phase2_at`` the switch
first turns on a loop of one repeat (the segment twice, the schedule of ``num_loops = 1``; skip rows stay sized for
the full loop, as upstream's are), and the full ``num_loops + 1`` passes take over at the top of the first later step
whose training fraction reaches ``phase2_at``. Training ends on the full schedule, which evaluation and export use.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch.callbacks import Callback

from pgolf_lit.errors import ConfigError
from pgolf_lit.model.gpt import layer_schedule, skip_plan

FIRST_PHASE_LOOPS = 1  # PR #1412's phase 1: min(num_loops, 1) repeats of the segment


def set_loop_repeats(model, num_loops: int) -> None:
    """Make the model's recurrent schedule run the loop segment ``num_loops + 1`` times. The skip plan keeps the
    config's rows (PR #1412 sizes skip_weights for the full loop and uses the leading rows in phase 1)."""
    cfg = model.config
    schedule = layer_schedule(cfg.replace(num_loops=num_loops), True)
    model._plans[True] = (schedule, skip_plan(cfg, schedule))  # the plan GPT.forward_hidden reads when recurrent


class RecurrenceActivation(Callback):
    def __init__(
        self, at_step: Optional[int] = None, at_fraction: Optional[float] = None, phase2_at: Optional[float] = None
    ):
        """Give exactly one of the first two.

        Args:
            at_step: switch on at the top of this optimizer step (PR #1333/#1421: 3000; PR #1278: 0).
            at_fraction: switch on once this fraction of the training budget is used (PR #1394: 0.5).
            phase2_at: PR #1412's second loop phase (upstream LOOP_PHASE2_AT, 0.65): the switch turns on one repeat,
                the full loop starts once this fraction of the budget is used; None = the full loop at once.
        """
        if (at_step is None) == (at_fraction is None):
            raise ConfigError("RecurrenceActivation: give exactly one of at_step or at_fraction")
        if phase2_at is not None and not (0 < phase2_at <= 1 and phase2_at > (at_fraction or 0)):
            raise ConfigError(
                f"RecurrenceActivation.phase2_at: expected a fraction in (at_fraction, 1], got {phase2_at}"
            )
        self.at_step = at_step
        self.at_fraction = at_fraction
        self.phase2_at = phase2_at

    def due(self, step: int, frac: float) -> bool:
        if self.at_step is not None:
            return step >= self.at_step
        return frac >= self.at_fraction

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.phase2_at is not None and pl_module.model.config.recurrence != "loop":
            raise ConfigError(
                "RecurrenceActivation.phase2_at: a second loop phase needs model.gpt.recurrence 'loop', "
                f"got {pl_module.model.config.recurrence!r}"
            )
        # Recurrent from the start (PR #1278): on before the step-0 validation and the compile priming too.
        if self.at_step == 0 and trainer.global_step == 0:
            self.on_train_batch_start(trainer, pl_module, None, 0)

    def in_first_phase(self, model) -> bool:
        return len(model.layer_schedule()) < len(layer_schedule(model.config, True))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        model = pl_module.model
        if model.config.recurrence == "none":
            return
        sched = pl_module.step_schedule()
        if not model.recurrence_active and self.due(sched.step, sched.frac):
            if self.phase2_at is not None:
                set_loop_repeats(model, FIRST_PHASE_LOOPS)
            model.set_recurrence(True)
            if getattr(model, "repeat_mlp", None) is not None:  # PR #1204: the repeated passes start from their layer
                from pgolf_lit.model.repeat_mlp import copy_base_mlps

                copy_base_mlps(model)
            self._record(pl_module, "recurrence:activated", sched, model)
        elif self.phase2_at is not None and model.recurrence_active:
            # from the fraction, so a run resumed from a checkpoint lands in its phase too
            first = sched.frac < self.phase2_at
            if first != self.in_first_phase(model):
                set_loop_repeats(model, FIRST_PHASE_LOOPS if first else model.config.num_loops)
                if not first:
                    self._record(pl_module, "recurrence:phase2", sched, model)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.phase2_at is not None and pl_module.model.config.recurrence == "loop":
            set_loop_repeats(pl_module.model, pl_module.model.config.num_loops)  # export and evaluation: full loop

    @staticmethod
    def _record(pl_module, event: str, sched, model) -> None:
        pl_module.record_event(
            event,
            f"{event} step:{sched.step} frac:{sched.frac:.3f} lr_scale:{sched.lr_scale:.4f} "
            f"schedule:{model.layer_schedule()}",
        )
