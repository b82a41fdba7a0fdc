"""GPT-J parallel residual: one residual stream whose attention and MLP read the same normed input.

PR #1412 / #1493 / #1514 (upstream ``PARALLEL_RESIDUAL_START``, the blocks with ``parallel = True``): from physical
layer ``parallel_start_layer`` on, a block computes

    x_in = resid_mix[0]·x + resid_mix[1]·x0
    n    = rms_norm(x_in)·ln_scale
    x    = x_in + attn_scale·attn(n) + mlp_scale·mlp(n)

instead of the sequential x_in + attn_scale·attn(…), then + mlp_scale·mlp(norm of that). Unlike the two-lane forms
(``parallel_residual`` lane_merge / lambdas) there is one stream, so the U-Net skips and the final norm are the
sequential model's and no parameter is added. The choice is per physical block, so a looped block keeps it on every
pass, as upstream's flag does.
"""

from __future__ import annotations

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.model.gpt import Block
from pgolf_lit.model.layers import rms_norm

# Counted in an artifact's code only for configs that use it (quant/code_size.py).
COUNTED_WHEN = "parallel_residual=gptj"


class GPTJBlock(Block):
    """A Block whose attention and MLP both read rms_norm(x_in) and add to the same stream."""

    def forward(self, x, x0, rope, ve=None, v_first=None, segments=None, adapter=None):
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        normed = rms_norm(x_in) * self.ln_scale_factor
        attn_out, v_raw = self.attn(normed, rope, ve, v_first, segments, adapter)
        mlp_out = self._mlp(normed, adapter)
        return x_in + self.attn_scale.to(x.dtype) * attn_out + self.mlp_scale.to(x.dtype) * mlp_out, v_raw


def gptj_block(cfg: GPTConfig, layer_idx: int) -> Block:
    """The block of physical layer ``layer_idx``: GPT-J from ``parallel_start_layer`` on, sequential below."""
    return (GPTJBlock if layer_idx >= cfg.parallel_start_layer else Block)(cfg, layer_idx)
