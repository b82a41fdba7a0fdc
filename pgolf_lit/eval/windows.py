"""The two stateless evaluations: standard (non-overlapping sequences, upstream ``eval_val``) and sliding-window
(the records' ``eval_val_sliding``), over the shared windows and scoring of ``scoring.py``. Plain PyTorch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from pgolf_lit.errors import ConfigError
from pgolf_lit.eval.registry import AuditCase, EvalMethod, PassOutcome, PassSetup
from pgolf_lit.eval.scoring import (
    WINDOW_RULES,
    Window,
    WindowBatch,
    WindowRule,
    batched,
    eval_mode,
    model_device,
    progress_bar,
    rank_share,
    score_batch,
    sequence_windows,
    sliding_windows,
)
from pgolf_lit.metrics import BitsPerByte


# ---------------------------------------------------------------------------------------------------------
# Standard and sliding-window evaluation
# ---------------------------------------------------------------------------------------------------------


def evaluate_windows(
    model: nn.Module,
    tokens: Tensor,
    metric: BitsPerByte,
    windows: Sequence[Window],
    batch_windows: int,
    setup: PassSetup,
    desc: str = "eval",
) -> None:
    """Score the given windows (this rank's share) with the frozen model, ``batch_windows`` at a time."""
    device = model_device(model)
    forward = setup.options.compiled(model.forward_logits)
    batches = batched(windows, batch_windows)
    with eval_mode(model), torch.inference_mode(), progress_bar(len(batches), desc, setup.progress) as bar:
        for group in batches:
            batch = WindowBatch.gather(tokens, group, setup.seq_len, device)
            with setup.options.autocast():
                logits = forward(batch.inputs)
            score_batch(batch, logits, metric, setup.recorder)
            bar.update()


@dataclass
class StandardSettings:
    """The standard pass: non-overlapping ``seq_len`` sequences, every position scored."""

    batch_seqs: int = 32
    """Sequences per forward (rows are independent: changes speed, not the score)."""

    def __post_init__(self) -> None:
        if self.batch_seqs <= 0:
            raise ConfigError(f"evaluation.standard.batch_seqs: must be positive, got {self.batch_seqs}")


@dataclass
class SlidingSettings:
    """The sliding-window pass: windows every ``stride`` positions, each scoring only its last ``stride``."""

    window_rule: WindowRule = "exact"
    """``exact`` scores every target once (PR #1333/#1394); ``legacy`` reproduces PR #1263/#1278/#1321's
    re-scored tail (non-compliant); ``ttt`` is PR #1334's TTT window list."""
    batch_windows: int = 32
    """Windows per forward."""

    def __post_init__(self) -> None:
        if self.window_rule not in WINDOW_RULES:
            raise ConfigError(
                f"evaluation.sliding.window_rule: expected one of {WINDOW_RULES}, got {self.window_rule!r}"
            )
        if self.batch_windows <= 0:
            raise ConfigError(f"evaluation.sliding.batch_windows: must be positive, got {self.batch_windows}")


def evaluate_standard(
    model: nn.Module, tokens: Tensor, metric: BitsPerByte, cfg: StandardSettings, setup: PassSetup
) -> PassOutcome:
    """Non-overlapping sequences of ``seq_len``, every position scored (upstream ``eval_val``); contiguous rank split
    of the ``T // seq_len`` sequences, ``batch_seqs`` per forward. Per-token nll is summed in float64, where the
    upstream ``eval_val`` adds float32 batch means (a ≤ 2e-7 difference in val_loss)."""
    windows = rank_share(sequence_windows(tokens.numel() - 1, setup.seq_len), setup.rank, setup.world_size)
    evaluate_windows(model, tokens, metric, windows, cfg.batch_seqs, setup, "standard eval")
    return PassOutcome(True)


def evaluate_sliding(
    model: nn.Module, tokens: Tensor, metric: BitsPerByte, cfg: SlidingSettings, setup: PassSetup
) -> PassOutcome:
    """Sliding-window eval (the records' ``eval_val_sliding``): every window scores only its slice ``[s, wl)``;
    contiguous rank split. ``exact`` windows score each target once; ``legacy`` reproduces the PR
    #1263/#1278/#1321 over-count."""
    rule = cfg.window_rule
    windows = sliding_windows(tokens.numel() - 1, setup.seq_len, setup.stride, rule)
    desc = f"sliding eval (stride {setup.stride}, {rule})"
    evaluate_windows(
        model, tokens, metric, rank_share(windows, setup.rank, setup.world_size), cfg.batch_windows, setup, desc
    )
    return PassOutcome(rule == "exact", {"stride": setup.stride, "window_rule": rule})


# ---------------------------------------------------------------------------------------------------------
# Registration (registry.py)
# ---------------------------------------------------------------------------------------------------------

# standard: non-overlapping sequences (the roundtrip score); sliding: windows every stride positions, each scoring
# its last stride positions.
METHODS = (
    EvalMethod(
        "standard",
        StandardSettings,
        evaluate_standard,
        "final_{q}_roundtrip",
        "",
        audit=(AuditCase("standard", lambda a: StandardSettings(), "batch_seqs"),),
    ),
    EvalMethod(
        "sliding",
        SlidingSettings,
        evaluate_sliding,
        "final_{q}_sliding_window",
        "sliding_window",
        audit=(
            AuditCase("sliding_exact", lambda a: SlidingSettings(), "batch_windows"),
            AuditCase("sliding_legacy", lambda a: SlidingSettings("legacy"), "batch_windows"),
        ),
    ),
)
