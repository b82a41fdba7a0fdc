"""GolfModule: the LightningModule around the GPT. It holds the step logic of the record scripts.

One training batch is one optimizer step: the datamodule yields ``grad_accum`` micro-batches stacked, and
``training_step`` runs them (DDP syncs gradients on the last one only), sets every group's LR from the schedule,
clips, and steps the optimizers in the records' order (upstream ``main`` loop, PR #1394 ``step_fn``). Manual
optimization keeps that order exact. Cross-cutting behaviour (EMA, SWA, late QAT, wallclock stop, recurrence switch,
compile priming, export) lives in the callbacks of ``callbacks/``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from pgolf_lit.eval.registry import DEFAULT_TEST_METHODS
from pgolf_lit.clock import TrainClock, ledger_line
from pgolf_lit.config import GPTConfig
from pgolf_lit.data.seq_schedule import SeqStage
from pgolf_lit.errors import CheckpointError, ConfigError, PgolfError
from pgolf_lit.eval import (
    EvalContext,
    EvalResult,
    EvalSettings,
    Weights,
    eval_methods,
    evaluation_context,
    format_result_line,
    run_method,
)
from pgolf_lit.metrics import BitsPerByte
from pgolf_lit.model.gpt import GPT
from pgolf_lit.run_summary import update_summary
from pgolf_lit.optim.groups import OptimConfig, build_optimizers
from pgolf_lit.optim.chain import OptimizerChain, all_reduce_gradients, clip_grad_norm
from pgolf_lit.optim.muon import Muon
from pgolf_lit.optim.schedule import ScheduleConfig, apply_schedule
from pgolf_lit.textlog import TextLog
from pgolf_lit.model.fused_kernels import use_fused_kernels


@dataclass
class StepSchedule:
    """Everything the schedule decides for one optimizer step, computed once at its start."""

    step: int  # optimizer steps completed before this one
    elapsed_ms: float  # training wallclock before this step
    frac: float  # training fraction (wallclock over the budget, or steps over max_steps)
    lr_scale: float
    momentum: float
    seq_len: Optional[int] = None  # the training length of a length schedule's stage (data.seq_schedule), else None
    muon_wd_scale: float = 1.0  # the Muon WD taper's factor (optim/wd_taper.py)


@dataclass
class CompileSettings:
    """How the records set up torch.compile and CUDA matmuls before training (upstream ``train_gpt.py`` setup)."""

    tf32: bool = True
    """On CUDA: allow TF32 matmuls and float32 matmul precision "high" (every record; GPTQ's fp32 Hessian sums
    run in TF32 too, which is what fits them in the records' reserve)."""
    optimize_ddp: Optional[bool] = None
    """``torch._dynamo.config.optimize_ddp``; null keeps torch's default. PR #1333/#1421/#1394 set it false."""
    cache_size_limit: Optional[int] = None
    """``torch._dynamo.config.cache_size_limit``: room for the recurrent and QAT graph variants (PR #1334
    family: 32; PR #1855: 64); null keeps torch's default."""

    def apply(self, device: torch.device, compiling: bool) -> None:
        if self.tf32 and device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        if compiling:
            # `import torch._dynamo` here would make `torch` a local name of this function, unbound above on CUDA.
            from torch import _dynamo

            if self.optimize_ddp is not None:
                _dynamo.config.optimize_ddp = self.optimize_ddp
            if self.cache_size_limit is not None:
                _dynamo.config.cache_size_limit = self.cache_size_limit


def grad_compression_dtype(strategy: Any) -> Optional[torch.dtype]:
    """The dtype in which the strategy's DDP communication hook reduces gradients: ``DDPStrategy(ddp_comm_hook=
    default_hooks.bf16_compress_hook)`` → bfloat16 (``fp16_compress_hook`` → float16); None without a hook.

    DDP runs the hook itself when it reduces (``grad_clip_scope: global``; Lightning registers it on CUDA only).
    With ``grad_clip_scope: local`` DDP never reduces (every backward runs under ``no_sync``) and the module
    reduces by ``all_reduce_gradients``, which follows this switch for the Muon parameters (PR #1855: bf16 banks,
    the rest in their own dtype). Raises ConfigError for another hook or a wrapper, which that reduction cannot
    follow."""
    hook = getattr(strategy, "_ddp_comm_hook", None)
    wrapper = getattr(strategy, "_ddp_comm_wrapper", None)
    if hook is None and wrapper is None:
        return None
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    known = {default_hooks.bf16_compress_hook: torch.bfloat16, default_hooks.fp16_compress_hook: torch.float16}
    if wrapper is None and hook in known:
        return known[hook]
    name = getattr(wrapper if wrapper is not None else hook, "__qualname__", repr(hook))
    raise ConfigError(
        f"trainer.strategy: with model.optim.grad_clip_scope local the module reduces the gradients itself and follows "
        f"ddp_comm_hook bf16_compress_hook or fp16_compress_hook (torch.distributed.algorithms.ddp_comm_hooks."
        f"default_hooks) only, got {name}"
    )


def plain(value: Any) -> Any:
    """Nested dicts/lists/tuples as dicts and lists (what yaml.safe_load and torch.load(weights_only) accept)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def _as(cls, value):
    """Accept a dataclass instance, a dict (from a checkpoint's hyperparameters or a YAML section) or None."""
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls.from_dict(value) if hasattr(cls, "from_dict") else cls(**value)
    return value


class GolfModule(L.LightningModule):
    def __init__(
        self,
        gpt: GPTConfig = GPTConfig(),
        optim: OptimConfig = OptimConfig(),
        schedule: ScheduleConfig = ScheduleConfig(),
        evaluation: EvalSettings = EvalSettings(),
        test_methods: list[str] = list(DEFAULT_TEST_METHODS),
        compile: bool = False,
        compile_settings: CompileSettings = CompileSettings(),
        record_dtypes: bool = True,
        attention_backend: Literal["auto", "fa3", "sdpa", "math"] = "auto",
        fused_kernels: bool = False,
        train_log_every: int = 200,
        check_finite_every: int = 50,
    ):
        """
        Args:
            gpt: the architecture (defaults: the upstream baseline).
            optim: optimizer routing and hyperparameters (defaults: the upstream baseline).
            schedule: LR warmdown (defaults: the upstream baseline's; Muon momentum warmup is in ``optim``).
            evaluation: settings of the evaluation passes ``pgolf test`` runs (window length, stride, SLOT, TTT).
            test_methods: the passes ``pgolf test`` runs, in order (registered methods: standard, sliding, slot,
                causal_slot, ttt, doc_isolated, phased_ttt; ``pgolf_lit.eval.registry``); the last one is the
                record's scored pass.
            compile: torch.compile the model (fullgraph, static shapes); on by default on CUDA in record configs.
            compile_settings: TF32 and the dynamo settings the records use with torch.compile and DDP.
            record_dtypes: under a bf16 precision, keep the tensors the records keep in bf16 (token tables) in bf16,
                so the residual stream is bf16 as in the records; fp32 precisions keep every weight fp32.
            attention_backend: the attention kernel: ``auto`` (FA3 on CUDA bf16 when installed, as the records,
                else SDPA), ``fa3``, ``sdpa``, or ``math`` (the reference kernel); the same function on each.
            fused_kernels: the records' Triton kernels on CUDA: the fused LeakyReLU² MLP (PR #1530 on) and the
                fused softcapped CE (PR #1787 on); needs triton (the ``kernels`` extra); ignored off CUDA (today's
                PyTorch path). The same functions as the eager path (``fused_kernels.use_fused_kernels``).
            train_log_every: plain-text train lines at steps 1-10 and every N steps.
            check_finite_every: every N steps (and before each validation) stop with a clear error naming the
                first step whose training loss was NaN/inf and the last checkpoint; each check is one host read,
                the bookkeeping in between stays on the device; 0 disables.
        """
        super().__init__()
        self.gpt_config = _as(GPTConfig, gpt)
        self.optim_config = _as(OptimConfig, optim)
        self.schedule_config = _as(ScheduleConfig, schedule)
        self.evaluation = _as(EvalSettings, evaluation)
        unknown = [m for m in test_methods if m not in eval_methods()]
        if unknown:
            known = list(eval_methods())
            raise ConfigError(f"model.test_methods: unknown method(s) {unknown}; expected some of {known}")
        self.test_methods = list(test_methods)
        self.test_results: list[EvalResult] = []
        # Which weights the model holds, for the labels of its result lines: float (fresh, a checkpoint, or an
        # averaging callback's "post-ema") or an artifact's dequantized ones (load_artifact).
        self.weights = Weights.float_weights()
        # Plain dicts only: checkpoints then load with torch.load(weights_only=True).
        # Plain YAML types only (tuples as lists): hparams.yaml then loads with yaml.safe_load.
        self.save_hyperparameters(
            plain(
                {
                    "gpt": self.gpt_config.to_dict(),
                    "optim": dataclasses.asdict(self.optim_config),
                    "schedule": dataclasses.asdict(self.schedule_config),
                    "evaluation": self.evaluation.to_dict(),
                    "test_methods": self.test_methods,
                    "compile": compile,
                    "compile_settings": dataclasses.asdict(_as(CompileSettings, compile_settings)),
                    "record_dtypes": record_dtypes,
                    "attention_backend": attention_backend,
                    "fused_kernels": fused_kernels,
                    "train_log_every": train_log_every,
                    "check_finite_every": check_finite_every,
                }
            )
        )
        self.model = GPT(self.gpt_config)
        self.automatic_optimization = False
        self.compile = compile
        self.compile_settings = _as(CompileSettings, compile_settings)
        self.record_dtypes = record_dtypes
        self.attention_backend = attention_backend
        self.model.set_attention_backend(attention_backend)
        self.fused_kernels = fused_kernels
        use_fused_kernels(self.model, fused_kernels)
        self.train_log_every = train_log_every
        self.check_finite_every = check_finite_every
        self.clock = TrainClock()
        self.text_log = TextLog(enabled=False)
        self.wallclock_budget = None  # set by pgolf_lit.callbacks.WallclockBudget when attached
        # Built here (not in setup) so weight-averaging callbacks, which copy the module at setup, see it.
        self.val_metric = BitsPerByte(vocab_size=self.gpt_config.vocab_size)
        # Every buffer (RoPE frequencies, byte LUTs) is a constant built the same on every rank: DDP neither
        # broadcasts them at start nor before every forward (upstream: broadcast_buffers=False).
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]
        self._schedule_cache: Optional[StepSchedule] = None
        # Progressive context growth (data.seq_schedule): the stage and its LR re-warmup, set up in setup("fit").
        self.seq_stage: Optional[SeqStage] = None
        self.last_schedule: Optional[StepSchedule] = None  # the schedule of the most recent optimizer step
        self._forward = self.model  # replaced by the compiled model in setup()
        self.last_train_loss: Optional[Tensor] = None
        self.last_val_bpb: Optional[float] = None  # for the progress bar
        self._first_nonfinite_step = torch.tensor(-1)
        self._checkpoint_write_due = False  # a checkpoint was written since the ranks last agreed on its outcome
        self._clock_was_running = False
        self._validation_started = 0.0
        self._run_dir = "."
        # Set by `pgolf fit` from the config's `record:` section (pgolf_lit.records.RecordRun): what differs from the
        # record's world, and summary.json's record_run.
        self.run_notes: list[str] = []
        self.record_run: Optional[dict[str, Any]] = None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GolfModule":
        """A module from a parsed pgolf YAML config (its ``model`` section), outside the CLI."""
        return cls(**(config.get("model") or {}))

    def load_checkpoint_weights(self, path: str) -> Optional[int]:
        """The model weights of a Lightning checkpoint of this config (the EMA weights when the EMA callback
        saved it) or of a ``pgolf convert`` file; returns the checkpoint's ``global_step`` (None without one).
        Loads with ``weights_only=True`` (no pickled code runs) and verifies the checkpoint's checksum."""
        from pgolf_lit.checkpoint import load_checkpoint_file
        from pgolf_lit.model.convert import load_upstream_state_dict

        ckpt = load_checkpoint_file(path)
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
        weights = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")}
        load_upstream_state_dict(self.model, weights, path)
        note = (ckpt.get("pgolf") or {}).get("weights_note", "") if isinstance(ckpt, dict) else ""
        self.weights = Weights.float_weights(note if isinstance(note, str) else "")
        step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
        return int(step) if isinstance(step, int) else None

    # --------------------------------------------------------------------------------------------------
    # Setup
    # --------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        self._setup_checkpoints(stage)
        datamodule = getattr(self.trainer, "datamodule", None)
        counts = getattr(datamodule, "byte_counts", None) if datamodule is not None else None
        if counts is not None:
            self.val_metric.set_luts(counts.luts)
            self.val_metric.set_sidecar(counts.sidecar)
        # trainer.log_dir is a collective under DDP (rank 0 broadcasts it): every rank asks, once, here.
        self._run_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.fast_dev_run:  # no logger then: keep the debug run's files out of the working directory
            self._run_dir = str(Path(self.trainer.default_root_dir) / "fast_dev_run")
        if self.trainer.is_global_zero:
            self.text_log = TextLog(f"{self._run_dir}/train.log")
        if stage == "fit":
            for line in self.run_notes:
                self.log_text(line)
            if self.record_run is not None:
                self.write_summary(record_run=self.record_run)
        plan = getattr(datamodule, "seq_plan", None) if datamodule is not None else None
        if stage == "fit" and plan is not None:
            self.seq_stage = SeqStage(plan, self.schedule_config.seq_change_warmup_steps)
        if stage == "fit" and self.optim_config.grad_clip_scope == "local":
            grad_compression_dtype(self.trainer.strategy)  # a hook the manual reduction cannot follow stops here
        self.compile_settings.apply(self.device, self.compile)
        if self.record_dtypes and str(self.trainer.precision).startswith("bf16"):
            self.model.apply_record_dtypes()
        if self.compile and self._forward is self.model:
            # Stored outside the module tree so the state dict keeps one copy of every weight.
            object.__setattr__(self, "_forward", torch.compile(self.model, dynamic=False, fullgraph=True))

    def _setup_checkpoints(self, stage: str) -> None:
        """Checkpoints go through ``GolfCheckpointIO`` (atomic, fsynced, checksummed, verified); under DDP its write
        errors wait for every rank (``_raise_checkpoint_write_error``). Before fitting, rank 0 checks that every
        ModelCheckpoint folder (resolved by now: callbacks' setup runs before the module's) takes a file, and
        every rank stops with its answer."""
        from pgolf_lit.checkpoint import check_writable_dir, install_checkpoint_io

        io = install_checkpoint_io(self.trainer)
        if io is not None:
            io.defer_errors = self.trainer.world_size > 1
        if stage != "fit":
            return
        problem = None
        if self.trainer.is_global_zero:
            for cb in self.trainer.checkpoint_callbacks:
                dirpath = getattr(cb, "dirpath", None)
                if dirpath and "://" not in str(dirpath):
                    problem = problem or check_writable_dir(dirpath)
        problem = self.trainer.strategy.broadcast(problem, src=0)
        if problem:
            raise CheckpointError(problem)

    def _raise_checkpoint_write_error(self) -> None:
        """After a checkpoint was written (only rank 0 writes, the others wait at Lightning's barrier), every rank
        learns rank 0's outcome and a failed write stops them all with its one line (DDP); one collective per
        checkpoint, none on other steps."""
        if not self._checkpoint_write_due or self._trainer is None:
            return
        self._checkpoint_write_due = False
        from pgolf_lit.checkpoint import GolfCheckpointIO

        io = self.trainer.strategy.checkpoint_io
        error = io.deferred_error if isinstance(io, GolfCheckpointIO) and self.trainer.is_global_zero else None
        if self.trainer.world_size > 1:
            error = self.trainer.strategy.broadcast(error, src=0)
        if error:
            raise CheckpointError(error)

    def last_good_checkpoint(self) -> str:
        """The newest checkpoint this run wrote that is still on disk (every one was checked finite before it was
        written), else the one it resumed from, else ``none saved``; the same answer on every rank (collective)."""
        from pgolf_lit.checkpoint import GolfCheckpointIO

        io = self.trainer.strategy.checkpoint_io
        path = io.newest_saved() if isinstance(io, GolfCheckpointIO) else None
        if path is None:
            path = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or self.trainer.ckpt_path
        if self.trainer.world_size > 1:
            path = self.trainer.strategy.broadcast(path, src=0)
        return str(path) if path else "none saved"

    def configure_optimizers(self):
        return OptimizerChain(build_optimizers(self.model, self.optim_config))

    # --------------------------------------------------------------------------------------------------
    # Schedule
    # --------------------------------------------------------------------------------------------------
    @property
    def max_steps(self) -> int:
        steps = self.trainer.max_steps if self._trainer is not None else -1
        return steps if steps and steps > 0 else 20000

    def step_schedule(self) -> StepSchedule:
        """LR multiplier, training fraction and Muon momentum of the current step (cached per step, so the
        callbacks that read it see exactly what the step uses)."""
        step = self.global_step
        if self._schedule_cache is None or self._schedule_cache.step != step:
            elapsed = self.clock.elapsed_ms()
            budget = self.wallclock_budget
            cap_ms = budget.effective_cap_ms if budget is not None else None
            cfg = self.schedule_config
            frac = cfg.training_fraction(step, elapsed, cap_ms, self.max_steps)
            lr_scale = cfg.lr_multiplier(step, elapsed, cap_ms, self.max_steps)
            seq_len = None
            if self.seq_stage is not None:  # progressive context growth: the stage of this fraction, its re-warmup
                if self.seq_stage.advance(step, frac):
                    self._log_stage_change(step, frac)
                lr_scale *= self.seq_stage.lr_factor(step)
                seq_len = self.seq_stage.seq_len
            self._schedule_cache = StepSchedule(
                step=step,
                elapsed_ms=elapsed,
                frac=frac,
                lr_scale=lr_scale,
                momentum=self.optim_config.muon_momentum_at(step),
                seq_len=seq_len,
                muon_wd_scale=cfg.muon_wd_multiplier(frac),
            )
        return self._schedule_cache

    def _log_stage_change(self, step: int, frac: float) -> None:
        stage = self.seq_stage
        self.record_event(
            f"growth_stage:{stage.seq_len}",
            f"growth_stage:seq_len:{stage.seq_len} progress:{frac:.3f} step:{step}",
            step,
        )
        if stage.rewarm_from == step:
            steps = stage.rewarmup_steps
            self.log_text(f"growth_stage_rewarmup:start step:{step} steps:{steps} seq_len:{stage.seq_len}")

    # --------------------------------------------------------------------------------------------------
    # Training
    # --------------------------------------------------------------------------------------------------
    def on_train_epoch_end(self) -> None:
        self._raise_checkpoint_write_error()

    def on_train_end(self) -> None:
        self.clock.pause(self.device)  # training is over: the EMA, the export and the scores are not training time
        self._raise_checkpoint_write_error()
        from pgolf_lit.checkpoint import GolfCheckpointIO

        io = self.trainer.strategy.checkpoint_io
        if isinstance(io, GolfCheckpointIO):  # a later save (outside the loop's hooks) raises where it fails
            io.defer_errors = False
        elapsed = self.clock.elapsed_ms()
        tokens = getattr(self.trainer.datamodule, "train_batch_tokens", 0) if self.trainer.datamodule else 0
        self.write_summary(
            train={
                "steps": self.global_step,
                "train_time_ms": elapsed,
                "step_avg_ms": elapsed / max(self.global_step, 1),
                "tokens_per_s": self.global_step * tokens / max(elapsed / 1000.0, 1e-9),
                "params": self.model.num_params(),
                "world_size": self.trainer.world_size,
            }
        )

    def on_fit_end(self) -> None:
        """The clock ledger (after the callbacks' fit-end work, so the export's calibration time is in it)."""
        budget = self.wallclock_budget
        cap_s = reserve_s = None
        if budget is not None and budget.effective_cap_ms is not None:
            cap_s, reserve_s = budget.max_seconds, budget.reserve_seconds
        ledger = self.clock.ledger(cap_s, reserve_s or 0.0)
        self.log_text(ledger_line(ledger))
        self.write_summary(clock=ledger)
        self.write_run_manifest("fit", clock=ledger)

    def on_train_start(self) -> None:
        if self.global_step > 0:  # resumed: the CSV keeps the run's history up to the checkpoint
            for logger in self.trainer.loggers:
                keep = getattr(logger.experiment, "keep_steps_before", None) if self.trainer.is_global_zero else None
                if keep is not None:
                    keep(self.global_step)
        if self.seq_stage is not None and self.global_step == 0:
            self.log_text(
                f"train_seq_schedule:{self.seq_stage.schedule.describe()} growth_stage:seq_len:{self.seq_stage.seq_len}"
                f" progress:0.000"
            )
        # Priming callbacks ran before this hook; the wallclock starts now.
        self.clock.start(self.device)
        self.log_text(f"train:start steps:{self.max_steps} params:{self.model.num_params()}")

    def _no_sync(self, skip_sync: bool):
        model = self.trainer.model if self._trainer is not None else None
        if skip_sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        sched = self.last_schedule = self.step_schedule()
        loss = self.run_optimizer_step(batch, sched, opt)
        self.last_train_loss = loss
        if self.check_finite_every:
            # Device-side bookkeeping (no host sync): the first step whose loss was not finite.
            bad = ~torch.isfinite(loss.detach())
            self._first_nonfinite_step = torch.where(
                bad & (self._first_nonfinite_step < 0), sched.step + 1, self._first_nonfinite_step.to(loss.device)
            )
        # Logged as device tensors and kept off the progress bar: Lightning reads progress-bar values on the host
        # after every batch, a sync per step on CUDA (the plain-text train lines show the loss instead).
        self.log("train_loss", loss)
        self.log("lr_scale", torch.full((), sched.lr_scale, device=loss.device))
        return None

    def run_optimizer_step(self, batch, sched: StepSchedule, optimizer, clip: Optional[bool] = None) -> Tensor:
        """One optimizer step in the records' order: zero grads; forward/backward of every micro-batch (DDP
        syncs on the last); LR = base_lr × multiplier and Muon momentum; clip the global grad norm; step.

        ``optimizer`` is the LightningOptimizer in training (so Lightning counts the step) or the bare
        OptimizerChain during compile priming. Returns the mean micro-batch loss (a device tensor, no sync).
        """
        x, y = batch[0], batch[1]  # [grad_accum, rows, T] each (packed rows: rows 1, T = N)
        cu_seqlens = batch[2] if len(batch) > 2 else None  # [grad_accum, K] document boundaries (packed rows)
        max_seqlen = int(batch[3]) if len(batch) > 3 else 0  # the loader's bound on every segment (packed rows)
        optimizer.zero_grad(set_to_none=True)
        accum = x.size(0)
        # PR #1855 clips each rank's own gradient and reduces after; otherwise DDP syncs on the last micro-batch
        local_clip = self.optim_config.grad_clip_scope == "local"
        total = torch.zeros((), device=x.device)
        for i in range(accum):
            with self._no_sync(local_clip or i < accum - 1):
                if cu_seqlens is None:
                    loss = self._forward(x[i], y[i])
                else:
                    loss = self._forward(x[i], y[i], cu_seqlens=cu_seqlens[i], max_seqlen=max_seqlen)
                self.manual_backward(loss / accum)
            total += loss.detach()
        chain = getattr(optimizer, "optimizer", optimizer)
        apply_schedule(chain, sched.lr_scale, sched.momentum, sched.muon_wd_scale)
        max_norm = self.optim_config.grad_clip_norm
        if max_norm > 0 and clip is not False:
            clip_grad_norm(self.model.parameters(), max_norm)
        if local_clip:
            self._reduce_gradients(chain)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total / accum

    def _reduce_gradients(self, chain) -> None:
        """``grad_clip_scope: local``: average the clipped gradients over the ranks. With a compression comm hook on
        the strategy (``grad_compression_dtype``), the Muon parameters' gradients (the parameters the chain's Muon
        holds, i.e. those whose declared role routes them there) are reduced in that dtype, the rest in their own."""
        dtype = grad_compression_dtype(self.trainer.strategy) if self._trainer is not None else None
        compressed = (
            [
                p
                for opt in getattr(chain, "optimizers", [chain])
                if isinstance(opt, Muon)
                for group in opt.param_groups
                for p in group["params"]
            ]
            if dtype is not None
            else []
        )
        all_reduce_gradients(self.model.parameters(), compressed, dtype or torch.bfloat16)

    def _check_finite(self, checkpoint: Optional[dict[str, Any]] = None) -> None:
        """Raise if any training loss since the last check was NaN/inf on any rank (one host read; one small
        all-reduce under DDP, so every rank stops together). With ``checkpoint`` (about to be written), also raise if
        a weight it holds is NaN/inf: a checkpoint that is written is finite."""
        first = self._first_nonfinite_step.to(self.device)
        status = [torch.where(first >= 0, first, torch.iinfo(torch.int64).max)]
        if checkpoint is not None:
            tensors = [
                t
                for key in ("state_dict", "current_model_state")
                for t in (checkpoint.get(key) or {}).values()
                if torch.is_tensor(t) and t.is_floating_point()
            ]
            finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
            status.append(finite.to(device=self.device, dtype=torch.int64))
        status = torch.stack(status)
        if self._trainer is not None and self.trainer.world_size > 1:
            status = self.trainer.strategy.reduce(status, reduce_op="min")
        values = status.tolist()
        first_bad = values[0] if values[0] != torch.iinfo(torch.int64).max else -1
        weights_finite = len(values) < 2 or values[1] == 1
        if first_bad < 0 and weights_finite:
            return
        before = f"before writing the checkpoint of step {self.global_step} " if checkpoint is not None else ""
        what = (
            f"training loss is not finite (nan/inf) at step {first_bad}"
            if first_bad >= 0
            else f"the weights are not finite (nan/inf) at step {self.global_step}"
        )
        raise PgolfError(
            f"{what}: stopping {before}(last good checkpoint: {self.last_good_checkpoint()}); lower the learning "
            f"rates or check the data"
        )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self._raise_checkpoint_write_error()
        step = self.global_step
        if self.check_finite_every and (step % self.check_finite_every == 0 or step >= self.max_steps):
            self._check_finite()
        if step <= 10 or step % self.train_log_every == 0:
            # The mean over ranks (one all-reduce at log steps only), not rank 0's micro-batches alone.
            loss = self.trainer.strategy.reduce(self.last_train_loss.detach(), reduce_op="mean")
            elapsed = self.clock.elapsed_ms()
            tokens = getattr(self.trainer.datamodule, "train_batch_tokens", 0) if self.trainer.datamodule else 0
            tok_s = step * tokens / max(elapsed / 1000.0, 1e-9)
            self.log_dict({"tok_s": tok_s, "train_time_ms": elapsed}, on_step=True, sync_dist=False)
            self.log_text(
                f"step:{step}/{self.max_steps} train_loss:{float(loss):.4f} "
                f"train_time:{elapsed:.0f}ms step_avg:{elapsed / max(step, 1):.2f}ms tok/s:{tok_s:.0f}"
            )
        if step >= self.max_steps:
            # Stopping through should_stop makes Lightning run the final validation at this step, as upstream.
            self.trainer.should_stop = True

    # --------------------------------------------------------------------------------------------------
    # Validation: the full split, contiguous sequences, raw weights (upstream train_gpt.py ``eval_val``)
    # --------------------------------------------------------------------------------------------------
    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking and self.check_finite_every:
            self._check_finite()
        self._clock_was_running = self.clock.running
        self.clock.pause(self.device)
        self._validation_started = time.perf_counter()

    def on_validation_end(self) -> None:
        self._raise_checkpoint_write_error()
        if self.trainer.state.fn == "fit":  # the clock ledger's off-the-clock validation time
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.clock.note_off_clock("validation", time.perf_counter() - self._validation_started)
        if self._clock_was_running:
            self.clock.start(self.device)

    def validation_step(self, batch, batch_idx: int) -> None:
        seqs, start = batch
        x, y = seqs[:, :-1], seqs[:, 1:]
        logits = self._forward(x)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
        positions = start + 1 + torch.arange(y.numel(), device=y.device)  # the targets' places in the val stream
        self.val_metric.update(nll, x.reshape(-1), y.reshape(-1), positions)

    def on_validation_epoch_end(self) -> None:
        result = self.val_metric.compute()
        self.val_metric.reset()
        val_loss, val_bpb = float(result["loss"]), float(result["bpb"])
        self.last_val_bpb = val_bpb
        if self.trainer.state.fn == "fit":
            key = "initial_val" if self.trainer.sanity_checking else "last_val"
            if not (key == "initial_val" and self.global_step > 0):  # a resume keeps the run's initial score
                self.write_summary(**{key: {"step": self.global_step, "val_loss": val_loss, "val_bpb": val_bpb}})
        if not self.trainer.sanity_checking:
            self.log("val_loss", val_loss, sync_dist=False)
            self.log("val_bpb", val_bpb, prog_bar=True, sync_dist=False)
        elapsed = self.clock.elapsed_ms()
        self.log_text(
            f"step:{self.global_step}/{self.max_steps} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f} "
            f"train_time:{elapsed:.0f}ms step_avg:{elapsed / max(self.global_step, 1):.2f}ms"
        )

    # --------------------------------------------------------------------------------------------------
    # Test: the configured evaluation passes (pgolf_lit.eval), one per test batch
    # --------------------------------------------------------------------------------------------------
    def mark_weights(self, note: str) -> None:
        """Say what produced the float weights the model now holds (``post-ema``, ``post-swa``): averaging callbacks
        call it when they load their average, and the pre-quantization result lines carry it."""
        self.weights = Weights.float_weights(note)

    def eval_context(self) -> EvalContext:
        """The evaluation of this run: the config's settings, the Trainer's precision, this module's compile flag
        and its current weights (the same function ``pgolf eval`` and ``GPTQExport`` use)."""
        return evaluation_context(
            self.evaluation,
            precision=str(self.trainer.precision),
            device=self.device,
            compile=self.compile,
            weights=self.weights,
        )

    def evaluate(self, method: str, model: Optional[torch.nn.Module] = None, context: Optional[EvalContext] = None):
        """Run one registered pass on the datamodule's val split, on every rank (collective), and return it."""
        dm = self.trainer.datamodule
        if model is not None and hasattr(model, "set_attention_backend"):
            model.set_attention_backend(self.attention_backend)
            use_fused_kernels(model, self.fused_kernels)  # PR #1855's global-SGD TTT trains through GPT.forward
        # SLOT and TTT optimize: leave any inference mode and the Trainer's autocast; each pass sets its own
        # precision through the context, as the record scripts do.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(self.device.type, enabled=False):
            return run_method(
                method,
                model if model is not None else self.model,
                dm.val_tokens.to(self.device),
                dm.byte_counts,
                context or self.eval_context(),
                self.global_rank,
                self.trainer.world_size,
            )

    def on_test_start(self) -> None:
        self.test_results = []

    def on_test_end(self) -> None:
        self.write_run_manifest("test")

    def test_step(self, batch, batch_idx: int) -> None:
        method = self.test_methods[batch_idx]
        result = self.evaluate(method)
        self.test_results.append(result)
        self.log_text(format_result_line(result))
        self.write_summary(test={method: dataclasses.asdict(result)})
        self.log_dict(
            {
                f"{method}/val_loss": result.val_loss,
                f"{method}/val_bpb": result.val_bpb,
                f"{method}/eval_time_ms": result.eval_time_ms,
            },
            sync_dist=False,
            batch_size=1,
        )

    def load_artifact(self, path: str) -> None:
        """Replace the weights by an artifact's dequantized ones; the artifact must match this config."""
        from pgolf_lit.model.convert import load_upstream_state_dict
        from pgolf_lit.quant import read_artifact

        art = read_artifact(path, self.gpt_config)
        load_upstream_state_dict(self.model, art.state_dict, str(path))
        self.weights = art.weights

    # --------------------------------------------------------------------------------------------------
    # Checkpoints: the wallclock and the recurrence state travel with the weights
    # --------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # Before the file is written, on every rank (Lightning dumps the checkpoint on all of them).
            self._check_finite(checkpoint)
            self._checkpoint_write_due = True
        checkpoint["pgolf"] = {
            "clock": self.clock.state_dict(),
            "recurrence_active": self.model.recurrence_active,
            "weights_note": checkpoint.get("pgolf", {}).get("weights_note", self.weights.note),
        }
        if self.seq_stage is not None:
            checkpoint["pgolf"]["seq_stage"] = self.seq_stage.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None and self.trainer.state.fn == "fit" and "loops" not in checkpoint:
            raise CheckpointError(
                f"{self.trainer.ckpt_path}: holds model weights only (a pgolf convert output or a save_weights_only "
                f"checkpoint), no training state to resume from; evaluate it with pgolf test --ckpt_path or export it "
                f"with pgolf export --ckpt"
            )
        sd = checkpoint.get("state_dict")
        if isinstance(sd, dict) and "_forward" in self._modules:
            # The module registers the model twice (``model`` and ``_forward``, the module the steps call); a
            # weights-only file such as a ``pgolf convert`` output holds only ``model.*``.
            for key in [k for k in sd if k.startswith("model.")]:
                sd.setdefault("_forward." + key[len("model.") :], sd[key])
        state = checkpoint.get("pgolf")
        if state:
            self.clock.load_state_dict(state["clock"])
            self.model.set_recurrence(state["recurrence_active"])
            self.weights = Weights.float_weights(state.get("weights_note", ""))
            if self.seq_stage is not None and state.get("seq_stage"):
                self.seq_stage.load_state_dict(state["seq_stage"])

    # --------------------------------------------------------------------------------------------------
    @property
    def run_dir(self) -> str:
        """The run's directory (the logger's log_dir), resolved on every rank in setup()."""
        return self._run_dir

    def write_summary(self, **sections) -> None:
        """Merge sections into the run's summary.json (rank 0 only)."""
        if self._trainer is not None and self.trainer.is_global_zero:
            update_summary(self.run_dir, **sections)

    def write_run_manifest(self, stage: str, clock: Optional[dict] = None) -> None:
        """The run's manifest.json (run_manifest.py: versions, hardware, every shard's sha256, config, seed, clock
        ledger), rank 0 only."""
        if self._trainer is not None and self.trainer.is_global_zero:
            from pgolf_lit.run_manifest import manifest_of_trainer, write_run_manifest

            write_run_manifest(self.run_dir, manifest_of_trainer(self.trainer, self.run_dir, stage, clock))

    def record_event(self, name: str, line: str, step: Optional[int] = None) -> None:
        """A training event (``recurrence:activated``, ``late_qat:enabled``, ...): its upstream-style line in
        train.log, and ``events[name] = {step, train_time_ms}`` in summary.json, which ``pgolf report`` plots."""
        self.log_text(line)
        at = self.global_step if step is None else step
        self.write_summary(events={name: {"step": int(at), "train_time_ms": float(self.clock.elapsed_ms())}})

    def log_text(self, line: str) -> None:
        if self._trainer is None or self.trainer.is_global_zero:
            self.text_log(line)
