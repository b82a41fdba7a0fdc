"""What every evaluation pass shares: windows over the validation stream, the rank split, batching, and the scoring
of a batch of windows into the ``BitsPerByte`` metric.

Every method in this package is "windows scored by some model": standard eval is the window list
``ws = 0, L, 2L, …`` with every position scored; sliding eval lets windows overlap and scores only their last
``stride`` positions; SLOT and TTT change the model that scores a window; phased TTT scores documents. They all share
the window lists, the rank split, ``WindowBatch`` and ``score_batch`` below, so the byte accounting is written once.

Plain PyTorch. The functions take ``rank``/``world_size`` and only touch the ranks' shares of the work; the
``BitsPerByte`` metric they update sums over ranks when the caller computes it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, NamedTuple, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pgolf_lit.eval.recording import NO_STATE, ScoreRecorder
from pgolf_lit.metrics import BitsPerByte

WindowRule = Literal["exact", "legacy", "ttt"]
RankSplit = Literal["contiguous", "interleaved"]
WINDOW_RULES = ("exact", "legacy", "ttt")

Item = TypeVar("Item")


class Window(NamedTuple):
    """Inputs ``x[ws : ws+wl]``, targets ``x[ws+1 : ws+wl+1]``; local positions ``[s, wl)`` are scored."""

    ws: int
    s: int
    wl: int


# ---------------------------------------------------------------------------------------------------------
# Window lists and the rank split
# ---------------------------------------------------------------------------------------------------------


def sliding_windows(total: int, seq_len: int, stride: int, rule: WindowRule) -> list[Window]:
    """Windows of length ``seq_len`` starting every ``stride`` positions over ``total`` scored targets.

    exact  (PR #1333/#1334/#1394 sliding): a later window exists only while it still has a full context of
           ``seq_len - stride`` tokens before its scored block, so the scored slices tile [0, total) exactly once.
    legacy (PR #1263/#1278/#1321, every record SLOT): a window at every start; tail windows shorter than
           ``seq_len`` re-score the last ``stride`` positions with ever shorter context.
    ttt    (PR #1334 eval_val_ttt): legacy, minus tail windows shorter than ``stride``.
    The first window always starts at 0 and scores all its positions.
    """
    if not 0 < stride <= seq_len:
        raise ValueError(f"stride must lie in [1, seq_len={seq_len}], got {stride}")
    if rule not in WINDOW_RULES:
        raise ValueError(f"window rule must be one of {WINDOW_RULES}, got {rule!r}")
    context = seq_len - stride
    windows = []
    for ws in range(0, total, stride):
        wl = min(seq_len, total - ws)
        if ws == 0:
            windows.append(Window(0, 0, wl))
        elif rule == "exact":
            if ws + context < total:
                windows.append(Window(ws, context, wl))
        elif rule == "legacy" or wl >= stride:
            windows.append(Window(ws, max(wl - stride, 0), wl))
    return windows


def sequence_windows(total: int, seq_len: int) -> list[Window]:
    """Standard eval's non-overlapping sequences over ``total`` targets, every position scored; the last one is
    shorter when ``total`` is no multiple of ``seq_len`` (a val split kept whole: ``include_tail``)."""
    return [Window(i, 0, min(seq_len, total - i)) for i in range(0, total, seq_len)]


def rank_share(items: Sequence[Item], rank: int, world_size: int, split: RankSplit = "contiguous") -> Sequence[Item]:
    """This rank's part of a list every rank built identically.

    contiguous: ``items[floor(n·r/W) : floor(n·(r+1)/W)]`` (all record scripts but two);
    interleaved: ``items[r::W]`` (PR #1278/#1321 SLOT). The split changes nothing but summation order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if split == "interleaved":
        return items[rank::world_size]
    n = len(items)
    return items[n * rank // world_size : n * (rank + 1) // world_size]


def sum_gradients_over_ranks(params: Sequence[nn.Parameter]) -> None:
    """One all-reduce of every gradient (zeros where this rank has none), so all ranks step identically
    (the TTT passes' gradient reduction)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def batched(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    if size <= 0:
        raise ValueError(f"batch size must be positive, got {size}")
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---------------------------------------------------------------------------------------------------------
# Helpers shared by every method
# ---------------------------------------------------------------------------------------------------------


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, then the caller's mode again (the upstream scripts leave train mode on)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def at_least_fp32(t: Tensor) -> Tensor:
    """Losses are taken on fp32 logits (bf16 autocast output is upcast); an fp64 model (the audit) stays fp64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def progress_bar(total: int, desc: str, enabled: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------------------
# Batches of windows and their scoring
# ---------------------------------------------------------------------------------------------------------


@dataclass
class WindowBatch:
    """Up to B windows as ``[B, L]`` tensors, zero-filled beyond each window's length.

    Padding is never scored and, the model being causal and row-independent, cannot change scored positions.
    """

    windows: Sequence[Window]
    inputs: Tensor  # int64 [B, L]
    targets: Tensor  # int64 [B, L]
    positions: Tensor  # int64 [B, L], stream position ws + k of each cell (the target is x[position + 1])
    scored: Tensor  # bool [B, L], True on each window's [s, wl)

    @classmethod
    def gather(cls, tokens: Tensor, windows: Sequence[Window], seq_len: int, device: torch.device) -> "WindowBatch":
        ws, s, wl = (torch.tensor(col, dtype=torch.int64, device=tokens.device) for col in zip(*windows))
        local = torch.arange(seq_len, device=tokens.device)
        positions = ws[:, None] + local
        inside = local < wl[:, None]
        last = tokens.numel() - 1
        inputs = torch.where(inside, tokens[positions.clamp(max=last)], 0)
        targets = torch.where(inside, tokens[(positions + 1).clamp(max=last)], 0)
        scored = inside & (local >= s[:, None])
        return cls(
            windows=windows,
            inputs=inputs.long().to(device),
            targets=targets.long().to(device),
            positions=positions.to(device),
            scored=scored.to(device),
        )

    @property
    def context(self) -> Tensor:
        """bool [B, L]: each window's unscored prefix ``[0, s)``, the positions causal SLOT may fit on."""
        s = torch.tensor([w.s for w in self.windows], device=self.scored.device)
        return torch.arange(self.scored.size(1), device=s.device) < s[:, None]


def score_batch(
    batch: WindowBatch,
    logits: Tensor,
    metric: BitsPerByte,
    recorder: Optional[ScoreRecorder] = None,
    state_reads_upto: Optional[Tensor] = None,
    tilt: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
) -> None:
    """Charge the scored positions of a batch to the metric: per-token nll from at-least-fp32 logits, summed in
    float64 by the metric, with the bytes of each target given its real previous token.

    logits: [B, L, V]. state_reads_upto: int64 [B] per window (or None = no adaptive state), passed on to the
    recorder only. ``tilt(logits [N, V], target index [N])`` reshapes the scored distributions before they are
    scored and recorded (``ngram_tilt.py``).
    """
    mask = batch.scored
    scored_logits = at_least_fp32(logits[mask])
    if tilt is not None:
        scored_logits = tilt(scored_logits, batch.positions[mask] + 1)
    targets = batch.targets[mask]
    nll = F.cross_entropy(scored_logits, targets, reduction="none")
    metric.update(nll, batch.inputs[mask], targets, batch.positions[mask] + 1)
    if recorder is not None:
        if state_reads_upto is None:
            reads = torch.full_like(targets, NO_STATE)
        else:
            reads = state_reads_upto.to(targets.device)[:, None].expand_as(mask)[mask]
        recorder.on_scores(batch.positions[mask] + 1, F.log_softmax(scored_logits, dim=-1), reads)
