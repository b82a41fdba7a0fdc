"""PR #65's BigramHash form (records/track_10min_16mb/2026-03-19_smeargate_orthoinit_muonwd, ``BigramHash``): the
pair (previous, current) token hashed as ``(prev · 92821 + cur) mod n`` with ``prev = 0`` before the first token,
looked up in an N(0, 0.01) table and projected to the model width by a zero-initialised matrix, with no learned
output scale (one parameter fewer than the PR #162 family's ``layers.BigramHash``). Counted code only for configs
that choose it (``COUNTED_WHEN``, quant/code_size.py)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_lit.model.layers import CastedLinear
from pgolf_lit.model.roles import declare_roles, embedding, matrix

COUNTED_WHEN = "bigram_sum_hash"
HASH_MULTIPLIER = 92821


def sum_hash(ids: Tensor, table_size: int) -> Tensor:
    """(prev · 92821 + cur) mod table_size per position, prev = 0 at position 0."""
    prev = F.pad(ids[..., :-1], (1, 0))
    return (prev.long() * HASH_MULTIPLIER + ids.long()) % table_size


class SumBigramHash(nn.Module):
    def __init__(self, table_size: int, dim: int, model_dim: int, trigram: bool = False):  # trigram: never (checked)
        super().__init__()
        self.table_size = table_size
        self.embed = nn.Embedding(table_size, dim)
        declare_roles(self.embed, weight=embedding("other", "bigram"))
        nn.init.normal_(self.embed.weight, std=0.01)
        self.proj = CastedLinear(dim, model_dim, role=matrix("attn", "bigram"), zero_init=True)

    def forward(self, ids: Tensor) -> Tensor:
        return self.proj(self.embed(sum_hash(ids, self.table_size)))
