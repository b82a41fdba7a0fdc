"""The multi-token-prediction loss (PR #1263 family; upstream MTP_NUM_HEADS / MTP_LOSS_WEIGHT): head k predicts the
token k+1 positions after the main target. A training loss only (the heads are never exported); counted code only
for configs that have heads (``COUNTED_WHEN``, quant/code_size.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

COUNTED_WHEN = "mtp_num_heads"


def mtp_loss(heads: nn.ModuleList, z: Tensor, targets: Tensor, softcap: float) -> Tensor:
    """Mean over the heads of the softcapped cross entropy of head k against ``targets`` shifted by k + 1."""
    losses = []
    for k, head in enumerate(heads):
        valid = z.size(1) - (k + 1)
        if valid <= 0:
            continue
        logits = softcap * torch.tanh(head(z[:, :valid]) / softcap)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets[:, k + 1 :].reshape(-1)))
    return torch.stack(losses).mean() if losses else z.new_zeros(())
