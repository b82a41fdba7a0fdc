"""Helpers for the tests that run a real Lightning Trainer on CPU with a tiny GPT and the embedded dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from pgolf_lit.config import GPTConfig
from pgolf_lit.data.datamodule import TokenShardDataModule
from pgolf_lit.module import GolfModule
from pgolf_lit.optim.groups import OptimConfig
from pgolf_lit.optim.schedule import ScheduleConfig

TINY_GPT = dict(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, mlp_mult=2.0)


def tiny_module(**gpt_changes: Any) -> GolfModule:
    return GolfModule(
        gpt=GPTConfig(**{**TINY_GPT, **gpt_changes}),
        optim=OptimConfig(grad_clip_norm=1.0, muon_momentum_warmup_steps=5),
        schedule=ScheduleConfig(warmdown="frac", warmdown_frac=0.5),
        train_log_every=1000,
    )


def tiny_datamodule(data_root: Path, **changes: Any) -> TokenShardDataModule:
    args = dict(
        data_dir=str(data_root / "datasets" / "fineweb10B_sp1024"),
        vocab_size=1024,
        train_batch_tokens=2048,
        train_seq_len=64,
        grad_accum_base=2,
        val_batch_tokens=4096,
        val_max_tokens=2048,
    )
    args.update(changes)
    return TokenShardDataModule(**args)


class CloseProcessGroup(Callback):
    """Spawned gloo ranks leave together: a barrier, then the process group destroyed, at the end of the run.
    Lightning's spawn workers exit with the group alive, and a rank whose peer is already gone then aborts in gloo's
    teardown ("terminate called without an active exception", SIGABRT, about 1 run in 12 on 2 cores)."""

    def teardown(self, trainer, pl_module, stage: str) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def tiny_trainer(root: Path, max_steps: int, callbacks: Optional[list] = None, **changes: Any) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        max_epochs=-1,
        val_check_interval=10_000,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=str(root),
        callbacks=callbacks or [],
        deterministic=True,
    )
    args.update(changes)
    if args.get("strategy") == "ddp_spawn":
        args["callbacks"] = [*args["callbacks"], CloseProcessGroup()]
    return L.Trainer(**args)


class Recorder(Callback):
    """Records, after every optimizer step, whatever ``fn(trainer, module)`` returns."""

    def __init__(self, fn: Callable, initial: bool = False):
        self.fn = fn
        self.values: list = []
        self.record_initial = initial
        self.initial = None

    def on_train_start(self, trainer, pl_module) -> None:
        if self.record_initial:
            self.initial = self.fn(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(self.fn(trainer, pl_module))


def weights(trainer, pl_module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


def fit(module, datamodule, trainer, **kwargs):
    trainer.fit(module, datamodule=datamodule, **kwargs)
    return trainer
