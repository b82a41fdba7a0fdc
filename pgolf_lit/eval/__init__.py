"""Evaluation in plain PyTorch: standard, sliding-window, document-isolated, SLOT, score-first and phased TTT passes
(and phased TTT with the n-gram tilt),
registered by name (``registry.py``), run with one evaluation context (``context.py``), their result lines, and the
empirical causality audit. No Lightning here: the LightningModule, the Fabric evaluator and the export callback call
these."""

from pgolf_lit.eval.context import EvalContext, ForwardOptions, Weights, evaluation_context, forward_options
from pgolf_lit.eval.recording import NO_STATE, ScoreRecorder
from pgolf_lit.eval.registry import EVAL_METHODS, EvalMethod, PassOutcome, PassSetup, register_eval_method

# The methods' modules register them, in this order (EVAL_METHODS' order).
from pgolf_lit.eval.windows import (
    SlidingSettings,
    StandardSettings,
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
from pgolf_lit.eval.ttt import TTTConfig, evaluate_ttt
from pgolf_lit.eval.phased_ttt import (
    DocIsolatedSettings,
    PhasedTTTSettings,
    evaluate_doc_isolated,
    evaluate_phased_ttt,
)
from pgolf_lit.eval.slot import SlotConfig, evaluate_slot
from pgolf_lit.eval.ngram_tilt import NgramTiltSettings, evaluate_ngram_tilt

# After every method module: EvalSettings gets one section per method registered when runner is imported.
from pgolf_lit.eval.runner import EvalResult, EvalSettings, format_result_line, run_method, scored_counts

__all__ = [
    "EVAL_METHODS",
    "NO_STATE",
    "DocIsolatedSettings",
    "EvalContext",
    "EvalMethod",
    "EvalResult",
    "EvalSettings",
    "ForwardOptions",
    "NgramTiltSettings",
    "PassOutcome",
    "PassSetup",
    "PhasedTTTSettings",
    "ScoreRecorder",
    "SlidingSettings",
    "SlotConfig",
    "StandardSettings",
    "TTTConfig",
    "Weights",
    "Window",
    "WindowBatch",
    "evaluate_doc_isolated",
    "evaluate_ngram_tilt",
    "evaluate_phased_ttt",
    "evaluate_sliding",
    "evaluate_slot",
    "evaluate_standard",
    "evaluate_ttt",
    "evaluate_windows",
    "evaluation_context",
    "format_result_line",
    "forward_options",
    "rank_share",
    "register_eval_method",
    "run_method",
    "score_batch",
    "scored_counts",
    "sequence_windows",
    "sliding_windows",
]
