"""A chain that presents the records' several optimizers as one, and the records' gradient clipping.

Per step, after backward (upstream train_gpt.py ``main`` loop; PR #1334/#1394 ``step_fn``): ``apply_schedule``
(schedule.py), ``clip_grad_norm`` over all parameters, then ``OptimizerChain.step()`` (token, [head], Muon, scalar)
and ``zero_grad``. With ``grad_clip_scope: local`` (PR #1855) the gradients are not synchronised by backward: clip
each rank's own, then ``all_reduce_gradients``, then step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, MutableMapping
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor


class _ChainedState(MutableMapping):
    """``optimizer.state`` of a chain: reads and writes go to the member optimizer that owns the parameter
    (Lightning moves optimizer state between devices through this mapping)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], owners: dict[Tensor, torch.optim.Optimizer]):
        self._optimizers = optimizers
        self._owners = owners

    def __getitem__(self, p: Tensor) -> Any:
        return self._owners[p].state[p]

    def __setitem__(self, p: Tensor, value: Any) -> None:
        self._owners[p].state[p] = value

    def __delitem__(self, p: Tensor) -> None:
        del self._owners[p].state[p]

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)


class OptimizerChain(torch.optim.Optimizer):
    """Several optimizers behind one ``torch.optim.Optimizer``: ``step`` runs them in list order.

    Why: the LightningModule needs ONE optimizer object. In manual optimization Lightning counts one global
    step per ``optimizer.step()`` call, so stepping the records' three or four optimizers separately would
    advance ``trainer.global_step`` (and with it ``max_steps``, logging and checkpoint cadence) three or four
    times per training step. ``param_groups`` is the concatenation of the members' group dicts (the same
    objects, so lr/momentum written here reach the members, and LearningRateMonitor sees every group);
    ``state_dict`` / ``load_state_dict`` round-trip every member's state. Groups cannot be added to the
    chain; add them to a member before chaining.
    """

    def __init__(self, optimizers: Iterable[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        if not self.optimizers:
            raise ValueError("OptimizerChain: needs at least one optimizer")
        owners: dict[Tensor, torch.optim.Optimizer] = {}
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p in owners:
                        raise ValueError("OptimizerChain: a parameter belongs to two member optimizers")
                    owners[p] = opt
        super().__init__(list(owners), {})  # sets up torch's hook tables and step profiling
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]
        self.state = _ChainedState(self.optimizers, owners)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(getattr(self, "state", None), _ChainedState):  # constructed: members own the groups
            raise RuntimeError("OptimizerChain: add param groups to a member optimizer before chaining")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        states = state_dict.get("optimizers")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            found = len(states) if isinstance(states, list) else "no"
            raise ValueError(f"OptimizerChain: state has {found} optimizer(s), the chain has {len(self.optimizers)}")
        for opt, sd in zip(self.optimizers, states):
            opt.load_state_dict(sd)
        # torch replaces a member's group dicts on load: point the chain at the new ones (else LearningRateMonitor,
        # and anything else reading chain.param_groups, sees the groups of before compile priming forever)
        self.param_groups = [g for opt in self.optimizers for g in opt.param_groups]

    def __iter__(self) -> Iterator[torch.optim.Optimizer]:
        return iter(self.optimizers)

    def __repr__(self) -> str:
        return f"OptimizerChain({', '.join(type(o).__name__ for o in self.optimizers)})"


def all_reduce_gradients(
    parameters: Iterable[Tensor],
    compressed: Collection[Tensor] = (),
    compress_dtype: torch.dtype = torch.bfloat16,
) -> None:
    """Average every ``.grad`` over the default process group, in place; a no-op without one (or with one rank).

    The manual reduction that ``grad_clip_scope: local`` needs (PR #1855 train_gpt.py ``Optimizers.step``: the
    gradients are reduced only after ``step_fn`` clipped each rank's own): run every micro-batch's backward
    without DDP's synchronisation, clip, then call this. Gradients are packed into one flat buffer per
    (device, dtype), summed and divided by the world size (SUM, because gloo has no AVG). Parameters without
    a gradient are skipped; every rank must pass the same parameters with the same gradients present.

    The gradients of the parameters in ``compressed`` are reduced as DDP's compression hook reduces a bucket
    (torch ``default_hooks._compress_hook``, e.g. ``bf16_compress_hook``): cast to ``compress_dtype``, divided by
    the world size, summed in that dtype, written back into the gradient in its own dtype. PR #1855 reduces its
    Muon banks so (bf16 ``reduce_scatter`` AVG) and every other gradient in its own dtype.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    low = {id(p) for p in compressed}
    by_kind: dict[tuple[torch.device, torch.dtype, bool], list[Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_kind.setdefault((p.grad.device, p.grad.dtype, id(p) in low), []).append(p.grad)
    for (_, _, compress), grads in by_kind.items():
        flat = torch.cat([g.reshape(-1) for g in grads])
        if compress:
            flat = flat.to(compress_dtype).div_(world)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        else:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float) -> Optional[Tensor]:
    """Clip the global L2 norm of all gradients to ``max_norm`` and return the norm before clipping.

    ``max_norm <= 0`` means off, as upstream's ``GRAD_CLIP_NORM=0``: nothing is computed and None is returned.
    Pass every model parameter (the records clip over all of them, including any without an optimizer).
    """
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
