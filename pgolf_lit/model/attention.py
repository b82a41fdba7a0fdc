"""Grouped-query causal self-attention with QK RMSNorm, (partial) RoPE with the length rescale, a learned
per-head q gain, optional XSA (projection removal), the VRL value residual (``CausalSelfAttention`` of upstream
train_gpt.py, PR #1263 and PR #1321), PR #1855's sparse per-head output gate, variable-length
(document-restricted) attention over packed rows, and the hooks of per-document LoRA adapters. Plain PyTorch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_lit.model.layers import CastedLinear, rms_norm
from pgolf_lit.model.roles import control, declare_roles, matrix


def _round_to_bf16(x: Tensor) -> Tensor:
    """fp32 values rounded to the nearest bf16 (ties to even), kept in fp32, for finite x. Integer bit arithmetic:
    torch.compile drops a plain ``x.bfloat16().float()`` round trip (inductor computes it in fp32)."""
    bits = x.view(torch.int32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) & -65536).view(torch.float32)


class Rotary(nn.Module):
    """cos/sin tables for the first ``rope_dims`` dims of a head, "half-split" pairing (i, i + rope_dims/2).

    With ``train_seq_len > 0`` a sequence longer than it uses the base ``base·(T/train_seq_len)^(rd/(rd-2))``
    (the records' length rescale: Family A hard-codes train_seq_len 1024, Family B uses TRAIN_SEQ_LEN).

    The records cast the whole model with ``.bfloat16()``, the rotary's non-persistent ``inv_freq`` buffer
    included, and keep it so: ``inv_freq_dtype="bf16"`` rounds the unscaled frequencies to bf16 as that cast does
    (the rescaled ones are computed afresh in fp32 there, so they stay fp32). The scripts before PR #1855 then
    build the table from ``arange(T, dtype=inv_freq.dtype)``, i.e. bf16 positions: ``positions_dtype="bf16"``
    rounds the positions (on the unscaled path only) and multiplies in fp32, as their compiled graphs do (in
    eager mode they also round each angle to bf16; checked with CPU inductor, not on a GPU). PR #1855 takes
    ``inv_freq.float()`` and fp32 positions. The table itself is fp32; the attention casts it to q's dtype.
    """

    def __init__(
        self,
        rope_dims: int,
        base: float = 10000.0,
        train_seq_len: int = 0,
        inv_freq_dtype: str = "fp32",
        positions_dtype: str = "fp32",
    ):
        super().__init__()
        for name, value in (("inv_freq_dtype", inv_freq_dtype), ("positions_dtype", positions_dtype)):
            if value not in ("fp32", "bf16"):
                raise ValueError(f"Rotary {name}: expected 'fp32' or 'bf16', got {value!r}")
        self.rope_dims = rope_dims
        self.base = base
        self.train_seq_len = train_seq_len
        self.positions_bf16 = positions_dtype == "bf16"
        inv_freq = self._inv_freq(base)
        if inv_freq_dtype == "bf16":
            inv_freq = inv_freq.bfloat16().float()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _inv_freq(self, base: float, device=None) -> Tensor:
        rd = self.rope_dims
        return 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        rescaled = bool(self.train_seq_len and seq_len > self.train_seq_len)
        if rescaled:
            rd = self.rope_dims
            base = self.base * (seq_len / self.train_seq_len) ** (rd / (rd - 2))
            inv_freq = self._inv_freq(base, self.inv_freq.device)
        else:  # at least fp32 (a bf16 cast of the module rounds the values, not the arithmetic; fp64 stays)
            inv_freq = self.inv_freq.to(torch.promote_types(self.inv_freq.dtype, torch.float32))
        if self.positions_bf16 and not rescaled:
            t = _round_to_bf16(torch.arange(seq_len, device=inv_freq.device, dtype=torch.float32)).to(inv_freq.dtype)
        else:
            t = torch.arange(seq_len, device=inv_freq.device, dtype=inv_freq.dtype)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, rope_dims: int) -> Tensor:
    """Rotate the first ``rope_dims`` dims of x [B,T,H,D]: (a, b) → (a·cos + b·sin, b·cos − a·sin)."""
    if rope_dims < x.size(-1):
        x_rope, x_pass = x[..., :rope_dims], x[..., rope_dims:]
    else:
        x_rope, x_pass = x, None
    half = rope_dims // 2
    a, b = x_rope[..., :half], x_rope[..., half:]
    out = torch.cat((a * cos + b * sin, a * (-sin) + b * cos), dim=-1)
    return out if x_pass is None else torch.cat((out, x_pass), dim=-1)


def _import_flash_attn(name: str) -> Optional[Callable[..., Any]]:
    try:
        module = __import__("flash_attn_interface")
    except ImportError:
        return None
    return getattr(module, name, None)


# FA3's kernels (package ``flash_attn_interface``, Hopper wheels) or None. Resolved at import, as the records do,
# so a compiled model sees plain globals (torch.compile cannot trace an import).
FLASH_ATTN: Optional[Callable[..., Any]] = _import_flash_attn("flash_attn_func")
FLASH_ATTN_VARLEN: Optional[Callable[..., Any]] = _import_flash_attn("flash_attn_varlen_func")

# Which kernel computes attention (the same function on every backend): ``auto`` = FA3 for CUDA bf16/fp16 inputs
# when it is installed (the records' kernel, native GQA), else SDPA; ``fa3`` always FA3 (an error without it);
# ``sdpa`` = torch's SDPA with ``enable_gqa`` (it picks the fastest kernel that supports the shapes); ``math`` =
# SDPA's reference math kernel with K/V repeated per query head.
ATTENTION_BACKENDS = ("auto", "fa3", "sdpa", "math")


@dataclass
class PackedSegments:
    """The documents of one packed row [1, N]: causal attention stays inside each [cu[s], cu[s+1]).

    ``cu_seqlens`` are int32 boundaries starting at 0 and ending at N, padded with N (empty segments), as
    ``pgolf_lit.data.packing.build_cu_seqlens`` (PR #1855 train_gpt.py ``_build_cu_seqlens``) makes them;
    ``max_seqlen`` is the longest segment (only FA3 reads it, as a hint).
    """

    cu_seqlens: Tensor
    max_seqlen: int
    total_len: int
    _bounds: Optional[list[tuple[int, int]]] = field(default=None, repr=False)

    @classmethod
    def build(cls, cu_seqlens: Tensor, max_seqlen: int, ids: Tensor) -> "PackedSegments":
        """Check the layout against the row ``ids`` [1, N] and move the boundaries to its device."""
        if ids.dim() != 2 or ids.size(0) != 1:
            raise ValueError(f"cu_seqlens needs one packed row of shape [1, N], got input shape {tuple(ids.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
            raise ValueError(
                f"cu_seqlens must be a 1-D int32 tensor of at least 2 boundaries, got {cu_seqlens.dtype} "
                f"{tuple(cu_seqlens.shape)}"
            )
        return cls(cu_seqlens.to(ids.device, non_blocking=True), int(max_seqlen), ids.size(1))

    def bounds(self) -> list[tuple[int, int]]:
        """The non-empty segments as host (start, end) pairs (one device sync, then cached)."""
        if self._bounds is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    "packed rows (cu_seqlens) in a compiled model need FA3 (flash_attn_interface) on CUDA bf16/fp16; "
                    "without it set model.compile false (the SDPA fallback reads the boundaries on the host)"
                )
            cu = self.cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != self.total_len or any(b < a for a, b in zip(cu, cu[1:])):
                raise ValueError(
                    f"cu_seqlens must rise from 0 to the row length {self.total_len} (padded with it), got "
                    f"{cu[:4]}...{cu[-2:]}"
                )
            self._bounds = [(a, b) for a, b in zip(cu, cu[1:]) if b > a]
        return self._bounds


def _sdpa(q: Tensor, k: Tensor, v: Tensor, math: bool) -> Tensor:
    """Causal SDPA on [B, T, H, D] / [B, T, Hkv, D]; ``math``: the reference kernel on K/V repeated per head."""
    if math:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        groups = q.size(-2) // k.size(-2)
        k, v = k.repeat_interleave(groups, dim=-2), v.repeat_interleave(groups, dim=-2)
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            ).transpose(1, 2)
    return F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=k.size(-2) != q.size(-2)
    ).transpose(1, 2)


def _use_fa3(q: Tensor, backend: str, kernel: Optional[Callable[..., Any]]) -> bool:
    if backend == "fa3":
        if kernel is None:
            raise RuntimeError("attention_backend fa3: flash_attn_interface (FA3) is not installed")
        return True
    return backend == "auto" and kernel is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16)


def causal_attention(
    q: Tensor, k: Tensor, v: Tensor, segments: Optional[PackedSegments] = None, backend: str = "auto"
) -> Tensor:
    """Causal GQA attention on [B, T, H, D] queries and [B, T, Hkv, D] keys/values, scale 1/sqrt(D).

    Without ``segments`` every row is one sequence (SDPA). With them (B = 1) attention stays inside each document
    segment: FA3's varlen kernel when it is installed and the inputs are CUDA bf16/fp16 (PR #1855 train_gpt.py
    ``CausalSelfAttention.forward``), else SDPA per segment (the same function; it syncs once to read the
    boundaries, so a compiled fullgraph model needs FA3 for packed rows).
    """
    math = backend == "math"
    if segments is None:
        if _use_fa3(q, backend, FLASH_ATTN):
            out = FLASH_ATTN(q, k, v, causal=True)
            return out[0] if isinstance(out, tuple) else out
        return _sdpa(q, k, v, math)
    if _use_fa3(q, backend, FLASH_ATTN_VARLEN):
        cu, n = segments.cu_seqlens, segments.max_seqlen
        out = FLASH_ATTN_VARLEN(
            q[0], k[0], v[0], cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=n, max_seqlen_k=n, causal=True
        )
        return (out[0] if isinstance(out, tuple) else out)[None]
    pieces = [_sdpa(q[:, a:b], k[:, a:b], v[:, a:b], math) for a, b in segments.bounds()]
    return torch.cat(pieces, dim=1)


def remove_self_value(y: Tensor, v: Tensor) -> Tensor:
    """XSA: subtract from each head's output its component along its own position's normalised value vector.

    y [B,T,H,D], v [B,T,Hkv,D]; query heads are grouped onto KV heads as in the attention (GQA).
    """
    B, T, H, D = y.shape
    hkv = v.size(-2)
    y_g = y.reshape(B, T, hkv, H // hkv, D)
    vn = F.normalize(v, dim=-1).unsqueeze(-2)
    return (y_g - (y_g * vn).sum(dim=-1, keepdim=True) * vn).reshape(B, T, H, D)


class CausalSelfAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        *,
        rope_dims: int,
        qk_gain_init: float,
        xsa: bool = False,
        vrl_gate: bool = False,
        sparse_gate_window: int = 0,
        sparse_gate_scale: float = 1.0,
        sparse_gate_init_std: float = 0.0,
        sparse_gate_gain: float = 1.0,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.backend = "auto"  # set by GPT.set_attention_backend (a runtime choice, not part of the config)
        kv_dim = num_kv_heads * self.head_dim
        self.rope_dims = rope_dims or self.head_dim
        self.xsa = xsa
        self.q_gain = nn.Parameter(torch.full((num_heads,), float(qk_gain_init)))
        # 0-d gate σ(-1.5) ≈ 0.18 mixing the first block's raw V into this block's V (VRL; not in block 0)
        self.vrl_gate = nn.Parameter(torch.tensor(-1.5)) if vrl_gate else None
        declare_roles(self, q_gain=control(), vrl_gate=control("vrl"))
        self.c_q = CastedLinear(dim, dim, role=matrix("attn", "attention"))
        self.c_k = CastedLinear(dim, kv_dim, role=matrix("attn", "attention"))
        self.c_v = CastedLinear(dim, kv_dim, role=matrix("attn", "attention"))
        self.proj = CastedLinear(dim, dim, role=matrix("attn", "attention"), zero_init=True, output_proj=True)
        # SparseAttnGate (PR #1787/#1855): per-head output gate from the first `window` input channels; gain 2 is
        # PR #1667's attention-output gate 2·σ(W·x[:12]), transparent at its zero init.
        self.sparse_gate_scale = sparse_gate_scale
        self.sparse_gate_gain = sparse_gate_gain
        self.attn_gate_w: Optional[nn.Parameter] = None
        if sparse_gate_window:
            self.attn_gate_w = nn.Parameter(torch.zeros(num_heads, sparse_gate_window))
            if sparse_gate_init_std > 0:
                nn.init.normal_(self.attn_gate_w, mean=0.0, std=sparse_gate_init_std)
        # quant "gate": int8 per row under an export `gate` rule (PR #1855's QuantGate), else kept as a float.
        declare_roles(self, attn_gate_w=control("sparse_attn_gate", quant="gate"))

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        ve: Tensor | None = None,
        v_first: Tensor | None = None,
        segments: Optional[PackedSegments] = None,
        adapter: Any = None,
    ) -> tuple[Tensor, Tensor]:
        """Return (output [B,T,D], raw value projection c_v(x) [B,T,kv_dim] for VRL).

        ``rope`` is the (cos, sin) pair of the model's Rotary for this sequence length, shared by all layers.
        ``segments``: document boundaries of a packed row (variable-length attention). ``adapter``: one layer
        slot of per-document LoRA adapters (``pgolf_lit.model.lora.SlotAdapters``): its q/k/v deltas are added
        to the projections and its o delta, computed from x, bypasses the whole attention (PR #1855
        train_gpt.py ``GPT._block_with_lora``).
        """
        B, T, D = x.shape
        q = self.c_q(x)
        k = self.c_k(x)
        v_raw = self.c_v(x)
        if adapter is not None:
            if adapter.q is not None:
                q = q + adapter.q(x)
            if adapter.k is not None:
                k = k + adapter.k(x)
            if adapter.v is not None:
                v_raw = v_raw + adapter.v(x)
        q = q.reshape(B, T, self.num_heads, self.head_dim)
        k = k.reshape(B, T, self.num_kv_heads, self.head_dim)
        v = v_raw if ve is None else v_raw + ve
        if self.vrl_gate is not None and v_first is not None:
            a = torch.sigmoid(self.vrl_gate.to(v.dtype))
            v = (1 - a) * v + a * v_first
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)
        q = rms_norm(q, self.head_dim)
        k = rms_norm(k, self.head_dim)
        cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
        q = apply_rotary(q, cos, sin, self.rope_dims)
        k = apply_rotary(k, cos, sin, self.rope_dims)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = causal_attention(q, k, v, segments, self.backend)
        if self.xsa:
            y = remove_self_value(y, v)
        if self.attn_gate_w is not None:
            window = self.attn_gate_w.size(-1)
            logit = F.linear(x[..., :window].contiguous(), self.attn_gate_w.to(x.dtype))
            y = y * (self.sparse_gate_gain * torch.sigmoid(self.sparse_gate_scale * logit))[..., None]
        out = self.proj(y.reshape(B, T, D))
        if adapter is not None and adapter.o is not None:
            out = out + adapter.o(x)
        return out, v_raw
