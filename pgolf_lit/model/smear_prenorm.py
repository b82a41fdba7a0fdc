"""PR #65's SmearGate (records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd, ``SmearGate``): on the sum of
the token embedding and the BigramHash, *before* the embedding norm, x[t] ← g·x[t] + (1 − g)·x[t−1] with
g = σ(gate) per channel, gate initialised at 3 (σ(3) ≈ 0.95 of each token kept); position 0 mixes with zeros.
The PR #162 family's ``layers.SmearGate`` mixes after the norm, from gate 0. Counted code only for configs that
choose it (``COUNTED_WHEN``, quant/code_size.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf_lit.model.roles import control, declare_roles

COUNTED_WHEN = "smear_gate_form=prenorm"
GATE_INIT = 3.0


class PrenormSmearGate(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.full((dim,), GATE_INIT))
        declare_roles(self, gate=control("smear"))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype)
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return g * x + (1.0 - g) * prev
