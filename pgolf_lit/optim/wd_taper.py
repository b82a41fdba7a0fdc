"""Muon weight-decay taper (PR #1729 ``wd_mul``): late in training the decoupled Muon decay falls linearly.

Before ``start_frac`` of training the factor is 1; from there it moves linearly to ``final_mult`` at the end
(training fraction 1) and stays there. The training fraction is the one the LR schedule uses (time over the
effective cap, or steps over the step budget without a cap). The factor multiplies every Muon group's
``base_weight_decay`` before each step (``apply_schedule``); the Adam groups keep their decay, as in the record.
Settings: ``ScheduleConfig.wd_taper_start_frac`` / ``wd_taper_final_mult``.
"""

from __future__ import annotations


def wd_taper_multiplier(frac: float, start_frac: float, final_mult: float) -> float:
    """The Muon decay factor at training fraction ``frac``: 1 up to ``start_frac`` (clamped to [0, 1]; 1 = off),
    then linear to ``final_mult`` (floored at 0) at fraction 1, held beyond."""
    start = min(max(start_frac, 0.0), 1.0)
    final = max(final_mult, 0.0)
    if frac <= start or start >= 1.0:
        return 1.0
    progress = min(max((frac - start) / max(1.0 - start, 1e-9), 0.0), 1.0)
    return 1.0 + (final - 1.0) * progress
