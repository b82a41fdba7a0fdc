"""``<run dir>/summary.json``: the numbers a run produced, merged section by section and rewritten atomically
(training, export, each evaluation pass), so tools (``pgolf seeds``, ``pgolf record``, ``pgolf report``) read
measured values instead of parsing logs, and an interrupted write never leaves a half file."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from pgolf_lit.fileio import atomic_write_text

SUMMARY_NAME = "summary.json"


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / SUMMARY_NAME
    if not path.is_file():
        return {}
    return json.loads(path.read_text())


def update_summary(run_dir: str | os.PathLike, **sections: Any) -> dict[str, Any]:
    """Merge ``sections`` (dataclasses become dicts; dict sections merge one level deep) and write atomically."""
    summary = read_summary(run_dir)
    for key, value in sections.items():
        if is_dataclass(value):
            value = asdict(value)
        if isinstance(value, dict) and isinstance(summary.get(key), dict):
            summary[key] = {**summary[key], **value}
        else:
            summary[key] = value
    atomic_write_text(Path(run_dir) / SUMMARY_NAME, json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
