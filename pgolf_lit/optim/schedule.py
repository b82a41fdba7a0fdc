"""LR warmdown multiplier and Muon momentum warmup of the record scripts (``lr_mul`` of upstream ``main``
and of PR #1334/#1394 ``train_model``).

The schedule values are pure functions of their arguments: the training clock (which excludes validation and
compile priming) is measured by the caller and passed in as ``elapsed_ms``, together with the cap;
``apply_schedule`` then writes one step's values into the optimizers. The formulas, including their guards
(``max(step, 1)``, ``1e-9``), are the scripts' own, so the values agree with the fixtures to the last bit.

Family A (baseline, PR #1263/#1278/#1321), ``warmdown: iters``: a linear ramp to 0 over the last
``warmdown_iters`` steps; under a wallclock cap the step count is converted to time with the running mean
step time, so the ramp ends at the cap.
Family B (PR #1334/#1333/#1421, PR #1394), ``warmdown: frac``: a linear ramp over the last
``warmdown_frac`` of training, where the training fraction is ``elapsed / cap`` (the cap after the GPTQ
reserve), floored at ``min_lr`` (a multiplier, not an absolute lr).
Without a cap both families count iterations instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Optional

import torch

from pgolf_lit.errors import CheckedConfig, ConfigError
from pgolf_lit.optim.muon import Muon
from pgolf_lit.optim.wd_taper import wd_taper_multiplier


def effective_cap_ms(max_wallclock_seconds: float, reserve_seconds: float = 0.0) -> Optional[float]:
    """The training cap in ms after a reserve (PR #1334 family: 10 s, PR #1394: 12 s for GPTQ); None = no cap.

    Computed as the scripts do (``1000·cap − 1000·reserve``) so fractions match theirs exactly.
    """
    if max_wallclock_seconds <= 0:
        return None
    if reserve_seconds < 0 or reserve_seconds >= max_wallclock_seconds:
        raise ConfigError(
            f"schedule: reserve of {reserve_seconds} s must lie in [0, max_wallclock_seconds={max_wallclock_seconds})"
        )
    return 1000.0 * max_wallclock_seconds - reserve_seconds * 1000.0


def momentum_warmup(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Muon momentum before the step with 0-based index ``step``: linear from ``start`` to ``end`` over
    ``warmup_steps`` steps, then ``end`` (``end`` at once when ``warmup_steps`` is 0)."""
    f = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - f) * start + f * end


def apply_schedule(
    optimizers: Iterable[torch.optim.Optimizer], lr_multiplier: float, muon_momentum: float, muon_wd_scale: float = 1.0
) -> None:
    """Before a step: every Muon group's momentum := ``muon_momentum`` and its weight_decay := base_weight_decay ·
    ``muon_wd_scale`` (the WD taper, ``optim/wd_taper.py``); every group's lr := base_lr · multiplier.

    ``optimizers``: the list from ``build_optimizers`` or an ``OptimizerChain`` (iterating it yields its members).
    """
    for opt in optimizers:
        is_muon = isinstance(opt, Muon)
        for group in opt.param_groups:
            if is_muon:
                group["momentum"] = muon_momentum
                # groups restored from a checkpoint written before the taper existed lack the base: never tapered
                base_wd = group.setdefault("base_weight_decay", group["weight_decay"])
                group["weight_decay"] = base_wd * muon_wd_scale
            group["lr"] = group["base_lr"] * lr_multiplier


@dataclass
class ScheduleConfig(CheckedConfig):
    """LR multiplier settings. Defaults are the upstream baseline (Family A, 1200 warmdown iterations).

    ``warmdown_iters`` is read in ``iters`` mode, ``warmdown_frac`` and ``min_lr`` in ``frac`` mode; a
    warmdown length of 0 (either mode) means no warmdown, as upstream.
    """

    SECTION = "schedule"

    warmdown: Literal["iters", "frac"] = "iters"
    """iters: Family A's ramp over the last warmdown_iters steps; frac: Family B's ramp over a training fraction."""
    warmdown_iters: int = 1200
    """iters mode: warmdown length in steps (upstream WARMDOWN_ITERS)."""
    warmdown_frac: float = 0.667
    """frac mode: the final fraction of training that ramps down (upstream WARMDOWN_FRAC; PR #1855: 0.85)."""
    min_lr: float = 0.0
    """frac mode: floor of the LR multiplier, not an absolute lr (upstream MIN_LR; PR #1855: 0.1)."""
    seq_change_warmup_steps: int = 0
    """With a training-length schedule (``data.seq_schedule``): after each length change past step 0 the multiplier
    ramps up again, times ``min((step - change + 1) / N, 1)`` for N steps (upstream SEQ_CHANGE_WARMUP_STEPS; PR
    #2014: 32; ``pgolf_lit/data/seq_schedule.py``); 0 = no ramp."""

    wd_taper_start_frac: float = 1.0
    """Muon WD taper: the training fraction from which the Muon weight decay falls linearly to
    ``wd_taper_final_mult`` × its value at the end (upstream WD_TAPER_START_FRAC; PR #1729: 0.70; 1 = no taper;
    ``pgolf_lit/optim/wd_taper.py``)."""
    wd_taper_final_mult: float = 1.0
    """Muon WD taper: the decay's factor at the end of training (upstream WD_TAPER_FINAL_MULT; PR #1729: 0.5)."""

    def __post_init__(self) -> None:
        if self.warmdown not in ("iters", "frac"):
            raise ConfigError(f"schedule.warmdown: expected 'iters' or 'frac', got {self.warmdown!r}")
        if not 0 <= self.warmdown_frac <= 1:
            raise ConfigError(f"schedule.warmdown_frac: must lie in [0, 1], got {self.warmdown_frac}")
        if not 0 <= self.min_lr <= 1:
            raise ConfigError(f"schedule.min_lr: a multiplier floor in [0, 1], got {self.min_lr}")
        if self.seq_change_warmup_steps < 0:
            raise ConfigError(f"schedule.seq_change_warmup_steps: must be >= 0, got {self.seq_change_warmup_steps}")
        if not 0 <= self.wd_taper_start_frac <= 1:
            raise ConfigError(f"schedule.wd_taper_start_frac: must lie in [0, 1], got {self.wd_taper_start_frac}")
        if self.wd_taper_final_mult < 0:
            raise ConfigError(f"schedule.wd_taper_final_mult: must be >= 0, got {self.wd_taper_final_mult}")
        if self.min_lr and self.warmdown != "frac":
            raise ConfigError("schedule.min_lr: only the 'frac' warmdown has a floor (Family A ramps to 0)")

    def training_fraction(self, step: int, elapsed_ms: float, cap_ms: Optional[float], iterations: int) -> float:
        """``elapsed_ms / cap_ms``, or ``step / iterations`` without a cap (Family B's progress measure)."""
        if cap_ms is None:
            return step / max(iterations, 1)
        return elapsed_ms / max(cap_ms, 1e-9)

    def multiplier_at_fraction(self, frac: float) -> float:
        """Family B's multiplier at training fraction ``frac``: 1 before the warmdown, then
        ``max((1 − frac) / warmdown_frac, min_lr)`` (PR #1855 train_gpt.py ``lr_mul``)."""
        if self.warmdown_frac <= 0:
            return 1.0
        if frac >= 1.0 - self.warmdown_frac:
            return max((1.0 - frac) / self.warmdown_frac, self.min_lr)
        return 1.0

    def muon_wd_multiplier(self, frac: float) -> float:
        """The Muon WD taper's factor at training fraction ``frac`` (1 without a taper)."""
        return wd_taper_multiplier(frac, self.wd_taper_start_frac, self.wd_taper_final_mult)

    def lr_multiplier(self, step: int, elapsed_ms: float, cap_ms: Optional[float], iterations: int) -> float:
        """The factor applied to every group's ``base_lr`` before the step with index ``step``.

        ``elapsed_ms``: training time before this step; ``cap_ms``: the effective cap (``effective_cap_ms``)
        or None; ``iterations``: the step budget (used only without a cap).
        """
        if self.warmdown == "frac":
            if self.warmdown_frac <= 0:
                return 1.0
            return self.multiplier_at_fraction(self.training_fraction(step, elapsed_ms, cap_ms, iterations))
        w = self.warmdown_iters
        if w <= 0:
            return 1.0
        if cap_ms is None:
            start = max(iterations - w, 0)
            return max((iterations - step) / max(w, 1), 0.0) if start <= step < iterations else 1.0
        warmdown_ms = w * (elapsed_ms / max(step, 1))
        remaining_ms = max(cap_ms - elapsed_ms, 0.0)
        return remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
