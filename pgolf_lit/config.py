"""Configuration files: the YAML configs (``extends`` overlays, packaged record configs) and ``GPTConfig``.

``GPTConfig`` (every architecture switch, named as upstream names it) lives in ``pgolf_lit/model/config.py`` beside
the model that reads it, and is importable from here; this module adds reading configs from disk. The model, the
artifact readers and the evaluation import ``pgolf_lit.model.config`` (their counted code, ``quant/code_size.py``,
has no YAML reading in it).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Optional

from pgolf_lit.errors import ConfigError
from pgolf_lit.model.config import GPTConfig

__all__ = [
    "CONFIG_DIR",
    "EXTENDS_KEY",
    "GPTConfig",
    "callback_init_args",
    "gpt_config_from_yaml",
    "load_config",
    "load_yaml",
    "merge_configs",
    "record_config_path",
    "resolve_config_path",
    "without_published_record",
]


# ---------------------------------------------------------------------------------------------------------
# Record configs on disk
# ---------------------------------------------------------------------------------------------------------


def _config_dir() -> Path:
    """Where the packaged configs are: the configs/ of the source checkout this package is imported from, else the
    installed ``pgolf_lit.configs`` (the wheel's copy, or the editable install's folder).

    The checkout comes first: an editable install maps ``pgolf_lit.configs`` to the folder of the checkout it was
    installed from, which is another checkout's when this one is imported through PYTHONPATH (a git worktree)."""
    import importlib.util

    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "setup.cfg").is_file() and (checkout / "configs" / "records").is_dir():
        return checkout / "configs"
    spec = importlib.util.find_spec("pgolf_lit.configs")
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0])
    return Path(__file__).resolve().parent.parent / "configs"


CONFIG_DIR = _config_dir()


# Where packaged configs are looked up by name: the record configs, the leaderboard's rows, the rest.
CONFIG_FOLDERS = ("records", "leaderboard", ".")


def record_config_path(name: str) -> Path:
    """``configs/records/<name>.yaml``, ``configs/leaderboard/<name>.yaml`` or ``configs/<name>.yaml``; unknown names
    list the record configs that exist."""
    for folder in CONFIG_FOLDERS:
        p = CONFIG_DIR / folder / f"{name}.yaml"
        if p.is_file():
            return p
    known = sorted(p.stem for p in (CONFIG_DIR / "records").glob("*.yaml"))
    raise ConfigError(f"unknown record '{name}': expected one of {known} (or a row of configs/leaderboard/)")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """One YAML file as a mapping (no ``extends`` resolution; see ``load_config``). Parsed once per file version:
    a leaderboard row's chain reads its ancestors' files again and again."""
    import copy

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    stat = path.stat()
    return copy.deepcopy(_parsed_yaml(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=512)
def _parsed_yaml(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


# ---------------------------------------------------------------------------------------------------------
# Overlays: a config that ``extends`` another lists only what differs
# ---------------------------------------------------------------------------------------------------------

EXTENDS_KEY = "extends"
REMOVE_KEY = "remove"  # in an overlay: drop the base's callback of that class, or the base's key


def merge_configs(base: Any, overlay: Any) -> Any:
    """``overlay`` on top of ``base``: mappings merge key by key; lists of ``class_path`` entries (callbacks) merge
    entry by entry, matched by class in order; anything else is replaced. A class the base lacks is inserted where
    the overlay puts it: before the next entry of the overlay that the base has, else at the end (so a record that
    adds EMA before its parent's export callback keeps the export last). An entry ``{class_path: X, remove: true}``
    drops the base's X (a record that leaves out its parent's SWA), and ``key: {remove: true}`` drops the base's
    key (a record that leaves out its parent's TTT settings).

    jsonargparse's own config stacking replaces lists whole, so a ``*_tiny.yaml`` would have to repeat every
    callback of its record: this merge is what lets it change only their arguments.
    """
    if isinstance(base, dict) and isinstance(overlay, dict):
        merged = dict(base)
        for key, value in overlay.items():
            if value == {REMOVE_KEY: True}:
                if key not in base:
                    raise ConfigError(f"{key}: '{REMOVE_KEY}: true' drops a key the base config has; it has none")
                del merged[key]
            else:
                merged[key] = merge_configs(base[key], value) if key in base else value
        return merged
    if _is_class_list(base) and _is_class_list(overlay):
        slots: list[Any] = list(base)  # base entries, merged in place; new entries wait for the next match
        matched: dict[int, int] = {}  # overlay index -> base index
        used: set[int] = set()
        for j, entry in enumerate(overlay):
            match = next(
                (i for i, b in enumerate(base) if i not in used and b["class_path"] == entry["class_path"]), None
            )
            if match is not None:
                used.add(match)
                matched[j] = match
                slots[match] = merge_configs(base[match], entry)
        inserted: dict[int, list[Any]] = {}  # base index -> new entries placed before it (len(base): at the end)
        for j, entry in enumerate(overlay):
            if j not in matched:
                before = next((matched[k] for k in range(j + 1, len(overlay)) if k in matched), len(base))
                inserted.setdefault(before, []).append(entry)
        removed = {matched[j] for j, entry in enumerate(overlay) if entry.get(REMOVE_KEY) is True and j in matched}
        for j, entry in enumerate(overlay):
            if REMOVE_KEY in entry and (entry[REMOVE_KEY] is not True or j not in matched):
                raise ConfigError(
                    f"callbacks: '{REMOVE_KEY}: true' drops a callback the base config attaches; "
                    f"{entry['class_path']} has {REMOVE_KEY}: {entry[REMOVE_KEY]!r}"
                    + ("" if j in matched else " and the base attaches none")
                )
        merged = []
        for i in range(len(base) + 1):
            merged.extend(inserted.get(i, []))
            if i < len(base) and i not in removed:
                merged.append(slots[i])
        return merged
    return overlay


def _is_class_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) and "class_path" in v for v in value)


def resolve_config_path(path: str | Path) -> Path:
    """``path`` when it is a file, else the packaged config of that name (``pr1394_sp8192_loop45``, ``demo_cpu``:
    ``configs/records/<name>.yaml`` or ``configs/<name>.yaml``, shipped in the wheel)."""
    path = Path(path)
    if path.is_file() or len(path.parts) > 1:
        return path
    try:
        return record_config_path(path.name.removesuffix(".yaml"))
    except ConfigError:
        raise ConfigError(f"{path}: config file not found (and no packaged config of that name)") from None


def load_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A pgolf YAML config (a path, or a packaged config's name) with its ``extends: <base.yaml>`` chain resolved
    (the path is relative to the file that names it): the base, then this file merged on top by ``merge_configs``."""
    path = resolve_config_path(path) if not _seen else Path(path)
    data = load_yaml(path)
    base_name = data.pop(EXTENDS_KEY, None)
    if base_name is None:
        return data
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' must be the path of the config it overlays, got {base_name!r}")
    base_path = (path.parent / base_name).resolve()
    if base_path in _seen:
        raise ConfigError(f"{path}: '{EXTENDS_KEY}' chain loops back to {base_path}")
    return merge_configs(without_published_record(load_config(base_path, (*_seen, path.resolve()))), data)


def without_published_record(config: dict[str, Any]) -> dict[str, Any]:
    """The base of an overlay without the facts of its published record (PR, score, parameter count, ...): they
    describe the file that states them, not a config that extends it (``pgolf_lit.records.PUBLISHED_FIELDS``)."""
    from pgolf_lit.records import PUBLISHED_FIELDS

    record = config.get("record")
    if not isinstance(record, dict):
        return config
    return {**config, "record": {k: v for k, v in record.items() if k not in PUBLISHED_FIELDS}}


def gpt_config_from_yaml(path: str | Path) -> GPTConfig:
    """The ``model.gpt`` section of a pgolf YAML config (overlays resolved) as a GPTConfig."""
    data = load_config(path)
    section = ((data.get("model") or {}).get("gpt")) or {}
    try:
        return GPTConfig.from_dict(section)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def callback_init_args(config: dict[str, Any], name: str) -> Optional[dict[str, Any]]:
    """The ``init_args`` of the first ``trainer.callbacks`` entry whose class is called ``name``, or None."""
    for cb in (config.get("trainer") or {}).get("callbacks") or []:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == name:
            return dict(cb.get("init_args") or {})
    return None
