"""Selective ±1 pruning: zero the cheapest ±1 codes until the artifact fits the budget (PR #1333/#1334/#1421
``serialize``).

Candidates are the entries with |q| = 1 in per-row quantized tensors below int8 (the int6 matrices; int8 tables
are never pruned). Moving ±s to 0 adds s_row² of squared error, so candidates are taken in ascending order of
the row scale squared (fp16 scale read as fp32), ties in candidate order: tensor order, then row-major position.
Zeros compress better than ±1, so each pruned entry shrinks the compressed file a little.

How many to prune:
  ``upstream`` (PR #1333/#1334/#1421): n = min(8 · excess bytes, #candidates), no search, no re-check.
  ``search``: the smallest n (to a resolution) whose real compressed total fits, by bisection; the returned
  total is measured, never estimated.

The order is computed once with a stable ``torch.sort`` over all candidates (no Python lists of millions of
tuples); pruning n entries clones only the tensors it touches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

import torch
from torch import Tensor

PruneMode = Literal["none", "upstream", "search"]
UPSTREAM_PRUNE_FACTOR = 8


@dataclass
class PruneCandidates:
    """Candidates in pruning order: which tensor (index into ``keys``) and which flat position, and the score."""

    keys: list[str]
    tensor_index: Tensor
    flat_index: Tensor
    scores: Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())


@dataclass
class PruneReport:
    mode: str
    budget_bytes: int
    unpruned_bytes: int  # total (model + code) before pruning
    final_bytes: int  # total after pruning, measured
    n_candidates: int = 0
    n_pruned: int = 0
    excess_bytes: int = 0
    pruned_per_tensor: dict[str, int] = field(default_factory=dict)
    last_score: float = 0.0
    probes: list[tuple[int, int]] = field(default_factory=list)  # (n pruned, total bytes) of each size measurement
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return self.final_bytes <= self.budget_bytes


def find_candidates(quant: Mapping[str, Tensor], code_keys: list[str], scale_keys: list[str]) -> PruneCandidates:
    """All |q| = 1 entries of the given code tensors (with their per-row scales), sorted by s_row² (stable)."""
    tensor_ids, flat_ids, scores = [], [], []
    for i, (qk, sk) in enumerate(zip(code_keys, scale_keys)):
        q, scale = quant[qk], quant[sk]
        if q.ndim != 2 or scale.ndim != 1:
            shapes = f"{tuple(q.shape)} / {tuple(scale.shape)}"
            raise ValueError(f"{qk}: pruning needs 2-D codes with per-row scales, got {shapes}")
        flat = torch.nonzero(q.reshape(-1).abs() == 1).reshape(-1)
        rows = flat // max(1, q.shape[1])
        flat_ids.append(flat)
        scores.append(scale.float()[rows].pow(2))
        tensor_ids.append(torch.full_like(flat, i))
    if not scores:
        empty = torch.zeros(0, dtype=torch.long)
        return PruneCandidates([], empty, empty, torch.zeros(0))
    all_scores = torch.cat(scores)
    order = torch.sort(all_scores, stable=True).indices
    return PruneCandidates(list(code_keys), torch.cat(tensor_ids)[order], torch.cat(flat_ids)[order], all_scores[order])


def prune_first(quant: Mapping[str, Tensor], candidates: PruneCandidates, n: int) -> dict[str, Tensor]:
    """A copy of ``quant`` with the first ``n`` candidates set to 0 (untouched tensors are shared, not copied)."""
    out = dict(quant)
    chosen_tensor, chosen_flat = candidates.tensor_index[:n], candidates.flat_index[:n]
    for i in torch.unique(chosen_tensor).tolist():
        key = candidates.keys[i]
        q = quant[key].clone()
        q.view(-1)[chosen_flat[chosen_tensor == i]] = 0
        out[key] = q
    return out


def selective_prune(
    quant: Mapping[str, Tensor],
    code_keys: list[str],
    scale_keys: list[str],
    total_bytes: Callable[[Mapping[str, Tensor]], int],
    budget_bytes: int,
    mode: PruneMode = "search",
    resolution: float = 0.01,
) -> tuple[Mapping[str, Tensor], PruneReport]:
    """Prune ±1 codes of ``code_keys`` until ``total_bytes(quant) <= budget_bytes`` (see the module docstring).

    The returned mapping is always one that ``total_bytes`` measured last for its n (``quant`` itself when
    nothing is pruned), so a caller may cache the serialized bytes by object identity.

    ``total_bytes`` serializes and compresses a candidate dict and adds the code bytes: the real measure.
    ``resolution`` (search mode): stop bisecting when the bracket is within this fraction of its upper end; the
    result may prune that many more entries than the exact minimum, and always fits.
    """
    start = time.perf_counter()
    probes: list[tuple[int, int]] = []

    def measure(n: int, candidate: Mapping[str, Tensor]) -> int:
        size = total_bytes(candidate)
        probes.append((n, size))
        return size

    unpruned = measure(0, quant)
    report = PruneReport(mode, budget_bytes, unpruned, unpruned, probes=probes)
    if mode == "none" or unpruned <= budget_bytes:
        report.seconds = time.perf_counter() - start
        return quant, report

    candidates = find_candidates(quant, code_keys, scale_keys)
    report.n_candidates = len(candidates)
    report.excess_bytes = unpruned - budget_bytes
    if mode == "upstream":
        n = min(UPSTREAM_PRUNE_FACTOR * report.excess_bytes, len(candidates))
        pruned = prune_first(quant, candidates, n)
        final = measure(n, pruned)
    elif mode == "search":
        n, pruned, final = _search(quant, candidates, measure, unpruned, budget_bytes, resolution)
    else:
        raise ValueError(f"prune mode must be 'none', 'upstream' or 'search', got {mode!r}")
    report.n_pruned, report.final_bytes = n, final
    if n:
        report.last_score = float(candidates.scores[n - 1])
        per_tensor = torch.bincount(candidates.tensor_index[:n], minlength=len(candidates.keys)).tolist()
        report.pruned_per_tensor = {k: c for k, c in zip(candidates.keys, per_tensor) if c}
    report.seconds = time.perf_counter() - start
    return pruned, report


def _search(quant, candidates, measure, unpruned, budget, resolution):
    """Bracket the crossing between ``lo`` (too big) and ``hi`` (fits), starting from the upstream guess
    8 · excess and doubling while it is short; then shrink the bracket to ``resolution``.

    The total is close to linear in n, so each step first tries the point where the line through the bracket
    ends meets the budget (false position); a step that does not halve the bracket is followed by a bisection.
    """
    lo, lo_over = 0, unpruned - budget
    hi = min(UPSTREAM_PRUNE_FACTOR * lo_over, len(candidates))
    best = prune_first(quant, candidates, hi)
    hi_size = measure(hi, best)
    while hi_size > budget and hi < len(candidates):
        lo, lo_over = hi, hi_size - budget
        hi = min(2 * hi, len(candidates))
        best = prune_first(quant, candidates, hi)
        hi_size = measure(hi, best)
    if hi_size > budget:  # even pruning every candidate does not fit: return the unpruned dict
        return 0, quant, unpruned
    interpolate = True
    while hi - lo > max(1, int(resolution * hi)):
        width = hi - lo
        if interpolate:
            mid = lo + round(lo_over * width / (lo_over + budget - hi_size))
        else:
            mid = (lo + hi) // 2
        mid = min(max(mid, lo + 1), hi - 1)
        candidate = prune_first(quant, candidates, mid)
        size = measure(mid, candidate)
        if size <= budget:
            hi, hi_size, best = mid, size, candidate
        else:
            lo, lo_over = mid, size - budget
        interpolate = not interpolate or 2 * (hi - lo) <= width
    return hi, best, hi_size
