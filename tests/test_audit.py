"""The causality audit gives the verdicts of spec/evaluation.md §7.6: it passes the compliant procedures and
fails the leaky or over-counting ones (zero vs non-zero violations; the counts depend on the random model)."""

from __future__ import annotations

import pytest
import torch

from pgolf_lit.eval.audit import AuditSetup, audit, audit_methods, format_audit_table, perturbed_indices

SETUP = AuditSetup()

# method: (A prefix invariance, B exactly once, C score before update, D batch/world invariance or None = n/a)
EXPECTED = {
    "standard": (True, True, True, True),
    "sliding_exact": (True, True, True, True),
    "sliding_legacy": (True, False, True, True),
    "slot_standard": (False, False, False, False),
    "causal_slot_batch_shared": (False, False, False, False),
    "causal_slot_per_window_legacy": (True, False, True, True),
    "causal_slot_per_window": (True, True, True, True),
    "ttt_score_first": (True, False, True, None),
    "ttt_exact": (True, True, True, None),
    "doc_isolated": (True, True, True, None),
    "phased_ttt": (True, True, True, None),
    "phased_ttt_no_qv": (True, True, True, None),
}


@pytest.fixture(scope="module")
def reports():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: audit(name, SETUP) for name in audit_methods(SETUP)}
    finally:
        torch.set_num_threads(previous)


def test_every_method_has_an_expected_verdict():
    assert set(audit_methods(SETUP)) == set(EXPECTED)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_audit_verdict(reports, method):
    report = reports[method]
    prefix, once, ordered, invariant = EXPECTED[method]
    assert report.prefix_checks == sum(perturbed_indices(SETUP, audit_methods(SETUP)[method]))
    assert report.prefix_invariant is prefix
    if not prefix:  # both kinds of leak: later tokens and the scored token itself
        assert report.violations_before > 0 and report.violations_self > 0 and report.prefix_max_delta > SETUP.tol
    else:
        assert report.prefix_max_delta <= SETUP.tol
    assert report.exactly_once is once
    assert report.missing_targets == 0
    assert (report.extra_scorings == 0) is once
    assert report.score_before_update is ordered
    assert report.batch_world_invariant is invariant
    assert report.compliant is (prefix and once and ordered)


def test_stateful_methods_record_their_updates(reports):
    for name, report in reports.items():
        stateful = "slot" in name or "ttt" in name
        assert (report.updates > 0) is stateful, name


def test_audit_table_lists_every_method(reports):
    table = format_audit_table(list(reports.values()))
    lines = table.splitlines()
    assert len(lines) == 2 + len(reports)
    for name, report in reports.items():
        row = next(line for line in lines if line.startswith(name + " "))
        assert row.rstrip().endswith("yes" if report.compliant else "no")
    assert "FAIL" in table and "pass" in table and "n/a" in table


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown audit method"):
        audit("peek", SETUP)
