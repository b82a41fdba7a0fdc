"""SLOT: per-batch optimisation of a hidden-state delta (and optionally a logit bias) on top of the frozen model's
hidden states, then scoring with it (PR #1263 ``eval_val_sliding_slot``, PR #1321 ``eval_val_slot``, PR #1333
``run_evals``).

Three modes, differing in what the delta is fitted on and who shares it:

standard             PR #1263/#1278/#1321. One delta [B,1,d] and logit bias [B,1,V] per window, fitted on the
                     very positions that are then scored (loss normalised by the batch's scored count).
                     Non-compliant: a target's own value shapes the distribution that scores it.
causal_batch_shared  PR #1333. One delta [1,1,d] for the whole batch, fitted on the mean nll over every
                     window's unscored prefix. Non-compliant: the prefixes of later windows overlap the scored
                     blocks of earlier ones, so 31 of 32 windows are scored with a delta fitted on their own
                     targets (and up to ``seq_len - stride`` positions beyond).
causal_per_window    pgolf_lit's compliant variant. One delta per window, loss = sum over windows of each
                     window's own mean prefix nll; Adam is element-wise, so every window's delta is exactly what
                     optimising it alone would give and depends only on tokens before its scored block. The
                     result is independent of batch size, batch membership and world size.

The model's weights are never changed and receive no gradient; the optimiser state lives for one batch.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_lit.errors import ConfigError
from pgolf_lit.eval.recording import NO_STATE
from pgolf_lit.eval.registry import AuditCase, EvalMethod, PassOutcome, PassSetup
from pgolf_lit.eval.scoring import (
    WINDOW_RULES,
    RankSplit,
    WindowBatch,
    WindowRule,
    at_least_fp32,
    batched,
    eval_mode,
    model_device,
    progress_bar,
    rank_share,
    score_batch,
    sliding_windows,
)
from pgolf_lit.metrics import BitsPerByte

SlotMode = Literal["standard", "causal_per_window", "causal_batch_shared"]
SLOT_MODES = ("standard", "causal_per_window", "causal_batch_shared")


@dataclass(frozen=True)
class SlotSettings:
    """One SLOT procedure on the evaluation's windows (``seq_len``/``stride`` are the evaluation's). The defaults
    are pgolf_lit's compliant per-window causal SLOT with PR #1333's optimiser; each record's YAML states its own
    procedure (PR #1263/#1278/#1321: ``mode: standard`` with their optimiser values)."""

    mode: SlotMode = "causal_per_window"
    """``standard`` (PR #1263/#1278/#1321, non-compliant), ``causal_batch_shared`` (PR #1333, leaks: one delta
    per batch) or ``causal_per_window`` (compliant: one delta per window, fitted on its unscored prefix)."""
    window_rule: WindowRule = "exact"
    """Window list: ``exact`` tiles every target once; ``legacy`` is the records' list (re-scores the tail)."""
    batch_windows: int = 32
    """Windows fitted and scored together."""
    steps: int = 16
    """AdamW steps per batch (SLOT-16/32/48 in the record names)."""
    lr: float = 0.008
    """Peak learning rate of the delta (and logit bias)."""
    lr_min: Optional[float] = None
    """None: constant ``lr``; else a cosine from ``lr`` towards ``lr_min`` over the steps (PR #1263 family)."""
    betas: tuple[float, float] = (0.3, 0.9)
    """AdamW betas (PR #1333: 0.3, 0.9; the standard-SLOT records use torch's 0.9, 0.999)."""
    eps: float = 1e-5
    """AdamW epsilon."""
    weight_decay: float = 1e-8
    """AdamW weight decay."""
    delta_position: Literal["pre_norm", "post_norm"] = "pre_norm"
    """Where the delta is added: the residual stream before the final norm, or the normalised head input."""
    logit_bias: bool = False
    """Also fit an additive logit bias per delta (the standard-SLOT records)."""
    head_autocast: bool = True
    """Run the output head under the caller's autocast (PR #1333) or in fp32 (PR #1263)."""
    warm_start: float = 0.0
    """PR #1278: start a batch from alpha × the previous batch's delta/bias (standard mode only)."""
    rank_split: RankSplit = "contiguous"
    """How windows are shared out over ranks: contiguous blocks, or ``interleaved`` (PR #1278/#1321)."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ConfigError:
            return ConfigError(f"slot.{name}: {msg}")

        if self.mode not in SLOT_MODES:
            raise bad("mode", f"must be one of {SLOT_MODES}, got {self.mode!r}")
        if self.window_rule not in WINDOW_RULES:
            raise bad("window_rule", f"must be one of {WINDOW_RULES}, got {self.window_rule!r}")
        if self.batch_windows <= 0 or self.steps < 0:
            raise bad("steps", f"need batch_windows > 0 and steps >= 0, got {self.batch_windows} / {self.steps}")
        if self.warm_start and self.mode != "standard":
            raise bad("warm_start", "is defined for standard SLOT only (it would couple windows across batches)")
        if self.rank_split not in ("contiguous", "interleaved"):
            raise bad("rank_split", f"must be contiguous or interleaved, got {self.rank_split!r}")

    @property
    def compliant(self) -> bool:
        """Satisfies the four conditions of issue #1017: per-window causal on exact windows."""
        return self.mode == "causal_per_window" and self.window_rule == "exact"

    def lr_at(self, step: int) -> float:
        if self.lr_min is None:
            return self.lr
        return self.lr_min + 0.5 * (self.lr - self.lr_min) * (1.0 + math.cos(math.pi * step / self.steps))


@contextmanager
def frozen_weights(model: nn.Module) -> Iterator[None]:
    """No gradient flows into the model while SLOT backpropagates through its output head."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _objective(nll: Tensor, mask: Tensor, mode: SlotMode) -> Tensor:
    """standard / batch-shared: mean nll over the batch's masked positions; per-window: the sum over windows of
    each window's own mean, so a window's gradient does not depend on the other rows."""
    masked = nll * mask
    if mode == "causal_per_window":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum()
    return masked.sum() / mask.sum()


def _max_target_read(batch: WindowBatch, mask: Tensor) -> Tensor:
    """int64 [B]: the largest stream index whose token enters a row's fitting loss (its last masked target)."""
    return torch.where(mask, batch.positions + 1, NO_STATE).amax(dim=1)


@dataclass
class _SlotHead:
    """The model's output path with the SLOT parameters inserted before or after the final norm."""

    model: nn.Module
    pre_norm: bool
    context: Callable[[], AbstractContextManager]

    def features(self, ids: Tensor) -> Tensor:
        """What the delta is added to: the residual stream (pre-norm) or the normalised head input (post-norm)."""
        hidden = self.model.forward_hidden(ids)
        return hidden if self.pre_norm else self.model.normalize_hidden(hidden)

    def logits(self, features: Tensor, delta: Tensor, bias: Optional[Tensor]) -> Tensor:
        with self.context():
            z = self.model.normalize_hidden(features + delta) if self.pre_norm else features + delta
            logits = self.model.logits_from_normed(z, bias)
        return logits.to(features.dtype)


def _fit(head: _SlotHead, features: Tensor, batch: WindowBatch, mask: Tensor, params: list[Tensor], cfg: SlotSettings):
    """``cfg.steps`` AdamW steps on the fitting loss over ``mask``; a fresh optimiser state for every batch."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    weights = mask.to(features.dtype)
    bias = params[1] if len(params) > 1 else None
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        optimizer.zero_grad()
        logits = head.logits(features, params[0], bias)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch.targets.reshape(-1), reduction="none")
        _objective(nll.view_as(weights), weights, cfg.mode).backward()
        optimizer.step()


def evaluate_slot(
    model: nn.Module, tokens: Tensor, metric: BitsPerByte, cfg: SlotSettings, setup: PassSetup
) -> PassOutcome:
    """Score this rank's windows with per-batch fitted SLOT parameters (see the module docstring for the modes).

    Per batch: features of the frozen model (no grad, the caller's autocast, optionally compiled), zero
    parameters (or the warm start), ``cfg.steps`` AdamW steps on the fitting loss, then scoring of the slices
    ``[s, wl)`` with the fitted parameters. Work happens in fp32 (fp64 for an fp64 model).
    """
    device, options, recorder, seq_len = model_device(model), setup.options, setup.recorder, setup.seq_len
    windows = sliding_windows(tokens.numel() - 1, seq_len, setup.stride, cfg.window_rule)
    windows = rank_share(windows, setup.rank, setup.world_size, cfg.rank_split)
    head = _SlotHead(model, cfg.delta_position == "pre_norm", options.autocast if cfg.head_autocast else nullcontext)
    features_fn = options.compiled(head.features)
    shared = cfg.mode == "causal_batch_shared"
    carried: list[Tensor] = []  # warm start: the previous batch's fitted parameters
    carried_reads = NO_STATE
    batches = batched(windows, cfg.batch_windows)
    with (
        eval_mode(model),
        frozen_weights(model),
        progress_bar(len(batches), f"SLOT ({cfg.mode})", setup.progress) as bar,
    ):
        for group in batches:
            batch = WindowBatch.gather(tokens, group, seq_len, device)
            with torch.no_grad(), options.autocast():
                features = at_least_fp32(features_fn(batch.inputs).detach())
            rows = 1 if shared else len(group)
            if carried and carried[0].size(0) == rows:
                params = [(cfg.warm_start * p).requires_grad_(True) for p in carried]
            else:
                params = [features.new_zeros(rows, 1, features.size(-1), requires_grad=True)]
                if cfg.logit_bias:
                    with torch.no_grad():
                        vocab = head.logits(features[:1, :1], params[0][:1], None).size(-1)
                    params.append(features.new_zeros(rows, 1, vocab, requires_grad=True))

            fit_mask = batch.scored if cfg.mode == "standard" else batch.context
            reads = torch.full((len(group),), NO_STATE, dtype=torch.int64, device=device)
            if cfg.steps > 0 and bool(fit_mask.any()):
                _fit(head, features, batch, fit_mask, params, cfg)
                reads = _max_target_read(batch, fit_mask)
                if shared:
                    reads = reads.amax().expand(len(group))
                if recorder is not None:
                    first = min(w.ws for w, fitted in zip(group, fit_mask.any(dim=1).tolist()) if fitted)
                    recorder.on_update(first, int(reads.max()))
            params = [p.detach() for p in params]
            if cfg.warm_start:
                reads = reads.clamp_min(carried_reads)
                carried, carried_reads = params, int(reads.max())

            with torch.no_grad():
                logits = head.logits(features, params[0], params[1] if len(params) > 1 else None)
            score_batch(batch, logits, metric, recorder, reads)
            bar.update()
    extra = {"slot": cfg.mode, "steps": cfg.steps, "lr": cfg.lr, "stride": setup.stride, "window_rule": cfg.window_rule}
    return PassOutcome(cfg.compliant, extra)


def _audit_slot(name: str, settings) -> AuditCase:
    # 8 AdamW steps per batch at the audit's scale; the batch only changes speed (where SLOT is causal)
    return AuditCase(name, lambda a: replace(settings(a), steps=8), "batch_windows")


# Two passes of one technique: ``slot`` (labelled as the standard-SLOT records label theirs) and ``causal_slot``
# (PR #1333's label); each has its own settings section, so a config can run both. The audit runs the procedures
# the record configs state (PR #1321's interleaved rank split only reorders sums; contiguous keeps D simple) and
# pgolf_lit's per-window variants.
METHODS = (
    EvalMethod(
        "slot",
        SlotSettings,
        evaluate_slot,
        "final_slot",
        "slot",
        audit=(_audit_slot("slot_standard", lambda a: replace(a.record("pr1321", "slot"), rank_split="contiguous")),),
    ),
    EvalMethod(
        "causal_slot",
        SlotSettings,
        evaluate_slot,
        "final_causal_slot",
        "causal_slot",
        audit=(
            _audit_slot("causal_slot_batch_shared", lambda a: a.record("pr1333", "slot")),
            _audit_slot("causal_slot_per_window_legacy", lambda a: SlotSettings(window_rule="legacy")),
            _audit_slot("causal_slot_per_window", lambda a: SlotSettings()),
        ),
    ),
)
