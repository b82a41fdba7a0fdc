"""CompilePriming: upstream's warmup steps (spec/training.md §5).

Runs real optimizer steps on real batches before the training clock starts, so torch.compile builds (and
autotunes) the training graphs off the clock, then restores the initial weights and optimizer state. The
batches come from a fresh loader, so training then starts from the same data the priming used, as upstream.

``steps`` run with recurrence off (the initial graph), ``recurrent_steps`` with recurrence on (PR #1394 primes
its looped graph this way, PR #1278 runs recurrent from the start). ``qat_steps`` prime the late-QAT graph.
``mode``: ``construction`` (Family A: construction-time LR and momentum, no clipping) or ``step_fn``
(Family B: the real step at LR multiplier 1, momentum warmup at the priming index, clipping on).
"""

from __future__ import annotations

import copy
import itertools
from typing import Literal

from lightning.pytorch.callbacks import Callback

from pgolf_lit.data.datamodule import TrainSteps


class CompilePriming(Callback):
    def __init__(
        self,
        steps: int = 20,
        recurrent_steps: int = 0,
        qat_steps: int = 0,
        qat_bits: int = 6,
        mode: Literal["construction", "step_fn"] = "step_fn",
    ):
        self.steps = steps
        self.recurrent_steps = recurrent_steps
        self.qat_steps = qat_steps
        self.qat_bits = qat_bits
        self.mode = mode

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 or not (self.steps or self.recurrent_steps or self.qat_steps):
            return  # a resumed run is already compiled past this point in its first life; nothing to prime
        from .late_qat import set_qat_bits
        from pgolf_lit.module import StepSchedule

        model = pl_module.model
        chain = pl_module.optimizers().optimizer
        weights = copy.deepcopy(model.state_dict())
        opt_state = copy.deepcopy(chain.state_dict())
        was_recurrent = model.recurrence_active
        dm = trainer.datamodule
        batches = iter(TrainSteps(dm.make_train_loader(), dm.grad_accum))
        phases = [(self.steps, False, False), (self.recurrent_steps, True, False), (self.qat_steps, was_recurrent, True)]
        index = itertools.count()
        with trainer.precision_plugin.train_step_context():
            for n, recurrent, qat in phases:
                model.set_recurrence(recurrent)
                set_qat_bits(model, self.qat_bits if qat else 0)
                for _ in range(n):
                    i = next(index)
                    x, y = (t.to(pl_module.device, non_blocking=True) for t in next(batches))
                    if self.mode == "construction":
                        sched = StepSchedule(i, 0.0, 0.0, 1.0, pl_module.optim_config.muon_momentum)
                    else:
                        sched = StepSchedule(i, 0.0, 0.0, 1.0, pl_module.optim_config.muon_momentum_at(i))
                    pl_module.run_optimizer_step((x, y), sched, chain, clip=self.mode != "construction")
                    if i < 5 or (i + 1) % 10 == 0:
                        pl_module.log_text(f"warmup_step:{i + 1} recurrent:{recurrent} qat:{qat}")
        set_qat_bits(model, 0)
        model.set_recurrence(was_recurrent)
        model.load_state_dict(weights)
        chain.load_state_dict(opt_state)
        chain.zero_grad(set_to_none=True)
        pl_module.record_event("warmup:done", f"warmup:done steps:{next(index)} weights and optimizer state restored")
