"""Tight SWA (PR #1263/#1278/#1321 ``main``'s ``swa_state``): once the LR multiplier is below a threshold, add a
copy of the weights every ``every`` steps to a running sum.

In the records the sum is collected and never used (the exported weights are the EMA), so ``apply`` defaults
to False and the callback only costs the CPU copies, as there. With ``apply=True`` the average replaces the
weights at the end of training (after EMA, when both are attached in that order).

A dedicated callback rather than Lightning's ``StochasticWeightAveraging`` (epoch-based, owns an LR schedule)
or ``WeightAveraging`` (its checkpoint hook replaces the state dict, which clashes with the EMA's).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback

from pgolf_lit.errors import ConfigError


class SWA(Callback):
    def __init__(self, every: int = 50, lr_scale_below: float = 0.2, apply: bool = False):
        """
        Args:
            every: add the weights to the sum every N optimizer steps once collecting (the records: 50).
            lr_scale_below: start collecting when the step's LR multiplier falls below this (the records: 0.2;
                upstream SWA_START_FRAC in PR #162/#180, 0.5/0.4, compared with the multiplier despite its name).
            apply: replace the weights by the average at the end of training (the records never do).
        """
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"SWA.every: must be a positive number of steps, got {every!r}")
        self.every = every
        self.lr_scale_below = lr_scale_below
        self.apply = apply
        self.sums: Optional[dict[str, torch.Tensor]] = None
        self.count = 0
        self.start_step: Optional[int] = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # steps completed, as upstream's `step` after `step += 1`
        # Upstream tests the multiplier the step just taken used.
        if pl_module.last_schedule.lr_scale >= self.lr_scale_below or step % self.every:
            return
        state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in pl_module.model.state_dict().items()}
        if self.sums is None:
            self.sums, self.count, self.start_step = state, 1, step
            pl_module.record_event("swa:start", f"swa:start step:{step}")
        else:
            for k, v in state.items():
                self.sums[k] += v
            self.count += 1

    def average(self) -> dict[str, torch.Tensor]:
        assert self.sums is not None, "SWA collected nothing"
        return {k: v / self.count for k, v in self.sums.items()}

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.apply or self.sums is None:
            return
        current = pl_module.model.state_dict()
        pl_module.model.load_state_dict(
            {k: v.to(current[k].device, current[k].dtype) for k, v in self.average().items()}
        )
        pl_module.mark_weights("post-swa")
        pl_module.record_event("swa:applied", f"swa:applied snapshots:{self.count} from_step:{self.start_step}")

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "count": self.count, "start_step": self.start_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sums, self.count, self.start_step = state_dict["sums"], state_dict["count"], state_dict["start_step"]
