"""Optimizers, parameter routing and LR/momentum schedules of the record scripts. Plain PyTorch (no Lightning).

Per training step (upstream train_gpt.py ``main`` loop; PR #1334/#1394 ``step_fn``):
``mult = schedule.lr_multiplier(...)``, ``apply_schedule(chain, mult, optim_cfg.muon_momentum_at(step))``,
``clip_grad_norm(model.parameters(), optim_cfg.grad_clip_norm)``, ``chain.step()``, ``chain.zero_grad()``. With
``grad_clip_scope: local`` (PR #1855) backward leaves each rank's gradient local, the clip acts on it, and
``all_reduce_gradients`` averages the clipped gradients before ``chain.step()``.
"""

from pgolf_lit.optim.chain import OptimizerChain, all_reduce_gradients, clip_grad_norm
from pgolf_lit.optim.groups import OptimConfig, ParamRouting, build_optimizers, route_parameters
from pgolf_lit.optim.muon import Muon, zeropower_via_newtonschulz5, zeropower_via_polar_express
from pgolf_lit.optim.presets import record_optim_config, record_schedule_config
from pgolf_lit.optim.schedule import ScheduleConfig, apply_schedule, effective_cap_ms, momentum_warmup

__all__ = [
    "Muon",
    "OptimConfig",
    "OptimizerChain",
    "all_reduce_gradients",
    "ParamRouting",
    "ScheduleConfig",
    "apply_schedule",
    "build_optimizers",
    "clip_grad_norm",
    "effective_cap_ms",
    "momentum_warmup",
    "record_optim_config",
    "record_schedule_config",
    "route_parameters",
    "zeropower_via_newtonschulz5",
    "zeropower_via_polar_express",
]
