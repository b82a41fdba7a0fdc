"""OvertoneInit (PR #60, records/track_10min_16mb/2026-03-19_SlidingWindow_FP16Emb_10L_MuonWD_OvertoneInit,
``GPT._init_weights``): before training, the tied embedding's singular values are reshaped to a power law,
``W ← U · diag(S[0] · k^-power) · Vᵀ`` (k = 1, 2, …; the record: power ½), keeping its singular vectors and its
largest singular value. An initialisation only: training-side, nothing of it is in the artifact or its code.

It runs at ``setup("fit")``, after the model's own init (the normal draw of ``tied_embed_init_std``) and before the
records' dtype policy casts the table to bf16 (the module's setup, after the callbacks'), as the record shapes the
fp32 draw before ``model.bfloat16()``; a resumed run's checkpoint is restored after it.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from pgolf_lit.errors import ConfigError


def overtone_spectrum(weight: Tensor, power: float = 0.5) -> Tensor:
    """``U · diag(S[0] · k^-power) · Vᵀ`` of ``weight`` (fp32 SVD, the record's ``torch.linalg.svd``)."""
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    target = s[0] * (1.0 / torch.arange(1, s.shape[0] + 1, dtype=s.dtype)) ** power
    return ((u * target[None, :]) @ vh).to(weight.dtype)


class OvertoneInit(Callback):
    def __init__(self, power: float = 0.5):
        """
        Args:
            power: the decay exponent of the singular values, S_k = S_1 · k^-power (PR #60: 0.5; no env var).
        """
        if not power > 0:
            raise ConfigError(f"OvertoneInit.power: must be positive, got {power}")
        self.power = power

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        model = pl_module.model
        if not model.config.tie_embeddings:
            raise ConfigError("OvertoneInit: shapes the tied embedding (PR #60); this config unties it")
        with torch.no_grad():
            model.tok_emb.weight.copy_(overtone_spectrum(model.tok_emb.weight, self.power))
