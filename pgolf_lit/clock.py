"""The training wallclock: time spent in the training loop only (validation and compile priming excluded), and its
ledger: what was kept off the clock and for how long, and what the work after the cap used of a GPTQ reserve.

The records' schedule and stop rule run on this clock (``training_time_ms`` in upstream ``main``). Lightning's
``Timer`` counts validation time and restarts per stage, so it cannot drive them; this clock is paused around
validation, started after priming, and saved in checkpoints so a resumed run continues its budget instead of
restarting it.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch


class TrainClock:
    def __init__(self, now: Callable[[], float] = time.perf_counter):
        self._now = now  # injectable for tests (a fake clock)
        self._accumulated = 0.0
        self._started_at: Optional[float] = None
        # The clock ledger: work of the fit kept off the training clock (validation, compile priming), and the work
        # after the cap that a GPTQ reserve pays for; seconds and counts per kind, saved with checkpoints.
        self.off_clock: dict[str, list[float]] = {}
        self.after_cap: dict[str, float] = {}

    def note_off_clock(self, kind: str, seconds: float) -> None:
        """Add one interval of work the training clock does not count (``validation``, ``priming``)."""
        entry = self.off_clock.setdefault(kind, [0.0, 0])
        entry[0] += float(seconds)
        entry[1] += 1

    def note_after_cap(self, kind: str, seconds: float) -> None:
        """Work after training that a record does inside its GPTQ reserve (``calibration``), or beside it
        (``export``)."""
        self.after_cap[kind] = self.after_cap.get(kind, 0.0) + float(seconds)

    @property
    def running(self) -> bool:
        return self._started_at is not None

    def start(self, sync_device: Optional[torch.device] = None) -> None:
        if self.running:
            return
        _sync(sync_device)
        self._started_at = self._now()

    def pause(self, sync_device: Optional[torch.device] = None) -> None:
        if not self.running:
            return
        _sync(sync_device)
        self._accumulated += self._now() - self._started_at
        self._started_at = None

    def elapsed_ms(self) -> float:
        running = self._now() - self._started_at if self.running else 0.0
        return 1000.0 * (self._accumulated + running)

    def state_dict(self) -> dict:
        return {"elapsed_ms": self.elapsed_ms(), "off_clock": {k: list(v) for k, v in self.off_clock.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._accumulated = float(state["elapsed_ms"]) / 1000.0
        self._started_at = None
        self.off_clock = {k: [float(v[0]), int(v[1])] for k, v in (state.get("off_clock") or {}).items()}

    def ledger(self, cap_s: Optional[float], reserve_s: float) -> dict:
        """The clock ledger as plain numbers (summary.json's ``clock``): training time against the budget, the work
        kept off the clock, and the GPTQ reserve against what calibration used of it."""
        train_s = self.elapsed_ms() / 1000.0
        budget_s = None if cap_s is None else cap_s - reserve_s
        out = {
            "train_s": train_s,
            "budget_s": budget_s,
            "cap_s": cap_s,
            "off_clock": {k: {"seconds": v[0], "count": int(v[1])} for k, v in self.off_clock.items()},
            "gptq_reserve_s": reserve_s,
            "after_cap": dict(self.after_cap),
        }
        if cap_s is not None:
            # What a record's rule counts: the training loop plus the calibration on training data after it.
            counted = train_s + self.after_cap.get("calibration", 0.0)
            out["counted_s"] = counted
            out["over_cap_s"] = max(counted - cap_s, 0.0)
        return out


def ledger_line(ledger: dict) -> str:
    """``clock: ...``, one line: what the training clock counted against its budget, what it excluded and how long
    that took, and the GPTQ reserve against what calibration used (the records' Hessian pass runs inside it)."""
    train, budget = ledger["train_s"], ledger["budget_s"]
    if budget is None:
        parts = [f"train {train:.1f}s (no wallclock cap)"]
    else:
        parts = [
            f"train {train:.1f}s of a {budget:.1f}s budget (cap {ledger['cap_s']:g}s - GPTQ reserve "
            f"{ledger['gptq_reserve_s']:g}s)"
        ]
    off = ledger["off_clock"]
    if off:
        parts.append(
            "off the clock: " + ", ".join(f"{kind} {v['seconds']:.1f}s ({v['count']}x)" for kind, v in off.items())
        )
    else:
        parts.append("off the clock: nothing")
    after = ledger["after_cap"]
    if "calibration" in after:
        used = after["calibration"]
        if "counted_s" not in ledger:
            parts.append(f"calibration + Hessians {used:.1f}s")
        else:
            over = ledger["over_cap_s"]
            fits = (
                f"train + calibration {ledger['counted_s']:.1f}s, {over:.1f}s over the cap"
                if over > 0
                else "inside the cap"
            )
            parts.append(f"GPTQ reserve {ledger['gptq_reserve_s']:g}s, calibration + Hessians used {used:.1f}s: {fits}")
    if "export" in after:
        parts.append(f"export {after['export']:.1f}s in all (quantize, compress, write)")
    return "clock: " + " | ".join(parts)


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
