"""Per-document LoRA adapters for score-first test-time training (PR #1855 train_gpt.py ``BatchedLinearLoRA``,
``BatchedTTTLoRA``, ``GPT.forward_ttt``). Plain PyTorch.

A batch of ``bsz`` documents is adapted at once: every adapter holds one (A, B) pair per document, and row b of
the model's input uses pair b. There is one set of adapters per *layer slot* — per position of the layer schedule,
so each pass of a looped layer has its own — plus one on the output head. In a slot:

- Q, K, V: added to the projections of the normed attention input n (before the head reshape, QK norm and RoPE;
  PR #1953 drops Q and V);
- O: computed from n and added to the attention output: a low-rank bypass around the whole attention;
- MLP: computed from the normed MLP input and added to the MLP output: a bypass around the MLP;
- head: computed from the final normed hidden state and added to the raw logits before the softcap.

``lora(x) = (x · Aᵀ) · Bᵀ · alpha / rank`` with A [bsz, rank, in] ~ U(±1/√in) and B [bsz, out, rank] = 0, so a
fresh adapter changes nothing. The model hooks are ``GPT.forward_hidden(..., lora=)`` and ``GPT.forward_ttt``;
the evaluation loop owns the optimizer, the chunking and ``reset`` between document batches.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple, Optional

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pgolf_lit.model.gpt import GPT

# PR #1767/#1855's TTT_LORA_ALPHA: the adapter output is scaled by alpha / rank, so the rank does not change the
# effective learning rate.
DEFAULT_ALPHA = 144.0


class BatchedLinearLoRA(nn.Module):
    """``bsz`` independent rank-``rank`` adapters of one ``in_features → out_features`` map."""

    def __init__(
        self,
        bsz: int,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float = DEFAULT_ALPHA,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        self.bound = 1.0 / math.sqrt(in_features)
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(bsz, rank, in_features))
        self.B = nn.Parameter(torch.zeros(bsz, out_features, rank))
        self.reset_a(generator)

    @torch.no_grad()
    def reset_a(self, generator: Optional[torch.Generator] = None) -> None:
        self.A.uniform_(-self.bound, self.bound, generator=generator)

    @torch.no_grad()
    def reset(self, warm_start_a: bool = True, generator: Optional[torch.Generator] = None) -> None:
        """B ← 0 (the adapter is the identity again); A is kept (``warm_start_a``, PR #1767) or redrawn."""
        if not warm_start_a:
            self.reset_a(generator)
        self.B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """x [bsz, T, in] → [bsz, T, out]."""
        return ((x @ self.A.transpose(1, 2)) @ self.B.transpose(1, 2)) * self.scale


class SlotAdapters(NamedTuple):
    """The adapters of one layer slot; each is None when switched off."""

    q: Optional[BatchedLinearLoRA]
    k: Optional[BatchedLinearLoRA]
    v: Optional[BatchedLinearLoRA]
    o: Optional[BatchedLinearLoRA]
    mlp: Optional[BatchedLinearLoRA]


class BatchedTTTLoRA(nn.Module):
    """Adapters for ``bsz`` documents on every layer slot of ``model``'s current layer schedule and on its head.

    Build it after setting the model's recurrence: the slot count is the number of layers the model runs now
    (17 for PR #1855 with looping on, 11 off); the model refuses a LoRA with another count. Submodule names are
    the upstream ones (``lm_head_lora``, ``q_loras.<slot>``, …), so an upstream LoRA state dict loads as it is.
    ``q``, ``k``, ``v``, ``o``, ``mlp`` switch those adapters (upstream TTT_Q_LORA, TTT_K_LORA, TTT_V_LORA,
    TTT_O_LORA, TTT_MLP_LORA; all on in #1855; PR #1953's TTT_MASK=no_qv is q and v off, PR #2135's k off). A
    switched-off list is None and draws no randomness, as upstream.
    """

    def __init__(
        self,
        model: "GPT",
        bsz: int,
        rank: int,
        alpha: float = DEFAULT_ALPHA,
        *,
        q: bool = True,
        k: bool = True,
        v: bool = True,
        o: bool = True,
        mlp: bool = True,
        generator: Optional[torch.Generator] = None,
    ):
        super().__init__()
        if bsz < 1 or rank < 1:
            raise ValueError(f"BatchedTTTLoRA: bsz and rank must be >= 1, got bsz={bsz}, rank={rank}")
        cfg = model.config
        d, kv, e = cfg.model_dim, cfg.kv_dim, cfg.emb_dim
        self.bsz, self.rank, self.alpha = bsz, rank, alpha
        self.num_slots = len(model.layer_schedule())

        def adapters(in_features: int, out_features: int) -> nn.ModuleList:
            return nn.ModuleList(
                BatchedLinearLoRA(bsz, in_features, out_features, rank, alpha, generator) for _ in range(self.num_slots)
            )

        device = model.tok_emb.weight.device
        with torch.device(device):
            self.lm_head_lora = BatchedLinearLoRA(bsz, e, cfg.vocab_size, rank, alpha, generator)
            self.q_loras = adapters(d, d) if q else None
            self.v_loras = adapters(d, kv) if v else None
            self.k_loras = adapters(d, kv) if k else None
            self.mlp_loras = adapters(d, d) if mlp else None
            self.o_loras = adapters(d, d) if o else None

    def slot(self, index: int) -> SlotAdapters:
        """The adapters of schedule position ``index``."""

        def pick(loras: Optional[nn.ModuleList]) -> Optional[BatchedLinearLoRA]:
            return None if loras is None else loras[index]

        return SlotAdapters(
            pick(self.q_loras), pick(self.k_loras), pick(self.v_loras), pick(self.o_loras), pick(self.mlp_loras)
        )

    def adapters(self) -> list[BatchedLinearLoRA]:
        return [m for m in self.modules() if isinstance(m, BatchedLinearLoRA)]

    @torch.no_grad()
    def reset(self, warm_start_a: bool = True, generator: Optional[torch.Generator] = None) -> None:
        """Before a new batch of documents: every B ← 0; A kept (warm start, PR #1855's default) or redrawn."""
        for adapter in self.adapters():
            adapter.reset(warm_start_a, generator)
