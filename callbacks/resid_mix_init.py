"""PhaseResidMixInit (PR #60's "phase-transition resid_mix", ``GPT._init_weights``): before training, block i of L
starts its residual mix at ``resid_mix[0] = σ(k · (i / (L − 1) − ½))`` (the weight of the residual stream) and
``resid_mix[1] = 1 − resid_mix[0]`` (the weight of x0) on every channel, k = 3: early layers lean on the embedding,
late ones on the residual. The baseline starts every block at (1, 0). An initialisation only: training-side.
Runs at ``setup("fit")``, before a resumed run's checkpoint is restored.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.callbacks import Callback

from pgolf_lit.errors import ConfigError


def phase(layer: int, num_layers: int, sharpness: float = 3.0) -> float:
    """σ(sharpness · (layer / max(L − 1, 1) − ½)), in fp32 as the record's ``torch.sigmoid(torch.tensor(...))``."""
    return float(torch.sigmoid(torch.tensor(sharpness * (layer / max(num_layers - 1, 1) - 0.5))))


class PhaseResidMixInit(Callback):
    def __init__(self, sharpness: float = 3.0):
        """
        Args:
            sharpness: k of σ(k · (i/(L−1) − ½)) (PR #60: 3.0; no env var).
        """
        if not math.isfinite(sharpness):
            raise ConfigError(f"PhaseResidMixInit.sharpness: must be finite, got {sharpness}")
        self.sharpness = sharpness

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        blocks = pl_module.model.blocks
        with torch.no_grad():
            for i, block in enumerate(blocks):
                p = phase(i, len(blocks), self.sharpness)
                block.resid_mix[0].fill_(p)
                block.resid_mix[1].fill_(1 - p)
