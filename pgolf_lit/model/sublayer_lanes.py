"""PR #1204's parallel residual (its README credits modded-nanogpt PR #230; upstream PARALLEL_RESIDUAL=1,
PARALLEL_START_LAYER=7, train_gpt.py ``GPT._parallel_block``).

From ``parallel_start_layer`` on the stream is two lanes. Attention reads lane 0, the MLP reads lane 1 (each mixed
with x0 by the block's resid_mix). Each sublayer k (0 attention, 1 MLP) in turn decays both lanes by its resid
lambda r[k] and writes its output o into both through its post lambdas p[k]:

    lane_j ← r[k]·lane_j + p[k, j]·o        (first k = 0, then k = 1 on the lanes attention just wrote)

r starts at √1.1, so a block grows both lanes by 1.1 before the writes; p starts at 1. The lambdas are per physical
layer, shaped for every layer as upstream though only those from the start layer act. The end is the lanes' mean.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

COUNTED_WHEN = "parallel_residual=sublayer"

RESID_INIT = math.sqrt(1.1)  # upstream: torch.full((num_layers, 2), 1.1**.5)


def sublayer_lambdas(num_layers: int) -> tuple[nn.Parameter, nn.Parameter]:
    """(parallel_post_lambdas [L, 2 sublayers, 2 lanes] = 1, parallel_resid_lambdas [L, 2 sublayers] = √1.1)."""
    return nn.Parameter(torch.ones(num_layers, 2, 2)), nn.Parameter(torch.full((num_layers, 2), RESID_INIT))


def sublayer_step(
    lanes: tuple[Tensor, Tensor],
    post: Tensor,
    resid: Tensor,
    attn: Optional[Callable[[Tensor], Tensor]],
    mlp: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor]:
    """One block on the two lanes. ``attn``/``mlp`` map the lane they read to the sublayer's scaled output
    (``attn`` None: the block runs no attention); ``post``/``resid`` are the layer's rows of the lambdas."""
    lane0, lane1 = lanes
    for k, sublayer, read in ((0, attn, 0), (1, mlp, 1)):
        if sublayer is None:
            continue
        out = sublayer(lane1 if read else lane0)
        r, p = resid[k].to(lane0.dtype), post[k].to(lane0.dtype)
        lane0, lane1 = r * lane0 + p[0] * out, r * lane1 + p[1] * out
    return lane0, lane1
