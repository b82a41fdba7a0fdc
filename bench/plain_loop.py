"""The records' training step as a plain PyTorch loop: the reference side of ``bench/throughput.py``.

It does per optimizer step what upstream ``train_gpt.py`` does in its ``main`` loop, with pgolf_lit's model,
optimizers and loaders and nothing of Lightning:

    scale = LR multiplier (elapsed wallclock, cap)   [recurrence switch when due]
    zero grads
    grad_accum × (next micro-batch → forward (bf16 autocast on CUDA) → backward of loss / grad_accum)
        (a packed loader's micro-batch is one row with its cu_seqlens; attention takes the loader's seqlen bound)
    Muon momentum and every group's lr from the schedule; clip the global grad norm; step token, [head],
    Muon, scalar; zero grads
    EMA update of an fp32 shadow of the state dict, tensor by tensor, as upstream
    step += 1; a train line (one host sync) at steps 1-10 and every ``log_every`` steps

Left out on purpose: SWA snapshots and the late-QAT flag act only once the LR multiplier falls below 0.2 /
0.15, which a benchmark with a far cap never reaches; validation is off the clock in the records; the
wallclock stop check is a Python comparison on one device (the all-reduce exists only under DDP, on both
sides alike). Single device only: the comparison is per GPU.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, TextIO

import torch

from pgolf_lit.config import GPTConfig
from pgolf_lit.data.loaders import PackedBatch, make_loader
from pgolf_lit.model.gpt import GPT
from pgolf_lit.optim import OptimConfig, ScheduleConfig, apply_schedule, build_optimizers, clip_grad_norm


@dataclass
class PlainConfig:
    """Everything the loop needs, in upstream terms (``throughput.py`` fills it from the parsed pgolf config)."""

    gpt: GPTConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    data_dir: Path
    loader: str  # sequential | shuffled | coprime
    seq_len: int
    micro_batch_tokens: int  # tokens per micro-batch (upstream's L)
    grad_accum: int
    device: torch.device
    bf16: bool  # bf16 autocast around the forward (CUDA records)
    compile: bool  # torch.compile(model, dynamic=False, fullgraph=True)
    cap_ms: Optional[float]  # effective wallclock cap of the schedule; None = count iterations
    iterations: int  # upstream ITERATIONS (the schedule's step budget without a cap)
    ema_decay: Optional[float] = None  # None = no EMA (the baseline)
    recurrence_at_step: Optional[int] = None  # PR #1278/#1333/#1421 switch
    recurrence_at_fraction: Optional[float] = None  # PR #1394 switch
    log_every: int = 200
    seed: int = 1337

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch_tokens * self.grad_accum


class PlainTrainer:
    """One model (compiled once) trained in runs of a few steps; every run starts like a fresh upstream run
    (new optimizers, loader, EMA shadow and clock) so it matches one ``Trainer.fit`` of the Lightning side."""

    def __init__(self, cfg: PlainConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.model = GPT(cfg.gpt).to(cfg.device)
        self.model.train()
        self.forward = torch.compile(self.model, dynamic=False, fullgraph=True) if cfg.compile else self.model

    def _sync(self) -> None:
        if self.cfg.device.type == "cuda":
            torch.cuda.synchronize(self.cfg.device)

    def _autocast(self):
        if self.cfg.bf16:
            return torch.autocast(device_type=self.cfg.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _recurrence_due(self, step: int, frac: float) -> bool:
        cfg = self.cfg
        if self.model.recurrence_active or cfg.gpt.recurrence == "none":
            return False
        if cfg.recurrence_at_step is not None:
            return step >= cfg.recurrence_at_step
        return cfg.recurrence_at_fraction is not None and frac >= cfg.recurrence_at_fraction

    def run(self, steps: int, timed_from: int, log: TextIO) -> float:
        """Train ``steps`` optimizer steps; return the wall seconds of the steps after the first ``timed_from``
        (the device is synchronised at both ends of that span, and nowhere else except the train lines)."""
        cfg, model = self.cfg, self.model
        optimizers = build_optimizers(model, cfg.optim)
        loader = make_loader(
            cfg.loader,
            cfg.data_dir,
            rank=0,
            world_size=1,
            seq_len=cfg.seq_len,
            tokens_per_rank=cfg.micro_batch_tokens,
            vocab_size=cfg.gpt.vocab_size,
        )
        ema = None
        if cfg.ema_decay is not None:
            ema = {name: t.detach().float().clone() for name, t in model.state_dict().items()}

        def zero_grad() -> None:
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)

        self._sync()
        clock_start = time.perf_counter()
        timed_start = clock_start
        for step in range(steps):
            if step == timed_from:
                self._sync()
                timed_start = time.perf_counter()
            elapsed_ms = 1000.0 * (time.perf_counter() - clock_start)
            scale = cfg.schedule.lr_multiplier(step, elapsed_ms, cfg.cap_ms, cfg.iterations)
            frac = cfg.schedule.training_fraction(step, elapsed_ms, cfg.cap_ms, cfg.iterations)
            if self._recurrence_due(step, frac):
                model.set_recurrence(True)

            zero_grad()
            train_loss = torch.zeros((), device=cfg.device)
            for _ in range(cfg.grad_accum):
                batch = loader.next_batch()
                x, y = (t.to(cfg.device, non_blocking=True) for t in batch[:2])
                with self._autocast():
                    if isinstance(batch, PackedBatch):  # PR #1855's packed row: varlen attention per document
                        cu = batch.cu_seqlens.to(cfg.device, non_blocking=True)
                        loss = self.forward(x, y, cu_seqlens=cu, max_seqlen=loader.seqlen_bound)
                    else:
                        loss = self.forward(x, y)
                (loss / cfg.grad_accum).backward()
                train_loss += loss.detach()
            train_loss /= cfg.grad_accum

            apply_schedule(optimizers, scale, cfg.optim.muon_momentum_at(step))
            clip_grad_norm(model.parameters(), cfg.optim.grad_clip_norm)
            for opt in optimizers:
                opt.step()
            zero_grad()

            if ema is not None:
                with torch.no_grad():
                    for name, t in model.state_dict().items():
                        ema[name].mul_(cfg.ema_decay).add_(t.detach().float(), alpha=1.0 - cfg.ema_decay)

            done = step + 1
            if done <= 10 or done % cfg.log_every == 0:
                train_ms = 1000.0 * (time.perf_counter() - clock_start)
                print(f"step:{done}/{steps} train_loss:{train_loss.item():.4f} train_time:{train_ms:.0f}ms", file=log)
        self._sync()
        return time.perf_counter() - timed_start
