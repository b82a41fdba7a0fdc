"""Empirical causality audit of every registered evaluation method (``pgolf audit``): the four conditions of
upstream issue #1017, and the checks the challenge's reviews turned on.

Each method declares how the audit exercises it (``EvalMethod.audit``, one ``AuditCase`` per row; see
``registry.py``): its settings at the audit's scale and what it claims. The method's own pass then runs unchanged
(window lists, batching, rank split, SLOT/TTT state) on a tiny deterministic float64 causal model, with a
``ScoreRecorder`` capturing every distribution it scores with and every state update it applies, while the audit
watches every backward pass (its loss values: ``_watch_gradients``) and runs the method's compiled code paths
eagerly (``AUDIT_FORWARD``: warmups run too). The checks:

A  prefix invariance (issue #1017 conditions 1 and 3): perturb token ``x_p``; every distribution that scores a
   target ``j <= p`` must stay the same (``j < p``: no dependence on later tokens; ``j = p``: none on the
   scored token itself). Changes at ``j > p`` are allowed.
B  exactly once (condition 4 / accounting): every target in ``[1, T]`` is scored once, ``token_count = T`` and
   ``byte_count`` equals the byte count of the stream computed directly from the LUTs.
C  score before update: no state a distribution depends on has read the token it scores (or a later one), as the
   method reports it.
D  batch / world invariance (diagnostic): the same distributions with one window per batch and with the work
   split over ranks (simulated in one process). A failure is no violation by itself but exposes coupling
   between windows, such as PR #1333's batch-shared delta.
E  normalization (condition 2): every distribution the method scores with covers the full vocabulary and sums to
   1, and the metric was charged exactly ``-log p(target)`` of those distributions (a hashed n-gram cache whose
   "distribution" sums to 277 fails, as does scoring with one distribution and reporting another).
F  nothing read before it is scored: run sequentially (one rank; one window per forward where the batch only
   changes speed), no backward pass and no reported state update reads a token before that token is scored.
   Observed, not trusted: a backward pass before ``x_p`` is first scored must not change when ``x_p`` does (a
   compile warmup or priming on validation tokens fails, even when its result is thrown away).
G  document isolation (methods that claim it): perturbing ``x_p`` changes no distribution of a target in another
   document (a target belongs to the document of the position that predicts it).
H  state order (methods whose state spans documents): on a stream whose documents are not in length order,
   perturbing ``x_p`` changes no distribution scored before ``x_p`` is. The order a state is updated in must
   agree with the order tokens are scored in: phased TTT updates its state in the order it scores (longest
   document first) and passes; a state built in stream order beside it (PR #2135's online n-gram table) fails.

A method is compliant when A, B, C, E and F pass and G and H pass where they apply.

float64 and deterministic kernels make any dependence visible at ``tol = 1e-12``; a GPU bf16 run would not.
The verdicts expected from the seed procedures: standard eval, exact sliding, per-window causal SLOT and
score-first TTT, the document-isolated eval and phased TTT pass every check; standard SLOT and batch-shared causal
SLOT fail A; standard SLOT fails F (it fits on the very tokens it then scores); the legacy and TTT window rules
fail B. The document methods run on a stream with BOS at ``document_starts`` (documents shorter along the
stream, so phased TTT's longest-first order is the stream order there) and perturbations that keep every BOS
in place; H runs them on ``order_document_starts`` (the same documents, shuffled).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from pgolf_lit.config import GPTConfig
from pgolf_lit.data.tokenizer import count_bytes
from pgolf_lit.eval.context import ForwardOptions
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
    # E: |log Σ p| and |charged - recorded| per distribution. A method may normalize in float32 (~1e-7); what E
    # catches is of order 0.01-6 nats (an unrenormalized tilt, a cache summing to 277).
    norm_tol: float = 1e-6
    seed: int = 0
    # The document methods' stream: BOS at these positions, so the documents get shorter along the stream and
    # phased TTT's longest-first queue scores them in stream order (then "no later token" is the same as "no
    # token scored later").
    document_starts: tuple[int, ...] = (0, 70, 132, 187, 235, 275, 309, 337, 359, 374)
    # H's stream: the same ten document lengths (70, 62, ..., 11) shuffled, so that no length order is the stream
    # order: a state that follows the stream then disagrees with a scoring order that follows length.
    order_document_starts: tuple[int, ...] = (0, 28, 90, 101, 149, 219, 234, 274, 329, 351)

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
    # D applies (and F runs one window per forward): False where the batch size is part of the method's definition
    # (TTT's training batches) or where ranks communicate (TTT all-reduces gradients, which one process cannot
    # simulate).
    invariance_applies: bool = True
    # the stream has BOS at setup.document_starts; perturbations keep every BOS where it is (documents are
    # delimited by them, and the scoring structure must not change with a token value)
    documents: bool = False
    isolated: bool = False  # G applies
    spans_documents: bool = False  # H applies


@dataclass(frozen=True)
class _CompiledEagerly(ForwardOptions):
    """``compile`` on, compiling nothing: a method takes its compiled path, warmups included, in eager mode."""

    compile: bool = True

    def compiled(self, fn: Callable, dynamic: bool = False) -> Callable:
        return fn


AUDIT_FORWARD = _CompiledEagerly()


def record_slot(record: str, section: str):
    """The settings a record config states in ``model.evaluation.<section>`` (e.g. its SLOT procedure)."""
    from pgolf_lit.records import record_eval_settings

    return getattr(record_eval_settings(record), section)


def audit_method(method: EvalMethod, case: AuditCase, setup: AuditSetup) -> AuditMethod:
    """The audit row of one ``AuditCase`` of a method: its pass, run with the case's settings (the batch field set
    to the audit's batch where the case names it), the audit's window geometry and ``AUDIT_FORWARD``."""
    settings = case.settings(setup)

    def run(model, tokens, metric, recorder, batch, rank, world):
        cfg = replace(settings, **{case.batch: batch}) if case.batch else settings
        pass_setup = PassSetup(setup.seq_len, setup.stride, rank, world, AUDIT_FORWARD, recorder=recorder)
        method.run(model, tokens, metric, cfg, pass_setup)

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


def audit_tokens(setup: AuditSetup, documents: bool = False, starts: Optional[Sequence[int]] = None) -> Tensor:
    """A BOS-led random stream of ``T + 1`` tokens (BOS = 1); ``documents``: BOS at every ``document_starts`` (or
    at ``starts``)."""
    generator = torch.Generator().manual_seed(setup.seed + 2)
    tokens = torch.randint(2, setup.vocab_size, (setup.total_targets + 1,), generator=generator)
    tokens[0] = AUDIT_BOS
    if documents:
        tokens[list(setup.document_starts if starts is None else starts)] = AUDIT_BOS
    return tokens


def perturbed_indices(setup: AuditSetup, method: "AuditMethod", starts: Optional[Sequence[int]] = None) -> list[int]:
    """The positions A perturbs: ``setup.perturbed_indices``, minus the BOS of a document method's stream (or of
    the stream with documents at ``starts``)."""
    if starts is None and method.documents:
        starts = setup.document_starts
    return [p for p in setup.perturbed_indices if p not in set(starts or ())]


def _perturb(value: int, p: int, vocab_size: int, keep_bos: bool) -> int:
    new = (value + 1 + p % (vocab_size - 1)) % vocab_size
    while keep_bos and new in (AUDIT_BOS, value):  # a new BOS would split a document
        new = (new + 1) % vocab_size
    return new


def _perturbed(tokens: Tensor, p: int, setup: AuditSetup, keep_bos: bool) -> Tensor:
    changed = tokens.clone()
    changed[p] = _perturb(int(tokens[p]), p, setup.vocab_size, keep_bos)
    return changed


def audit_luts(vocab_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Byte tables with both LUT paths: ids 0 and 1 are 0-byte boundaries, others 1-3 bytes, half with a space."""
    ids = torch.arange(vocab_size)
    is_boundary = ids < 2
    base_bytes = torch.where(is_boundary, 0, 1 + ids % 3).to(torch.int16)
    has_leading_space = ~is_boundary & (ids % 2 == 0)
    return base_bytes, has_leading_space, is_boundary


def _document_of(length: int, starts: Sequence[int]) -> Tensor:
    """int64 [length]: the index of the document holding each stream position."""
    return torch.bucketize(torch.arange(length), torch.tensor(sorted(starts)), right=True) - 1


# ---------------------------------------------------------------------------------------------------------
# Recording and comparing runs
# ---------------------------------------------------------------------------------------------------------


class _Scored(Exception):
    """Raised by a Recording once its ``stop_at`` target is scored: F and H look no further."""


class Recording:
    """A ScoreRecorder keeping every scored distribution and update, every backward pass's loss (``on_gradient``,
    from ``_watch_gradients``), the order they came in (``events``), and the run's metric totals."""

    def __init__(self, stop_at: Optional[int] = None) -> None:
        self._targets: list[Tensor] = []
        self._log_probs: list[Tensor] = []
        self._reads: list[Tensor] = []
        self.updates: list[tuple[int, int]] = []
        # in time order: ("scores", index into the scored chunks) | ("update", first, last) | ("gradient", losses)
        self.events: list[tuple] = []
        self.token_count = 0
        self.byte_count = 0
        self.charged = 0.0  # nats the metric was charged
        self.stop_at = stop_at

    def on_scores(self, target_index: Tensor, log_probs: Tensor, state_reads_upto: Tensor) -> None:
        self._targets.append(target_index.detach().cpu().clone())
        self._log_probs.append(log_probs.detach().cpu().clone())
        self._reads.append(state_reads_upto.detach().cpu().clone())
        self.events.append(("scores", len(self._targets) - 1))
        if self.stop_at is not None and bool((self._targets[-1] == self.stop_at).any()):
            raise _Scored

    def on_update(self, first_token: int, last_token: int) -> None:
        self.updates.append((first_token, last_token))
        self.events.append(("update", first_token, last_token))

    def on_gradient(self, losses: Tensor) -> None:
        self.events.append(("gradient", losses))

    def by_target(self) -> tuple[Tensor, Tensor, Tensor]:
        """(targets [N], log_probs [N, V], reads [N]) ordered by target, repeats of a target in scoring order.
        The scoring structure never depends on token values, so two runs line up row by row."""
        targets = torch.cat(self._targets)
        order = torch.sort(targets, stable=True).indices
        return targets[order], torch.cat(self._log_probs)[order], torch.cat(self._reads)[order]

    def chunk(self, index: int) -> tuple[Tensor, Tensor]:
        """(targets, log_probs) of the ``index``-th scoring, in scoring order."""
        return self._targets[index], self._log_probs[index]

    def first_scored(self, target: int) -> int:
        """The index in ``events`` of the scoring that first scores ``target`` (len(events) if none does)."""
        for i, event in enumerate(self.events):
            if event[0] == "scores" and bool((self._targets[event[1]] == target).any()):
                return i
        return len(self.events)


@contextmanager
def _watch_gradients(recording: Recording) -> Iterator[None]:
    """Every backward pass a procedure takes goes to the recording with its loss values, in the order it happens:
    ``torch.autograd.backward`` (which ``Tensor.backward`` calls) and ``torch.autograd.grad`` are wrapped for the
    duration. (A ``TorchFunctionMode`` would see them too, also under a name imported early, but costs a Python
    call per tensor operation: 2-3x on phased TTT's runs.)"""
    originals = torch.autograd.backward, torch.autograd.grad

    def watched(original):
        def run(tensors, *args, **kwargs):
            losses = tensors if isinstance(tensors, (tuple, list)) else [tensors]
            recording.on_gradient(torch.cat([t.detach().reshape(-1).double().cpu() for t in losses]))
            return original(tensors, *args, **kwargs)

        return run

    torch.autograd.backward, torch.autograd.grad = (watched(f) for f in originals)
    try:
        yield
    finally:
        torch.autograd.backward, torch.autograd.grad = originals


def _record(
    method: AuditMethod,
    model: nn.Module,
    tokens: Tensor,
    luts,
    batch_windows: int,
    world_size: int,
    stop_at: Optional[int] = None,
) -> Recording:
    """Run every rank's share in turn in this process (the procedures without collectives allow that); with
    ``stop_at``, only until that target is scored."""
    recording = Recording(stop_at)
    try:
        with _watch_gradients(recording):
            for rank in range(world_size):
                metric = BitsPerByte(luts)
                method.run(model, tokens, metric, recording, batch_windows, rank, world_size)
                recording.token_count += int(metric.token_count)
                recording.byte_count += int(metric.byte_count)
                recording.charged += float(metric.loss_sum)
    except _Scored:
        pass
    return recording


def _max_difference(a: Recording, b: Recording) -> float:
    targets_a, log_probs_a, _ = a.by_target()
    targets_b, log_probs_b, _ = b.by_target()
    if not torch.equal(targets_a, targets_b):
        return float("inf")
    return float((log_probs_a - log_probs_b).abs().max())


def _differs(a: Tensor, b: Tensor, tol: float) -> bool:
    if a.shape != b.shape:
        return True
    return a.numel() > 0 and bool((a - b).abs().max() > tol)


def _gradients_changed_before(base: Recording, run: Recording, until: int, tol: float) -> bool:
    """Whether a backward pass among ``base.events[:until]`` differs in ``run`` (or the event order does)."""
    for i in range(until):
        event = base.events[i]
        other = run.events[i] if i < len(run.events) else None
        if other is None or other[0] != event[0]:
            return True
        if event[0] == "gradient" and _differs(event[1], other[1], tol):
            return True
    return False


def _scored_changed_before(base: Recording, run: Recording, until: int, tol: float) -> float:
    """The largest |Δ log p| over the distributions scored in ``base.events[:until]`` (inf if the runs differ in
    what they scored)."""
    worst = 0.0
    for event in base.events[:until]:
        if event[0] != "scores":
            continue
        if event[1] >= len(run._targets):
            return float("inf")
        (targets, log_probs), (run_targets, run_log_probs) = base.chunk(event[1]), run.chunk(event[1])
        if not torch.equal(targets, run_targets):
            return float("inf")
        if log_probs.numel():
            worst = max(worst, float((log_probs - run_log_probs).abs().max()))
    return worst


def _updates_before_scoring(recording: Recording, known: Sequence[int] = ()) -> int:
    """Reported updates that read a target not yet scored. ``known``: positions whose token is structure, the same
    in every run (a document stream's BOS: perturbations keep them); index 0 is no target, only ever context."""
    scored: set[int] = set(known)
    early = 0
    for event in recording.events:
        if event[0] == "scores":
            scored.update(recording._targets[event[1]].tolist())
        elif event[0] == "update":
            early += any(j not in scored for j in range(max(event[1], 1), event[2] + 1))
    return early


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
    norm_tol: float = 0.0
    vocab_entries: int = 0  # E: entries of each scored distribution (the vocabulary size when whole)
    vocab_size: int = 0
    norm_max_delta: float = 0.0  # E: largest |log Σ_a p(a)| over the scored distributions
    charged_delta: float = 0.0  # E: |nats charged - Σ -log p(target)| per scored distribution
    gradient_steps: int = 0  # F: backward passes in the sequential run
    early_updates: int = 0  # F: reported updates that read a token before it was scored
    early_gradients: int = 0  # F: perturbed x_p that changed a backward pass taken before x_p was scored
    isolation_violations: Optional[int] = None  # G: (p, j) with j in another document whose distribution changed
    order_violations: Optional[int] = None  # H: perturbed x_p that changed a distribution scored before x_p
    order_max_delta: Optional[float] = None  # H: largest such |Δ log p|

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
    def normalized(self) -> bool:
        return (
            self.vocab_entries == self.vocab_size
            and self.norm_max_delta <= self.norm_tol
            and self.charged_delta <= self.norm_tol
        )

    @property
    def read_after_scoring(self) -> bool:
        return self.early_updates == 0 and self.early_gradients == 0

    @property
    def documents_isolated(self) -> Optional[bool]:
        return None if self.isolation_violations is None else self.isolation_violations == 0

    @property
    def state_order_agrees(self) -> Optional[bool]:
        return None if self.order_violations is None else self.order_violations == 0

    @property
    def compliant(self) -> bool:
        return (
            self.prefix_invariant
            and self.exactly_once
            and self.score_before_update
            and self.normalized
            and self.read_after_scoring
            and self.documents_isolated is not False
            and self.state_order_agrees is not False
        )


def audit(
    method: Union[str, AuditMethod], setup: AuditSetup = AuditSetup(), model: Optional[nn.Module] = None
) -> AuditReport:
    """Run checks A-H on one procedure (a row name of ``audit_methods`` or an ``AuditMethod``).

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
    document_of = _document_of(T + 1, setup.document_starts) if method.isolated else None

    with _deterministic():
        base = _record(method, model, tokens, luts, setup.batch_windows, 1)
        targets, log_probs, reads = base.by_target()

        checks = violations_before = violations_self = crossings = 0
        max_delta = 0.0
        runs: dict[int, Recording] = {}  # F reads them where the batch is the method's own
        for p in perturbed_indices(setup, method):
            perturbed = _perturbed(tokens, p, setup, method.documents)
            runs[p] = run = _record(method, model, perturbed, luts, setup.batch_windows, 1)
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
            if document_of is not None:  # G: targets of other documents (by the position predicting them)
                crossing = (delta > tol) & (document_of[targets - 1] != document_of[p])
                crossings += len(torch.unique(targets[crossing]))

        counts = torch.bincount(targets, minlength=T + 1)[1 : T + 1]
        batch_delta = world_delta = None
        sequential = base  # F's run: one rank, one window per forward where the batch only changes speed
        if method.invariance_applies:
            sequential = _record(method, model, tokens, luts, 1, 1)
            batch_delta = _max_difference(base, sequential)
            world_run = _record(method, model, tokens, luts, setup.batch_windows, setup.world_size)
            world_delta = _max_difference(base, world_run)

        # E: the distributions scored with, and what the metric was charged
        recorded_nats = float(-log_probs.gather(1, tokens[targets][:, None]).sum())
        norm_max = float(torch.logsumexp(log_probs, dim=-1).abs().max()) if len(targets) else 0.0

        # F: reported updates, then every backward pass up to the first scoring of each perturbed token
        gradient_steps = sum(event[0] == "gradient" for event in sequential.events)
        early_gradients = 0
        if gradient_steps:
            for p in perturbed_indices(setup, method):
                until = sequential.first_scored(p)
                if method.invariance_applies:
                    perturbed = _perturbed(tokens, p, setup, method.documents)
                    run = _record(method, model, perturbed, luts, 1, 1, stop_at=p)
                else:
                    run = runs[p]
                early_gradients += _gradients_changed_before(sequential, run, until, tol)

        order_violations = order_max = None
        if method.spans_documents:
            order_violations, order_max = _state_order(method, model, luts, setup)

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
        norm_tol=setup.norm_tol,
        vocab_entries=int(log_probs.size(-1)),
        vocab_size=setup.vocab_size,
        norm_max_delta=norm_max,
        charged_delta=abs(base.charged - recorded_nats) / max(len(targets), 1),
        gradient_steps=gradient_steps,
        early_updates=_updates_before_scoring(sequential, setup.document_starts if method.documents else ()),
        early_gradients=early_gradients,
        isolation_violations=crossings if method.isolated else None,
        order_violations=order_violations,
        order_max_delta=order_max,
    )


def _state_order(method: AuditMethod, model: nn.Module, luts, setup: AuditSetup) -> tuple[int, float]:
    """H on ``order_document_starts``: the perturbed tokens that change a distribution scored before they are,
    and the largest such change."""
    starts = setup.order_document_starts
    tokens = audit_tokens(setup, True, starts)
    base = _record(method, model, tokens, luts, setup.batch_windows, 1)
    violations, worst = 0, 0.0
    for p in perturbed_indices(setup, method, starts):
        perturbed = _perturbed(tokens, p, setup, True)
        run = _record(method, model, perturbed, luts, setup.batch_windows, 1, stop_at=p)
        delta = _scored_changed_before(base, run, base.first_scored(p), setup.tol)
        violations += delta > setup.tol
        worst = max(worst, delta)
    return violations, worst


def audit_all(setup: AuditSetup = AuditSetup()) -> list[AuditReport]:
    return [audit(method, setup) for method in audit_methods(setup).values()]


def format_audit_table(reports: list[AuditReport]) -> str:
    """A plain-text table, one row per procedure, with pass/fail per condition and the numbers behind it."""

    def verdict(ok: Optional[bool]) -> str:
        return "n/a" if ok is None else ("pass" if ok else "FAIL")

    def delta(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.2g}"

    def count(value: Optional[int]) -> str:
        return "-" if value is None else str(value)

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
        "E |logΣp|",
        "E",
        "F early",
        "F",
        "G viol.",
        "G",
        "H viol.",
        "H",
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
                f"{r.norm_max_delta:.2g}",
                verdict(r.normalized),
                f"{r.early_updates}/{r.early_gradients}",
                verdict(r.read_after_scoring),
                count(r.isolation_violations),
                verdict(r.documents_isolated),
                count(r.order_violations),
                verdict(r.state_order_agrees),
                "yes" if r.compliant else "no",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
