"""The causality audit gives the verdicts of spec/evaluation.md §7.6: it passes the compliant procedures and
fails the leaky or over-counting ones (zero vs non-zero violations; the counts depend on the random model). Each
of its later checks (E-H) fails a crafted method that breaks it, declared as a method file declares itself."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import pytest
import torch
import torch.nn.functional as F

from pgolf_lit.eval.audit import AuditSetup, audit, audit_method, audit_methods, format_audit_table, perturbed_indices
from pgolf_lit.eval.phased_ttt import find_documents
from pgolf_lit.eval.recording import NO_STATE
from pgolf_lit.eval.registry import AuditCase, EvalMethod, PassOutcome, eval_methods
from pgolf_lit.eval.scoring import WindowBatch, batched, model_device, rank_share, sequence_windows
from pgolf_lit.eval.windows import SlidingSettings, StandardSettings, evaluate_sliding, evaluate_standard

SETUP = AuditSetup()

# method: A prefix invariance, B exactly once, C score before update, D batch/world invariance, E normalization,
# F nothing read before it is scored, G document isolation, H state order (None = n/a)
EXPECTED = {
    "standard": (True, True, True, True, True, True, None, None),
    "sliding_exact": (True, True, True, True, True, True, None, None),
    "sliding_legacy": (True, False, True, True, True, True, None, None),
    "slot_standard": (False, False, False, False, True, False, None, None),
    "causal_slot_batch_shared": (False, False, False, False, True, True, None, None),
    "causal_slot_per_window_legacy": (True, False, True, True, True, True, None, None),
    "causal_slot_per_window": (True, True, True, True, True, True, None, None),
    "ttt_score_first": (True, False, True, None, True, True, None, True),
    "ttt_exact": (True, True, True, None, True, True, None, True),
    "ttt_exact_hash_embed": (True, True, True, None, True, True, None, True),  # PR #1529's table: score first too
    "doc_isolated": (True, True, True, None, True, True, True, None),
    "phased_ttt": (True, True, True, None, True, True, None, True),
    "phased_ttt_no_qv": (True, True, True, None, True, True, None, True),
    # PR #2135: the table follows the stream, phased TTT scores longest documents first -> H fails (spec §6 note B)
    "ngram_tilt": (True, True, True, None, True, True, None, False),
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
    assert list(audit_methods(SETUP)) == [case.name for m in eval_methods().values() for case in m.audit]


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_audit_verdict(reports, method):
    report = reports[method]
    prefix, once, ordered, invariant, normalized, read_after, isolated, order = EXPECTED[method]
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
    assert report.normalized is normalized and report.vocab_entries == SETUP.vocab_size
    assert report.read_after_scoring is read_after
    assert report.documents_isolated is isolated
    assert report.state_order_agrees is order
    passed = prefix and once and ordered and normalized and read_after
    assert report.compliant is (passed and isolated is not False and order is not False)


def test_stateful_methods_record_their_updates_and_gradients(reports):
    for name, report in reports.items():
        stateful = "slot" in name or "ttt" in name or "tilt" in name
        assert (report.updates > 0) is stateful, name
        assert (report.gradient_steps > 0) is stateful, name


def test_standard_slot_reads_what_it_then_scores(reports):
    """F, reported and observed: standard SLOT fits its delta on the very targets the next scoring scores."""
    report = reports["slot_standard"]
    assert report.early_updates > 0 and report.early_gradients > 0


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


# ---------------------------------------------------------------------------------------------------------
# Crafted methods, each breaking one of the checks E-H (and a sound twin passing it)
# ---------------------------------------------------------------------------------------------------------

# Fewer perturbed positions (40, 101, 162, 223, 284, 345): enough for every crafted flaw, a third of the runs.
CRAFTED = replace(SETUP, perturb_every=61)


@dataclass
class CraftedSettings:
    flaw: str = ""
    """Which flaw the crafted method has ("": none)."""
    batch_seqs: int = 4


def crafted_audit(run, flaw: str, **claims):
    """Audit ``run`` declared as a method (``EvalMethod`` with one ``AuditCase``, as a method file declares it)."""
    method = EvalMethod("crafted", CraftedSettings, run, "final_{q}_crafted", "crafted")
    case = AuditCase(f"crafted_{flaw or 'sound'}", lambda a: CraftedSettings(flaw), **claims)
    return audit(audit_method(method, case, CRAFTED), CRAFTED)


def _sequences(model, tokens, cfg, setup):
    """The standard pass's batches of sequences, with their logits at the scored positions."""
    windows = rank_share(sequence_windows(tokens.numel() - 1, setup.seq_len), setup.rank, setup.world_size)
    for group in batched(windows, cfg.batch_seqs):
        batch = WindowBatch.gather(tokens, group, setup.seq_len, model_device(model))
        with torch.no_grad():
            yield batch, model.forward_logits(batch.inputs)[batch.scored]


def evaluate_tilted(model, tokens, metric, cfg: CraftedSettings, setup):
    """Every distribution tilted toward the token before its target (a hint that reads no later token), then
    renormalized; flaws: ``unnormalized`` drops the renormalization (a distribution summing to more than 1),
    ``charged_untilted`` reports the tilted distribution but charges the untilted one."""
    for batch, logits in _sequences(model, tokens, cfg, setup):
        plain = F.log_softmax(logits, dim=-1)
        tilted = plain + 2.0 * F.one_hot(batch.inputs[batch.scored], logits.size(-1))
        if cfg.flaw != "unnormalized":
            tilted = tilted - torch.logsumexp(tilted, dim=-1, keepdim=True)
        targets = batch.targets[batch.scored]
        charged = plain if cfg.flaw == "charged_untilted" else tilted
        metric.update(-charged.gather(1, targets[:, None])[:, 0], batch.inputs[batch.scored], targets)
        if setup.recorder is not None:
            setup.recorder.on_scores(batch.positions[batch.scored] + 1, tilted, torch.full_like(targets, NO_STATE))
    return PassOutcome(True)


@pytest.mark.parametrize("flaw", ["", "unnormalized", "charged_untilted"])
def test_normalization_fails_a_distribution_that_does_not_sum_to_one(flaw):
    report = crafted_audit(evaluate_tilted, flaw, batch="batch_seqs")
    assert report.prefix_invariant and report.exactly_once and report.score_before_update
    assert report.normalized is (flaw == "")
    assert (report.norm_max_delta > 0.1) is (flaw == "unnormalized")  # log Σp' = log(1 + p(h)(e^2 - 1))
    assert (report.charged_delta > 1e-3) is (flaw == "charged_untilted")  # per distribution: ~0.1 nats
    assert report.compliant is (flaw == "")


def evaluate_warmed_up(model, tokens, metric, cfg: CraftedSettings, setup):
    """The standard pass after a compile warmup (only when compiling: the audit runs that path eagerly): one
    backward pass on a copy of the model, thrown away. Flaws: ``val_warmup`` warms up on the first two validation
    sequences instead of random tokens; ``reported_update`` reports an update that read them, before scoring."""
    L = setup.seq_len
    if setup.options.compile:
        scratch = copy.deepcopy(model)
        if cfg.flaw == "val_warmup":
            x = tokens[: 2 * L + 1]
        else:
            x = torch.randint(0, model.config.vocab_size, (2 * L + 1,), generator=torch.Generator().manual_seed(0))
        logits = scratch.forward_logits(x[:-1].view(2, L))
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[1:]).backward()
    if cfg.flaw == "reported_update" and setup.recorder is not None:
        setup.recorder.on_update(0, 2 * L)
    return evaluate_standard(model, tokens, metric, StandardSettings(cfg.batch_seqs), setup)


@pytest.mark.parametrize("flaw", ["", "val_warmup", "reported_update"])
def test_reading_a_token_before_it_is_scored_fails_even_when_thrown_away(flaw):
    report = crafted_audit(evaluate_warmed_up, flaw, batch="batch_seqs")
    # the scores never see the warmup: A-E cannot tell
    assert report.prefix_invariant and report.exactly_once and report.score_before_update and report.normalized
    assert report.gradient_steps == 1  # the compiled path ran, eagerly
    assert (report.early_gradients > 0) is (flaw == "val_warmup")
    assert (report.early_updates > 0) is (flaw == "reported_update")
    assert report.read_after_scoring is (flaw == "") and report.compliant is (flaw == "")


def evaluate_sliding_across_documents(model, tokens, metric, cfg: CraftedSettings, setup):
    """Sliding windows over the stream, whatever its documents: a window reads the end of the previous one."""
    return evaluate_sliding(model, tokens, metric, SlidingSettings(batch_windows=cfg.batch_seqs), setup)


def test_document_isolation_fails_a_method_that_claims_it_and_reads_across(reports):
    report = crafted_audit(evaluate_sliding_across_documents, "", batch="batch_seqs", documents=True, isolated=True)
    assert report.prefix_invariant and report.exactly_once and report.normalized and report.read_after_scoring
    assert report.isolation_violations > 0 and report.documents_isolated is False and not report.compliant
    assert reports["doc_isolated"].isolation_violations == 0  # the method that isolates documents


def evaluate_count_tilt(model, tokens, metric, cfg: CraftedSettings, setup):
    """Each document scored in one window of its own tokens, each distribution tilted toward every token by its
    frequency in the stream before the target: a state updated in stream order, never reset at documents (PR
    #2135's n-gram table in miniature). Flaw ``longest_first``: the documents are scored longest first, as phased
    TTT scores them; otherwise in stream order."""
    vocab = model.config.vocab_size
    docs = find_documents(tokens, model.config.bos_id)
    if cfg.flaw == "longest_first":
        docs = sorted(docs, key=lambda d: -d[1])
    seen = F.one_hot(tokens, vocab).cumsum(0)  # seen[i]: counts of x_0 .. x_i
    for start, n in docs[setup.rank :: setup.world_size]:
        batch = WindowBatch.gather(tokens, [(start, 0, n - 1)], n - 1, model_device(model))
        with torch.no_grad():
            plain = F.log_softmax(model.forward_logits(batch.inputs)[0], dim=-1)
        target_index = batch.positions[0] + 1
        frequency = seen[target_index - 1] / target_index[:, None]  # of x_0 .. x_{j-1}: no later token
        tilted = plain + 2.0 * frequency
        tilted = tilted - torch.logsumexp(tilted, dim=-1, keepdim=True)
        targets = batch.targets[0]
        metric.update(-tilted.gather(1, targets[:, None])[:, 0], batch.inputs[0], targets)
        if setup.recorder is not None:
            setup.recorder.on_scores(target_index, tilted, target_index - 1)
    return PassOutcome(True)


@pytest.mark.parametrize("flaw", ["", "longest_first"])
def test_state_order_fails_a_stream_order_state_scored_longest_first(flaw):
    report = crafted_audit(evaluate_count_tilt, flaw, documents=True, spans_documents=True)
    # in stream order (the audit's document stream is also longest first) everything else holds
    assert report.prefix_invariant and report.exactly_once and report.score_before_update
    assert report.normalized and report.read_after_scoring
    assert report.state_order_agrees is (flaw == "") and report.compliant is (flaw == "")
    if flaw:
        assert report.order_violations > 0 and report.order_max_delta > CRAFTED.tol
