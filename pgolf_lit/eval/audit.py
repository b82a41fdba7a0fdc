"""Empirical causality audit of an evaluation procedure (the four conditions of upstream issue #1017, ``pgolf audit``).

The procedure under test runs unchanged (window lists, batching, rank split, SLOT/TTT state) on a tiny
deterministic float64 causal model, with a ``ScoreRecorder`` capturing every distribution it scores with and
every state update it applies. Four checks:

A  prefix invariance (issue #1017 conditions 1 and 3): perturb token ``x_p``; every distribution that scores a
   target ``j <= p`` must stay the same (``j < p``: no dependence on later tokens; ``j = p``: none on the
   scored token itself). Changes at ``j > p`` are allowed.
B  exactly once (condition 4 / accounting): every target in ``[1, T]`` is scored once, ``token_count = T`` and
   ``byte_count`` equals the byte count of the stream computed directly from the LUTs.
C  score before update: no state a distribution depends on has read the token it scores (or a later one).
D  batch / world invariance (diagnostic): the same distributions with one window per batch and with the work
   split over ranks (simulated in one process). A failure is no violation by itself but exposes coupling
   between windows, such as PR #1333's batch-shared delta.

float64 and deterministic kernels make any dependence visible at ``tol = 1e-12``; a GPU bf16 run would not.
The verdicts expected from the seed procedures: standard eval, exact sliding, per-window causal SLOT and
score-first TTT, the document-isolated eval and phased TTT pass A and C; standard SLOT and batch-shared causal
SLOT fail A; the legacy and TTT window rules fail B. The document methods run on a stream with BOS at
``document_starts`` and perturbations that keep every BOS in place.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from pgolf_lit.config import GPTConfig
from pgolf_lit.data.tokenizer import count_bytes
from pgolf_lit.eval.registry import AuditCase, EvalMethod, PassSetup, eval_methods
from pgolf_lit.metrics import BitsPerByte
from pgolf_lit.model.gpt import GPT

# run(model, tokens, metric, recorder, batch_windows, rank, world_size): one rank's share of an evaluation.
Procedure = Callable[[nn.Module, Tensor, BitsPerByte, "Recording", int, int, int], None]


@dataclass(frozen=True)
class AuditSetup:
    """The audit's model, stream and test set (defaults: T = 12·L, p every 23rd index from 40). Each method's
    settings at this scale come from its ``AuditCase`` (``registry.py``)."""

    vocab_size: int = 40
    model_dim: int = 16
    seq_len: int = 32
    stride: int = 8
    batch_windows: int = 4
    world_size: int = 2
    n_sequences: int = 12
    perturb_first: int = 40
    perturb_every: int = 23
    tol: float = 1e-12
    seed: int = 0
    # The document methods' stream: BOS at these positions, so the documents get shorter along the stream and
    # phased TTT's longest-first queue scores them in stream order (then "no later token" is the same as "no
    # token scored later").
    document_starts: tuple[int, ...] = (0, 70, 132, 187, 235, 275, 309, 337, 359, 374)

    @property
    def total_targets(self) -> int:
        return self.n_sequences * self.seq_len

    @property
    def perturbed_indices(self) -> range:
        return range(self.perturb_first, self.total_targets, self.perturb_every)

    def record(self, record: str, method: str):
        """The settings a record config states for one of its methods (``model.evaluation.<method>``), for an
        ``AuditCase``: the audit audits what the record runs."""
        return record_slot(record, method)


@dataclass(frozen=True)
class AuditMethod:
    """One row of the audit: a procedure and what it claims (``AuditCase``, ``registry.py``)."""

    name: str
    description: str
    run: Procedure
    # D applies: False where the batch size is part of the method's definition (TTT's training batches) or
    # where ranks communicate (TTT all-reduces gradients, which one process cannot simulate).
    invariance_applies: bool = True
    # the stream has BOS at setup.document_starts; perturbations keep every BOS where it is (documents are
    # delimited by them, and the scoring structure must not change with a token value)
    documents: bool = False
    isolated: bool = False
    spans_documents: bool = False


def record_slot(record: str, section: str):
    """The settings a record config states in ``model.evaluation.<section>`` (e.g. its SLOT procedure)."""
    from pgolf_lit.records import record_eval_settings

    return getattr(record_eval_settings(record), section)


def audit_method(method: EvalMethod, case: AuditCase, setup: AuditSetup) -> AuditMethod:
    """The audit row of one ``AuditCase`` of a registered method: its pass, run with the case's settings (the
    batch field set to the audit's batch where the case names it) and the audit's window geometry."""
    settings = case.settings(setup)

    def run(model, tokens, metric, recorder, batch, rank, world):
        cfg = replace(settings, **{case.batch: batch}) if case.batch else settings
        method.run(model, tokens, metric, cfg, PassSetup(setup.seq_len, setup.stride, rank, world, recorder=recorder))

    return AuditMethod(
        case.name,
        f"eval method {method.name!r}: {case.name}",
        run,
        invariance_applies=bool(case.batch),
        documents=case.documents,
        isolated=case.isolated,
        spans_documents=case.spans_documents,
    )


def audit_methods(setup: AuditSetup) -> dict[str, AuditMethod]:
    """Every registered method's audit rows (``EvalMethod.audit``), in registry order."""
    rows: dict[str, AuditMethod] = {}
    for method in eval_methods().values():
        for case in method.audit:
            if case.name in rows:
                raise ValueError(f"audit case {case.name!r} is declared twice ({method.name})")
            rows[case.name] = audit_method(method, case, setup)
    return rows


# ---------------------------------------------------------------------------------------------------------
# The audit's model, stream and byte tables
# ---------------------------------------------------------------------------------------------------------


def audit_model(setup: AuditSetup) -> GPT:
    """One-layer GPT (tied softcapped head) in float64 with random weights large enough to matter everywhere
    (the default init zeroes several projections, which would hide dependencies)."""
    cfg = GPTConfig(vocab_size=setup.vocab_size, num_layers=1, model_dim=setup.model_dim, num_heads=2, num_kv_heads=2)
    torch.manual_seed(setup.seed)
    model = GPT(cfg).double()
    generator = torch.Generator().manual_seed(setup.seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model.eval()


AUDIT_BOS = 1


def audit_tokens(setup: AuditSetup, documents: bool = False) -> Tensor:
    """A BOS-led random stream of ``T + 1`` tokens (BOS = 1); ``documents``: BOS at every ``document_starts``."""
    generator = torch.Generator().manual_seed(setup.seed + 2)
    tokens = torch.randint(2, setup.vocab_size, (setup.total_targets + 1,), generator=generator)
    tokens[0] = AUDIT_BOS
    if documents:
        tokens[list(setup.document_starts)] = AUDIT_BOS
    return tokens


def perturbed_indices(setup: AuditSetup, method: "AuditMethod") -> list[int]:
    """The positions A perturbs: ``setup.perturbed_indices``, minus the BOS of a document method's stream."""
    bos = set(setup.document_starts) if method.documents else set()
    return [p for p in setup.perturbed_indices if p not in bos]


def _perturb(value: int, p: int, vocab_size: int, keep_bos: bool) -> int:
    new = (value + 1 + p % (vocab_size - 1)) % vocab_size
    while keep_bos and new in (AUDIT_BOS, value):  # a new BOS would split a document
        new = (new + 1) % vocab_size
    return new


def audit_luts(vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Byte tables with both LUT paths: ids 0 and 1 are 0-byte boundaries, others 1-3 bytes, half with a space."""
    ids = torch.arange(vocab_size)
    is_boundary = ids < 2
    base_bytes = torch.where(is_boundary, 0, 1 + ids % 3).to(torch.int16)
    has_leading_space = ~is_boundary & (ids % 2 == 0)
    return base_bytes, has_leading_space, is_boundary


# ---------------------------------------------------------------------------------------------------------
# Recording and comparing runs
# ---------------------------------------------------------------------------------------------------------


class Recording:
    """A ScoreRecorder keeping every scored distribution and update, plus the run's metric totals."""

    def __init__(self) -> None:
        self._targets: list[Tensor] = []
        self._log_probs: list[Tensor] = []
        self._reads: list[Tensor] = []
        self.updates: list[tuple[int, int]] = []
        self.token_count = 0
        self.byte_count = 0

    def on_scores(self, target_index: Tensor, log_probs: Tensor, state_reads_upto: Tensor) -> None:
        self._targets.append(target_index.detach().cpu().clone())
        self._log_probs.append(log_probs.detach().cpu().clone())
        self._reads.append(state_reads_upto.detach().cpu().clone())

    def on_update(self, first_token: int, last_token: int) -> None:
        self.updates.append((first_token, last_token))

    def by_target(self) -> tuple[Tensor, Tensor, Tensor]:
        """(targets [N], log_probs [N, V], reads [N]) ordered by target, repeats of a target in scoring order.
        The scoring structure never depends on token values, so two runs line up row by row."""
        targets = torch.cat(self._targets)
        order = torch.sort(targets, stable=True).indices
        return targets[order], torch.cat(self._log_probs)[order], torch.cat(self._reads)[order]


def _record(
    method: AuditMethod, model: nn.Module, tokens: Tensor, luts, batch_windows: int, world_size: int
) -> Recording:
    """Run every rank's share in turn in this process (the procedures without collectives allow that)."""
    recording = Recording()
    for rank in range(world_size):
        metric = BitsPerByte(luts)
        method.run(model, tokens, metric, recording, batch_windows, rank, world_size)
        recording.token_count += int(metric.token_count)
        recording.byte_count += int(metric.byte_count)
    return recording


def _max_difference(a: Recording, b: Recording) -> float:
    targets_a, log_probs_a, _ = a.by_target()
    targets_b, log_probs_b, _ = b.by_target()
    if not torch.equal(targets_a, targets_b):
        return float("inf")
    return float((log_probs_a - log_probs_b).abs().max())


@contextmanager
def _deterministic() -> Iterator[None]:
    """Deterministic kernels on one thread: identical inputs give bit-identical outputs, and the audit's tiny
    tensors run fastest without intra-op parallelism (which stalls badly on a busy machine)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


# ---------------------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------------------


@dataclass
class AuditReport:
    method: str
    description: str
    tol: float
    prefix_checks: int  # (p, j) pairs with j <= p examined by A
    violations_before: int  # A: pairs with j < p whose distribution changed
    violations_self: int  # A: perturbations that changed the distribution scoring x_p itself
    prefix_max_delta: float  # A: largest |Δ log p| over j <= p
    targets: int  # T
    extra_scorings: int  # B: scorings beyond the first of a target
    missing_targets: int  # B: targets never scored
    token_count: int
    byte_count: int
    expected_bytes: int
    updates: int  # state updates recorded
    update_violations: int  # C: scored distributions depending on a state that read the scored token or later
    batch_delta: Optional[float]  # D: max |Δ log p|, one window per batch vs the default batch
    world_delta: Optional[float]  # D: max |Δ log p|, ranks simulated vs one rank

    @property
    def prefix_invariant(self) -> bool:
        return self.violations_before == 0 and self.violations_self == 0

    @property
    def exactly_once(self) -> bool:
        return (
            self.extra_scorings == 0
            and self.missing_targets == 0
            and self.token_count == self.targets
            and self.byte_count == self.expected_bytes
        )

    @property
    def score_before_update(self) -> bool:
        return self.update_violations == 0

    @property
    def batch_world_invariant(self) -> Optional[bool]:
        deltas = [d for d in (self.batch_delta, self.world_delta) if d is not None]
        return all(d <= self.tol for d in deltas) if deltas else None

    @property
    def compliant(self) -> bool:
        return self.prefix_invariant and self.exactly_once and self.score_before_update


def audit(
    method: Union[str, AuditMethod], setup: AuditSetup = AuditSetup(), model: Optional[nn.Module] = None
) -> AuditReport:
    """Run checks A-D on one procedure (a name from ``audit_methods`` or an ``AuditMethod``).

    ``model`` defaults to ``audit_model(setup)``; another model must be causal, deterministic and have
    ``setup.vocab_size`` tokens (float64 recommended).
    """
    if isinstance(method, str):
        methods = audit_methods(setup)
        if method not in methods:
            raise ValueError(f"unknown audit method '{method}': expected one of {sorted(methods)}")
        method = methods[method]
    model = audit_model(setup) if model is None else model
    tokens = audit_tokens(setup, method.documents)
    luts = audit_luts(setup.vocab_size)
    T, tol = setup.total_targets, setup.tol

    with _deterministic():
        base = _record(method, model, tokens, luts, setup.batch_windows, 1)
        targets, log_probs, reads = base.by_target()

        checks = violations_before = violations_self = 0
        max_delta = 0.0
        for p in perturbed_indices(setup, method):
            perturbed = tokens.clone()
            perturbed[p] = _perturb(int(tokens[p]), p, setup.vocab_size, method.documents)
            run = _record(method, model, perturbed, luts, setup.batch_windows, 1)
            run_targets, run_log_probs, _ = run.by_target()
            if not torch.equal(run_targets, targets):
                raise RuntimeError(f"{method.name}: the scoring structure changed with a token value")
            delta = (run_log_probs - log_probs).abs().amax(dim=-1)
            in_prefix = targets <= p
            changed = torch.unique(targets[in_prefix & (delta > tol)])
            checks += p
            violations_before += int((changed < p).sum())
            violations_self += int((changed == p).sum())
            max_delta = max(max_delta, float(delta[in_prefix].max()))

        counts = torch.bincount(targets, minlength=T + 1)[1 : T + 1]
        batch_delta = world_delta = None
        if method.invariance_applies:
            batch_delta = _max_difference(base, _record(method, model, tokens, luts, 1, 1))
            world_delta = _max_difference(
                base, _record(method, model, tokens, luts, setup.batch_windows, setup.world_size)
            )

    return AuditReport(
        method=method.name,
        description=method.description,
        tol=tol,
        prefix_checks=checks,
        violations_before=violations_before,
        violations_self=violations_self,
        prefix_max_delta=max_delta,
        targets=T,
        extra_scorings=int((counts - 1).clamp_min(0).sum()),
        missing_targets=int((counts == 0).sum()),
        token_count=base.token_count,
        byte_count=base.byte_count,
        expected_bytes=count_bytes(tokens, luts),
        updates=len(base.updates),
        update_violations=int((reads >= targets).sum()),
        batch_delta=batch_delta,
        world_delta=world_delta,
    )


def audit_all(setup: AuditSetup = AuditSetup()) -> list[AuditReport]:
    return [audit(method, setup) for method in audit_methods(setup).values()]


def format_audit_table(reports: list[AuditReport]) -> str:
    """A plain-text table, one row per procedure, with pass/fail per condition and the numbers behind it."""

    def verdict(ok: Optional[bool]) -> str:
        return "n/a" if ok is None else ("pass" if ok else "FAIL")

    def delta(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2g}"

    header = [
        "method",
        "A j<p",
        "A j=p",
        "A max|Δ|",
        "A",
        "B extra/missing",
        "B bytes",
        "B",
        "C viol.",
        "C",
        "D batch",
        "D world",
        "D",
        "compliant",
    ]
    rows = [header]
    for r in reports:
        rows.append(
            [
                r.method,
                str(r.violations_before),
                str(r.violations_self),
                f"{r.prefix_max_delta:.2g}",
                verdict(r.prefix_invariant),
                f"{r.extra_scorings}/{r.missing_targets}",
                f"{r.byte_count}/{r.expected_bytes}",
                verdict(r.exactly_once),
                str(r.update_violations),
                verdict(r.score_before_update),
                delta(r.batch_delta),
                delta(r.world_delta),
                verdict(r.batch_world_invariant),
                "yes" if r.compliant else "no",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
