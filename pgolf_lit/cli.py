"""The ``pgolf`` command.

``pgolf fit|validate|test --config X.yaml`` is a LightningCLI over GolfModule + TokenShardDataModule (every
Trainer flag works: ``--trainer.devices 8 --trainer.strategy ddp``; ``--print_config`` prints the merged
config). The other subcommands are tools around a run: ``data build|download``, ``summary``, ``convert``,
``export``, ``eval``, ``audit``, ``demo``, ``seeds``, ``record``, ``report``.

Bad input ends in one line ``error: ...`` naming the file or field, and exit status 2: a ``PgolfError`` (also when
Lightning or jsonargparse wrapped it), an OS error (permission denied, disk full: the line names the path), and,
under DDP, the error of another rank (every rank ends with the failing rank's line).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, Sequence

from pgolf_lit.errors import ConfigError, PgolfError

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
            key = flag[len("--model."):] if flag != "--model" else ""
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
            remaining = merge_checkpoint_hparams(hparams, current, explicit_model_keys(self._args),
                                                 f"the checkpoint {path}")
            self.config = self.parser.parse_object({sub: {"model": remaining}}, self.config)

        def before_validate(self) -> None:
            self._load_artifact()

        def before_test(self) -> None:
            self._load_artifact()

        def _load_artifact(self) -> None:
            path = self.config[self.subcommand].get("artifact")
            if path:
                self.model.load_artifact(path)

    return GolfCLI(
        GolfModule,
        TokenShardDataModule,
        args=resolve_config_args(args),
        run=run,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
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
    except Exception as e:
        line = one_line(e)
        if line is None:
            raise
        own = not (_dist_world()[1] > 1 and _is_peer_failure(e))
        print(f"error: {line}", file=sys.stderr)
        sys.stderr.flush()
        _finish_distributed(line, own)
        sys.exit(2)


def _run(argv: list[str], command: str) -> None:
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
