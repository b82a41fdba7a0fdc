"""``pgolf lineage CONFIG``: the chain of configs a config ``extends``, from the root to it, with what each step
changes — the readable answer to "what did this record change?".

Each step prints its file, the published record it states (``record:``: PR, score, what it lacks), and every key
whose value differs from its parent's after overlays are resolved (``model.gpt.qk_gain_init: 4.0 -> 5.0``; a key
the parent lacks shows its value alone, one the step drops ends in ``-> -``). Callbacks are keyed by class
(``trainer.callbacks.EMA.decay``), so a step that adds a callback shows its arguments.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from pgolf_lit.config import EXTENDS_KEY, load_config, load_yaml, resolve_config_path
from pgolf_lit.errors import ConfigError
from pgolf_lit.records import PUBLISHED_FIELDS, RecordRun

# Keys that only describe the published record (shown in the step's header, not as changes).
_FACTS = tuple(f"record.{name}" for name in PUBLISHED_FIELDS)


def _is_fact(key: str) -> bool:
    return any(key == fact or key.startswith(fact + ".") for fact in _FACTS)


def chain(path: str | Path) -> list[Path]:
    """The config and the configs it extends, root first."""
    steps = [resolve_config_path(path).resolve()]
    while True:
        base = load_yaml(steps[-1]).get(EXTENDS_KEY)
        if base is None:
            return steps[::-1]
        nxt = (steps[-1].parent / base).resolve()
        if nxt in steps:
            raise ConfigError(f"{steps[-1]}: '{EXTENDS_KEY}' chain loops back to {nxt}")
        steps.append(nxt)


def leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of every non-mapping value; lists of callbacks become one mapping per callback class."""
    if isinstance(tree, list) and tree and all(isinstance(v, dict) and "class_path" in v for v in tree):
        tree = {str(v["class_path"]).rsplit(".", 1)[-1]: v.get("init_args") or {} for v in tree}
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changes(parent: dict[str, Any], child: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, parent value, child value) for every leaf that differs; ``_MISSING`` marks an absent side."""
    before, after = leaves(parent), leaves(child)
    keys = sorted(
        k for k in set(before) | set(after) if not _is_fact(k) and before.get(k, _MISSING) != after.get(k, _MISSING)
    )
    return [(k, before.get(k, _MISSING), after.get(k, _MISSING)) for k in keys]


class _Missing:
    def __repr__(self) -> str:
        return "-"


_MISSING = _Missing()


def _value(value: Any) -> str:
    if value is _MISSING:
        return "-"
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def describe(record: RecordRun) -> str:
    """A step's published record in one line (empty for a config that states none)."""
    parts = []
    if record.pr is not None:
        parts.append(f"PR #{record.pr}" if record.pr else "no PR")
    if record.score is not None:
        parts.append(f"val_bpb {record.score}")
    if record.params is not None:
        parts.append(f"{record.params:,} params")
    if record.approx:
        parts.append(f"≈: {record.approx}")
    if record.missing:
        parts.append("missing: " + "; ".join(record.missing))
    return ", ".join(parts)


def format_lineage(path: str | Path) -> str:
    lines: list[str] = []
    previous: Optional[dict[str, Any]] = None
    for step in chain(path):
        config = load_config(step)
        facts = describe(RecordRun.of(load_yaml(step), str(step)))
        lines.append(f"{step.name}" + (f"  ({facts})" if facts else ""))
        if previous is None:
            lines.append("  the root: every value it states, over the code's defaults")
            diff = [(k, _MISSING, v) for k, v in sorted(leaves(config).items()) if not _is_fact(k)]
        else:
            diff = changes(previous, config)
        if not diff:
            lines.append("  (no change)")
        for key, before, after in diff:
            lines.append(
                f"  {key}: {_value(after)}" if before is _MISSING else f"  {key}: {_value(before)} -> {_value(after)}"
            )
        previous = config
    return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="pgolf lineage", description=__doc__.splitlines()[0])
    p.add_argument("config", help="a config file or a packaged config's name (e.g. 2026-04-27_pr1855)")
    args = p.parse_args(argv)
    print(format_lineage(args.config))
