"""Building blocks of the GPT: weightless RMSNorm, CastedLinear (with a fake-quant hook), MLP, the two SmearGates
(PR #1263's per-channel one, PR #1855's token-gated one), BigramHash. Plain PyTorch (upstream train_gpt.py
``RMSNorm``, ``CastedLinear``, ``MLP``; PR #1263 ``SmearGate``, ``BigramHashEmbedding``). The value embedding and
the multi-token-prediction loss live in their own modules (value_embedding.py, mtp.py)."""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_lit.model.roles import ParamRole, control, declare_roles, embedding, matrix


def rms_norm(x: Tensor, dims: int | None = None) -> Tensor:
    """Weightless RMS norm over the last dim (or the last ``dims`` features); eps=None: PyTorch then uses float32's
    epsilon even for bf16. The output keeps the input's dtype under autocast too: torch >= 2.12 autocasts rms_norm
    to fp32, the records' torch kept bf16 (so their q/k, rotary and q_gain ran in bf16, and so do ours)."""
    shape = (x.size(-1) if dims is None else dims,)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x, shape)
    return F.rms_norm(x, shape)


def fake_quantize_rows(w: Tensor, bits: int) -> Tensor:
    """The records' late-QAT quantizer: per-row scale max(|w|max / R, 1/R), codes clamped to [-R-1, R]."""
    r = 2 ** (bits - 1) - 1
    with torch.no_grad():
        w32 = w.float()
        scale = (w32.abs().amax(dim=1) / r).clamp_min(1.0 / r)
        return torch.clamp(torch.round(w32 / scale[:, None]), -r - 1, r) * scale[:, None]


class CastedLinear(nn.Linear):
    """A bias-free Linear whose fp32 weight is cast to the input dtype at call time (bf16 compute, fp32 master).

    ``qat_bits > 0`` turns on straight-through fake quantization of the weight in training mode: the forward
    sees the quantized weight, the gradient flows to the fp32 weight unchanged. Set by the LateQAT callback.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        role: Optional[ParamRole] = None,
        zero_init: bool = False,
        output_proj: bool = False,
    ):
        super().__init__(in_features, out_features, bias=False)
        if role is not None:
            declare_roles(self, weight=role)
        self.zero_init = zero_init
        self.output_proj = output_proj  # a block's output projection (GPTConfig.proj_init_scale scales its init)
        self.qat_bits = 0

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype)
        if self.qat_bits and self.training:
            w = w + (fake_quantize_rows(self.weight, self.qat_bits).to(x.dtype) - w).detach()
        return F.linear(x, w)


class MLP(nn.Module):
    """proj(act(fc(x))²) with act = relu (baseline) or leaky_relu(slope) (every record).

    ``fused`` (set by ``use_fused_kernels``): the records' fused Triton LeakyReLU² MLP (``fused_mlp``), taken in
    training mode with ``leaky_relu2`` and no QAT fake-quant, on CUDA tensors (any device with ``fused_force``, for
    the tests under the Triton interpreter); the same function as the eager path below, which runs otherwise.
    """

    def __init__(self, dim: int, hidden: int, activation: str = "relu2", slope: float = 0.5):
        super().__init__()
        self.fc = CastedLinear(dim, hidden, role=matrix("mlp", "mlp"))
        self.proj = CastedLinear(hidden, dim, role=matrix("mlp", "mlp"), zero_init=True, output_proj=True)
        self.activation = activation
        self.slope = slope
        self.fused: Optional[Callable[..., Tensor]] = None
        self.fused_force = False

    def forward(self, x: Tensor) -> Tensor:
        if (
            self.fused is not None
            and self.training
            and self.activation == "leaky_relu2"
            and not (self.fc.qat_bits or self.proj.qat_bits)
            and (x.is_cuda or self.fused_force)
        ):
            return self.fused(x, self.fc.weight, self.proj.weight, self.slope)
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.activation == "leaky_relu2" else torch.relu(h)
        return self.proj(h.square())


class SmearGate(nn.Module):
    """PR #1263's smear: x[t] ← (1-g)·x[t] + g·x[t-1] per row, g = σ(gate) per channel; position 0 mixes with
    zeros. (PR #1855's input-dependent, BOS-masked form is ``smear_previous_token``.)"""

    def __init__(self, dim: int):
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(dim))
        declare_roles(self, gate=control("smear"))

    def forward(self, x: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate.to(x.dtype))[None, None, :]
        prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return (1 - g) * x + g * prev


def smear_previous_token(x: Tensor, ids: Tensor, gate_weight: Tensor, smear_lambda: Tensor, bos_id: int = -1) -> Tensor:
    """The token SmearGate, PR #1855 train_gpt.py ``GPT._forward_hidden``: for t >= 1,
    x[t] += λ·σ(x[t, :w] · gate_weightᵀ) · x[t-1], skipped where ``ids[t] == bos_id`` (so a packed row never
    smears one document's last token into the next document's BOS); x[0] is left alone.

    x [B, T, D] is the raw token embedding (before its norm); ``gate_weight`` [1, w]; ``smear_lambda`` [1].
    λ = 0 at init makes it the identity. The previous position is the un-smeared x[t-1].
    """
    window = gate_weight.size(-1)
    gate = smear_lambda.to(x.dtype) * torch.sigmoid(F.linear(x[:, 1:, :window].contiguous(), gate_weight.to(x.dtype)))
    not_bos = (ids[:, 1:] != bos_id).to(x.dtype).unsqueeze(-1)
    return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1] * not_bos], dim=1)


def bigram_hash(tokens: Tensor, table_size: int) -> Tensor:
    """(36313·t[i] XOR 27191·t[i-1]) mod (table_size-1) in int32; position 0 gets the reserved last bucket."""
    t = tokens.to(torch.int32)
    mod = table_size - 1
    out = torch.empty_like(t)
    out[..., 0] = mod
    out[..., 1:] = torch.bitwise_xor(36313 * t[..., 1:], 27191 * t[..., :-1]) % mod
    return out.long()


def trigram_hash(tokens: Tensor, table_size: int) -> Tensor:
    """Like bigram_hash over (t[i], t[i-1], t[i-2]); positions 0 and 1 get the reserved last bucket."""
    t = tokens.to(torch.int32)
    mod = table_size - 1
    out = torch.full_like(t, mod)
    if t.size(-1) > 2:
        h = torch.bitwise_xor(36313 * t[..., 2:], 27191 * t[..., 1:-1])
        out[..., 2:] = torch.bitwise_xor(h, 51497 * t[..., :-2]) % mod
    return out.long()


class BigramHash(nn.Module):
    """A hashed table of token pairs, projected to the model width and scaled; added to the token embedding."""

    def __init__(self, table_size: int, dim: int, model_dim: int, trigram: bool = False):
        super().__init__()
        self.table_size = table_size
        self.trigram = trigram
        self.embed = nn.Embedding(table_size, dim)
        declare_roles(self.embed, weight=embedding("other", "bigram"))
        nn.init.zeros_(self.embed.weight)
        # The records' export puts every ".proj." weight under the attention rule, this one included.
        self.proj = (
            CastedLinear(dim, model_dim, role=matrix("attn", "bigram"), output_proj=True) if dim != model_dim else None
        )
        if self.proj is not None:
            nn.init.zeros_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(0.05))
        declare_roles(self, scale=control("bigram"))

    def forward(self, ids: Tensor) -> Tensor:
        h = self.embed(bigram_hash(ids, self.table_size))
        if self.trigram:
            h = h + self.embed(trigram_hash(ids, self.table_size))
        if self.proj is not None:
            h = self.proj(h)
        return h * self.scale.to(h.dtype)
