"""GPTQ Hessians H = Σ XᵀX / batches from forward hooks on the GPT's linear layers (PR #1263/#1334/#1394
``collect_hessians``).

Which layers: ``"large"`` hooks the CastedLinear modules with more than ``min_numel`` (65,536) weights whose
declared quant group the export quantizes with a Hessian-using method (``groups``: ``ExportConfig.hessian_groups``,
mlp and attn in every record: PR #1333/#1334/#1421/#1394), ``"all"`` every CastedLinear (PR #1263, PR #1019),
``"layers"`` the CastedLinears of those groups inside the transformer layers at any size, the untied MLPs of repeated
passes included, and nothing outside them (PR #1204's ``_init_hessians``: no Hessian for ``bigram.proj``).
``head=True`` adds the output head's Hessian, taken from the vector that multiplies the head weight: the
final-norm (and ``head_proj``) output ``model.normalize_hidden(h)`` for a tied embedding (PR #1394's
``tok_emb.weight``), the ``lm_head`` input otherwise.

Hooks fire on every pass of a repeated layer, so under depth recurrence those Hessians sum over all passes.
Inputs are accumulated in fp32 with ``addmm_`` on the model's device, moved to CPU and divided by the number of
batches at the end. ``damping > 0`` then adds ``damping · max(mean diag, 1e-6) · I`` (PR #1263, which damps again
inside GPTQ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Literal, Optional, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pgolf_lit.model.layers import CastedLinear
from pgolf_lit.model.roles import parameter_roles
from pgolf_lit.quant.awq import activation_rms
from pgolf_lit.quant.quantizers import KEEP_FLOAT_MAX_NUMEL

HessianModules = Literal["large", "all", "layers"]
HESSIAN_MODULES: tuple[str, ...] = ("large", "all", "layers")


@dataclass
class HessianReport:
    num_batches: int
    num_tokens: int
    seconds: float
    names: list[str] = field(default_factory=list)
    act_rms: dict[str, Tensor] = field(default_factory=dict)
    """Per input channel sqrt(Σx² / rows) of every hooked matrix, over the same inputs as its Hessian (CPU fp32;
    PR #1945's activation statistics, which AWQ-lite scores groups with)."""


def hooked_linears(
    model: nn.Module,
    modules: HessianModules = "large",
    min_numel: int = KEEP_FLOAT_MAX_NUMEL,
    groups: Sequence[str] = ("mlp", "attn"),
) -> dict[str, CastedLinear]:
    """Weight name → CastedLinear whose input Hessian is collected ("large": more than ``min_numel`` weights, in a
    quant group of ``groups``; "layers": in a layer and a group of ``groups``; the output head has its own hook,
    ``head=``)."""
    if modules not in HESSIAN_MODULES:
        raise ValueError(f"modules must be one of {HESSIAN_MODULES}, got {modules!r}")
    roles = parameter_roles(model)
    chosen = {}
    for name, module in model.named_modules():
        if not isinstance(module, CastedLinear):
            continue
        weight_name = f"{name}.weight"
        role = roles[weight_name]
        quantized = role.quant in groups and role.kind != "head"
        large = quantized and module.weight.numel() > min_numel
        in_layer = quantized and role.layer is not None
        if modules == "all" or (large if modules == "large" else in_layer):
            chosen[weight_name] = module
    return chosen


class _Accumulator:
    """Running Σ XᵀX per name, rows of X being the last-dim vectors of every call, and Σ x² per column with the
    row count (the activation statistics)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.sumsq: dict[str, Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, x: Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        if name not in self.sums:
            self.sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            self.sumsq[name] = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
            self.rows[name] = 0
        self.sums[name].addmm_(x.T, x)
        self.sumsq[name] += x.square().sum(dim=0)
        self.rows[name] += x.shape[0]


def collect_hessians(
    model: nn.Module,
    batches: Iterable[Tensor],
    *,
    modules: HessianModules = "large",
    head: bool = False,
    damping: float = 0.0,
    num_batches: Optional[int] = None,
    min_numel: int = KEEP_FLOAT_MAX_NUMEL,
    groups: Sequence[str] = ("mlp", "attn"),
    progress: bool = True,
) -> tuple[dict[str, Tensor], HessianReport]:
    """Run ``model.forward_logits`` on each token batch ``[B, T]`` (eval mode, no grad) and return CPU fp32 Hessians.

    ``num_batches`` caps how many batches are taken from ``batches`` (and sizes the progress bar). The model's
    recurrence state is used as it is: switch it on first where the record exports with recurrence active.
    """
    acc = _Accumulator()
    handles = [
        module.register_forward_hook(lambda _m, inputs, _out, name=name: acc.add(name, inputs[0]))
        for name, module in hooked_linears(model, modules, min_numel, groups).items()
    ]
    restore_head = _hook_head(model, acc) if head else None
    was_training = model.training
    model.eval()
    count = tokens = 0
    start = time.perf_counter()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, total=num_batches, desc="GPTQ Hessians", disable=not progress, leave=False):
                if num_batches is not None and count >= num_batches:
                    break
                model.forward_logits(batch)
                count += 1
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
        if restore_head is not None:
            restore_head()
        model.train(was_training)
    if count == 0:
        raise ValueError("collect_hessians: no calibration batches were given")
    hessians = {}
    for name, total in acc.sums.items():
        h = total.cpu() / count
        if damping > 0:
            h += damping * torch.diag(h).mean().clamp_min(1e-6) * torch.eye(h.shape[0])
        hessians[name] = h
    act_rms = {name: activation_rms(acc.sumsq[name].cpu(), acc.rows[name]) for name in acc.sums}
    return hessians, HessianReport(count, tokens, time.perf_counter() - start, sorted(hessians), act_rms)


def _hook_head(model: nn.Module, acc: _Accumulator):
    """Record the head's input; returns the undo function.

    An untied ``lm_head`` is a module and gets a forward hook. The tied embedding has no module between the final
    norm and the logits (``rms_norm`` is a function), so ``normalize_hidden`` is wrapped on the instance instead.
    """
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        handle = lm_head.register_forward_hook(lambda _m, inputs, _out: acc.add("lm_head.weight", inputs[0]))
        return handle.remove
    normalize = model.normalize_hidden

    def recording_normalize(h: Tensor) -> Tensor:
        z = normalize(h)
        acc.add("tok_emb.weight", z)
        return z

    model.normalize_hidden = recording_normalize

    def undo() -> None:
        del model.normalize_hidden

    return undo
