"""Grouped-query causal self-attention with QK RMSNorm, (partial) RoPE with the length rescale, a learned
per-head q gain, optional XSA (projection removal) and the VRL value residual (spec/model.md §1.2, §2.3-2.6,
§2.12). Plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_lit.model.layers import CastedLinear
from pgolf_lit.model.roles import control, declare_roles, matrix


class Rotary(nn.Module):
    """cos/sin tables for the first ``rope_dims`` dims of a head, "half-split" pairing (i, i + rope_dims/2).

    With ``train_seq_len > 0`` a sequence longer than it uses the base ``base·(T/train_seq_len)^(rd/(rd-2))``
    (the records' length rescale: Family A hard-codes train_seq_len 1024, Family B uses TRAIN_SEQ_LEN).
    """

    def __init__(self, rope_dims: int, base: float = 10000.0, train_seq_len: int = 0):
        super().__init__()
        self.rope_dims = rope_dims
        self.base = base
        self.train_seq_len = train_seq_len
        self.register_buffer("inv_freq", self._inv_freq(base), persistent=False)

    def _inv_freq(self, base: float, device=None) -> Tensor:
        rd = self.rope_dims
        return 1.0 / (base ** (torch.arange(0, rd, 2, dtype=torch.float32, device=device) / rd))

    def forward(self, seq_len: int) -> tuple[Tensor, Tensor]:
        if self.train_seq_len and seq_len > self.train_seq_len:
            rd = self.rope_dims
            inv_freq = self._inv_freq(self.base * (seq_len / self.train_seq_len) ** (rd / (rd - 2)), self.inv_freq.device)
        else:
            inv_freq = self.inv_freq
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
    ):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
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
        self.proj = CastedLinear(dim, dim, role=matrix("attn", "attention"), zero_init=True)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], ve: Tensor | None = None, v_first: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Return (output [B,T,D], raw value projection c_v(x) [B,T,kv_dim] for VRL).

        ``rope`` is the (cos, sin) pair of the model's Rotary for this sequence length, shared by all layers.
        """
        B, T, D = x.shape
        q = self.c_q(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.c_k(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v_raw = self.c_v(x)
        v = v_raw if ve is None else v_raw + ve
        if self.vrl_gate is not None and v_first is not None:
            a = torch.sigmoid(self.vrl_gate.to(v.dtype))
            v = (1 - a) * v + a * v_first
        v = v.reshape(B, T, self.num_kv_heads, self.head_dim)
        q = F.rms_norm(q, (self.head_dim,))
        k = F.rms_norm(k, (self.head_dim,))
        cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
        q = apply_rotary(q, cos, sin, self.rope_dims)
        k = apply_rotary(k, cos, sin, self.rope_dims)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.num_kv_heads != self.num_heads,
        ).transpose(1, 2)
        if self.xsa:
            y = remove_self_value(y, v)
        return self.proj(y.reshape(B, T, D)), v_raw
