"""A record's settings by name, read from its YAML config (``configs/records/<record>.yaml``).

The YAML is the record: these readers only pick its sections, so tests, the audit and the benchmarks use exactly
what ``pgolf fit --config`` runs. Names are our config names or the upstream aliases of
``pgolf_lit.model.convert.RECORD_ALIASES`` (``pr1394``, ``pr1334``, …).
"""

from __future__ import annotations

from typing import Any

from pgolf_lit.config import callback_init_args, load_config, record_config_path
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.convert import RECORD_ALIASES, record_gpt_config
from pgolf_lit.optim.presets import record_optim_config, record_schedule_config

__all__ = [
    "record_config",
    "record_eval_settings",
    "record_export_config",
    "record_gpt_config",
    "record_optim_config",
    "record_schedule_config",
    "record_test_methods",
]


def record_config(record: str) -> dict[str, Any]:
    """The record's whole config (overlays resolved)."""
    return load_config(record_config_path(RECORD_ALIASES.get(record, record)))


def record_export_config(record: str):
    """The record's export settings: its ``GPTQExport`` callback's ``export`` argument."""
    from pgolf_lit.quant.export import ExportConfig

    args = callback_init_args(record_config(record), "GPTQExport")
    if args is None:
        raise ConfigError(f"record '{record}': its config attaches no GPTQExport callback")
    return ExportConfig.from_dict(args.get("export") or {})


def record_eval_settings(record: str):
    """The record's ``model.evaluation`` settings."""
    from pgolf_lit.eval import EvalSettings

    return EvalSettings.from_dict((record_config(record).get("model") or {}).get("evaluation") or {})


def record_test_methods(record: str) -> list[str]:
    return list((record_config(record).get("model") or {}).get("test_methods") or ["standard", "sliding"])
