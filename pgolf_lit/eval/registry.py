"""Evaluation methods by name. Each method registers itself, with its settings dataclass, in the file that
implements it (``windows.py``: standard, sliding; ``slot.py``: slot, causal_slot; ``ttt.py``: ttt;
``phased_ttt.py``: doc_isolated, phased_ttt), the way codecs sit in ``CODECS``; ``EvalSettings`` (``runner.py``)
gets one field per registered method, so a new method is one file plus one ``register_eval_method`` call (and its
import in ``pgolf_lit/eval/__init__.py``). A method's ``modules`` (its ``run``'s module, plus ``needs``) are what
an artifact's code size counts for it (``pgolf_lit/quant/code_size.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor, nn

from pgolf_lit.eval.context import ForwardOptions
from pgolf_lit.eval.recording import ScoreRecorder
from pgolf_lit.metrics import BitsPerByte


@dataclass(frozen=True)
class PassSetup:
    """What every pass gets besides its own settings: the shared window geometry and how to run."""

    seq_len: int
    stride: int
    rank: int = 0
    world_size: int = 1
    options: ForwardOptions = ForwardOptions()
    progress: bool = False
    recorder: Optional[ScoreRecorder] = None


@dataclass(frozen=True)
class PassOutcome:
    """What a pass reports besides its scores: the compliance verdict and extra ``key:value`` result fields."""

    compliant: bool
    extra: dict[str, Any] = field(default_factory=dict)
    precompute: bool = False  # the pass did work before scoring (inside its eval_time), e.g. building a hint table


RunFn = Callable[[nn.Module, Tensor, BitsPerByte, Any, PassSetup], PassOutcome]


@dataclass(frozen=True)
class EvalMethod:
    """A registered pass. ``quantized_label`` is its upstream result-line label when scoring an artifact
    (``{q}`` becomes the code width, e.g. ``final_{q}_roundtrip``); ``float_suffix`` follows
    ``pre-quantization`` when scoring float weights."""

    name: str
    settings: type
    run: RunFn
    quantized_label: str
    float_suffix: str
    description: str = ""
    needs: tuple[str, ...] = ()  # modules the pass needs beyond ``run``'s module and what that imports

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules that running this pass needs (``code_size.py`` counts them and everything they import)."""
        return (self.run.__module__, *self.needs)


EVAL_METHODS: dict[str, EvalMethod] = {}


def register_eval_method(method: EvalMethod) -> EvalMethod:
    if method.name in EVAL_METHODS:
        raise ValueError(f"eval method {method.name!r} is registered twice")
    EVAL_METHODS[method.name] = method
    return method
