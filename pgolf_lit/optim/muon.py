"""Muon: momentum SGD whose update is orthogonalised by a Newton–Schulz iteration (spec/training.md §2.2–2.4).

Every record script uses the same algorithm; they differ only in decoupled weight decay (PR #1263 on) and in
MuonEq-R row normalisation of the update before the iteration (PR #1334 family, PR #1394). The numerics follow
the scripts operation by operation (bf16 iteration, bf16 shape scale, bf16 hand-off buffer), because the
acceptance fixtures compare eager results bit for bit.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# Quintic Newton–Schulz coefficients (a, b, c) of every script: fast to converge, not exactly orthogonal
# (singular values end in roughly [0.5, 1.2]), which is what the records trained with.
NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ROW_NORM_EPS = 1e-7


def zeropower_via_newtonschulz5(G: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximate the orthogonal factor of a 2-D ``G`` with ``steps`` quintic Newton–Schulz iterations in bf16.

    Returns a new bf16 tensor of G's shape (``G`` is never modified). The iteration works on the wide
    orientation, so the Gram matrix ``X Xᵀ`` is the smaller of the two squares. The operation order —
    including ``(c·A)·A`` rather than ``c·(A·A)`` — is part of the contract: in bf16 a different order gives
    different bits, and the fixtures compare eager outputs exactly.
    """
    a, b, c = NS5_COEFFICIENTS
    x = G.bfloat16()
    x = x / (x.norm() + eps)
    tall = G.size(0) > G.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.T if tall else x


@functools.cache
def _compiled_newtonschulz5() -> Callable[..., Tensor]:
    """The records run the iteration through ``torch.compile`` (inductor fuses the bf16 chain, so its bits
    differ from eager). Built once, on first use on a CUDA tensor, so CPU-only runs never invoke the compiler."""
    return torch.compile(zeropower_via_newtonschulz5)


def _newtonschulz(update: Tensor, steps: int, compile_cuda: bool) -> Tensor:
    if compile_cuda and update.is_cuda:
        return _compiled_newtonschulz5()(update, steps)
    return zeropower_via_newtonschulz5(update, steps)


def shape_scale(rows: int, cols: int) -> float:
    """sqrt(max(1, rows/cols)): tall matrices (MLP-in, the 128-wide projections) get a larger step."""
    return max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum, optional MuonEq-R and decoupled weight decay, rank-sharded under DDP.

    Per parameter ``W`` with gradient ``G``, momentum ``μ``, scheduled lr ``η`` and decay ``λ``::

        B ← μ·B + G;   U = G + μ·B (Nesterov) or B
        U_i ← U_i / max(‖U_i‖, 1e-7) for every row        (row_normalize, MuonEq-R)
        O = NS5(U) · sqrt(max(1, rows/cols))              (bf16)
        W ← W·(1 − η·λ);   W ← W − η·O

    The decay uses the scheduled lr, so it fades with the warmdown, and it is applied to every parameter of
    the group even when its ``.grad`` is None (that parameter gets a zero update but is still decayed).

    Distribution: when ``torch.distributed`` is initialised, parameter ``i`` of a group (list order) is owned
    by rank ``i % world_size``. Only the owner runs the row normalisation and the iteration; each rank writes
    its results into a zeroed bf16 buffer of the group's total size and one ``all_reduce(SUM)`` gives every
    rank every update (exactly one rank contributes each slice, so the sum is exact and the result equals a
    single-process step bit for bit). A single process goes through the same buffer.

    Momentum buffers are kept for every parameter on every rank (the scripts keep each only on its owner).
    The gradients are identical on all ranks after DDP's all-reduce, so the buffers are too; the extra cost
    is two foreach kernels per step, and it makes each rank's ``state_dict()`` complete: a checkpoint
    written by rank 0 resumes every rank exactly. The updates are the same either way.

    Param-group options: ``lr``, ``momentum``, ``backend_steps``, ``nesterov``, ``weight_decay``,
    ``row_normalize``, and ``base_lr`` (the unscheduled lr; defaults to the group's ``lr``) which the
    schedule multiplies every step. ``compile_cuda`` runs the iteration through ``torch.compile`` for CUDA
    tensors, as the records do; CPU tensors always take the eager path.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.95,
        backend_steps: int = 5,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        row_normalize: bool = False,
        compile_cuda: bool = True,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or backend_steps < 1:
            raise ValueError(
                f"Muon: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1, backend_steps >= 1 "
                f"(got lr={lr}, weight_decay={weight_decay}, momentum={momentum}, backend_steps={backend_steps})"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            nesterov=nesterov,
            weight_decay=weight_decay,
            row_normalize=row_normalize,
        )
        self.compile_cuda = compile_cuda
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
        if bad:
            self.param_groups.pop()
            raise ValueError(f"Muon: parameters must be 2-D matrices, got shapes {bad}")
        group.setdefault("base_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        rank = dist.get_rank() if distributed else 0
        for group in self.param_groups:
            params: list[Tensor] = group["params"]
            if not params:
                continue
            self._update_momentum(params, group["momentum"])
            flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.bfloat16, device=params[0].device)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    flat[offset : offset + p.numel()] = self._orthogonalized_update(p, group).reshape(-1)
                offset += p.numel()
            if world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            lr, wd = group["lr"], group["weight_decay"]
            offset = 0
            for p in params:
                if wd > 0:
                    p.mul_(1.0 - lr * wd)
                p.add_(flat[offset : offset + p.numel()].view_as(p).to(p.dtype), alpha=-lr)
                offset += p.numel()
        return loss

    def _update_momentum(self, params: list[Tensor], momentum: float) -> None:
        """B ← μ·B + G for every parameter that has a gradient (buffers start at zero, in the grad's dtype)."""
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        buffers = []
        for p in with_grad:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buffers.append(state["momentum_buffer"])
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, [p.grad for p in with_grad])

    def _orthogonalized_update(self, p: Tensor, group: dict) -> Tensor:
        """Steps 2–5 for one owned parameter: Nesterov, MuonEq-R, NS5, shape scale (bf16 result)."""
        grad, buf = p.grad, self.state[p]["momentum_buffer"]
        update = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        if group["row_normalize"]:
            row_norms = update.float().norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS)
            update = update / row_norms.to(update.dtype)
        out = _newtonschulz(update, group["backend_steps"], self.compile_cuda)
        return out.mul_(shape_scale(p.size(0), p.size(1)))
