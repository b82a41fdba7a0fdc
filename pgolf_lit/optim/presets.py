"""Optimizer and schedule settings of each record run (spec/training.md §10), plus upstream-name overrides.

The values are the effective ones of each record (script defaults plus the record command's env vars), given
as differences from the baseline defaults of ``OptimConfig`` / ``ScheduleConfig``. Records are named as in
``configs/records/`` or by the upstream aliases of ``pgolf_lit.model.convert.RECORD_ALIASES``. The GPTQ reserve
and the wallclock cap are not here: they belong to the wallclock callback, which passes the effective cap in.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from pgolf_lit.errors import ConfigError
from pgolf_lit.model.convert import RECORD_ALIASES
from pgolf_lit.optim.groups import BASELINE_CONTROL_PATTERNS, OptimConfig
from pgolf_lit.optim.schedule import ScheduleConfig

_MOMENTUM_099 = dict(muon_momentum=0.99, muon_momentum_warmup_start=0.92, muon_momentum_warmup_steps=1500)

# PR #1263 / #1278 / #1321: AdamW with one decay (ADAM_WD) for token and scalar groups.
_FAMILY_A_OPTIM = dict(
    adam_class="AdamW",
    tied_embed_lr=0.035,
    matrix_lr=0.025,
    scalar_lr=0.025,
    **_MOMENTUM_099,
    muon_wd=0.04,
    adam_wd=0.04,
    grad_clip_norm=0.3,
    control_tensor_patterns=[*BASELINE_CONTROL_PATTERNS, "smear", "dtg_gate", "ve_layer_scales", "ve_shared.scale"],
)
# PR #1334 / #1333 / #1421: MuonEq-R hard-coded, separate token decay (EMBED_WD).
_PR1334_OPTIM = dict(
    adam_class="AdamW",
    tied_embed_lr=0.03,
    matrix_lr=0.02,
    scalar_lr=0.02,
    **_MOMENTUM_099,
    muon_wd=0.09,
    adam_wd=0.02,
    embed_wd=0.09,
    grad_clip_norm=0.3,
    muon_row_normalize=True,
    control_tensor_patterns=[
        *BASELINE_CONTROL_PATTERNS, "skip_gates", "ve_layer_scales", "ve_shared.scale", "lane_merge"
    ],
)
_PR1394_OPTIM = dict(
    _PR1334_OPTIM,
    muon_wd=0.085,
    embed_wd=0.085,
    control_tensor_patterns=[*BASELINE_CONTROL_PATTERNS, "skip_gates"],
)
_FAMILY_A_SCHEDULE = dict(warmdown="iters", warmdown_iters=3500)
_FAMILY_B_SCHEDULE = dict(warmdown="frac", warmdown_frac=0.667, min_lr=0.0)

RECORD_PRESETS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "baseline_sp1024": ({}, {}),
    "pr1263_slot16": (_FAMILY_A_OPTIM, _FAMILY_A_SCHEDULE),
    "pr1278_slot32_recur": (_FAMILY_A_OPTIM, _FAMILY_A_SCHEDULE),
    "pr1321_slot48": (_FAMILY_A_OPTIM, _FAMILY_A_SCHEDULE),
    "pr1333_sp4096_causal_slot": (_PR1334_OPTIM, _FAMILY_B_SCHEDULE),
    "pr1421_recur_ema9965": (_PR1334_OPTIM, _FAMILY_B_SCHEDULE),
    "pr1394_sp8192_loop45": (_PR1394_OPTIM, _FAMILY_B_SCHEDULE),
}

# Upstream knob names that differ from ours.
_UPSTREAM_NAMES = {"control_tensor_name_patterns": "control_tensor_patterns"}


def _preset(record: str) -> tuple[dict[str, Any], dict[str, Any]]:
    name = RECORD_ALIASES.get(record, record)
    if name not in RECORD_PRESETS:
        raise ConfigError(
            f"unknown record '{record}': expected one of {sorted(RECORD_PRESETS)} or {sorted(RECORD_ALIASES)}"
        )
    return RECORD_PRESETS[name]


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
        name = _UPSTREAM_NAMES.get(name.lower(), name.lower())
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
