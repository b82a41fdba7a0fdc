"""GPTQ calibration tokens: fixed batches from data, or text the model writes itself (PR #1019).

The records after PR #1019 calibrate on training batches (PR #1334/#1394 ``serialize``); ``token_batches`` cuts a
``[N, T]`` token tensor into the batches ``collect_hessians`` consumes. PR #1019 instead sampled its own
calibration set so that export touches no data: sequences start from a uniformly random token and continue by
temperature sampling from the model (no KV cache), all from one seeded generator; each sequence then feeds the
Hessians on its own, without its last token.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pgolf_lit.model.generate import generate


def token_batches(tokens: Tensor, seqs_per_batch: int, drop_last_token: bool = False) -> list[Tensor]:
    """Consecutive row groups ``tokens[i·B:(i+1)·B]`` (a shorter last group is kept)."""
    if tokens.ndim != 2:
        raise ValueError(f"token_batches: expected [sequences, length] tokens, got shape {tuple(tokens.shape)}")
    if seqs_per_batch < 1:
        raise ValueError(f"token_batches: seqs_per_batch must be >= 1, got {seqs_per_batch}")
    rows = tokens[:, :-1] if drop_last_token else tokens
    return list(rows.split(seqs_per_batch))


def generate_calibration_tokens(
    model: nn.Module,
    vocab_size: int,
    *,
    num_seqs: int = 64,
    seq_len: int = 2048,
    temperature: float = 0.8,
    batch_size: int = 8,
    seed: int = 42,
    device: Optional[torch.device] = None,
    progress: bool = True,
) -> Tensor:
    """Sample ``[num_seqs, seq_len]`` tokens from the model (PR #1019's self-generated calibration set)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    device = device or next(model.parameters()).device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    sequences = []
    for first in tqdm(range(0, num_seqs, batch_size), desc="calibration text", disable=not progress, leave=False):
        n = min(batch_size, num_seqs - first)
        start = torch.randint(0, vocab_size, (n, 1), device=device, generator=generator)
        sequences.append(generate(model, start, seq_len - 1, temperature=temperature, generator=generator))
    return torch.cat(sequences)
