"""Sampling text from a GPT: temperature (and optional top-k) sampling, one token at a time over a sliding
context. Plain PyTorch; no KV cache (the models are small and generation is for looking at samples and for PR
#1019's self-generated calibration, not for serving)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


@torch.no_grad()
def generate(
    model: nn.Module,
    ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    context: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """``ids`` [B, T] followed by ``max_new_tokens`` sampled tokens; each step conditions on the last ``context``
    tokens (all of them when None)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            window = ids if context is None else ids[:, -context:]
            logits = model.forward_logits(window)[:, -1, :].float() / temperature
            if top_k is not None and top_k < logits.size(-1):
                cutoff = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            ids = torch.cat([ids, torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)], dim=1)
    finally:
        model.train(was_training)
    return ids
