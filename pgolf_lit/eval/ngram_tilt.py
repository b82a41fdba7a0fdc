"""The token-only online n-gram tilt (PR #2135, from the PR #1145 / #1514 line; spec/frontier.md §5.2): phased
score-first TTT whose scored distributions are tilted toward a hint from an n-gram table of the validation stream.

Hints. One left-to-right pass over the targets ``x_1 … x_T`` in stream order (documents concatenated, BOS tokens
included, never reset at a document boundary) keeps, for every context of the ``order - 1`` tokens before a
target, how often each token followed it. Before target ``j`` is added, the context's most frequent continuation
so far is its hint ``h_j``; the hint is gated on where that continuation's frequency (top count / context total,
a float32 ratio) is at least ``threshold``. The top continuation changes only when a count strictly exceeds the
top count. As the record's C state (``online_ngram_state.c``), contexts and (context, token) pairs are identified
by 64-bit hashes, so colliding contexts share counts and the hints are the record's exactly:

    key  = XOR_k ring[k] · C[k]  (ring oldest to newest, k < order - 1)
    pair = key · 1000003  XOR  token · C[(order - 1) mod 32]

with C the record's ``ROLLING_COEFFS``. The record seeds its ring with ``x_1`` before reading ``x_1``, so the
first full context is ``[x_1, x_1, …, x_{order-2}]``; that quirk is kept.

Tilt. For a gated target, ``p'(a) = p(a) · e^{β·1[a = h]} / Z`` with ``Z = 1 + p(h)(e^β - 1)``: exactly the softmax
of the logits with β added to the hint's logit, which is how it is applied here, so the scored distribution is a
full normalized distribution over the vocabulary (``tilted_nll`` is the record's closed form of its loss). The
tilt reshapes only the scored distributions (``score_batch``'s ``tilt``); the adapters and the global phases still
learn from the untilted loss.

Orders (what the audit checks). The table is updated in stream order (``NgramHints.update_order``), and the hint of
target ``j`` reads ``x_1 … x_{j-1}`` (``NgramHints.reads_upto``), whereas phased TTT scores the documents longest
first. Each order is causal on its own; no single order makes every score depend only on tokens already scored
(spec §6 note B), so this pass reports ``compliant:no`` until the audit says otherwise.

Speed. The record spent ~200 s of its evaluation building hints, mostly in experts whose output it discards; here
the pass is token-only and compiled with numba (a hash-table state machine, sequential by nature, that numpy
cannot express without sorting the stream): the positions are first split by the high bits of ``key · 1000003``
(every position sharing a context or a pair hash lands in the same part, see ``_part_bits``), then each part is
run through a cache-sized table in stream order. ``bench/ngram_tilt.py`` times the full 47.8 M-target stream.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from pgolf_lit.errors import ConfigError
from pgolf_lit.eval.phased_ttt import PhasedTTTSettings, evaluate_phased_ttt
from pgolf_lit.eval.phased_ttt import audit_scale as phased_audit_scale
from pgolf_lit.eval.recording import ScoreRecorder
from pgolf_lit.eval.registry import AuditCase, EvalMethod, PassOutcome, PassSetup
from pgolf_lit.metrics import BitsPerByte

# online_ngram_state.c: ROLLING_COEFFS (ring weights, and the pair key's token weight), PAIR_MIX
ROLLING_COEFFS = (
    36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521, 1048583, 1179653,
    1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243, 2359319, 2490389, 2621471, 2752549,
    2883617, 3014687, 3145757, 3276833, 3407903, 3538973,
)  # fmt: skip
PAIR_MIX = 1000003
TABLE_MIX = 0x9E3779B97F4A7C15  # the slot of a key: (key · TABLE_MIX) mod table size, linear probing
MAX_ORDER = len(ROLLING_COEFFS) + 1


@dataclass
class NgramTiltSettings(PhasedTTTSettings):
    """Phased TTT's settings (the pass it tilts; PR #1855's defaults) plus the tilt's own. Defaults of the three:
    PR #2135's record values (its env)."""

    order: int = 16
    """Tokens of a context plus the predicted one: the hint reads the order - 1 previous targets (TOKEN_ORDER)."""
    threshold: float = 0.8
    """A hint is used where its continuation's frequency in its context is at least this (TOKEN_THRESHOLD)."""
    boost: float = 2.625
    """β: the hint's probability is multiplied by e^β, then the distribution renormalized (TOKEN_BOOST)."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ConfigError:
            return ConfigError(f"evaluation.ngram_tilt.{name}: {msg}")

        try:
            super().__post_init__()
        except ConfigError as e:  # the inherited checks name this section
            raise ConfigError(str(e).replace("evaluation.phased_ttt.", "evaluation.ngram_tilt.", 1)) from None
        if isinstance(self.order, bool) or not 2 <= self.order <= MAX_ORDER:
            raise bad("order", f"must lie in [2, {MAX_ORDER}] (the record's coefficient table), got {self.order!r}")
        if not 0 < self.threshold <= 1:
            raise bad("threshold", f"must lie in (0, 1], got {self.threshold}")
        if not math.isfinite(self.boost) or self.boost < 0:
            raise bad("boost", f"must be a finite number >= 0, got {self.boost}")


# ---------------------------------------------------------------------------------------------------------
# The online table (numba)
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _kernels():
    """The compiled passes (numba, imported on first use: every other pass runs without it)."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is an install requirement
        raise ConfigError("evaluation.ngram_tilt: the n-gram hints need numba (pip install numba)") from None
    # cached next to this file when it is one (the wrapped evaluation program serves sources without files)
    jit = numba.njit(nogil=True, cache=os.path.isfile(__file__))
    table_mix, pair_mix, one, low = np.uint64(TABLE_MIX), np.uint64(PAIR_MIX), np.uint64(1), np.uint64(0xFFFFFFFF)

    @jit
    def context_keys(seq, coeffs, out):
        # out[r]: the key of the context seq[r : r + len(coeffs)] (oldest first)
        span = coeffs.size
        for r in range(out.size):
            key = np.uint64(0)
            for k in range(span):
                key ^= np.uint64(seq[r + k]) * coeffs[k]
            out[r] = key

    @jit
    def split_by_part(keys, span_bits, part_bits, order_out, starts):
        # a stable counting sort of the positions by part: a multiplicative hash of (key · PAIR_MIX) >> span_bits
        n_parts = starts.size - 1
        sh, ph = np.uint64(span_bits), np.uint64(64 - part_bits)
        parts = np.empty(keys.size, np.int64)
        counts = np.zeros(n_parts + 1, np.int64)
        for r in range(keys.size):
            p = np.int64((((keys[r] * pair_mix) >> sh) * table_mix) >> ph) if part_bits else 0
            parts[r] = p
            counts[p + 1] += 1
        for p in range(n_parts):
            counts[p + 1] += counts[p]
        starts[:] = counts
        for r in range(keys.size):
            p = parts[r]
            order_out[counts[p]] = r
            counts[p] += 1

    @jit
    def run_parts(
        keys, toks, pair_coeff, order, starts, ctx, pair, top_tok, top_count, total, keep, kept_ctx, kept_pair
    ):
        # ctx rows: key, total | top_count << 32, top token (total 0 = free); pair rows: key, count (0 = free)
        n_ctx, n_pair = 0, 0
        for p in range(starts.size - 1):
            a, b = starts[p], starts[p + 1]
            if a == b:
                continue
            size = 1
            while size < 2 * (b - a):
                size *= 2
            mask = np.uint64(size - 1)
            ctx[:size] = 0
            pair[:size] = 0
            for q in range(a, b):
                r = order[q]
                key, tok = keys[r], toks[r]
                slot = (key * table_mix) & mask
                while ctx[slot, 1] != 0 and ctx[slot, 0] != key:
                    slot = (slot + one) & mask
                found = ctx[slot, 1] != 0
                if found:  # the lookup comes before this target is added
                    top_tok[r] = ctx[slot, 2]
                    top_count[r] = ctx[slot, 1] >> np.uint64(32)
                    total[r] = ctx[slot, 1] & low
                pkey = (key * pair_mix) ^ (np.uint64(tok) * pair_coeff)
                ps = (pkey * table_mix) & mask
                while pair[ps, 1] != 0 and pair[ps, 0] != pkey:
                    ps = (ps + one) & mask
                pair[ps, 0] = pkey
                count = pair[ps, 1] + one
                pair[ps, 1] = count
                if not found:
                    ctx[slot, 0], ctx[slot, 1], ctx[slot, 2] = key, (count << np.uint64(32)) | one, tok
                elif count > (ctx[slot, 1] >> np.uint64(32)):  # strictly more: the top continuation changes
                    ctx[slot, 1], ctx[slot, 2] = (count << np.uint64(32)) | ((ctx[slot, 1] & low) + one), tok
                else:
                    ctx[slot, 1] += one
            if keep:
                for s in range(size):
                    if ctx[s, 1] != 0:
                        kept_ctx[n_ctx] = ctx[s]
                        n_ctx += 1
                    if pair[s, 1] != 0:
                        kept_pair[n_pair] = pair[s]
                        n_pair += 1
        return n_ctx, n_pair

    return context_keys, split_by_part, run_parts


def _part_bits(n: int) -> int:
    """Positions go to ``2^bits`` parts of 16-32 K positions (tables of a few MB, in cache) by a hash of
    ``(key · PAIR_MIX) >> span_bits``, span_bits the width of ``token · C``. Two (context, token) pairs with equal pair
    hashes have ``key · PAIR_MIX`` differing only below span_bits, so every context and every pair hash stays inside
    one part (keys stay below 2^38 for uint16 tokens: ``key · PAIR_MIX`` never wraps) and each part's table evolves
    exactly as the record's one table does for those keys."""
    return min(max(n >> 15, 1).bit_length(), 16)


@dataclass
class ContextCounts:
    """Per target ``x_{i+1}`` (index i of the target array): its context's top continuation before it was added,
    that continuation's count and the context's total (0 / 0 / 0 where the context was new or the ring not full)."""

    top_token: np.ndarray  # uint16
    top_count: np.ndarray  # uint32
    total: np.ndarray  # uint32
    ctx_rows: Optional[np.ndarray] = None  # keep_state: the final context entries [key, total | top << 32, token]
    pair_rows: Optional[np.ndarray] = None  # keep_state: the final pair entries [pair key, count]

    @property
    def top_prob(self) -> np.ndarray:
        """top count / total as float32, as the C state divides (0 where no context was seen)."""
        prob = np.zeros(self.total.shape, np.float32)
        seen = self.total > 0
        prob[seen] = self.top_count[seen].astype(np.float32) / self.total[seen].astype(np.float32)
        return prob


def context_counts(targets: np.ndarray, order: int, keep_state: bool = False) -> ContextCounts:
    """The online order-``order`` table over ``targets`` (uint16, stream order), seeded with ``targets[0]`` as the
    record is: one compiled pass, table updates in stream order per context. ``keep_state`` also returns the final
    table entries (tests; memory of the size of the stream)."""
    targets = np.ascontiguousarray(targets, dtype=np.uint16)
    n = targets.size
    span = order - 1
    top_token, top_count, total = np.zeros(n, np.uint16), np.zeros(n, np.uint32), np.zeros(n, np.uint32)
    first = span - 1  # the first target whose ring is full (the seed fills one slot)
    m = n - first
    if m <= 0:
        return ContextCounts(top_token, top_count, total, np.zeros((0, 3), np.uint64), np.zeros((0, 2), np.uint64))
    context_keys, split_by_part, run_parts = _kernels()
    seq = np.concatenate([targets[:1], targets])
    coeffs = np.array(ROLLING_COEFFS[:span], np.uint64)
    pair_coeff = np.uint64(ROLLING_COEFFS[span % len(ROLLING_COEFFS)])
    keys = np.empty(m, np.uint64)
    context_keys(seq, coeffs, keys)
    span_bits = (int(targets.max()) * int(pair_coeff)).bit_length()
    part_bits = _part_bits(m)
    order_ = np.empty(m, np.int64)
    starts = np.empty((1 << part_bits) + 1, np.int64)
    split_by_part(keys, span_bits, part_bits, order_, starts)
    biggest = int(np.diff(starts).max())
    size = 1 << max(2 * biggest - 1, 1).bit_length()
    ctx, pair = np.empty((size, 3), np.uint64), np.empty((size, 2), np.uint64)
    kept_ctx = np.empty((m if keep_state else 0, 3), np.uint64)
    kept_pair = np.empty((m if keep_state else 0, 2), np.uint64)
    n_ctx, n_pair = run_parts(
        keys,
        targets[first:],
        pair_coeff,
        order_,
        starts,
        ctx,
        pair,
        top_token[first:],
        top_count[first:],
        total[first:],
        keep_state,
        kept_ctx,
        kept_pair,
    )
    if not keep_state:
        return ContextCounts(top_token, top_count, total)
    return ContextCounts(top_token, top_count, total, kept_ctx[:n_ctx].copy(), kept_pair[:n_pair].copy())


# ---------------------------------------------------------------------------------------------------------
# Hints and the tilt
# ---------------------------------------------------------------------------------------------------------


@dataclass
class NgramHints:
    """The hint, gate and boost of every target of a stream ``x_0 … x_T``: entry ``j - 1`` is for target ``x_j``
    (hint 0 and no gate where ungated, as the record stores them)."""

    hint: Tensor  # int64 [T]
    gate: Tensor  # bool [T]
    boost: float

    @property
    def gated(self) -> int:
        return int(self.gate.sum())

    def boost_at(self, target_index: Tensor) -> Tensor:
        """β at each target (the record's ``boost`` array: β where gated, else 0)."""
        return self.gate[target_index - 1].to(torch.float32) * self.boost

    def tilt(self, logits: Tensor, target_index: Tensor) -> Tensor:
        """The tilted logits of scored targets: β added to the hint's logit where gated, so that their softmax is
        ``p(a)·e^{β·1[a=h]}/Z`` over the whole vocabulary (``score_batch``'s ``tilt``). logits: [N, V] (fp32 or
        wider), target_index: [N] stream indices of the scored targets."""
        index = (target_index - 1).cpu()
        rows = self.gate[index].nonzero(as_tuple=True)[0]
        if rows.numel() == 0 or self.boost == 0:
            return logits
        out = logits.clone()
        hint = self.hint[index[rows]].to(logits.device)
        rows = rows.to(logits.device)
        out[rows, hint] += self.boost
        return out

    def reads_upto(self, target_index: Tensor) -> Tensor:
        """The largest stream index the hint of each target read: its previous target (the table holds only
        ``x_1 … x_{j-1}`` when target ``j`` is looked up)."""
        return target_index - 1

    def update_order(self) -> Tensor:
        """Stream indices of the targets in the order the table read them: stream order (``x_1`` first, also as the
        record's seed)."""
        return torch.arange(1, self.hint.numel() + 1)


def build_hints(tokens: Union[Tensor, np.ndarray], cfg: NgramTiltSettings) -> NgramHints:
    """The hints of the stream ``tokens`` (``x_0 … x_T``; the targets are ``x_1 … x_T``, as the record passes
    ``val_tokens[1:]``)."""
    array = tokens.cpu().numpy() if isinstance(tokens, Tensor) else np.asarray(tokens)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(np.uint16).max):
        raise ConfigError("evaluation.ngram_tilt: token ids must fit uint16, as the record's table stores them")
    counts = context_counts(array[1:].astype(np.uint16), cfg.order)
    gate = counts.top_prob >= np.float32(cfg.threshold)
    hint = np.where(gate, counts.top_token.astype(np.int64), 0)
    return NgramHints(torch.from_numpy(hint), torch.from_numpy(gate), float(cfg.boost))


def tilted_nll(nll: Tensor, log_q: Tensor, hit: Tensor, boost: Tensor) -> Tensor:
    """The record's closed form (``apply_tilt_to_ptl_torch_fast``, fp32): ``nll - β·hit + log1p(q·(e^β - 1))``,
    q = exp(min(log p(h), 0)); with β = 0 the nll itself. The scoring path adds β to the hint's logit instead (the
    same distribution); this is the reference the tests hold it to."""
    dtype = torch.promote_types(nll.dtype, torch.float32)
    beta = boost.to(dtype)
    q = log_q.to(dtype).clamp(max=0.0).exp()
    tilted = nll.to(dtype) - beta * hit.to(dtype) + torch.log1p(q * torch.expm1(beta))
    return torch.where(beta != 0, tilted, nll.to(dtype))


class _ReadsRecorder:
    """Passes the scores on with the hint's reads folded in: each tilted distribution also depends on the table,
    which read every target before the scored one."""

    def __init__(self, inner: ScoreRecorder, hints: NgramHints):
        self.inner, self.hints = inner, hints

    def on_scores(self, target_index: Tensor, log_probs: Tensor, state_reads_upto: Tensor) -> None:
        reads = torch.maximum(state_reads_upto, self.hints.reads_upto(target_index).to(state_reads_upto.device))
        self.inner.on_scores(target_index, log_probs, reads)

    def on_update(self, first_token: int, last_token: int) -> None:
        self.inner.on_update(first_token, last_token)


def evaluate_ngram_tilt(
    model: nn.Module,
    tokens: Tensor,
    metric: BitsPerByte,
    cfg: NgramTiltSettings,
    setup: PassSetup,
    hints: Optional[NgramHints] = None,
    **phased,
) -> PassOutcome:
    """Build the hints (every rank builds the same, as the record's ranks do), then phased TTT with each scored
    distribution tilted. ``phased``: further arguments of ``evaluate_phased_ttt`` (tests' ``lora_factory``). The
    outcome's ``details``: the hints and phased TTT's summary."""
    hints = hints if hints is not None else build_hints(tokens, cfg)
    if setup.recorder is not None:
        setup = replace(setup, recorder=_ReadsRecorder(setup.recorder, hints))
    summary = evaluate_phased_ttt(model, tokens, metric, cfg, setup, tilt=hints.tilt, **phased).details
    extra = {
        "ngram_order": cfg.order,
        "ngram_gated": hints.gated,
        "boost": cfg.boost,
        "docs": summary["documents"],
        "phases": len(summary["phases"]),
        "ngram_state": "stream_order",  # phased TTT scores longest documents first (spec §6 note B)
    }
    return PassOutcome(False, extra, precompute=True, details=(hints, summary))


def audit_scale(a) -> NgramTiltSettings:
    """At the audit's scale (385 tokens of 40 ids): phased TTT's audit settings and a table that fires there (order 2,
    threshold 0.3; order 3 at 0.5 gates no hint, so H would see no state to order)."""
    return NgramTiltSettings(**vars(phased_audit_scale(a)), order=2, threshold=0.3)


METHODS = (
    EvalMethod(
        "ngram_tilt",
        NgramTiltSettings,
        evaluate_ngram_tilt,
        "quantized_ttt_phased",
        "ttt_phased",
        audit=(AuditCase("ngram_tilt", audit_scale, documents=True, spans_documents=True),),
    ),
)
