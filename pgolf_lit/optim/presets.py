"""A record's optimizer and schedule settings, read from its YAML config, with upstream-named overrides.

The values live in ``configs/records/<record>.yaml`` (``model.optim`` / ``model.schedule``, as differences from
the baseline defaults of ``OptimConfig`` / ``ScheduleConfig``). Records are named as in ``configs/`` or by the
upstream aliases of ``pgolf_lit.model.convert.RECORD_ALIASES``; overrides may use upstream env names and
env-style strings, so a script's whole hyperparameter dict can be applied (the fixture tests do).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from pgolf_lit.config import load_config, record_config_path
from pgolf_lit.model.convert import RECORD_ALIASES
from pgolf_lit.optim.groups import OptimConfig
from pgolf_lit.optim.schedule import ScheduleConfig


def _preset(record: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``model.optim`` and ``model.schedule`` sections of the record's YAML config."""
    model = load_config(record_config_path(RECORD_ALIASES.get(record, record))).get("model") or {}
    return dict(model.get("optim") or {}), dict(model.get("schedule") or {})


def _coerce(value: Any, default: Any) -> Any:
    """Parse an env-style string the way the scripts do (bools as 0/1, lists comma-separated)."""
    if not isinstance(value, str):
        return value
    if isinstance(default, bool):
        return bool(int(value))
    if isinstance(default, int):
        return int(value)
    if isinstance(default, list):
        return [x for x in value.split(",") if x]
    if isinstance(default, float) or default is None:
        return float(value)
    return value


def _apply(base: Any, changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` as a dict with the upstream-named ``changes`` that are fields of it; other names are ignored,
    so a script's whole hyperparameter dict can be passed."""
    current = dataclasses.asdict(base)
    for name, value in changes.items():
        name = name.lower()
        if name in current:
            current[name] = _coerce(value, current[name])
    return current


def record_optim_config(record: str, changes: Optional[Mapping[str, Any]] = None) -> OptimConfig:
    """The record's OptimConfig with upstream hyperparameter overrides (e.g. ``{"matrix_lr": 0.03}`` or
    env-style ``{"MUON_WD": "0.05"}``) applied."""
    return OptimConfig.from_dict(_apply(OptimConfig(**_preset(record)[0]), changes or {}))


def record_schedule_config(record: str, changes: Optional[Mapping[str, Any]] = None) -> ScheduleConfig:
    """The record's ScheduleConfig with upstream overrides (``warmdown_iters``, ``warmdown_frac``, ``min_lr``)."""
    return ScheduleConfig.from_dict(_apply(ScheduleConfig(**_preset(record)[1]), changes or {}))
