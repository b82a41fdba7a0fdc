"""The training wallclock: time spent in the training loop only (validation and compile priming excluded).

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
        return {"elapsed_ms": self.elapsed_ms()}

    def load_state_dict(self, state: dict) -> None:
        self._accumulated = float(state["elapsed_ms"]) / 1000.0
        self._started_at = None


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
