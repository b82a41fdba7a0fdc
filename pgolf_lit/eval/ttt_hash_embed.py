"""PR #1529's TTT-time hash embedding: a table created at evaluation (zeros) and trained with the TTT weights.

Upstream (``eval_val_sliding_ttt``, HASH_EMBED_ENABLED=1, HASH_EMBED_SIZE=16384): every position adds the row
``(prev · 2039 + token) mod size`` of a [size, model_dim] fp32 table to the normed token embedding, before the
embedding projection; ``prev`` is the previous token of the same window (0 at its first position). It acts in both
the scoring and the training forwards of the pass, and its weight joins the TTT optimizer, clip and all-reduce.
Nothing of it is in the artifact: it starts from zeros every evaluation.

Here the row is added by a forward pre-hook on the model copy's ``embed_proj`` (an ``nn.Identity`` without
parameters is put there when the model has none), which sits exactly at that point of ``GPT.forward_hidden``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HASH_MULTIPLIER = 2039


def hash_indices(ids: Tensor, size: int) -> Tensor:
    """``(prev · 2039 + ids) mod size`` with ``prev`` the previous token of the row (0 at position 0)."""
    prev = torch.zeros_like(ids)
    prev[:, 1:] = ids[:, :-1]
    return (prev * HASH_MULTIPLIER + ids) % size


class TTTHashEmbedding(nn.Module):
    """The table, attached to (a TTT copy of) ``model``; ``wrap(forward)`` gives a forward that uses it."""

    def __init__(self, model: nn.Module, size: int):
        super().__init__()
        device = model.tok_emb.weight.device
        self.table = nn.Parameter(torch.zeros(size, model.config.model_dim, device=device))
        self._rows: Tensor | None = None  # this forward's rows, set by the wrapped forward
        if model.embed_proj is None:
            model.embed_proj = nn.Identity()
        model.embed_proj.register_forward_pre_hook(self._add_rows)

    def _add_rows(self, module: nn.Module, args: tuple) -> tuple:
        return (args[0] + self._rows,)

    def wrap(self, forward: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def with_hash(ids: Tensor) -> Tensor:
            self._rows = F.embedding(hash_indices(ids, self.table.size(0)), self.table)
            return forward(ids)

        return with_hash
