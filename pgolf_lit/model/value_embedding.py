"""Value embeddings (PR #1263 family ``ValueEmbedding``; upstream VE_ENABLED / VE_DIM / VE_LAYERS): a token table
projected to the KV width and added to the value projection of selected layers. Counted code only for configs
that switch it on (``COUNTED_WHEN``, quant/code_size.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pgolf_lit.model.layers import CastedLinear
from pgolf_lit.model.roles import control, declare_roles, embedding, matrix

COUNTED_WHEN = "ve_enabled"


class ValueEmbedding(nn.Module):
    """A token table projected to the KV width, added to the value projection of selected layers."""

    def __init__(self, vocab_size: int, dim: int, kv_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        declare_roles(self.embed, weight=embedding("other", "value_embedding"))
        nn.init.normal_(self.embed.weight, std=0.01)
        # Under the attention rule at export, like every ".proj." weight in the records.
        self.proj = (
            CastedLinear(dim, kv_dim, role=matrix("attn", "value_embedding"), output_proj=True)
            if dim != kv_dim
            else None
        )
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(0.1))
        declare_roles(self, scale=control("value_embedding"))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(ids)
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)
