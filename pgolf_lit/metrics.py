"""BitsPerByte: token cross entropy turned into bits per UTF-8 byte of the scored text (spec/evaluation.md §1.5).

Three float64 sums per process (nats, scored tokens, bytes), summed over ranks on ``compute``:
``val_loss = loss_sum / token_count`` and ``val_bpb = loss_sum / (ln 2 · byte_count)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torchmetrics import Metric


def target_bytes(prev_ids: Tensor, target_ids: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """UTF-8 bytes of each target given its previous token: base_bytes[t] + (leading space and prev not a boundary)."""
    base_bytes, has_leading_space, is_boundary = luts
    prev, tgt = prev_ids.long(), target_ids.long()
    return base_bytes[tgt].to(torch.int64) + (has_leading_space[tgt] & ~is_boundary[prev]).to(torch.int64)


class BitsPerByte(Metric):
    """Accumulate per-token negative log likelihoods (nats) with the byte counts of their targets.

    ``update(nll, prev_ids, target_ids)`` takes same-shaped tensors of the scored positions only.
    ``compute()`` returns ``{"loss": nats per token, "bpb": bits per byte}`` as float64 tensors.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, luts: Optional[tuple[Tensor, Tensor, Tensor]] = None, vocab_size: int = 0, **kwargs):
        """``luts`` from ``build_byte_luts``; or ``vocab_size`` alone to allocate them now and ``set_luts`` later
        (a LightningModule builds its metric before the datamodule has read the tokenizer)."""
        super().__init__(**kwargs)
        if luts is None:
            luts = (
                torch.zeros(vocab_size, dtype=torch.int16),
                torch.zeros(vocab_size, dtype=torch.bool),
                torch.ones(vocab_size, dtype=torch.bool),
            )
        base_bytes, has_leading_space, is_boundary = luts
        # LUTs are constants, not metric state: plain buffers so .to(device) moves them.
        self.register_buffer("base_bytes", base_bytes.clone(), persistent=False)
        self.register_buffer("has_leading_space", has_leading_space.clone(), persistent=False)
        self.register_buffer("is_boundary", is_boundary.clone(), persistent=False)
        self.add_state("loss_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("token_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("byte_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def set_luts(self, luts: tuple[Tensor, Tensor, Tensor]) -> None:
        base_bytes, has_leading_space, is_boundary = luts
        if base_bytes.numel() != self.base_bytes.numel():
            self.base_bytes = base_bytes.clone().to(self.base_bytes.device)
            self.has_leading_space = has_leading_space.clone().to(self.base_bytes.device)
            self.is_boundary = is_boundary.clone().to(self.base_bytes.device)
            return
        self.base_bytes.copy_(base_bytes)
        self.has_leading_space.copy_(has_leading_space)
        self.is_boundary.copy_(is_boundary)

    @property
    def luts(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.base_bytes, self.has_leading_space, self.is_boundary

    def update(self, nll: Tensor, prev_ids: Tensor, target_ids: Tensor) -> None:
        self.loss_sum += nll.detach().to(torch.float64).sum()
        self.token_count += nll.numel()
        self.byte_count += target_bytes(prev_ids, target_ids, self.luts).sum().to(torch.float64)

    def compute(self) -> dict[str, Tensor]:
        loss = self.loss_sum / self.token_count.clamp_min(1)
        bpb = self.loss_sum / (math.log(2.0) * self.byte_count.clamp_min(1))
        return {"loss": loss, "bpb": bpb}
