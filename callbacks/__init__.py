"""Lightning callbacks for the record systems; attach them in YAML under ``trainer.callbacks``:

    - class_path: pgolf_lit.callbacks.EMA
      init_args: {decay: 0.997}

One technique per file: ema, swa, late_qat, wallclock (WallclockBudget), recurrence (RecurrenceActivation),
priming (CompilePriming), gptq_export (GPTQExport), overtone_init (OvertoneInit), resid_mix_init
(PhaseResidMixInit), progress (BudgetProgressBar, CompactModelSummary: attached
by ``pgolf fit`` itself).
"""

from .checkpoint import Checkpoint
from .ema import EMA
from .gptq_export import GPTQExport
from .late_qat import LateQAT
from .overtone_init import OvertoneInit
from .priming import CompilePriming
from .progress import BudgetProgressBar, CompactModelSummary
from .recurrence import RecurrenceActivation
from .resid_mix_init import PhaseResidMixInit
from .swa import SWA
from .wallclock import WallclockBudget

__all__ = [
    "BudgetProgressBar",
    "Checkpoint",
    "CompactModelSummary",
    "EMA",
    "SWA",
    "CompilePriming",
    "GPTQExport",
    "LateQAT",
    "OvertoneInit",
    "PhaseResidMixInit",
    "RecurrenceActivation",
    "WallclockBudget",
]
