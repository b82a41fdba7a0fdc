"""Lightning callbacks for the record systems; attach them in YAML under ``trainer.callbacks``:

    - class_path: callbacks.EMA
      init_args: {decay: 0.997}

One technique per file: ema, swa, late_qat, wallclock (WallclockBudget), recurrence (RecurrenceActivation),
priming (CompilePriming), gptq_export (GPTQExport).
"""

from callbacks.ema import EMA
from callbacks.gptq_export import GPTQExport
from callbacks.late_qat import LateQAT
from callbacks.priming import CompilePriming
from callbacks.recurrence import RecurrenceActivation
from callbacks.swa import SWA
from callbacks.wallclock import WallclockBudget

__all__ = ["EMA", "SWA", "CompilePriming", "GPTQExport", "LateQAT", "RecurrenceActivation", "WallclockBudget"]
