"""Progressive context growth (PR #2014 ``TRAIN_SEQ_SCHEDULE``; spec/frontier.md §4.1): the training length grows in
stages over the training fraction, e.g. ``1024@0.100,2048@0.700,3072@1.000``.

Stage k trains at length n_k while the training fraction p (the one the LR schedule and the loop switch read:
wallclock over the budget, or steps over max_steps without a cap) is at most its threshold t_k; thresholds are
inclusive upper bounds, sorted, and a missing final stage at 1.0 repeats the last length. A stage changes only the
packed documents' cut length and the ``max_seqlen`` varlen attention gets, never the batch: the packed row stays
the micro-batch, so every length must divide it. At a change after step 0:

- the LR multiplier of every group is multiplied by ``min((step - s0 + 1) / N, 1)`` for the N steps from the change
  step s0 (``ScheduleConfig.seq_change_warmup_steps``, upstream SEQ_CHANGE_WARMUP_STEPS; ``SeqStage``);
- the packing loader skips the two calls the record's loader had already prepared at the old length
  (``DocumentPackingLoader.set_max_doc_len``): their tokens are never trained on, as in the record.

Every (length, looping) shape the run will train is compiled before the clock starts (``compile_shapes``, which
``CompilePriming`` primes), as the record's COMPILE_SHAPE_WARMUP=1 does.

Where it acts: ``data.seq_schedule`` (``TokenShardDataModule``) parses and checks it and reads each step's batch at
its stage; ``GolfModule.step_schedule`` advances the ``SeqStage`` once per step. Each rank decides from its own
training clock, as the record's ranks (and the LR schedule and loop switch here) do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pgolf_lit.errors import ConfigError


@dataclass(frozen=True)
class SeqSchedule:
    """Stages ``(threshold, seq_len)``, thresholds ascending in (0, 1], the last one 1.0."""

    stages: tuple[tuple[float, int], ...]

    @classmethod
    def parse(cls, text: str, train_seq_len: int, field: str = "data.seq_schedule") -> "SeqSchedule":
        """The schedule of upstream's text form (``"1024@0.1,2048@0.7,3072@1.0"``); an empty text is one stage at
        ``train_seq_len``. No length may exceed ``train_seq_len``, as in the record (it sizes what else reads the
        training length: GPTQ calibration windows, the loader's own bound)."""
        stages = []
        for raw in str(text).split(","):
            raw = raw.strip()
            if not raw:
                continue
            length, at, fraction = raw.partition("@")
            try:
                seq_len, threshold = int(length.strip()), float(fraction.strip())
            except ValueError:
                at = ""
            if not at:
                raise ConfigError(f"{field}: stage {raw!r} is not LENGTH@FRACTION (e.g. 1024@0.35)")
            if seq_len <= 0:
                raise ConfigError(f"{field}: stage {raw!r}: the length must be positive")
            if not 0.0 < threshold <= 1.0:
                raise ConfigError(f"{field}: stage {raw!r}: the training fraction must lie in (0, 1]")
            stages.append((threshold, seq_len))
        if not stages:
            return cls(((1.0, train_seq_len),))
        stages.sort(key=lambda stage: stage[0])
        if stages[-1][0] < 1.0:
            stages.append((1.0, stages[-1][1]))
        schedule = cls(tuple(stages))
        if schedule.max_seq_len > train_seq_len:
            raise ConfigError(
                f"{field}: length {schedule.max_seq_len} exceeds data.train_seq_len {train_seq_len}; the training "
                f"length must be the schedule's longest"
            )
        return schedule

    @property
    def lengths(self) -> list[int]:
        return [seq_len for _, seq_len in self.stages]

    @property
    def max_seq_len(self) -> int:
        return max(self.lengths)

    def seq_len_at(self, progress: float) -> int:
        """The length of the first stage whose threshold is at least ``progress``; the last one beyond 1."""
        return next((seq_len for threshold, seq_len in self.stages if progress <= threshold), self.stages[-1][1])

    def describe(self) -> str:
        return ",".join(f"{seq_len}@{threshold:.3f}" for threshold, seq_len in self.stages)

    def check_micro_batch(self, tokens: int, field: str = "data.seq_schedule") -> None:
        """Every length cuts the packed row of ``tokens`` (a rank's micro-batch) into whole pieces."""
        bad = sorted({n for n in self.lengths if tokens % n})
        if bad:
            raise ConfigError(
                f"{field}: length(s) {bad} do not divide the micro-batch of {tokens} tokens per rank "
                f"(train_batch_tokens // grad_accum_base); every length must"
            )

    def compile_shapes(self, loop_at: Optional[float], loops: bool) -> list[tuple[int, bool]]:
        """The (length, looping) pairs training will run, in stage order: a stage runs plain if it starts before
        ``loop_at`` (the loop switch's training fraction; None = unknown, so both) and looped if it ends after it
        (the record's COMPILE_SHAPE_WARMUP_LOOP_MODES=auto); plain only for a model without looping."""
        shapes: list[tuple[int, bool]] = []
        start = 0.0
        for end, seq_len in self.stages:
            if not loops:
                modes = [False]
            elif loop_at is None:
                modes = [False, True]
            else:
                modes = [m for m, on in ((False, start < loop_at), (True, end > loop_at)) if on] or [False]
            shapes += [(seq_len, m) for m in modes if (seq_len, m) not in shapes]
            start = end
        return shapes


class SeqStage:
    """The stage a run is in and its LR re-warmup, advanced once per optimizer step (saved in checkpoints)."""

    def __init__(self, schedule: SeqSchedule, rewarmup_steps: int = 0):
        self.schedule = schedule
        self.rewarmup_steps = rewarmup_steps
        self.seq_len = schedule.stages[0][1]
        self.rewarm_from: Optional[int] = None  # the step of the last change while its re-warmup lasts

    def advance(self, step: int, progress: float) -> bool:
        """Enter the stage of ``progress`` at ``step``; True when that is a change (a re-warmup starts at a change
        after step 0)."""
        seq_len = self.schedule.seq_len_at(progress)
        if seq_len == self.seq_len:
            return False
        self.seq_len = seq_len
        if self.rewarmup_steps > 0 and step > 0:
            self.rewarm_from = step
        return True

    def lr_factor(self, step: int) -> float:
        """The re-warmup factor of ``step``'s LR multiplier: ``min((step - s0 + 1) / N, 1)``, then 1 for good."""
        if self.rewarm_from is None:
            return 1.0
        factor = min(max((step - self.rewarm_from + 1) / self.rewarmup_steps, 0.0), 1.0)
        if factor >= 1.0:
            self.rewarm_from = None
        return factor

    def state_dict(self) -> dict:
        return {"seq_len": self.seq_len, "rewarm_from": self.rewarm_from}

    def load_state_dict(self, state: dict) -> None:
        self.seq_len = int(state["seq_len"])
        self.rewarm_from = None if state.get("rewarm_from") is None else int(state["rewarm_from"])
