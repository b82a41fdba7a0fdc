"""The ``pgolf`` command.

``pgolf fit|validate|test --config X.yaml`` is a LightningCLI over GolfModule + TokenShardDataModule (every
Trainer flag works: ``--trainer.devices 8 --trainer.strategy ddp``; ``--print_config`` prints the merged
config). The other subcommands are tools around a run: ``data build|download``, ``summary``, ``convert``,
``export``, ``eval``, ``audit``, ``demo``, ``seeds``, ``record``, ``report``, ``leaderboard``, ``lineage``.

Bad input ends in one line ``error: ...`` naming the file or field, and exit status 2: a ``PgolfError`` (also when
Lightning or jsonargparse wrapped it), an OS error (permission denied, disk full: the line names the path), and,
under DDP, the error of another rank (every rank ends with the failing rank's line).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Sequence

from pgolf_lit.errors import ConfigError, PgolfError

TRAINER_COMMANDS = ("fit", "validate", "test")

# Console noise the package can filter without hiding anything a user needs (message regexes).
QUIET_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\)",  # lightning 2.6 + torch 2.13, inside Lightning
    r".*It is recommended to use `self\.log\(.*sync_dist=True",  # our metrics reduce themselves
    r".*LightningCLI's args parameter is intended",
    r".*Your `IterableDataset` has `__len__` defined",  # our loaders run in the main process (no workers)
    r".*Checkpoint directory .* exists and is not empty",  # a run resumed in its own folder
)
# Lightning's litlogger / litmodels advertisements, and its note that our own summary callback replaced its own.
QUIET_INFO = ("💡 Tip:", "Trainer already configured with model summary callbacks")


def quiet_console() -> None:
    """Filter the warnings and tips above (idempotent)."""
    import logging
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

    class DropTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.getMessage()).startswith(QUIET_INFO)

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropTips) for f in logger.filters):
            logger.addFilter(DropTips())
        for handler in logger.handlers:
            if not any(isinstance(f, DropTips) for f in handler.filters):
                handler.addFilter(DropTips())


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("pgolf-lit")
    except PackageNotFoundError:
        return "unknown (not installed)"


CONFIG_FLAGS = ("--config", "-c")


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Merge the ``--config`` files of a command line into one, resolving ``extends`` overlays.

    ``pgolf fit --config record.yaml --config record_tiny.yaml`` and ``pgolf fit --config record_tiny.yaml``
    (whose ``extends: record.yaml`` names its base) give the same run: the files are merged in order by
    ``pgolf_lit.config.merge_configs`` (callbacks matched by class) and passed on as one config at the place of the
    first. A single file without ``extends`` is passed on unchanged, as are configs given as YAML strings.
    """
    from pathlib import Path

    from pgolf_lit.config import EXTENDS_KEY, load_config, load_yaml, merge_configs, without_published_record

    positions, files = [], []
    out = list(args)
    i = 0
    while i < len(out):
        flag, value = out[i], None
        if flag in CONFIG_FLAGS and i + 1 < len(out):
            value, width = out[i + 1], 2
        elif flag.startswith("--config="):
            value, width = flag.split("=", 1)[1], 1
        if value is not None and not Path(value).is_file() and "\n" not in value and ":" not in value:
            value = str(named_config(value))  # a record's name: configs/records/<name>.yaml
        if value is not None and Path(value).is_file():
            positions.append((i, width))
            files.append(value)
            i += width
            continue
        i += 1
    if not files:
        return out
    own = load_yaml(files[-1])
    if len(files) == 1 and EXTENDS_KEY not in own and (_names_its_run(own) or _logger_of(own) is None):
        return out
    import yaml

    merged: dict = {}
    for path in files:  # each file overlays the ones before it, as if it extended them
        merged = merge_configs(without_published_record(merged), load_config(path))
    if not _names_its_run(own) and _logger_of(merged) is not None:
        _logger_of(merged).setdefault("init_args", {})["name"] = Path(files[-1]).stem
    for i, width in reversed(positions[1:]):
        del out[i : i + width]
    first, width = positions[0]
    out[first : first + width] = ["--config", yaml.safe_dump(merged, sort_keys=False)]
    return out


def _logger_of(config: dict) -> Optional[dict]:
    """A config's logger in ``class_path`` form, or None (no logger section, or ``logger: false``)."""
    logger = (config.get("trainer") or {}).get("logger")
    return logger if isinstance(logger, dict) else None


def _names_its_run(own: dict) -> bool:
    """The file itself names its logger's run (or turns the logger off). Otherwise the config logs under the file's
    stem (``runs/<stem>/version_N``): inheriting a parent's name put a child's runs in the parent's folder, where
    ``--ckpt_path last`` then resumed the parent's run."""
    logger = (own.get("trainer") or {}).get("logger")
    return logger is not None and not isinstance(logger, dict) or "name" in ((logger or {}).get("init_args") or {})


# Values of ``--ckpt_path`` that Lightning resolves itself (not files).
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every non-mapping value of a nested mapping (lists are values)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def explicit_model_keys(args: Sequence[str]) -> set[str]:
    """The ``model`` settings a command line states: every leaf under ``model`` of its ``--config`` files or YAML
    strings (overlays resolved), and every ``--model.X`` flag (a flag whose value is a mapping states its leaves).
    Dotted keys relative to ``model``; a key stands for everything under it."""
    import yaml

    from pgolf_lit.config import load_config

    def parsed(value: str) -> Any:
        from pathlib import Path

        try:
            is_file = Path(value).is_file()
        except OSError:  # a YAML string too long to be a file name
            is_file = False
        if is_file:
            return load_config(value)
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            return None

    keys: set[str] = set()
    items = list(args)
    for i, token in enumerate(items):
        flag, value = token, None
        if "=" in token and token.startswith("--"):
            flag, value = token.split("=", 1)
        elif i + 1 < len(items):
            value = items[i + 1]
        if flag in CONFIG_FLAGS and value is not None:
            data = parsed(value)
            if isinstance(data, dict) and isinstance(data.get("model"), dict):
                keys.update(_leaves(data["model"]))
        elif flag == "--model" or flag.startswith("--model."):
            key = flag[len("--model.") :] if flag != "--model" else ""
            data = parsed(value) if value is not None else None
            leaves = _leaves(data) if isinstance(data, dict) else {}
            keys.update(f"{key}.{k}" if key else k for k in leaves)
            if key:
                keys.add(key)
    return keys


def _is_explicit(key: str, explicit: set[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in explicit)


def _drop_leaf(tree: dict, key: str) -> None:
    *parents, last = key.split(".")
    for name in parents:
        tree = tree.get(name)
        if not isinstance(tree, dict):
            return
    tree.pop(last, None)


def merge_checkpoint_hparams(stored: dict[str, Any], current: dict[str, Any], explicit: set[str], source: str) -> dict:
    """The checkpoint's model arguments to apply over the parsed ones: every setting the command line did not state
    comes from the checkpoint (as Lightning does), a stated one stays (evaluation settings, test methods, ...), and a
    stated architecture value (``model.gpt.*``) that differs from the checkpoint's is an error naming both."""
    import copy

    stored_leaves, current_leaves = _leaves(stored), _leaves(current)
    for key, value in stored_leaves.items():
        if key.startswith("gpt.") and _is_explicit(key, explicit) and key in current_leaves:
            given = current_leaves[key]
            if given != value:
                raise ConfigError(
                    f"model.{key}: the command line gives {given!r}, but {source} was trained with {value!r}; drop the "
                    f"setting, or use a checkpoint of that architecture"
                )
    remaining = copy.deepcopy(stored)
    for key in stored_leaves:
        if _is_explicit(key, explicit):
            _drop_leaf(remaining, key)
    return remaining


def named_config(value: str):
    """A config path as given, or the packaged config of that name (``pgolf_lit.config.resolve_config_path``)."""
    from pgolf_lit.config import resolve_config_path

    return resolve_config_path(value)


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


def _root_cause(error: BaseException, kinds: tuple) -> Optional[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kinds):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def make_cli(args: Optional[Sequence[str]] = None, run: bool = True):
    """The LightningCLI over GolfModule + TokenShardDataModule. ``run=False`` only parses the config and builds
    the trainer, module and datamodule (``cli.trainer``, ``cli.model``, ``cli.datamodule``): tests and tools use
    it to get exactly the objects ``pgolf fit`` would. Config overlays are resolved first (``resolve_config_args``)."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    if args is None:
        args = sys.argv[1:]
    # Attribute docstrings of the config dataclasses become `pgolf fit --help` text (and --print_config=comments).
    # Reading them from the source costs seconds per command, so only when they are shown.
    shown = any(a in ("-h", "--help") or (a.startswith("--print_config") and "comments" in a) for a in args)
    set_parsing_settings(docstring_parse_attribute_docstrings=shown)

    from pgolf_lit.data.datamodule import TokenShardDataModule
    from pgolf_lit.module import GolfModule

    class GolfCLI(LightningCLI):
        @staticmethod
        def subcommands() -> dict:
            # `predict` has no meaning for a scored language model; `pgolf sample` generates text instead.
            return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

        def init_parser(self, **kwargs):
            kwargs.setdefault("allow_abbrev", False)  # --model.gpt.num_layer must not silently mean num_layers
            return super().init_parser(**kwargs)

        def before_instantiate_classes(self) -> None:
            config = self.config[self.subcommand] if self.subcommand else self.config
            if self.subcommand == "fit" and config.get("ckpt_path") == "last":
                resume_in_place(config, self._args)
            honest_trainer_flags(config)
            # The console callbacks, unless the Trainer turns bars or the summary off (Lightning refuses a bar
            # callback with enable_progress_bar false).
            extra = []
            if config.trainer.get("enable_progress_bar") is not False:
                extra.append(BudgetProgressBar())
            if config.trainer.get("enable_model_summary") is not False:
                extra.append(CompactModelSummary(max_depth=1))
            self.trainer_defaults["callbacks"] = extra

        def instantiate_classes(self) -> None:
            # jsonargparse wraps what a constructor raises into "Does not validate against any of the Union
            # subtypes"; a config error or a missing package deserves its own one line.
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as e:
                cause = _root_cause(e, (PgolfError, ModuleNotFoundError))
                if cause is None:
                    raise
                raise cause from None

        def add_arguments_to_parser(self, parser) -> None:
            # One vocabulary: the data side checks its tokenizer and shards against the model's.
            parser.link_arguments("model.gpt.vocab_size", "data.vocab_size")
            # The evaluation window length also trims the val split (upstream: EVAL_SEQ_LEN, or TRAIN_SEQ_LEN).
            parser.link_arguments("model.evaluation.seq_len", "data.val_seq_len")
            parser.add_argument(
                "--artifact", type=Optional[str], default=None, help="test/validate the weights of a pgolf artifact"
            )
            # A record config's `record:` section: the world it ran on, and the step-matched mode for fewer GPUs.
            parser.add_class_arguments(RecordRun, "record")

        def parse_arguments(self, parser, args) -> None:
            # pgolf always passes the (overlay-resolved) command line on, so Lightning's warning that ``args`` is
            # meant for calls from Python does not apply.
            self._args = list(args)
            self.config = parser.parse_args(args)

        def _parse_ckpt_path(self) -> None:
            """Lightning's version parses the checkpoint's hyperparameters over the whole config, so ``--ckpt_path``
            silently replaced settings given explicitly, and it loads the file unverified (a traceback for a truncated
            or empty one). Here the file is verified first (``pgolf_lit.checkpoint``), explicit settings win, and an
            architecture given explicitly must equal the checkpoint's."""
            from pgolf_lit.checkpoint import checkpoint_hparams, load_checkpoint_file

            sub = self.config.get("subcommand")
            path = self.config[sub].get("ckpt_path") if sub else None
            if not path or path in _SPECIAL_CKPT_PATHS:
                return
            hparams = checkpoint_hparams(load_checkpoint_file(path))
            if not hparams:
                return
            if "_class_path" in hparams:  # a subclass-mode model: Lightning's own handling
                return super()._parse_ckpt_path()
            current = self.config[sub]["model"]
            current = current.as_dict() if hasattr(current, "as_dict") else dict(current or {})
            remaining = merge_checkpoint_hparams(
                hparams, current, explicit_model_keys(self._args), f"the checkpoint {path}"
            )
            self.config = self.parser.parse_object({sub: {"model": remaining}}, self.config)

        def before_fit(self) -> None:
            self._apply_record_run()

        def _apply_record_run(self) -> None:
            """Compare this run's world with the record's (``record.world``): the differences go to train.log as
            one line, and step-matched mode scales the wallclock budget (``RecordRun``); a config that lacks or
            approximates its record's techniques says so there too."""
            from pgolf_lit.callbacks import GPTQExport, WallclockBudget

            config = self.config_init[self.subcommand] if self.subcommand else self.config_init
            record = config.get("record") or RecordRun()
            trainer, module = self.trainer, self.model
            budget = next((cb for cb in trainer.callbacks if isinstance(cb, WallclockBudget)), None)
            capped = budget is not None and budget.effective_cap_ms is not None
            export = next((cb for cb in trainer.callbacks if isinstance(cb, GPTQExport)), None)
            calibrates = export is not None and export.config.uses_gptq and export.calibration != "generated"
            notes = record.fidelity_notes() + record.world_notes(
                trainer.world_size,
                getattr(self.datamodule, "grad_accum_base", 8),
                getattr(module.optim_config, "grad_clip_scope", "global") == "local",
                calibrates,
                budget.effective_cap_ms / 1000.0 if capped else None,
            )
            scale = record.step_scale(trainer.world_size)
            if capped and scale != 1.0:
                budget.scale_training_time(scale)
            if hasattr(module, "run_notes"):
                module.run_notes = notes
                module.record_run = record.summary(trainer.world_size, capped and scale != 1.0)

        def before_validate(self) -> None:
            self._load_artifact()

        def before_test(self) -> None:
            self._load_artifact()

        def _load_artifact(self) -> None:
            path = self.config[self.subcommand].get("artifact")
            if path:
                self.model.load_artifact(path)

    from pgolf_lit.callbacks import BudgetProgressBar, CompactModelSummary
    from pgolf_lit.records import RecordRun

    quiet_console()
    return GolfCLI(
        GolfModule,
        TokenShardDataModule,
        args=resolve_config_args(args),
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        trainer_defaults={"default_root_dir": "runs"},
    )


def _chain(e: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _dist_world() -> tuple[int, int]:
    """(rank, world size) of an initialized default process group, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # a half-torn-down process group answers nothing useful
        pass
    return 0, 1


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another process of the run went away (gloo / NCCL / the store)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    marks = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Broken pipe")
    return isinstance(e, RuntimeError) and any(mark in text for mark in marks)


_ERROR_KEY, _DONE_KEY = "pgolf/error", "pgolf/done"


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def one_line(e: BaseException) -> Optional[str]:
    """The ``error:`` line for an exception, or None for a genuine bug (which keeps its traceback): a PgolfError
    (also inside a wrapper whose message quotes it, as jsonargparse wraps errors raised while it instantiates
    classes), an OS error naming its path, or, under DDP, a collective broken by a failed peer (that peer's line,
    read from the process group's store, else a line saying a peer failed)."""
    chain = _chain(e)
    for inner in chain:
        if isinstance(inner, PgolfError) and (inner is e or inner is e.__cause__ or str(inner) in str(e)):
            return str(inner)
    if isinstance(e, OSError):
        what = e.strerror or _first_line(e)
        return f"{e.filename}: {what}" if e.filename else what
    rank, world = _dist_world()
    if world > 1 and _is_peer_failure(e):
        try:
            from datetime import timedelta

            store = _store()
            store.set_timeout(timedelta(seconds=5))
            return store.get(_ERROR_KEY).decode("utf-8", "replace")
        except Exception:  # the failed peer left no line (killed, or it hosted the store)
            return f"rank {rank}: stopped because another process of this run failed ({_first_line(e)})"
    return None


def _finish_distributed(line: str, own: bool) -> None:
    """Under DDP, leave the line for the other ranks: a rank that failed on its own stores it, closes its process
    group (peers blocked in a gloo collective fail at once and read it) and waits, a few seconds at most, until every
    rank has ended, so that a store it hosts outlives their reads."""
    rank, world = _dist_world()
    if world < 2:
        return
    try:
        import torch.distributed as dist

        store = _store()
        if own:
            store.set(_ERROR_KEY, line)
        store.add(_DONE_KEY, 1)
        if own:
            dist.destroy_process_group()
            deadline = time.monotonic() + 10
            while store.add(_DONE_KEY, 0) < world and time.monotonic() < deadline:
                time.sleep(0.05)
    except Exception:  # best effort: the line is printed whatever happens here
        pass


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "--help"
    try:
        _run(argv, command)
    except ModuleNotFoundError as e:  # e.g. a logger whose package is not installed
        print(f"error: {missing_package_line(e)}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:
        line = one_line(e)
        if line is None:
            raise
        own = not (_dist_world()[1] > 1 and _is_peer_failure(e))
        print(f"error: {line}", file=sys.stderr)
        sys.stderr.flush()
        _finish_distributed(line, own)
        sys.exit(2)


def missing_package_line(error: ModuleNotFoundError) -> str:
    """What to install, in one line (Lightning's loggers raise without a module name: read the message)."""
    text = f"{error.name or ''} {error}".lower()
    for package, extra in (("tensorboard", "tensorboard"), ("matplotlib", "report")):
        if package in text:
            return f"the Python package '{package}' is not installed: pip install 'pgolf-lit[{extra}]'"
    name = error.name or str(error).split("'")[1] if "'" in str(error) else (error.name or str(error))
    return f"the Python package '{name}' is not installed: pip install {name}"


def _run(argv: list[str], command: str) -> None:
    if command in ("-V", "--version"):
        print(f"pgolf-lit {version()}")
    elif command == "predict":
        raise PgolfError(
            "pgolf predict: a language model is scored, not predicted; use "
            "`pgolf sample --config X --artifact A --prompt ...` to generate text"
        )
    elif command in TRAINER_COMMANDS:
        make_cli(argv)
    elif command in TOOLS:
        module_name, func = TOOLS[command]
        module = __import__(f"pgolf_lit.tools.{module_name}", fromlist=[func])
        getattr(module, func)(argv[1:])
    else:
        print(USAGE)
        if command not in ("-h", "--help", "help"):
            print(f"error: unknown command '{command}'", file=sys.stderr)
            sys.exit(2)


TOOLS = {
    "data": ("data_cmd", "main"),
    "summary": ("summary", "main"),
    "convert": ("convert_cmd", "main"),
    "export": ("export_cmd", "main"),
    "eval": ("eval_cmd", "main"),
    "audit": ("audit_cmd", "main"),
    "demo": ("demo", "main"),
    "seeds": ("seeds", "main"),
    "stats": ("seeds", "stats_main"),
    "record": ("record", "main"),
    "report": ("report", "main"),
    "sample": ("sample", "main"),
    "leaderboard": ("leaderboard", "main"),
    "lineage": ("lineage", "main"),
}

USAGE = """usage: pgolf COMMAND ...

training (LightningCLI; see `pgolf fit --help`):
  fit | validate | test     --config configs/records/<record>.yaml [--trainer.devices N --trainer.strategy ddp]
data:
  data build                text/JSONL (or the embedded corpus) -> tokenizer + upstream shards
  data download             the official pre-tokenized shards from the Hugging Face hub
model:
  summary --config X        parameter counts by category, layer schedule, artifact size estimate
  convert                   upstream train_gpt.py state dicts <-> pgolf checkpoints
artifacts and evaluation:
  export --ckpt C --config X --out A     quantize + compress + size-check a checkpoint (GPTQExport's code)
  eval A --data DIR --method M           evaluate an artifact under Lightning Fabric on N devices
  audit                                  the empirical causality audit of every evaluation procedure
from runs to a record:
  seeds --config X --seeds 42,1337,2024 [--baseline B] [FIT ARGS]   fit + test per seed -> results.json/.csv
  stats RESULTS.json --baseline B        the seeds table and the one-sided t-test (>= 0.005 nats at p < 0.01)
  record --results RESULTS.json --out records/<name>/   README.md + submission.json + logs, from the logs
  report RUN_DIR [--ckpt C]              PNG plots (curves, LR and events, weights, bytes) + summary.md
text:
  sample --config X (--artifact A | --ckpt C) --prompt "..."   generate text from a trained model
the leaderboard as configs:
  leaderboard [--no-audit]  every row of the final leaderboard: its config, parameter check, audit, what it lacks
  lineage CONFIG            the chain of configs CONFIG extends, with what each step changes
demo:
  demo                      the CPU demo: embedded corpus -> 60 s of training -> export -> roundtrip val_bpb
  --version                 the installed version
"""


if __name__ == "__main__":
    main()
