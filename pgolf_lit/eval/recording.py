"""The recording hook every evaluation procedure reports to (read by the causality audit, ``audit.py``).

Evaluators take an optional ``recorder``. When one is given they report every distribution they score with
and every state update they apply, which lets the causality audit (``audit.py``) and the tests check the
compliance conditions on the real procedure instead of on a description of it. With ``recorder=None``
(every production run) nothing extra is computed.

Token indices are stream indices: the trimmed stream is ``x_0 … x_T`` and position ``i`` scores target
``x_{i+1}``, so a scored target index ``j`` lies in ``[1, T]``.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

# ``state_reads_upto`` of a distribution that no adaptive state influenced.
NO_STATE = -1


class ScoreRecorder(Protocol):
    def on_scores(self, target_index: Tensor, log_probs: Tensor, state_reads_upto: Tensor) -> None:
        """Distributions used to score ``x[target_index]``, in scoring order.

        target_index: int64 [n]; log_probs: [n, V], the full normalized log-probability vectors;
        state_reads_upto: int64 [n], for each distribution the largest stream index read by any state update
        it depends on (a SLOT delta, TTT weights), or ``NO_STATE``.
        """

    def on_update(self, first_token: int, last_token: int) -> None:
        """A state update was applied that read stream tokens ``x_first … x_last`` (inputs and targets)."""
