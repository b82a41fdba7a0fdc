"""Evaluation in plain PyTorch: standard, sliding-window, SLOT and score-first TTT eval, result lines, and the
empirical causality audit (spec/evaluation.md). No Lightning here: the LightningModule and the Fabric
evaluator call these functions."""

from pgolf_lit.eval.recording import NO_STATE, ScoreRecorder
from pgolf_lit.eval.runner import (
    DEFAULT_LABELS,
    METHODS,
    EvalResult,
    EvalSettings,
    format_result_line,
    run_method,
    scored_counts,
)
from pgolf_lit.eval.slot import SLOT_PRESETS, SlotConfig, evaluate_slot, slot_preset
from pgolf_lit.eval.ttt import TTTConfig, evaluate_ttt
from pgolf_lit.eval.windows import (
    ForwardOptions,
    Window,
    WindowBatch,
    evaluate_sliding,
    evaluate_standard,
    evaluate_windows,
    rank_share,
    score_batch,
    sequence_windows,
    sliding_windows,
)

__all__ = [
    "DEFAULT_LABELS",
    "METHODS",
    "NO_STATE",
    "SLOT_PRESETS",
    "EvalResult",
    "EvalSettings",
    "ForwardOptions",
    "ScoreRecorder",
    "SlotConfig",
    "TTTConfig",
    "Window",
    "WindowBatch",
    "evaluate_sliding",
    "evaluate_slot",
    "evaluate_standard",
    "evaluate_ttt",
    "evaluate_windows",
    "format_result_line",
    "rank_share",
    "run_method",
    "score_batch",
    "scored_counts",
    "sequence_windows",
    "sliding_windows",
    "slot_preset",
]
