"""One clip percentile per parameter bank (PR #1120 with SKIP_GPTQ=1, ``export.rtn.percentile_scope: bank``).

PR #1120's script quantizes the model's own state dict, whose block matrices live in four 3-D banks (qo, kv,
mlp_up, mlp_down; ``model/state_dicts.py``). With GPTQ skipped, each bank reaches ``quantize_int6_per_row`` as
``bank.reshape(-1, cols)``: the row scales are those of each matrix, but the percentile search scores the whole bank
at once, so all its matrices share the winning candidate.

Here each bank is rebuilt from our per-block matrices in the bank's slice order (``bank_slices``), searched as that
one matrix by ``quantize_percentile_search`` (the same computation on the same tensor), and its codes and scales
are cut back into the per-block tensors: the container and its reader stay per matrix.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor

from pgolf_lit.errors import ConfigError
from pgolf_lit.model.roles import ParamRole
from pgolf_lit.model.state_dicts import bank_slices
from pgolf_lit.quant.quantizers import Quantized
from pgolf_lit.quant.rtn import quantize_percentile_search


def bank_members(names: Mapping[str, int], roles: Mapping[str, ParamRole]) -> dict[str, list[str]]:
    """The tensors of ``names`` (name → bits) that live in a bank, grouped by bank in its slice order; a bank whose
    matrices would take different bits is an error (one search covers it)."""
    layers = [role.layer for role in roles.values() if role.layer is not None]
    slices = bank_slices(max(layers) + 1) if layers else {}
    ordered = sorted((slices[name], name) for name in names if name in slices)
    banks: dict[str, list[str]] = {}
    for (bank, _), name in ordered:
        banks.setdefault(bank, []).append(name)
    for bank, members in banks.items():
        widths = sorted({names[m] for m in members})
        if len(widths) > 1:
            raise ConfigError(f"export.rtn.percentile_scope: bank {bank} mixes bit widths {widths}; one search each")
    return banks


def quantize_banks(
    state_dict: Mapping[str, Tensor], banks: Mapping[str, list[str]], bits: Mapping[str, int]
) -> dict[str, tuple[Quantized, dict[str, Any]]]:
    """Each bank's percentile search over its stacked matrices, cut back per matrix: name → (codes + scales, meta)."""
    out: dict[str, tuple[Quantized, dict[str, Any]]] = {}
    for bank, members in banks.items():
        weights = [state_dict[name].detach().cpu().float() for name in members]
        if len({w.shape[1:] for w in weights}) > 1 or any(w.ndim != 2 for w in weights):
            raise ConfigError(f"export.rtn.percentile_scope: the matrices of {bank} do not stack ({members[0]}, ...)")
        q = quantize_percentile_search(torch.cat(weights), bits[members[0]])
        rows = [w.shape[0] for w in weights]
        how = {"method": "rtn", "percentile": q.percentile, "bank": bank}
        for name, codes, scale in zip(members, q.q.split(rows), q.scale.split(rows)):
            out[name] = (Quantized(codes.contiguous(), scale.contiguous(), q.percentile), how)
    return out
