"""BitsPerByte: token cross entropy turned into bits per UTF-8 byte of the scored text (upstream ``eval_val``).

Three float64 sums per process (nats, scored tokens, bytes), summed over ranks on ``compute``:
``val_loss = loss_sum / token_count`` and ``val_bpb = loss_sum / (ln 2 · byte_count)``.

Where the bytes come from: the tokenizer's byte LUTs (piece bytes + a leading space after a non-boundary token), or,
for a split with a byte sidecar (PR #1855's CaseOps data, whose pieces are of transformed text), the sidecar's
count of original bytes of the token at each stream position.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torchmetrics import Metric


def target_bytes(prev_ids: Tensor, target_ids: Tensor, luts: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """UTF-8 bytes of each target given its previous token: base_bytes[t] + (leading space and prev not a boundary)."""
    base_bytes, has_leading_space, is_boundary = luts
    prev, tgt = prev_ids.long(), target_ids.long()
    return base_bytes[tgt].to(torch.int64) + (has_leading_space[tgt] & ~is_boundary[prev]).to(torch.int64)


class ByteCounts(NamedTuple):
    """A split's byte accounting: the LUTs of ``build_byte_luts`` and, for CaseOps data, the per-token sidecar
    (int32 [N], entry p = original bytes of val token p), which then decides."""

    luts: tuple[Tensor, Tensor, Tensor]
    sidecar: Optional[Tensor] = None

    @property
    def source(self) -> str:
        return "sidecar" if self.sidecar is not None else "lut"


def as_byte_counts(value: Union[ByteCounts, tuple[Tensor, Tensor, Tensor]]) -> ByteCounts:
    return value if isinstance(value, ByteCounts) else ByteCounts(tuple(value))


class BitsPerByte(Metric):
    """Accumulate per-token negative log likelihoods (nats) with the byte counts of their targets.

    ``update(nll, prev_ids, target_ids, target_positions)`` takes same-shaped tensors of the scored positions only
    (``target_positions``: each target's index in the val stream, needed when a sidecar counts the bytes).
    ``compute()`` returns ``{"loss": nats per token, "bpb": bits per byte}`` as float64 tensors.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(
        self,
        luts: Optional[Union[ByteCounts, tuple[Tensor, Tensor, Tensor]]] = None,
        vocab_size: int = 0,
        **kwargs,
    ):
        """``luts`` from ``build_byte_luts`` (or a ``ByteCounts`` with a sidecar); or ``vocab_size`` alone to allocate
        them now and ``set_luts`` / ``set_sidecar`` later (a LightningModule builds its metric before the datamodule
        has read the tokenizer)."""
        super().__init__(**kwargs)
        sidecar = None
        if isinstance(luts, ByteCounts):
            luts, sidecar = luts.luts, luts.sidecar
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
        self.register_buffer("sidecar", torch.zeros(0, dtype=torch.int32), persistent=False)
        if sidecar is not None:
            self.set_sidecar(sidecar)
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

    def set_sidecar(self, sidecar: Optional[Tensor]) -> None:
        """Count bytes from a per-token sidecar from now on (None: back to the LUTs)."""
        device = self.base_bytes.device
        self.sidecar = torch.zeros(0, dtype=torch.int32, device=device) if sidecar is None else sidecar.to(device)

    @property
    def luts(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.base_bytes, self.has_leading_space, self.is_boundary

    @property
    def byte_source(self) -> str:
        """``sidecar`` or ``lut``: what the byte count of this metric is made of (printed in result lines)."""
        return "sidecar" if self.sidecar.numel() else "lut"

    def update(
        self, nll: Tensor, prev_ids: Tensor, target_ids: Tensor, target_positions: Optional[Tensor] = None
    ) -> None:
        self.loss_sum += nll.detach().to(torch.float64).sum()
        self.token_count += nll.numel()
        if self.sidecar.numel():
            if target_positions is None:
                raise ValueError("BitsPerByte: this split counts bytes from its sidecar; pass the targets' positions")
            nbytes = self.sidecar[target_positions.to(self.sidecar.device).long()].to(torch.int64)
        else:
            nbytes = target_bytes(prev_ids, target_ids, self.luts)
        self.byte_count += nbytes.sum().to(torch.float64)

    def compute(self) -> dict[str, Tensor]:
        loss = self.loss_sum / self.token_count.clamp_min(1)
        bpb = self.loss_sum / (math.log(2.0) * self.byte_count.clamp_min(1))
        return {"loss": loss, "bpb": bpb}
