"""CompilePriming: upstream's warmup steps (the ``warmup_steps`` loop of train_gpt.py ``main``).

Runs real optimizer steps on real batches before the training clock starts, so torch.compile builds (and
autotunes) the training graphs off the clock, then restores the initial weights and optimizer state. The
batches come from a fresh loader, so training then starts from the same data the priming used, as upstream.

``steps`` run with recurrence off (the initial graph), ``recurrent_steps`` with recurrence on (PR #1394 primes
its looped graph this way, PR #1278 runs recurrent from the start). ``qat_steps`` prime the late-QAT graph.
``mode``: ``construction`` (Family A: construction-time LR and momentum, no clipping) or ``step_fn``
(Family B: the real step at LR multiplier 1, momentum warmup at the priming index, clipping on).
``cu_buckets`` (packed documents, PR #1855 ``_run_cu_bucket_warmup``): before the real steps, for recurrence off
and on, three forward/backward passes without a step for each listed ``cu_seqlens`` width, with synthetic
boundaries every ``train_seq_len`` tokens, so every bucket's graph is compiled off the clock.

With a training-length schedule (``data.seq_schedule``, progressive context growth) the buckets are primed for every
(length, recurrence) shape the schedule will train (``SeqSchedule.compile_shapes``: recurrence off for the stages
that start before the loop switch's fraction, on for those that end after it; PR #2014's COMPILE_SHAPE_WARMUP=1),
so no length change compiles on the clock, and the real steps run at the first stage's length.
"""

from __future__ import annotations

import copy
import itertools
import time
from typing import Literal, Optional

import torch

from lightning.pytorch.callbacks import Callback

from pgolf_lit.data.datamodule import TrainSteps


class CompilePriming(Callback):
    def __init__(
        self,
        steps: int = 20,
        recurrent_steps: int = 0,
        qat_steps: int = 0,
        qat_bits: Optional[int] = None,
        mode: Literal["construction", "step_fn"] = "step_fn",
        cu_buckets: Optional[list[int]] = None,
    ):
        """
        Args:
            steps: real optimizer steps with recurrence off.
            recurrent_steps: real optimizer steps with recurrence on.
            qat_steps: steps with late-QAT fake quantization on (primes that graph).
            qat_bits: the fake-quantization width of those steps; null: LateQAT's (its bits, else each layer's
                export rule width).
            mode: ``construction`` (PR #1263 family) or ``step_fn`` (PR #1333 onwards), see the module docstring.
            cu_buckets: packed-document ``cu_seqlens`` widths to compile before the real steps (PR #1855: 64, 128,
                192, 256); empty for dense training.
        """
        self.cu_buckets = list(cu_buckets or [])
        self.steps = steps
        self.recurrent_steps = recurrent_steps
        self.qat_steps = qat_steps
        self.qat_bits = qat_bits
        self.mode = mode

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step > 0 or not (self.steps or self.recurrent_steps or self.qat_steps):
            return  # a resumed run is already compiled past this point in its first life; nothing to prime
        from .late_qat import LateQAT, run_export_config, set_qat_bits
        from .recurrence import FIRST_PHASE_LOOPS, RecurrenceActivation, set_loop_repeats
        from pgolf_lit.module import StepSchedule

        started = time.perf_counter()
        model = pl_module.model
        chain = pl_module.optimizers().optimizer
        weights = copy.deepcopy(model.state_dict())
        opt_state = copy.deepcopy(chain.state_dict())
        was_recurrent = model.recurrence_active
        dm = trainer.datamodule
        stage = pl_module.seq_stage  # a training-length schedule: the steps run at its first length
        steps = TrainSteps(dm.make_train_loader(), dm.grad_accum)
        first_len = stage.schedule.stages[0][1] if stage is not None else None
        # (steps, recurrence, qat, loop repeats: None = the config's); a second loop phase (PR #1412) primes its
        # one-repeat graph before the full loop's, as upstream's loop_warmup_phase1/2
        full_loops = model.config.num_loops
        # the QAT graph is primed at the widths LateQAT will set: its bits when it states them, else the export rules'
        late_qat = [cb.bits for cb in trainer.callbacks if isinstance(cb, LateQAT)]
        qat_bits = self.qat_bits if self.qat_bits is not None else (late_qat[0] if late_qat else None)
        phases = [(self.steps, False, False, None)]
        if any(isinstance(cb, RecurrenceActivation) and cb.phase2_at is not None for cb in trainer.callbacks):
            phases.append((self.recurrent_steps, True, False, FIRST_PHASE_LOOPS))
        phases += [(self.recurrent_steps, True, False, None), (self.qat_steps, was_recurrent, True, None)]
        index = itertools.count()
        with trainer.precision_plugin.train_step_context():
            if self.cu_buckets and pl_module.compile:  # only the compiled graphs care about bucket widths
                batch = TrainSteps(dm.make_train_loader(), 1).take()
                self._prime_cu_buckets(pl_module, batch, self._shapes(trainer, pl_module, batch))
            for n, recurrent, qat, loops in phases:
                if model.config.recurrence == "loop":
                    set_loop_repeats(model, full_loops if loops is None else loops)
                model.set_recurrence(recurrent)
                set_qat_bits(model, qat_bits if qat else 0, run_export_config(trainer))
                for _ in range(n):
                    i = next(index)
                    batch = tuple(
                        t.to(pl_module.device, non_blocking=True) if torch.is_tensor(t) else t
                        for t in steps.take(first_len)
                    )
                    if self.mode == "construction":
                        sched = StepSchedule(i, 0.0, 0.0, 1.0, pl_module.optim_config.muon_momentum)
                    else:
                        sched = StepSchedule(i, 0.0, 0.0, 1.0, pl_module.optim_config.muon_momentum_at(i))
                    pl_module.run_optimizer_step(batch, sched, chain, clip=self.mode != "construction")
                    if i < 5 or (i + 1) % 10 == 0:
                        loops_note = f" loops:{loops}" if loops else ""
                        pl_module.log_text(f"warmup_step:{i + 1} recurrent:{recurrent} qat:{qat}{loops_note}")
        set_qat_bits(model, 0, run_export_config(trainer))
        if model.config.recurrence == "loop":
            set_loop_repeats(model, full_loops)
        model.set_recurrence(was_recurrent)
        model.zero_grad(set_to_none=True)
        model.load_state_dict(weights)
        chain.load_state_dict(opt_state)
        chain.zero_grad(set_to_none=True)
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        seconds = time.perf_counter() - started
        pl_module.clock.note_off_clock("priming", seconds)  # compile + autotune, off the training clock as upstream
        pl_module.record_event(
            "warmup:done", f"warmup:done steps:{next(index)} weights and optimizer state restored time:{seconds:.1f}s"
        )

    @staticmethod
    def _shapes(trainer, pl_module, batch) -> Optional[list[tuple[int, bool]]]:
        """The (max_seqlen, recurrence) pairs of the length schedule's stages (None without a schedule): a stage
        loops if it ends after the loop switch's fraction (both ways for a step-based switch; never without one)."""
        stage = pl_module.seq_stage
        if stage is None:
            return None
        from .recurrence import RecurrenceActivation

        switches = [cb for cb in trainer.callbacks if isinstance(cb, RecurrenceActivation)]
        loop_at = switches[0].at_fraction if switches else float("inf")
        return stage.schedule.compile_shapes(loop_at, pl_module.model.config.recurrence != "none")

    def _prime_cu_buckets(self, pl_module, batch, shapes: Optional[list[tuple[int, bool]]] = None) -> None:
        """``shapes``: (max_seqlen, recurrence) pairs; default the batch's bound (the one the training steps pass)
        with recurrence off and on."""
        if len(batch) < 4:
            return  # dense rows: no document boundaries to compile for
        x, y = (t[0].to(pl_module.device) for t in batch[:2])
        n = x.size(-1)
        shapes = shapes or [(int(batch[3]), False), (int(batch[3]), True)]
        for bound, recurrent in shapes:
            pl_module.model.set_recurrence(recurrent)
            starts = torch.arange(0, n, bound, dtype=torch.int32)
            for width in self.cu_buckets:
                if width < starts.numel() + 1:
                    continue  # too narrow to hold this row's boundaries
                cu = torch.full((width,), n, dtype=torch.int32)
                cu[: starts.numel()] = starts
                cu = cu.to(pl_module.device)
                for _ in range(3):
                    pl_module.model.zero_grad(set_to_none=True)
                    pl_module._forward(x, y, cu_seqlens=cu, max_seqlen=bound).backward()
        described = ",".join(f"{bound}x{'loop' if recurrent else 'plain'}" for bound, recurrent in shapes)
        pl_module.log_text(f"warmup_cu_buckets:{self.cu_buckets} shapes:{described}")
