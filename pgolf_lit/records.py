"""A record's settings by name, read from its YAML config (``configs/records/<record>.yaml``).

The YAML is the record: these readers only pick its sections, so tests, the audit and the benchmarks use exactly
what ``pgolf fit --config`` runs. Names are our config names or the upstream aliases of
``pgolf_lit.model.convert.RECORD_ALIASES`` (``pr1394``, ``pr1334``, …).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from pgolf_lit.eval.registry import DEFAULT_TEST_METHODS
from pgolf_lit.config import CONFIG_DIR, CONFIG_FOLDERS, callback_init_args, load_config, load_yaml, record_config_path
from pgolf_lit.errors import ConfigError, check_field_types
from pgolf_lit.model.convert import RECORD_ALIASES, record_gpt_config
from pgolf_lit.optim.presets import record_optim_config, record_schedule_config

__all__ = [
    "PUBLISHED_FIELDS",
    "RecordRun",
    "built_param_count",
    "config_files",
    "published_record",
    "published_record_configs",
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
    return list((record_config(record).get("model") or {}).get("test_methods") or DEFAULT_TEST_METHODS)


# The ``record:`` keys that describe the published record itself. They belong to the file that states them: a
# config that ``extends`` it (a tiny twin, a user's variant, the next leaderboard row) does not inherit them
# (``pgolf_lit.config.load_config`` drops them from the base), so a twin never carries its record's parameter count.
PUBLISHED_FIELDS = ("pr", "folder", "score", "params", "param_groups", "approx", "missing", "not_built")
PARAM_GROUPS = ("muon", "scalar", "token", "untrained")


@dataclass
class RecordRun:
    """A record config's ``record:`` section: the run it reproduces, the published record it is (its PR, score and
    parameter count, read by the tests and ``pgolf leaderboard``), and how this run may differ from it."""

    world: int = 1
    """GPUs the record trained on (8 for every record: 8×H100 under DDP; a CPU twin says 1). ``pgolf fit`` on another
    world size prints one line naming what differs."""
    step_matched: bool = False
    """On a world other than ``world``: scale the wallclock training budget by world / W, so the time-based schedules
    (warmdown, loop activation, ...) see the record's step count at this world's step time. Marked in train.log and
    summary.json as not a record-valid run."""
    pr: Optional[int] = None
    """The upstream pull request of the record (openai/parameter-golf); 0 for the baseline, which has none."""
    folder: Optional[str] = None
    """Its folder under the upstream repository's records/track_10min_16mb/."""
    score: Optional[float] = None
    """Its published score as the leaderboard lists it: the mean val_bpb over its seeds (3 unless the config says
    otherwise; the early records list one run)."""
    params: Optional[int] = None
    """The parameter count its logs print (``model_params``); the tests build this config's model and compare."""
    param_groups: Optional[dict[str, list[int]]] = None
    """[tensors, elements] per optimizer group (muon, scalar, token, untrained: in no optimizer), where the spec
    states them (spec/training.md §2.1); the tests route this config's parameters and compare."""
    approx: Optional[str] = None
    """Set when the config can only come close to the record: what differs (``pgolf leaderboard`` marks it ≈)."""
    missing: Optional[list[str]] = None
    """Techniques of the record that pgolf_lit lacks, so this config leaves them out (marked missing)."""
    not_built: Optional[str] = None
    """With ``missing``: why pgolf_lit leaves those techniques out on purpose (one line), where building them costs
    out of proportion to one row; without it a missing technique is simply not yet built."""
    rope_follows_train_seq_len: bool = False
    """The record's script sizes RoPE's length-rescale threshold from TRAIN_SEQ_LEN (the scripts of PR #1334's line
    and PR #1394; the baseline's family hard-codes 1024): ``pgolf convert --from-upstream`` with a TRAIN_SEQ_LEN
    override moves ``rope_train_seq_len`` with it."""

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or isinstance(self.world, bool) or self.world < 1:
            raise ConfigError(f"record.world: expected a positive GPU count, got {self.world!r}")
        check_field_types(RecordRun, {k: v for k, v in vars(self).items() if v is not None}, "record")
        if self.pr is not None and self.pr < 0:
            raise ConfigError(f"record.pr: expected a pull request number (0 for the baseline), got {self.pr}")
        if self.score is not None and not 0 < self.score < 10:
            raise ConfigError(f"record.score: expected a val_bpb such as 1.0611, got {self.score}")
        if self.not_built and not self.missing:
            raise ConfigError("record.not_built: says why techniques are left out, but record.missing lists none")
        if self.params is not None and self.params < 1:
            raise ConfigError(f"record.params: expected the logged parameter count, got {self.params}")
        if self.param_groups is not None and not isinstance(self.param_groups, dict):
            raise ConfigError("record.param_groups: expected a mapping of group to [tensors, elements]")
        for group, sizes in (self.param_groups or {}).items():
            if group not in PARAM_GROUPS or not (
                isinstance(sizes, list) and len(sizes) == 2 and all(isinstance(n, int) and n >= 0 for n in sizes)
            ):
                raise ConfigError(
                    f"record.param_groups.{group}: expected one of {list(PARAM_GROUPS)} mapped to "
                    f"[tensors, elements], got {sizes!r}"
                )

    @classmethod
    def of(cls, config: dict[str, Any], name: str = "config") -> "RecordRun":
        """The ``record:`` section of a loaded config (absent: the defaults); a bad value names the field."""
        section = config.get("record") or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: record: expected a mapping, got {section!r}")
        unknown = sorted(set(section) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"{name}: record: unknown field(s) {unknown}; known fields are those of RecordRun")
        try:
            return cls(**section)
        except ConfigError as e:
            raise ConfigError(f"{name}: {e}") from None

    def fidelity_notes(self) -> list[str]:
        """The lines ``pgolf fit`` prints for a config that is not its record: what it lacks, what differs."""
        name = f"PR #{self.pr}" if self.pr else "its record"
        lines = []
        if self.missing:
            why = f" (not built: {self.not_built})" if self.not_built else ""
            lines.append(f"record: this config lacks techniques of {name}: " + "; ".join(self.missing) + why)
        if self.approx:
            lines.append(f"record: this config approximates {name}: {self.approx}")
        return lines

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


def config_files(root: Optional[Path] = None) -> list[Path]:
    """Every YAML config under ``root`` (default: the packaged configs/): its own files, records/ and leaderboard/."""
    root = CONFIG_DIR if root is None else Path(root)
    return sorted(p for folder in CONFIG_FOLDERS for p in (root / folder).glob("*.yaml"))


def published_record_configs(root: Optional[Path] = None) -> list[Path]:
    """The configs that are a published record: their own file states ``record.params`` (a tiny twin or a variant
    that extends one does not inherit it). Tests check each against what it states, so a new record YAML needs no
    test edit."""
    return [p for p in config_files(root) if "params" in (load_yaml(p).get("record") or {})]


def published_record(path: Path) -> RecordRun:
    """A config's ``record:`` section, overlays resolved (its own published facts, the world it inherits)."""
    return RecordRun.of(load_config(path), str(path))


def built_param_count(config: dict[str, Any]) -> int:
    """The parameter count of the model a loaded config builds, built on the meta device (no weights are made)."""
    import torch

    from pgolf_lit.model.config import GPTConfig
    from pgolf_lit.model.gpt import GPT

    with torch.device("meta"):
        return GPT(GPTConfig.from_dict(((config.get("model") or {}).get("gpt")) or {})).num_params()
