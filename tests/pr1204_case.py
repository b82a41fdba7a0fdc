"""A tiny model with every piece of PR #1204 switched on, randomized so that each piece changes the output (shared by
the PR #1204 model tests and the trace-ranked export tests)."""

from __future__ import annotations

import torch

from pgolf_lit.config import GPTConfig
from pgolf_lit.model.gpt import GPT


def tiny_cfg(**changes) -> GPTConfig:
    base = dict(
        vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0,
        mlp_activation="leaky_relu2", rope_dims=4, ln_scale=True, xsa_last_n=5, skip_gates=True,
        skip_rows="recurrent", smear_gate=True, bigram_vocab_size=16, bigram_dim=8, ve_enabled=True, ve_dim=8,
        ve_layers=[3, 4], recurrence="group", recur_layers=[1, 2], repeat_untie_mlp="full",
        block_controls="position", disable_layer0_attn=True, parallel_start_layer=3, parallel_residual="sublayer",
        init="orthogonal",
    )  # fmt: skip
    return GPTConfig(**{**base, **changes})


def randomized(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model
