"""Muon: momentum SGD whose update is orthogonalised by a Newton–Schulz iteration (upstream train_gpt.py
``Muon``, ``zeropower_via_newtonschulz5``).

Every record script uses the same algorithm; they differ in decoupled weight decay (PR #1263 on), in MuonEq-R
row normalisation of the update before the iteration (PR #1334 family, PR #1394), and, in PR #1855, in the
iteration's coefficients (Polar Express: one (a, b, c) per iteration) and a bf16 step (bf16 gradient and
momentum, the shape scale applied in the fp32 update). The numerics follow the scripts operation by operation,
because the acceptance fixtures compare eager results bit for bit.
"""

from __future__ import annotations

import functools
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

# Quintic Newton–Schulz coefficients (a, b, c) of every script: fast to converge, not exactly orthogonal
# (singular values end in roughly [0.5, 1.2]), which is what the records trained with.
NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ROW_NORM_EPS = 1e-7

# Polar Express (PR #1344, used by PR #1787/#1855 train_gpt.py ``_PE_COEFFS``): minimax-tuned (a, b, c) for each
# of the five iterations; the polar factor comes out with less spread (singular values ~0.86-1.14).
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
NS_COEFFICIENTS = ("ns5", "polar_express")
MOMENTUM_DTYPES = ("fp32", "bf16")


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
        # A contiguous copy: CPU bf16 matmul of a transposed view takes another kernel path with other
        # rounding (the tall fixtures differ on AVX-only hosts); the copy gives the fixtures' bits everywhere.
        x = x.T.contiguous()
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.T if tall else x


def zeropower_via_polar_express(G: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Polar Express Newton–Schulz, PR #1855 train_gpt.py ``zeropower_via_newtonschulz5``, in bf16.

    ``G`` is a matrix or a bank of matrices [B, rows, cols] (each orthogonalised on its own). Per matrix: bf16,
    transposed to the wide orientation, divided by (‖X‖_F + eps), then for each (a, b, c) of the first
    ``steps`` Polar Express tuples (all five when ``steps`` > 5, as the script's slice does):
    A = X·Xᵀ, B = b·A + c·(A·A), X = a·X + B·X. Returns bf16 of G's shape, no shape scale. The operation order
    (transpose before the norm, the batched norm over the last two dims, c·(A·A)) is the script's, so the
    bits are too.
    """
    flat = G.dim() == 2
    x = G.unsqueeze(0).bfloat16() if flat else G.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    coefficients = POLAR_EXPRESS_COEFFICIENTS
    if steps <= len(POLAR_EXPRESS_COEFFICIENTS):
        coefficients = POLAR_EXPRESS_COEFFICIENTS[:steps]
    for a, b, c in coefficients:
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if tall:
        x = x.mT
    return x.squeeze(0) if flat else x


def _ns5_any_rank(G: Tensor, steps: int) -> Tensor:
    """The quintic iteration on a matrix, or on each matrix of a bank."""
    if G.dim() == 2:
        return zeropower_via_newtonschulz5(G, steps)
    return torch.stack([zeropower_via_newtonschulz5(m, steps) for m in G])


ORTHOGONALIZERS: dict[str, Callable[[Tensor, int], Tensor]] = {
    "ns5": _ns5_any_rank,
    "polar_express": zeropower_via_polar_express,
}


@functools.cache
def _compiled(coefficients: str) -> Callable[..., Tensor]:
    """The records run the iteration through ``torch.compile`` (inductor fuses the bf16 chain, so its bits
    differ from eager). Built once, on first use on a CUDA tensor, so CPU-only runs never invoke the compiler."""
    return torch.compile(ORTHOGONALIZERS[coefficients])


def _newtonschulz(update: Tensor, steps: int, compile_cuda: bool, coefficients: str = "ns5") -> Tensor:
    if compile_cuda and update.is_cuda:
        return _compiled(coefficients)(update, steps)
    return ORTHOGONALIZERS[coefficients](update, steps)


def newton_schulz_cost(rows: int, cols: int) -> int:
    """rows·cols·min(rows, cols): the multiply-adds of one Newton–Schulz iteration on a rows×cols matrix, up to a
    constant (the Gram matrix X·Xᵀ and B·X on the wide orientation each cost min²·max)."""
    return rows * cols * min(rows, cols)


def balanced_owners(shapes: Sequence[tuple[int, int]], world: int) -> list[int]:
    """The rank that orthogonalises each matrix: longest processing time first.

    ``shapes`` are the (rows, cols) of the matrices in a fixed order (every rank passes the same list). Matrices
    are taken by ``newton_schulz_cost`` descending, ties in list order, and each goes to the rank with the least
    load so far, ties to the lowest rank; every rank computes the same answer. Greedy list scheduling keeps the
    largest load within one matrix's cost of the mean. The records assigned parameter ``i`` to rank
    ``i % world`` (PR #1394, round robin) or gave every rank an equal share of each bank (PR #1855).

    Max load / mean load at world 8 (``tests/optim/test_optim.py::test_balanced_owners_on_record_shapes``): the Muon
    group of PR #1394 and of PR #1855 (the same 66 matrices: 11 × c_q 512×512, c_k and c_v 256×512, attn.proj
    512×512, mlp.fc 2048×512, mlp.proj 512×2048): round robin over the parameters 1.091, balanced 1.004. Stored as
    PR #1855's four banks, round robin over the banks would give 3.048; balanced over their slices, 1.004.
    """
    if world < 1:
        raise ValueError(f"balanced_owners: world must be >= 1, got {world}")
    costs = [newton_schulz_cost(r, c) for r, c in shapes]
    loads = [0] * world
    owners = [0] * len(shapes)
    for k in sorted(range(len(shapes)), key=lambda k: -costs[k]):  # stable: equal costs keep list order
        rank = min(range(world), key=loads.__getitem__)  # the first (lowest) of the least loaded
        owners[k] = rank
        loads[rank] += costs[k]
    return owners


def shape_scale(rows: int, cols: int) -> float:
    """sqrt(max(1, rows/cols)): tall matrices (MLP-in, the 128-wide projections) get a larger step."""
    return max(1.0, rows / cols) ** 0.5


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum, optional MuonEq-R and decoupled weight decay, rank-sharded under DDP.

    Parameters are matrices or banks of matrices [B, rows, cols] (PR #1855's storage; each matrix of a bank is
    normalised, orthogonalised and scaled on its own, exactly as B separate matrices would be).

    Per parameter ``W`` with gradient ``G``, momentum ``μ``, scheduled lr ``η`` and decay ``λ``::

        B ← μ·B + G;   U = G + μ·B (Nesterov) or B
        U_i ← U_i / max(‖U_i‖, 1e-7) for every row        (row_normalize, MuonEq-R)
        O = NS5(U) · sqrt(max(1, rows/cols))              (bf16)
        W ← W·(1 − η·λ);   W ← W − η·O

    The decay uses the scheduled lr, so it fades with the warmdown, and it is applied to every parameter of
    the group even when its ``.grad`` is None (that parameter gets a zero update but is still decayed), unless
    ``skip_without_grad`` (PR #1855: such a parameter is left alone entirely).

    ``coefficients``: ``ns5`` (every record up to PR #1394) or ``polar_express`` (PR #1855). ``momentum_dtype``
    ``bf16`` is PR #1855's step: G is cast to bf16 first, the buffer is bf16, the Nesterov sum and row norm
    run in bf16, and the shape scale goes into the fp32 update (``W ← W − η·scale·O``) instead of into O.

    Distribution: when ``torch.distributed`` is initialised, every matrix of a group (a 2-D parameter, or one
    slice of a bank) has one owner, ``balanced_owners`` over the group's matrices in list order (balanced by
    Newton–Schulz cost, not round robin as the scripts). Only the owner runs the row normalisation and the
    iteration (a rank that owns several slices of a bank runs them as one batch); each rank writes its results
    into a zeroed bf16 buffer of the group's total size and one ``all_reduce(SUM)`` gives every rank every
    update (exactly one rank contributes each slice, so the sum is exact and the result equals a
    single-process step bit for bit, given that a matrix's iteration does not depend on the batch it runs in:
    tested on CPU). A single process owns everything and goes through the same buffer.

    Momentum buffers are kept for every parameter on every rank (the scripts keep each only on its owner).
    The gradients are identical on all ranks after DDP's all-reduce, so the buffers are too; the extra cost
    is two foreach kernels per step, and it makes each rank's ``state_dict()`` complete: a checkpoint
    written by rank 0 resumes every rank exactly. The updates are the same either way.

    ``grad_scale`` (a param-group option, default 1): the group's gradients are multiplied by it before the step
    (PR #1179/#1204's "split LR": ``bank.grad[:5].mul_(MATRIX_LR_EARLY / MATRIX_LR)`` after clipping; see
    ``groups.build_optimizers``).

    Param-group options: ``lr``, ``momentum``, ``backend_steps``, ``nesterov``, ``weight_decay``, ``grad_scale``,
    ``row_normalize``, ``coefficients``, ``momentum_dtype``, ``skip_without_grad``, and ``base_lr`` (the
    unscheduled lr; defaults to the group's ``lr``) which the schedule multiplies every step, and
    ``base_weight_decay`` (likewise, for the WD taper). ``compile_cuda``
    runs the iteration through ``torch.compile`` for CUDA tensors, as the records do; CPU tensors always take
    the eager path.
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
        coefficients: str = "ns5",
        momentum_dtype: str = "fp32",
        skip_without_grad: bool = False,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or backend_steps < 1:
            raise ValueError(
                f"Muon: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1, backend_steps >= 1 "
                f"(got lr={lr}, weight_decay={weight_decay}, momentum={momentum}, backend_steps={backend_steps})"
            )
        if coefficients not in NS_COEFFICIENTS or momentum_dtype not in MOMENTUM_DTYPES:
            raise ValueError(
                f"Muon: coefficients must be one of {NS_COEFFICIENTS} and momentum_dtype one of {MOMENTUM_DTYPES}, "
                f"got {coefficients!r}, {momentum_dtype!r}"
            )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            backend_steps=backend_steps,
            nesterov=nesterov,
            weight_decay=weight_decay,
            row_normalize=row_normalize,
            coefficients=coefficients,
            momentum_dtype=momentum_dtype,
            skip_without_grad=skip_without_grad,
        )
        self.compile_cuda = compile_cuda
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        bad = [tuple(p.shape) for p in group["params"] if p.ndim not in (2, 3)]
        if bad:
            self.param_groups.pop()
            raise ValueError(f"Muon: parameters must be 2-D matrices or 3-D banks of matrices, got shapes {bad}")
        group.setdefault("base_lr", group["lr"])
        group.setdefault("base_weight_decay", group["weight_decay"])  # the unscheduled decay (WD taper)

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
            bf16_step = group.get("momentum_dtype", "fp32") == "bf16"
            scale = group.get("grad_scale", 1.0)
            grads = {p: self._step_grad(p, bf16_step, scale) for p in params if p.grad is not None}
            self._update_momentum(grads, group["momentum"])
            flat = torch.zeros(sum(p.numel() for p in params), dtype=torch.bfloat16, device=params[0].device)
            offset = 0
            for p, owned in zip(params, self._owned_slices(params, world, rank)):
                if owned and p in grads:
                    out = flat[offset : offset + p.numel()].view_as(p)
                    if p.ndim == 2 or len(owned) == p.size(0):  # the whole matrix or bank
                        out.copy_(self._orthogonalized_update(p, grads[p], group))
                    else:  # some slices of a bank, as one batch
                        index = torch.tensor(owned, device=p.device)
                        out[index] = self._orthogonalized_update(p, grads[p], group, index)
                offset += p.numel()
            if world > 1:
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            lr, wd = group["lr"], group["weight_decay"]
            offset = 0
            for p in params:
                update = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
                if p not in grads and group.get("skip_without_grad", False):
                    continue
                if wd > 0:
                    p.mul_(1.0 - lr * wd)
                if bf16_step:  # PR #1855: p.add_(O, alpha=-lr·scale), the scale in fp32
                    p.add_(update, alpha=-lr * shape_scale(p.size(-2), p.size(-1)))
                else:
                    p.add_(update.to(p.dtype), alpha=-lr)
        return loss

    @staticmethod
    def _owned_slices(params: list[Tensor], world: int, rank: int) -> list[list[int]]:
        """Per parameter, the matrices ``rank`` orthogonalises: slice indices of a bank, [0] for a 2-D parameter."""
        matrices = [(i, j) for i, p in enumerate(params) for j in range(p.size(0) if p.ndim == 3 else 1)]
        owners = balanced_owners([tuple(params[i].shape[-2:]) for i, _ in matrices], world)
        owned: list[list[int]] = [[] for _ in params]
        for (i, j), owner in zip(matrices, owners):
            if owner == rank:
                owned[i].append(j)
        return owned

    @staticmethod
    def _step_grad(p: Tensor, bf16_step: bool, scale: float = 1.0) -> Tensor:
        """The gradient the step works with: bf16 in PR #1855's step (``g = p.grad.bfloat16()``), else as is; times
        the group's ``grad_scale`` first, in the gradient's dtype (PR #1204 scales the fp32 bank gradient in place)."""
        g = p.grad if scale == 1.0 else p.grad * scale
        return g.bfloat16() if bf16_step else g

    def _update_momentum(self, grads: dict[Tensor, Tensor], momentum: float) -> None:
        """B ← μ·B + G for every parameter that has a gradient (buffers start at zero, in G's dtype)."""
        if not grads:
            return
        buffers = []
        for p, g in grads.items():
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buffers.append(state["momentum_buffer"])
        if buffers[0].dtype == torch.bfloat16:
            # PR #1855's buf.mul_(μ).add_(g): the foreach kernels round μ to bf16 first (0.97 → 0.96875).
            for buf, g in zip(buffers, grads.values()):
                buf.mul_(momentum).add_(g)
            return
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, list(grads.values()))

    def _orthogonalized_update(self, p: Tensor, grad: Tensor, group: dict, index: Optional[Tensor] = None) -> Tensor:
        """Steps 2–5 for one owned parameter (or the bank slices ``index``): Nesterov, MuonEq-R, Newton–Schulz, and
        (except in the bf16 step, which scales in the fp32 update) the shape scale. bf16 result."""
        buf = self.state[p]["momentum_buffer"]
        update = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        if index is not None:
            update = update[index]
        if group["row_normalize"]:
            row_norms = update.float().norm(dim=-1, keepdim=True).clamp_min(ROW_NORM_EPS)
            update = update / row_norms.to(update.dtype)
        out = _newtonschulz(update, group["backend_steps"], self.compile_cuda, group.get("coefficients", "ns5"))
        if group.get("momentum_dtype", "fp32") == "bf16":
            return out
        return out.mul_(shape_scale(p.size(-2), p.size(-1)))
