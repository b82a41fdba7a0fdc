"""What a ``pgolf fit|validate|test`` command line states about its configuration.

Its ``--config`` files are merged into one, ``extends`` overlays resolved (``resolve_config_args``), before
LightningCLI parses them; and the model settings it states explicitly (``explicit_model_keys``) win over a
checkpoint's stored hyperparameters, which fill in the rest (``merge_checkpoint_hparams``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from pgolf_lit.errors import ConfigError

CONFIG_FLAGS = ("--config", "-c")


def resolve_config_args(args: Sequence[str]) -> list[str]:
    """Merge the ``--config`` files of a command line into one, resolving ``extends`` overlays.

    ``pgolf fit --config record.yaml --config record_tiny.yaml`` and ``pgolf fit --config record_tiny.yaml``
    (whose ``extends: record.yaml`` names its base) give the same run: the files are merged in order by
    ``pgolf_lit.config.merge_configs`` (callbacks matched by class) and passed on as one config at the place of the
    first. A single file without ``extends`` is passed on unchanged, as are configs given as YAML strings.
    """
    from pathlib import Path

    from pgolf_lit.config import (
        EXTENDS_KEY,
        load_config,
        load_yaml,
        merge_configs,
        resolve_config_path,
        without_published_record,
    )

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
            value = str(resolve_config_path(value))  # a record's name: configs/records/<name>.yaml
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
