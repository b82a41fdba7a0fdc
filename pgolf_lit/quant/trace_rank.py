"""Trace-ranked int5/int6 mixing (PR #1105, upstream MIXED_QUANT=1 N_INT6_LAYERS=N; PR #1204's recurrent layers
first).

The GPTQ mlp/attn matrices are ranked by their Hessian's trace, ``H.diag().sum()`` (0 for a matrix without a
Hessian); the top N keep the rule's bits (int6, clip range 31) and the rest get the low bits (int5, clip range 15).
N counts tensors, not layers. PR #1204 first takes the matrices of its recurrent layers (the physical layers the
layer schedule runs more than once, with the untied MLPs of their repeated pass), ranked among themselves by trace,
then fills up to N from the whole ranking. Both sorts are stable, so equal traces keep the state-dict order: the
only equal traces are c_q, c_k and c_v of one layer (one input, one Hessian), which both the records' unbanked state
dict and ours list in that order.
"""

from __future__ import annotations

from typing import Collection, Mapping, Optional, Sequence

from torch import Tensor


def recurrent_layers(cfg) -> set[int]:
    """The physical layers that the model's recurrent layer schedule (``layer_schedule``) runs more than once."""
    from pgolf_lit.model.gpt import layer_schedule

    schedule = layer_schedule(cfg, recurrence_active=True)
    return {layer for layer in schedule if schedule.count(layer) > 1}


def trace(hessian: Optional[Tensor]) -> float:
    """The records' sensitivity: the sum of the Hessian's diagonal, 0 without a Hessian."""
    return hessian.diagonal().sum().item() if hessian is not None else 0.0


def trace_ranked_int6(
    candidates: Sequence[str], hessians: Mapping[str, Tensor], keep: int, first: Collection[str] = ()
) -> list[str]:
    """The ``keep`` candidates that keep the high bits: those in ``first`` by trace, then the rest by trace."""
    sensitivity = {name: trace(hessians.get(name)) for name in candidates}
    ranked = sorted(candidates, key=lambda name: -sensitivity[name])
    chosen = [name for name in ranked if name in first][:keep]
    taken = set(chosen)
    for name in ranked:
        if len(chosen) >= keep:
            break
        if name not in taken:
            chosen.append(name)
            taken.add(name)
    return chosen
