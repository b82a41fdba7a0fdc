"""The records' fused LeakyReLU² MLP (PR #1530 on; PR #1855 ``MLP.forward`` when training with ``use_fused``;
spec leaderboard.md §9): out = leaky_relu(x·W_upᵀ, slope)²·W_downᵀ, where one Triton matmul kernel computes the
up-projection and applies leaky-relu and the square in its epilogue, saving pre = x·W_upᵀ for the backward. The
backward runs the same kernel on g·W_down with the derivative epilogue
d_pre = (g·W_down) ⊙ (pre > 0 ? 2·pre : 2·slope²·pre)  (slope 0.5: 0.5·pre),
then dW_up = d_preᵀ·x and dx = d_pre·W_up; the down projection and its gradients stay torch matmuls. Plain
PyTorch + Triton. Both passes are ``torch.library`` custom ops (with fakes) so torch.compile traces them; they run
wherever Triton runs: CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (the tests).

The epilogue works on the fp32 accumulator: act is rounded once to the compute dtype (eager bf16 rounds pre, then
the square), d_pre likewise. Tiles (``_tiles``): (128, 256, 64) for 16-bit inputs on sm90+ (PR #2135's; #1855 used
(256, 128, 64)), smaller elsewhere, small under the interpreter.
liger-kernel 0.8.5 did not fit: its ReLU² is elementwise (no leaky slope, no matmul epilogue), its fused MLP SwiGLU.
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

__all__ = ["fused_leaky_relu2_mlp", "triton_available"]
# Speed only, switched on by use_fused_kernels (model/fused_kernels.py; training; `pgolf test`'s TTT steps on CUDA).
# Evaluating an artifact (eval/artifact_eval.py) runs the eager path, the same function, so its counted code
# (quant/code_size.py) does not follow use_fused_kernels' import of this module.
TRAINING_ONLY = "a fused Triton kernel: the eager path computes the same function"


def triton_available() -> bool:
    return triton is not None


def _require_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused LeakyReLU² MLP needs triton (pip install 'pgolf-lit[kernels]')")


def _tiles(a: Tensor, n: int, k: int) -> dict:
    """BLOCK_M/N/K, warps and stages for C[M, n] = A[M, k]·Bᵀ on A's device."""
    m = a.size(0)
    if os.environ.get("TRITON_INTERPRET") == "1" or a.device.type != "cuda":
        # The interpreter runs every program in numpy: few, small tiles (>= 16, tl.dot's minimum on a GPU).
        def fit(d: int, cap: int) -> int:
            return max(16, min(cap, triton.next_power_of_2(d)))

        # bf16 operands go to tl.dot as fp32 there (UPCAST): exact products, fp32 sums, as a GPU's bf16 MMA.
        return dict(
            BLOCK_M=fit(m, 32),
            BLOCK_N=fit(n, 64),
            BLOCK_K=fit(k, 32),
            GROUP_M=4,
            num_warps=1,
            num_stages=1,
            UPCAST=True,
        )
    major, _ = torch.cuda.get_device_capability(a.device)
    if a.element_size() == 2 and major >= 9:  # bf16/fp16 on Hopper (sm90 smem: 3 stages × 48 KiB)
        return dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3, UPCAST=False)
    if a.element_size() == 2:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3, UPCAST=False)
    return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2, UPCAST=False)


if triton is not None:

    @triton.jit
    def _linear_leaky_relu2_kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        aux_ptr,
        M,
        N,
        K,
        stride_am,
        stride_ak,
        stride_bn,
        stride_bk,
        stride_cm,
        stride_cn,
        stride_xm,
        stride_xn,
        slope,
        BACKWARD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
        UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
    ):
        """acc = A[M, K]·B[N, K]ᵀ in fp32. Forward: aux ← acc (pre), c ← leaky(acc, slope)². Backward: aux holds
        pre, c ← acc ⊙ d(leaky(pre)²)/d pre."""
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n  # grouped launch order: neighbouring programs share A rows in L2
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - kk * BLOCK_K
            a = tl.load(a_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
            b = tl.load(b_ptrs, mask=(offs_n[None, :] < N) & (offs_k[:, None] < k_left), other=0.0)
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        rows = offs_m[:, None].to(tl.int64)
        c_ptrs = c_ptr + rows * stride_cm + offs_n[None, :] * stride_cn
        x_ptrs = aux_ptr + rows * stride_xm + offs_n[None, :] * stride_xn
        if BACKWARD:
            pre = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            d = tl.where(pre > 0, 2.0 * pre, 2.0 * slope * slope * pre)
            tl.store(c_ptrs, (acc * d).to(c_ptr.dtype.element_ty), mask=mask)
        else:
            h = tl.where(acc > 0, acc, slope * acc)
            tl.store(x_ptrs, acc.to(aux_ptr.dtype.element_ty), mask=mask)
            tl.store(c_ptrs, (h * h).to(c_ptr.dtype.element_ty), mask=mask)


def _launch(a: Tensor, b: Tensor, aux: Tensor, out: Tensor, slope: float, backward: bool) -> None:
    """out[M, N] (and aux in the forward) from A [M, K] and B [N, K] (any strides)."""
    m, k = a.shape
    n = b.size(0)
    if m == 0 or n == 0:
        return
    tiles = _tiles(a, n, k)
    grid = (triton.cdiv(m, tiles["BLOCK_M"]) * triton.cdiv(n, tiles["BLOCK_N"]),)
    _linear_leaky_relu2_kernel[grid](
        a,
        b,
        out,
        aux,
        m,
        n,
        k,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        out.stride(1),
        aux.stride(0),
        aux.stride(1),
        float(slope),
        BACKWARD=backward,
        **tiles,
        # fp32 operands: TF32 exactly when torch's fp32 matmuls use it (the records' CompileSettings.tf32)
        INPUT_PRECISION=None if a.element_size() == 2 else "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee",
    )


@torch.library.custom_op("pgolf::leaky_relu2_mlp", mutates_args=())
def _leaky_relu2_mlp(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float) -> tuple[Tensor, Tensor, Tensor]:
    """(out, pre, act) for x [M, D], W_up [H, D], W_down [D, H], all of one dtype; pre and act are kept for the
    backward only."""
    _require_triton()
    m, h = x.size(0), w_up.size(0)
    pre = x.new_empty(m, h)
    act = x.new_empty(m, h)
    _launch(x, w_up, pre, act, slope, backward=False)
    return act @ w_down.t(), pre, act


@_leaky_relu2_mlp.register_fake
def _(x, w_up, w_down, slope):
    m, h = x.size(0), w_up.size(0)
    return x.new_empty(m, w_down.size(0)), x.new_empty(m, h), x.new_empty(m, h)


@torch.library.custom_op("pgolf::leaky_relu2_mlp_backward", mutates_args=())
def _leaky_relu2_mlp_backward(
    grad: Tensor, x: Tensor, w_up: Tensor, w_down: Tensor, pre: Tensor, act: Tensor, slope: float
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dW_up, dW_down) from the gradient of out [M, D]."""
    _require_triton()
    grad = grad.to(x.dtype)
    d_pre = torch.empty_like(pre)
    _launch(grad, w_down.t(), pre, d_pre, slope, backward=True)  # (g·W_down) ⊙ d leaky²/d pre, fused
    return d_pre @ w_up, d_pre.t() @ x, grad.t() @ act


@_leaky_relu2_mlp_backward.register_fake
def _(grad, x, w_up, w_down, pre, act, slope):
    return x.new_empty(x.shape), w_up.new_empty(w_up.shape), w_down.new_empty(w_down.shape)  # contiguous, as the op


def _setup_context(ctx, inputs, output) -> None:
    x, w_up, w_down, slope = inputs
    _, pre, act = output
    ctx.save_for_backward(x, w_up, w_down, pre, act)
    ctx.slope = slope
    ctx.mark_non_differentiable(pre, act)


def _backward(ctx, grad_out, grad_pre, grad_act):
    x, w_up, w_down, pre, act = ctx.saved_tensors
    dx, dw_up, dw_down = torch.ops.pgolf.leaky_relu2_mlp_backward(grad_out, x, w_up, w_down, pre, act, ctx.slope)
    return dx, dw_up, dw_down, None


_leaky_relu2_mlp.register_autograd(_backward, setup_context=_setup_context)


def fused_leaky_relu2_mlp(x: Tensor, w_up: Tensor, w_down: Tensor, slope: float = 0.5) -> Tensor:
    """leaky_relu(x·W_upᵀ, slope)²·W_downᵀ for x [..., D] with the fused kernels, in the autocast dtype when
    autocast is on (as the eager CastedLinear path), else in x's dtype; W_up [H, D], W_down [D, H]."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.size(-1)).to(dtype)
    out, _, _ = torch.ops.pgolf.leaky_relu2_mlp(x2, w_up.to(dtype), w_down.to(dtype), float(slope))
    return out.reshape(*lead, out.size(-1))
