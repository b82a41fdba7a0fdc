"""The records' Triton kernels switched on in a GPT (speed only; training and `pgolf test`'s TTT steps on CUDA).

A function here rather than a GPT method: evaluating an artifact never runs the kernels, so the switch stays out of
the program an artifact's code size counts (``quant/code_size.py`` counts ``gpt.py``).
"""

from __future__ import annotations

from torch import nn


def use_fused_kernels(model: nn.Module, enabled: bool, force: bool = False) -> None:
    """PR #1530's fused LeakyReLU² MLP and PR #1787's fused softcapped CE (need triton) for CUDA tensors: the MLP in
    training mode (``MLP.fused``), the CE in ``GPT.forward``'s main loss only (not ``forward_ttt``, not the MTP
    heads). Off CUDA the eager path runs unless ``force`` (the tests run the kernels on CPU tensors under
    ``TRITON_INTERPRET=1``). Each computes the same function as its eager path."""
    mlp = ce = None
    if enabled:  # imported here: triton is optional and loads only when the kernels are asked for
        from pgolf_lit.model.fused_mlp import fused_leaky_relu2_mlp as mlp
        from pgolf_lit.model.fused_softcap_ce import softcapped_cross_entropy as ce
    for block in model.blocks:
        block.mlp.fused, block.mlp.fused_force = mlp, bool(force)
    model.fused_ce, model.fused_force = ce, bool(force)
