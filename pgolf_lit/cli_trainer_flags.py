"""Trainer flags that manual optimization or the records' own clock would ignore, translated onto the records'
knobs or refused (``honest_trainer_flags``), and ``--ckpt_path last`` resuming a run in its own folder
(``resume_in_place``). Both edit the parsed config before LightningCLI instantiates the Trainer."""

from __future__ import annotations

from typing import Sequence

from pgolf_lit.errors import PgolfError


def _max_time_seconds(value) -> float:
    """Lightning's ``max_time`` ("DD:HH:MM:SS", a dict of timedelta fields, or a timedelta) in seconds."""
    import datetime

    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, dict) or hasattr(value, "__dict__"):
        return datetime.timedelta(**dict(vars(value) if hasattr(value, "__dict__") else value)).total_seconds()
    try:
        days, hours, minutes, seconds = (int(x) for x in str(value).split(":"))
    except ValueError:
        raise PgolfError(f"trainer.max_time: expected DD:HH:MM:SS, got {value!r}") from None
    return float(((days * 24 + hours) * 60 + minutes) * 60 + seconds)


def honest_trainer_flags(config) -> None:
    """Trainer flags that manual optimization or the records' own clock would ignore are mapped onto the record's
    knobs, or refused with one line naming the right field:

    * ``gradient_clip_val`` → ``model.optim.grad_clip_norm`` (the records clip the global norm before each step);
    * ``accumulate_grad_batches`` → refused: the records accumulate ``data.grad_accum_base`` micro-batches;
    * ``enable_checkpointing false`` → the config's checkpoint callback is dropped (Lightning would refuse both);
    * ``enable_checkpointing true`` on a config without a checkpoint callback (the records write nothing during the
      timed run) → ``pgolf_lit.callbacks.Checkpoint`` (every 1000 steps, plus ``last.ckpt`` where training stops),
      not Lightning's default, which saves only at an epoch's end (never, in a run of one endless epoch);
    * ``max_time`` → the ``WallclockBudget`` cap (added when the config has none), so the LR schedule's training
      fraction and the stop follow it; Lightning's own timer, which also counts validation, is not used.
    """
    from jsonargparse import Namespace

    trainer = config.trainer
    clip = trainer.get("gradient_clip_val")
    if clip is not None:
        if trainer.get("gradient_clip_algorithm") not in (None, "norm"):
            raise PgolfError("trainer.gradient_clip_algorithm: the records clip the gradient norm; use 'norm'")
        config.model.optim.grad_clip_norm = float(clip)
        trainer.gradient_clip_val = None
        trainer.gradient_clip_algorithm = None
    if trainer.get("accumulate_grad_batches") not in (None, 1):
        raise PgolfError(
            "trainer.accumulate_grad_batches: pgolf accumulates data.grad_accum_base micro-batches per step (the "
            "global batch stays data.train_batch_tokens on any device count); set data.grad_accum_base instead"
        )
    if trainer.get("enable_checkpointing") is False:  # the switch wins over the config's checkpoint callback
        trainer.callbacks = [c for c in (trainer.get("callbacks") or []) if not _is_checkpoint(c)]
    elif trainer.get("enable_checkpointing") and not any(_is_checkpoint(c) for c in trainer.get("callbacks") or []):
        trainer.callbacks = [
            *(trainer.get("callbacks") or []),
            Namespace(class_path="pgolf_lit.callbacks.Checkpoint", init_args=Namespace()),
        ]
    max_time = trainer.get("max_time")
    if max_time is not None:
        seconds = _max_time_seconds(max_time)
        callbacks = list(trainer.get("callbacks") or [])
        budget = next((c for c in callbacks if str(c.get("class_path", "")).endswith(".WallclockBudget")), None)
        if budget is None:
            callbacks.append(
                Namespace(
                    class_path="pgolf_lit.callbacks.WallclockBudget",
                    init_args=Namespace(max_seconds=seconds, reserve_seconds=0.0),
                )
            )
        else:
            cap = budget.init_args.get("max_seconds") or 0
            budget.init_args.max_seconds = seconds if cap <= 0 else min(cap, seconds)
            reserve = budget.init_args.get("reserve_seconds") or 0
            if reserve >= budget.init_args.max_seconds:
                raise PgolfError(
                    f"trainer.max_time: a {budget.init_args.max_seconds:g} s cap leaves no training time after the "
                    f"config's WallclockBudget.reserve_seconds {reserve:g}"
                )
        trainer.callbacks = callbacks
        trainer.max_time = None


def _is_checkpoint(callback) -> bool:
    import importlib

    from lightning.pytorch.callbacks import ModelCheckpoint

    if isinstance(callback, ModelCheckpoint):
        return True
    module, _, name = str(getattr(callback, "class_path", "") or "").rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        return False
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)


def resume_in_place(config, command_line: Sequence[str] = ()) -> None:
    """``--ckpt_path last`` resumes the run's own newest checkpoint in its own folder: the logger's version is pinned
    to the run folder holding the newest ``checkpoints/*.ckpt`` (Lightning would start a fresh version_N and find
    no last checkpoint there), and ``ckpt_path`` becomes that file, so resuming does not depend on this invocation
    having a checkpoint callback (record configs have none). The resumed run keeps checkpointing, as the run it
    resumes did, unless the command line says ``--trainer.enable_checkpointing false``. A logger given an explicit
    version resumes from that folder."""
    from pathlib import Path

    if not any(a.startswith("--trainer.enable_checkpointing") for a in command_line):
        config.trainer.enable_checkpointing = True
    logger = config.trainer.get("logger")
    args = logger.get("init_args") if hasattr(logger, "get") else None
    if args is None or not args.get("save_dir"):
        return
    root = Path(args.get("save_dir")) / (args.get("name") or "lightning_logs")
    version = args.get("version")
    folders = "*" if version is None else version if isinstance(version, str) else f"version_{version}"
    checkpoints = sorted(root.glob(f"{folders}/checkpoints/*.ckpt"), key=lambda p: p.stat().st_mtime)
    if checkpoints:
        if version is None:
            args.version = checkpoints[-1].parent.parent.name
        config.ckpt_path = str(checkpoints[-1])
