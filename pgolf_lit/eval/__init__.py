"""Evaluation in plain PyTorch: standard, sliding-window, SLOT, score-first TTT, document-isolated and phased TTT passes
(and phased TTT with the n-gram tilt), each one file registered by name (``registry.py``), run with one evaluation
context (``context.py``), their result lines (``runner.py``), and the empirical causality audit (``audit.py``). No
Lightning here: the LightningModule, the Fabric evaluator and the export callback call these.

The names below load on first use (PEP 562), so importing one submodule imports no other: the registry imports
the method modules itself (``registry.METHOD_MODULES``), before ``runner.py`` builds ``EvalSettings`` from it.
"""

from pgolf_lit.lazy_exports import lazy_exports

_EXPORTS = {
    "AuditCase": "registry",
    "DocIsolatedSettings": "phased_ttt",
    "EvalContext": "context",
    "EvalMethod": "registry",
    "EvalResult": "runner",
    "EvalSettings": "runner",
    "ForwardOptions": "context",
    "NgramTiltSettings": "ngram_tilt",
    "NO_STATE": "recording",
    "PassOutcome": "registry",
    "PassSetup": "registry",
    "PhasedTTTSettings": "phased_ttt",
    "ScoreRecorder": "recording",
    "SlidingSettings": "windows",
    "SlotSettings": "slot",
    "StandardSettings": "windows",
    "TTTSettings": "ttt",
    "Weights": "context",
    "Window": "scoring",
    "WindowBatch": "scoring",
    "eval_methods": "registry",
    "evaluate_doc_isolated": "phased_ttt",
    "evaluate_ngram_tilt": "ngram_tilt",
    "evaluate_phased_ttt": "phased_ttt",
    "evaluate_sliding": "windows",
    "evaluate_slot": "slot",
    "evaluate_standard": "windows",
    "evaluate_ttt": "ttt",
    "evaluate_windows": "windows",
    "evaluation_context": "context",
    "format_result_line": "runner",
    "forward_options": "context",
    "rank_share": "scoring",
    "run_method": "runner",
    "score_batch": "scoring",
    "scored_counts": "runner",
    "sequence_windows": "scoring",
    "sliding_windows": "scoring",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, globals(), _EXPORTS)
