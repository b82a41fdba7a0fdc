"""The records' fused softcapped cross entropy (PR #1787, in PR #1855's ``GPT.forward`` with FUSED_CE_ENABLED=1;
spec leaderboard.md §3.9): the mean CE of c·tanh(z/c) computed from the pre-softcap logits z (bf16 under autocast)
in fp32 inside a Triton kernel, without an fp32 copy of the logits. Plain PyTorch + Triton.

Per row, in fp32: u_j = 2c·σ(2z_j/c) (= c·tanh(z_j/c) + c; the constant shift cancels in the CE),
lse = logsumexp_j u_j (one pass over vocab blocks with an online max/sum), loss = lse − u_target. Backward:
∂loss/∂z_j = g·(exp(u_j − lse) − 1[j = target])·4σ(2z_j/c)(1 − σ(2z_j/c)), σ recomputed per block; autograd saves
z, the targets and lse only. Rows whose target is ``ignore_index`` count as F.cross_entropy's do (loss 0, no
gradient, left out of the mean). Both passes are ``torch.library`` custom ops (with fakes), so torch.compile traces
them; they run wherever Triton runs: CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests).

liger-kernel 0.8.5's CE (softcap=) did not fit: it fails under TRITON_INTERPRET ('float' object has no attribute
'to') and writes the gradient into the logits in the forward instead of saving z and lse (the record's op).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # optional (the `kernels` extra): the package and its eager path import without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

__all__ = ["softcapped_cross_entropy", "triton_available"]
# Speed only, switched on by use_fused_kernels (model/fused_kernels.py; training; `pgolf test`'s TTT steps on CUDA).
# Evaluating an artifact (eval/artifact_eval.py) runs the eager path, the same function, so its counted code
# (quant/code_size.py) does not follow use_fused_kernels' import of this module.
TRAINING_ONLY = "a fused Triton kernel: the eager path computes the same function"


def triton_available() -> bool:
    return triton is not None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused softcapped CE needs triton (pip install 'pgolf-lit[kernels]')")


def _block_v(vocab: int) -> tuple[int, int]:
    """Vocab block and warps: 1024 (the record's block) on a GPU; 256 under the interpreter, which is slow per op."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return min(256, triton.next_power_of_2(vocab)), 1
    return min(1024, triton.next_power_of_2(vocab)), 4


if triton is not None:

    @triton.jit
    def _softcap_ce_fwd_kernel(
        z_ptr, y_ptr, loss_ptr, lse_ptr, V, stride_z, softcap, ignore_index, BLOCK_V: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        y = tl.load(y_ptr + row)
        # First block peeled: the running max starts at a real value (no -inf - -inf).
        cols = tl.arange(0, BLOCK_V)
        z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
        u = tl.where(cols < V, 2.0 * softcap * tl.sigmoid(2.0 * z / softcap), float("-inf"))
        m = tl.max(u, axis=0)
        s = tl.sum(tl.exp(u - m), axis=0)
        for start in range(BLOCK_V, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(z_row + cols, mask=cols < V, other=0.0).to(tl.float32)
            u = tl.where(cols < V, 2.0 * softcap * tl.sigmoid(2.0 * z / softcap), float("-inf"))
            m_new = tl.maximum(m, tl.max(u, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(u - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        valid = y != ignore_index
        z_y = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
        u_y = 2.0 * softcap * tl.sigmoid(2.0 * z_y / softcap)
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(valid, lse - u_y, 0.0))

    @triton.jit
    def _softcap_ce_bwd_kernel(
        z_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr, V, stride_z, stride_dz, softcap, ignore_index, BLOCK_V: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * stride_z
        dz_row = dz_ptr + row * stride_dz
        y = tl.load(y_ptr + row)
        lse = tl.load(lse_ptr + row)
        g = tl.where(y != ignore_index, tl.load(g_ptr + row), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(2.0 * z / softcap)
            p = tl.exp(2.0 * softcap * sig - lse)
            p = tl.where(cols == y, p - 1.0, p)
            dz = g * p * 4.0 * sig * (1.0 - sig)
            tl.store(dz_row + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _rows(z: Tensor) -> Tensor:
    return z if z.stride(-1) == 1 else z.contiguous()


def _softcapped_ce_launch(
    z: Tensor, targets: Tensor, losses: Tensor, lse: Tensor, softcap: float, ignore_index: int
) -> None:
    n, v = z.shape
    if n:
        block, warps = _block_v(v)
        _softcap_ce_fwd_kernel[(n,)](
            z,
            targets.contiguous(),
            losses,
            lse,
            v,
            z.stride(0),
            float(softcap),
            int(ignore_index),
            BLOCK_V=block,
            num_warps=warps,
        )


@torch.library.custom_op("pgolf::softcapped_ce", mutates_args=())
def _softcapped_ce(z: Tensor, targets: Tensor, softcap: float, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Per-row losses and logsumexps (fp32 [N] each) of the softcapped logits of z [N, V]."""
    _require_triton()
    z = _rows(z)
    losses = z.new_empty(z.size(0), dtype=torch.float32)
    lse = z.new_empty(z.size(0), dtype=torch.float32)
    _softcapped_ce_launch(z, targets, losses, lse, softcap, ignore_index)
    return losses, lse


@_softcapped_ce.register_fake
def _(z, targets, softcap, ignore_index):
    n = z.size(0)
    return z.new_empty(n, dtype=torch.float32), z.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("pgolf::softcapped_ce_backward", mutates_args=())
def _softcapped_ce_backward(
    grad: Tensor, z: Tensor, targets: Tensor, lse: Tensor, softcap: float, ignore_index: int
) -> Tensor:
    """dz [N, V] (z's dtype) from the gradient of the per-row losses."""
    _require_triton()
    z = _rows(z)
    n, v = z.shape
    dz = z.new_empty(z.shape)
    if n:
        block, warps = _block_v(v)
        _softcap_ce_bwd_kernel[(n,)](
            z,
            targets.contiguous(),
            lse.contiguous(),
            grad.float().contiguous(),
            dz,
            v,
            z.stride(0),
            dz.stride(0),
            float(softcap),
            int(ignore_index),
            BLOCK_V=block,
            num_warps=warps,
        )
    return dz


@_softcapped_ce_backward.register_fake
def _(grad, z, targets, lse, softcap, ignore_index):
    return z.new_empty(z.shape)  # contiguous rows, as the op


def _setup_context(ctx, inputs, output) -> None:
    z, targets, softcap, ignore_index = inputs
    _, lse = output
    ctx.save_for_backward(z, targets, lse)
    ctx.softcap, ctx.ignore_index = softcap, ignore_index
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_losses, grad_lse):
    z, targets, lse = ctx.saved_tensors
    dz = torch.ops.pgolf.softcapped_ce_backward(grad_losses, z, targets, lse, ctx.softcap, ctx.ignore_index)
    return dz, None, None, None


_softcapped_ce.register_autograd(_backward, setup_context=_setup_context)


def softcapped_cross_entropy(
    z: Tensor, targets: Tensor, softcap: float, reduction: str = "mean", ignore_index: int = -100
) -> Tensor:
    """``F.cross_entropy((softcap·tanh(z/softcap)).float(), targets)`` from the pre-softcap logits z [N, V]
    (any float dtype; the arithmetic is fp32), with the fused kernels. ``reduction``: mean, sum or none."""
    losses, _ = torch.ops.pgolf.softcapped_ce(z, targets, float(softcap), int(ignore_index))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    if reduction != "mean":
        raise ValueError(f"reduction: expected mean, sum or none, got {reduction!r}")
    return losses.sum() / (targets != ignore_index).sum()
