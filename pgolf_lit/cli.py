"""The ``pgolf`` command: dispatch (``main``, ``TOOLS``, ``USAGE``) and the LightningCLI (``make_cli``).

``pgolf fit|validate|test --config X.yaml`` is a LightningCLI over GolfModule + TokenShardDataModule (every
Trainer flag works: ``--trainer.devices 8 --trainer.strategy ddp``; ``--print_config`` prints the merged
config). The other subcommands are tools around a run (``TOOLS``: a module of ``pgolf_lit/tools`` each).

Around the LightningCLI: config overlays and explicit settings (cli_overlays.py), Trainer flags mapped onto the
records' knobs (cli_trainer_flags.py), and how a failure ends (cli_errors.py): one line ``error: ...`` naming the
file or field, and exit status 2, for a ``PgolfError`` (also when Lightning or jsonargparse wrapped it), an OS
error (permission denied, disk full: the line names the path), and, under DDP, the error of another rank (every
rank ends with the failing rank's line).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from pgolf_lit.cli_errors import missing_package_line, one_line, report_error_line
from pgolf_lit.cli_overlays import explicit_model_keys, merge_checkpoint_hparams, resolve_config_args
from pgolf_lit.cli_trainer_flags import honest_trainer_flags, resume_in_place
from pgolf_lit.errors import PgolfError

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


# Values of ``--ckpt_path`` that Lightning resolves itself (not files).
_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")


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
            parser.link_arguments("model.evaluation.include_tail", "data.val_include_tail")
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
        report_error_line(line, e)
        sys.exit(2)


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
