"""``pgolf leaderboard [--no-audit]``: the final 10 min / 16 MB leaderboard, one row per ``configs/leaderboard/*.yaml``.

Each row is a config (``extends`` its parent row, states what the record changed) whose own ``record:`` section
states the published record: PR, folder, score (the mean over its seeds), logged parameter count, and, when the
config is not the record, what differs (``approx``: ≈) or which techniques pgolf_lit lacks (``missing``). The table
prints, ranked by score: the date and PR, the config, the parameter count with ✓ when the model the config builds
(on the meta device) has exactly the logged count, the causality audit's verdict of its scored pass (the last of
``model.test_methods``, as the config sets it up; ``pgolf audit`` has the details), and what the row lacks.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from pgolf_lit.eval.registry import DEFAULT_TEST_METHODS
from pgolf_lit.config import CONFIG_DIR, load_config
from pgolf_lit.errors import ConfigError, PgolfError
from pgolf_lit.records import RecordRun, built_param_count, published_record

ROW_NAME = re.compile(r"^(?P<date>\d{4}-\d{2}-\d{2})_(?P<pr>baseline|pr\d+)(?:_[a-z0-9]+)?$")
REQUIRED = ("pr", "folder", "score", "params")


@dataclass
class Row:
    path: Path
    date: str
    record: RecordRun
    config: dict[str, Any]
    built_params: Optional[int]
    build_error: Optional[str] = None

    @property
    def lacks(self) -> str:
        if self.record.missing:
            why = f" (not built: {self.record.not_built})" if self.record.not_built else ""
            return "missing: " + "; ".join(self.record.missing) + why
        return f"≈: {self.record.approx}" if self.record.approx else ""

    @property
    def scored_method(self) -> str:
        methods = (self.config.get("model") or {}).get("test_methods") or list(DEFAULT_TEST_METHODS)
        return methods[-1]


def leaderboard_rows(folder: Optional[Path] = None) -> list[Row]:
    """Every row config of ``folder`` (default: configs/leaderboard/), ranked by score. A row names itself
    ``<date>_pr<N>[_<tag>].yaml`` and states its PR, folder, score and parameter count (a clear error otherwise)."""
    folder = CONFIG_DIR / "leaderboard" if folder is None else Path(folder)
    rows = []
    for path in sorted(folder.glob("*.yaml")):
        match = ROW_NAME.match(path.stem)
        if match is None:
            raise ConfigError(f"{path}: a leaderboard row is named <date>_pr<N>[_<tag>].yaml (or <date>_baseline.yaml)")
        record = published_record(path)
        absent = [name for name in REQUIRED if getattr(record, name) is None]
        if absent:
            raise ConfigError(f"{path}: record: a leaderboard row states its {', '.join(absent)}")
        expected_pr = 0 if match["pr"] == "baseline" else int(match["pr"][2:])
        if record.pr != expected_pr:
            raise ConfigError(f"{path}: record.pr is {record.pr}, but the file is named after PR #{expected_pr}")
        config = load_config(path)
        try:
            built, error = built_param_count(config), None
        except PgolfError as e:
            built, error = None, str(e)
        rows.append(Row(path, match["date"], record, config, built, error))
    return sorted(rows, key=lambda row: (row.record.score, row.date))


def audit_procedure(config: dict[str, Any], method: str) -> Optional[str]:
    """The ``pgolf audit`` procedure that exercises ``method`` as ``config`` sets it up (None: not audited).

    The names are those of ``pgolf_lit.eval.audit.audit_methods``; the settings that change a verdict (window
    rule, SLOT mode, the phased-TTT adapter set) pick among its variants."""
    from pgolf_lit.eval import EvalSettings

    settings = EvalSettings.from_dict((config.get("model") or {}).get("evaluation") or {})
    if method == "standard" or method == "doc_isolated":
        return method
    if method == "sliding":
        return {"exact": "sliding_exact", "legacy": "sliding_legacy"}.get(settings.sliding.window_rule)
    if method == "ttt":
        if settings.ttt.hash_embed_size and settings.ttt.window_rule == "exact":
            return "ttt_exact_hash_embed"  # PR #1529's TTT-time hash embedding trains with the adapted weights
        return {"exact": "ttt_exact", "ttt": "ttt_score_first"}.get(settings.ttt.window_rule)
    if method in ("slot", "causal_slot"):
        slot = getattr(settings, method)
        if slot.mode == "causal_per_window":
            return {"exact": "causal_slot_per_window", "legacy": "causal_slot_per_window_legacy"}.get(slot.window_rule)
        return {"standard": "slot_standard", "causal_batch_shared": "causal_slot_batch_shared"}.get(slot.mode)
    if method == "phased_ttt":
        phased = settings.phased_ttt
        return "phased_ttt" if phased.q_lora and phased.v_lora else "phased_ttt_no_qv"
    from pgolf_lit.eval.registry import eval_methods

    # any other method: the first audit case it declares (registry.AuditCase)
    declared = eval_methods().get(method)
    return declared.audit[0].name if declared is not None and declared.audit else None


def audit_verdicts(names: set[str]) -> dict[str, str]:
    """Run each audit procedure once: ``yes``, or ``no`` with the conditions it fails (A-C, E-H; D is speed only)."""
    from pgolf_lit.eval.audit import audit

    verdicts = {}
    for name in sorted(names):
        report = audit(name)
        checks = (
            ("A", report.prefix_invariant),
            ("B", report.exactly_once),
            ("C", report.score_before_update),
            ("E", report.normalized),
            ("F", report.read_after_scoring),
            ("G", report.documents_isolated),
            ("H", report.state_order_agrees),
        )
        failed = [c for c, ok in checks if ok is False]
        verdicts[name] = "yes" if not failed else "no: fails " + "+".join(failed)
    return verdicts


def format_table(rows: list[Row], verdicts: Optional[dict[str, str]]) -> str:
    header = ["rank", "score", "date", "PR", "config", "parameters", "scored pass: audit", "lacks"]
    table = [header]
    for rank, row in enumerate(rows, 1):
        record = row.record
        if row.built_params is None:
            params = f"{record.params:,} ✗ ({row.build_error})"
        elif row.built_params == record.params:
            params = f"{record.params:,} ✓"
        else:
            params = f"{record.params:,} ✗ (builds {row.built_params:,})"
        procedure = audit_procedure(row.config, row.scored_method)
        if procedure is None:
            audit = f"{row.scored_method}: not audited"
        elif verdicts is None:
            audit = f"{row.scored_method} ({procedure})"
        else:
            audit = f"{row.scored_method}: {verdicts[procedure]}"
        pr = f"#{record.pr}" if record.pr else "-"
        table.append([str(rank), _four_places(record.score), row.date, pr, row.path.stem, params, audit, row.lacks])
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[-1]]).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in [*widths, len(header[-1])]))
    complete = sum(1 for r in rows if not r.lacks and r.built_params == r.record.params)
    approx = sum(1 for r in rows if r.record.approx and not r.record.missing)
    lines.append("")
    lines.append(
        f"{len(rows)} rows: {complete} reproduced by their config, {approx} approximated (≈), "
        f"{len(rows) - complete - approx} missing a technique or not yet expressed"
    )
    return "\n".join(lines)


def _four_places(score: float) -> str:
    """The score as the leaderboard prints it: 4 decimals, halves rounded up (1.09785 -> 1.0979)."""
    from decimal import ROUND_HALF_UP, Decimal

    return str(Decimal(str(score)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP))


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="pgolf leaderboard", description=__doc__.splitlines()[0])
    p.add_argument("--no-audit", action="store_true", help="name each scored pass's audit procedure without running it")
    p.add_argument("--folder", type=Path, default=None, help="the row configs (default: configs/leaderboard/)")
    args = p.parse_args(argv)
    rows = leaderboard_rows(args.folder)
    if not rows:
        raise PgolfError(f"{args.folder or CONFIG_DIR / 'leaderboard'}: no row configs (*.yaml)")
    verdicts = None
    if not args.no_audit:
        names = {audit_procedure(r.config, r.scored_method) for r in rows}
        verdicts = audit_verdicts({n for n in names if n is not None})
    print(format_table(rows, verdicts))
