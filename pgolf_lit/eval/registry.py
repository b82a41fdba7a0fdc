"""Evaluation methods by name, and how the causality audit exercises each. **An eval method is one file.** The file
defines the method's settings dataclass and its pass, ``evaluate_<name>(model, tokens, metric, cfg, setup) ->
PassOutcome`` (``cfg``: its settings, ``setup``: the ``PassSetup`` every pass shares), and declares what it
registers in a module-level ``METHODS`` tuple of ``EvalMethod``; ``METHOD_MODULES`` below names the file, once.
``eval_methods()`` imports those modules, in that order, the first time anything asks for the registry, and
``EvalSettings`` (``runner.py``) is built from it when ``runner.py`` is imported, one settings section per method.
So every method is registered before ``EvalSettings`` exists: nothing registers later, nothing can be missed. The
methods, in registry order: ``windows.py`` (standard, sliding), ``slot.py`` (slot, causal_slot), ``ttt.py`` (ttt),
``phased_ttt.py`` (doc_isolated, phased_ttt), ``ngram_tilt.py`` (ngram_tilt). A method's ``modules`` (its ``run``'s
module, plus ``needs``) are what an artifact's code size counts for it (``pgolf_lit/quant/code_size.py``); the
program it ships lists only those modules here.

**How the audit exercises a method** (``pgolf audit``, ``audit.py``): ``EvalMethod.audit`` holds one
``AuditCase`` per row of the audit table, and the audit iterates the registry for them. A case names its row,
gives the method's settings at the audit's scale (``settings(audit_setup)``; the ``AuditSetup`` also reads record
configs: ``audit_setup.record("pr1321", "slot")``), and states what the method claims, which decides the checks:

* ``batch``: the settings field of the windows per forward, when the batch only changes speed; the audit then
  also runs one window per forward (D: batch invariance; F: a sequential run). Empty when the batch is part of
  the method (TTT's training batches, phased TTT's documents per batch).
* ``documents``: the method runs on a BOS-delimited document stream (the perturbations keep every BOS).
* ``isolated``: no information crosses a document boundary (check G).
* ``spans_documents``: the method's state carries from one document to the next (check H: the order its state is
  updated in must agree with the order it scores tokens in).

Every case gets A–F. During the pass the method reports to ``setup.recorder`` (``recording.py``) every
distribution it scores with (the full, normalized log-probabilities the metric is charged with, and the last
stream index any state behind them has read) and every state update it applies; the audit itself perturbs tokens,
watches every backward pass, and runs the method's compiled code paths eagerly. The audit's stream is 385 random
tokens of 40 ids in ten documents of 11-71 tokens, so a case's settings must make its state move there (a table of
order 16 would never fire on it: use a low order and threshold).

Example: PR #2135's online n-gram tilt (a hashed order-16 table updated in stream order, tilting the distribution
phased TTT scores, which scores documents longest first; the spec: ``shared/spec/frontier.md`` §5.2, §6 note B)
declares itself so (``ngram_tilt.py``)::

    METHODS = (
        EvalMethod("ngram_tilt", NgramTiltSettings, evaluate_ngram_tilt, "quantized_ttt_phased", "ttt_phased",
                   "phased score-first TTT with the online n-gram tilt (PR #2135)",
                   audit=(AuditCase("ngram_tilt", lambda a: NgramTiltSettings(...), documents=True,
                                    spans_documents=True),)),
    )

and reports the tilted log-probabilities (E: they sum to 1 and are what the metric was charged) with
``state_reads_upto`` = the largest of the adapters' reads and the table's (``j - 1`` for target ``j``): A and C
then hold in stream order, and H finds that no single order serves both (the table follows the stream, the
scoring follows document length).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from pgolf_lit.eval.context import ForwardOptions

# Every module that defines eval methods: the one place a method is listed (see the module docstring).
# The passes a config scores when it names none (``model.test_methods``): every record scores at least these.
DEFAULT_TEST_METHODS: tuple[str, ...] = ("standard", "sliding")

METHOD_MODULES: tuple[str, ...] = (
    "pgolf_lit.eval.windows",
    "pgolf_lit.eval.slot",
    "pgolf_lit.eval.ttt",
    "pgolf_lit.eval.phased_ttt",
    "pgolf_lit.eval.ngram_tilt",
)


@dataclass(frozen=True)
class PassSetup:
    """What every pass gets besides its own settings: the shared window geometry and how to run."""

    seq_len: int
    stride: int
    rank: int = 0
    world_size: int = 1
    options: ForwardOptions = ForwardOptions()
    progress: bool = False
    recorder: Any = None  # a ScoreRecorder (recording.py): the audit's and tests' view of the pass, else None


@dataclass(frozen=True)
class PassOutcome:
    """What a pass reports besides its scores: the compliance verdict and extra ``key:value`` result fields."""

    compliant: bool
    extra: dict[str, Any] = field(default_factory=dict)
    precompute: bool = False  # the pass did work before scoring (inside its eval_time), e.g. building a hint table
    details: Any = None  # what else the pass found, for its callers (phased TTT: its phases), never printed


@dataclass(frozen=True)
class AuditCase:
    """One row of the causality audit: the method with ``settings(audit_setup)`` and the claims that decide which
    checks apply (module docstring)."""

    name: str
    settings: Callable  # (AuditSetup) -> the method's settings at the audit's scale
    batch: str = ""
    documents: bool = False
    isolated: bool = False
    spans_documents: bool = False


@dataclass(frozen=True)
class EvalMethod:
    """A registered pass: ``run(model, tokens, metric, settings, setup) -> PassOutcome`` with ``settings`` an
    instance of ``settings``. ``quantized_label`` is its upstream result-line label when scoring an artifact
    (``{q}`` becomes the code width, e.g. ``final_{q}_roundtrip``); ``float_suffix`` follows ``pre-quantization``
    when scoring float weights."""

    name: str
    settings: type
    run: Callable
    quantized_label: str
    float_suffix: str
    needs: tuple = ()  # modules the pass needs beyond ``run``'s module and what that imports
    audit: tuple = ()  # AuditCase: the rows of ``pgolf audit``

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules that running this pass needs (``code_size.py`` counts them and everything they import)."""
        return (self.run.__module__, *self.needs)


_REGISTRY: dict[str, EvalMethod] = {}


def eval_methods() -> dict[str, EvalMethod]:
    """Every method that ``METHOD_MODULES`` declare (each module's ``METHODS``), by name, in that order; the modules
    are imported on the first call."""
    if not _REGISTRY:
        found: dict[str, EvalMethod] = {}
        for module in METHOD_MODULES:
            for method in importlib.import_module(module).METHODS:
                if method.name in found:
                    raise ValueError(f"eval method {method.name!r} is declared twice ({module})")
                found[method.name] = method
        _REGISTRY.update(found)
    return _REGISTRY
