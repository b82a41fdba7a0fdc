"""A record's settings by name, read from its YAML config (``configs/records/<record>.yaml``).

The YAML is the record: these readers only pick its sections, so tests, the audit and the benchmarks use exactly
what ``pgolf fit --config`` runs. Names are our config names or the upstream aliases of
``pgolf_lit.model.convert.RECORD_ALIASES`` (``pr1394``, ``pr1334``, …).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pgolf_lit.config import callback_init_args, load_config, record_config_path
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.convert import RECORD_ALIASES, record_gpt_config
from pgolf_lit.optim.presets import record_optim_config, record_schedule_config

__all__ = [
    "RecordRun",
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


@dataclass
class RecordRun:
    """A record config's ``record:`` section: the run it reproduces, and how this run may differ from it."""

    world: int = 1
    """GPUs the record trained on (8 for every record: 8×H100 under DDP; a CPU twin says 1). ``pgolf fit`` on another
    world size prints one line naming what differs."""
    step_matched: bool = False
    """On a world other than ``world``: scale the wallclock training budget by world / W, so the time-based schedules
    (warmdown, loop activation, ...) see the record's step count at this world's step time. Marked in train.log and
    summary.json as not a record-valid run."""

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 1:
            from pgolf_lit.errors import ConfigError

            raise ConfigError(f"record.world: expected a positive GPU count, got {self.world!r}")

    def world_notes(
        self, world: int, grad_accum_base: int, local_clip: bool, calibrates: bool, budget_s: Optional[float]
    ) -> list[str]:
        """The lines ``pgolf fit`` prints when this run's ``world`` differs from the record's (none when equal): what
        differs, and, in step-matched mode, the scaled budget. Pure: the CLI passes what it resolved."""
        if world == self.world:
            return []
        accum, record_accum = max(grad_accum_base // world, 1), max(grad_accum_base // self.world, 1)
        what = [f"{accum} micro-batch(es) per rank per step instead of {record_accum}"]
        if local_clip and accum != record_accum:
            what.append(f"each rank clips the gradient of {accum} micro-batch(es) instead of {record_accum}")
        if calibrates:
            what.append(f"GPTQ calibration reads rank 0's share of a {world}-rank stream")
        if budget_s is None:
            what.append("max_steps sets the step count (no wallclock cap)")
        elif self.step_matched:
            what.append(f"the budget scaled by {self.world}/{world} to the record's step count (step_matched)")
        else:
            what.append(
                f"about {world}/{self.world} of the record's steps in the budget "
                f"(--record.step_matched true scales it by {self.world}/{world})"
            )
        lines = [f"record world: this run has {world} device(s), the record ran on {self.world}: " + "; ".join(what)]
        if self.step_matched:
            if budget_s is None:
                lines.append("step_matched: no wallclock cap to scale (the schedule counts steps already)")
            else:
                lines.append(
                    f"step_matched: training budget {budget_s:.1f}s x {self.world}/{world} = "
                    f"{budget_s * self.step_scale(world):.1f}s; not a record-valid run"
                )
        return lines

    def step_scale(self, world: int) -> float:
        """How much longer this world's budget runs in step-matched mode (1 otherwise)."""
        return self.world / world if self.step_matched and world != self.world else 1.0

    def summary(self, world: int, budget_scaled: bool) -> dict[str, Any]:
        """summary.json's ``record_run``: a run is record-valid on the record's world with an unscaled budget."""
        return {
            "record_world": self.world,
            "world": world,
            "step_matched": self.step_matched,
            "budget_scale": self.step_scale(world) if budget_scaled else 1.0,
            "record_valid": world == self.world and not budget_scaled,
        }
