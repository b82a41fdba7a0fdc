"""Untied MLPs of the repeated layers (PR #1204, upstream REPEAT_UNTIE_MLP=full, REPEAT_UNTIE_MLP_LAYERS=4,5;
train_gpt.py ``RepeatMLPWeights``, ``GPT._sync_repeat_mlp_from_base``).

Under group recurrence a repeated layer runs twice; its second pass uses an MLP of its own while attention and the
block's other tensors stay shared. The copy is orthogonally initialised like upstream's (both matrices, no output
scale) and overwritten with the layer's MLP weights when recurrence switches on during training
(``copy_base_mlps``, called by the RecurrenceActivation callback), so it starts where the shared MLP is.
"""

from __future__ import annotations

import torch
from torch import nn

from pgolf_lit.model.layers import MLP
from pgolf_lit.model.roles import declare_roles, matrix

COUNTED_WHEN = "repeat_untie_mlp=full"


def build_repeat_mlps(cfg) -> nn.ModuleDict:
    """One MLP per untied recur layer, keyed by the physical layer (``repeat_mlp.4.fc.weight``: layer 4's second
    pass). Each declares its layer, so the exporter treats it as that layer's MLP."""
    layers = cfg.repeat_untie_mlp_layers or cfg.recur_layers
    mlps = nn.ModuleDict()
    for layer in layers:
        mlp = MLP(cfg.model_dim, cfg.mlp_hidden, cfg.mlp_activation, cfg.leaky_relu_slope)
        mlp.layer_idx = layer
        mlp.proj.zero_init = mlp.proj.output_proj = False  # upstream: orthogonal, unscaled
        # not a bank matrix: the split LR leaves it alone, as upstream (optim/groups.py BANK_COMPONENTS)
        role = matrix("mlp", "repeat_mlp")
        declare_roles(mlp.fc, weight=role)
        declare_roles(mlp.proj, weight=role)
        mlps[str(layer)] = mlp
    return mlps


@torch.no_grad()
def copy_base_mlps(model: nn.Module) -> None:
    """Each repeated pass's MLP := its layer's MLP (upstream, when recurrence switches on)."""
    for layer, mlp in model.repeat_mlp.items():
        base = model.blocks[int(layer)].mlp
        mlp.fc.weight.copy_(base.fc.weight)
        mlp.proj.weight.copy_(base.proj.weight)
