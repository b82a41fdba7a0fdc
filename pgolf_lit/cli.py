"""The ``pgolf`` command.

``pgolf fit|validate|test --config X.yaml`` is a LightningCLI over GolfModule + TokenShardDataModule (every
Trainer flag works: ``--trainer.devices 8 --trainer.strategy ddp``; ``--print_config`` prints the merged
config). The other subcommands are tools around a run: ``data build|download``, ``summary``, ``convert``,
``export``, ``eval``, ``audit``, ``demo``, ``seeds``, ``record``, ``report``.

Bad input ends in one line ``error: ...`` naming the file or field, and exit status 2.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from pgolf_lit.errors import PgolfError

TRAINER_COMMANDS = ("fit", "validate", "test", "predict")


CONFIG_FLAGS = ("--config", "-c")


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Merge the ``--config`` files of a command line into one, resolving ``extends`` overlays.

    ``pgolf fit --config record.yaml --config record_tiny.yaml`` and ``pgolf fit --config record_tiny.yaml``
    (whose ``extends: record.yaml`` names its base) give the same run: the files are merged in order by
    ``pgolf_lit.config.merge_configs`` (callbacks matched by class) and passed on as one config at the place of the
    first. A single file without ``extends`` is passed on unchanged, as are configs given as YAML strings.
    """
    from pathlib import Path

    from pgolf_lit.config import EXTENDS_KEY, load_config, load_yaml, merge_configs

    positions, files = [], []
    out = list(args)
    i = 0
    while i < len(out):
        flag, value = out[i], None
        if flag in CONFIG_FLAGS and i + 1 < len(out):
            value, width = out[i + 1], 2
        elif flag.startswith("--config="):
            value, width = flag.split("=", 1)[1], 1
        if value is not None and Path(value).is_file():
            positions.append((i, width))
            files.append(value)
            i += width
            continue
        i += 1
    if not files or (len(files) == 1 and EXTENDS_KEY not in load_yaml(files[0])):
        return out
    import yaml

    merged: dict = {}
    for path in files:
        merged = merge_configs(merged, load_config(path))
    for i, width in reversed(positions[1:]):
        del out[i : i + width]
    first, width = positions[0]
    out[first : first + width] = ["--config", yaml.safe_dump(merged, sort_keys=False)]
    return out


def make_cli(args: Optional[Sequence[str]] = None, run: bool = True):
    """The LightningCLI over GolfModule + TokenShardDataModule. ``run=False`` only parses the config and builds
    the trainer, module and datamodule (``cli.trainer``, ``cli.model``, ``cli.datamodule``): tests and tools use
    it to get exactly the objects ``pgolf fit`` would. Config overlays are resolved first (``resolve_config_args``)."""
    from jsonargparse import set_parsing_settings
    from lightning.pytorch.cli import LightningCLI

    # Attribute docstrings of the config dataclasses become `pgolf fit --help` text.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)

    from pgolf_lit.data.datamodule import TokenShardDataModule
    from pgolf_lit.module import GolfModule

    class GolfCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # One vocabulary: the data side checks its tokenizer and shards against the model's.
            parser.link_arguments("model.gpt.vocab_size", "data.vocab_size")
            # The evaluation window length also trims the val split (upstream: EVAL_SEQ_LEN, or TRAIN_SEQ_LEN).
            parser.link_arguments("model.evaluation.seq_len", "data.val_seq_len")
            parser.add_argument(
                "--artifact", type=Optional[str], default=None, help="test/validate the weights of a pgolf artifact"
            )

        def parse_arguments(self, parser, args) -> None:
            # pgolf always passes the (overlay-resolved) command line on, so Lightning's warning that ``args`` is
            # meant for calls from Python does not apply.
            self.config = parser.parse_args(args)

        def before_validate(self) -> None:
            self._load_artifact()

        def before_test(self) -> None:
            self._load_artifact()

        def _load_artifact(self) -> None:
            path = self.config[self.subcommand].get("artifact")
            if path:
                self.model.load_artifact(path)

    if args is None:
        args = sys.argv[1:]
    return GolfCLI(
        GolfModule,
        TokenShardDataModule,
        args=resolve_config_args(args),
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else "--help"
    try:
        if command in TRAINER_COMMANDS:
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
    except PgolfError as e:
        print(f"error: {e}", file=sys.stderr)
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
demo:
  demo                      the CPU demo: embedded corpus -> 60 s of training -> export -> roundtrip val_bpb
"""


if __name__ == "__main__":
    main()
