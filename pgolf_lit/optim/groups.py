"""Parameter routing and optimizer construction of the record scripts (spec/training.md §2.1, §2.5).

Inside ``blocks`` one rule routes every tensor: a 2-D tensor whose name (relative to ``blocks``) contains
no control pattern goes to Muon, everything else to the scalar Adam(W) group. Outside ``blocks`` the scripts
list tensors by hand; ``route_parameters`` reproduces those lists for every architecture feature, in the
scripts' order. The order inside the Muon group matters: it fixes which rank orthogonalises which matrix.

Optimizers, in the scripts' step order: token Adam(W) (one param group per embedding table), head Adam
(untied models only), Muon, scalar Adam(W).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from pgolf_lit.config import BASELINE_CONTROL_PATTERNS
from pgolf_lit.errors import ConfigError
from pgolf_lit.optim.muon import Muon
from pgolf_lit.optim.schedule import momentum_warmup


@dataclass
class OptimConfig:
    """Optimizer knobs under their upstream names. Defaults are the upstream baseline's.

    ``adam_class`` is the torch class of the token and scalar optimizers (the baseline uses Adam without
    decay, every record AdamW); the head optimizer is always Adam without decay, as in every script.
    ``embed_wd`` is the token group's decay; None means ``adam_wd`` (PR #1263/#1278/#1321, where one decay
    serves both groups). ``train_embed_projections``: the scripts give ``embed_proj``/``head_proj`` (only
    present when embedding_dim != model_dim, never in a record) no optimizer, so they stay at their init;
    True (default) trains them with Muon like every other projection, False reproduces the scripts.
    ``muon_compile_cuda`` runs Newton–Schulz through torch.compile on CUDA, as the records do.
    """

    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6
    head_lr: float = 0.008
    matrix_lr: float = 0.04
    scalar_lr: float = 0.04
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    muon_nesterov: bool = True
    muon_row_normalize: bool = False
    muon_wd: float = 0.0
    muon_compile_cuda: bool = True
    adam_class: Literal["Adam", "AdamW"] = "Adam"
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    adam_wd: float = 0.0
    embed_wd: Optional[float] = None
    fused: bool = True
    grad_clip_norm: float = 0.0
    control_tensor_patterns: list[str] = field(default_factory=lambda: list(BASELINE_CONTROL_PATTERNS))
    train_embed_projections: bool = True

    def __post_init__(self) -> None:
        self.control_tensor_patterns = [str(p) for p in self.control_tensor_patterns if p]
        self.validate()

    def validate(self) -> None:
        for name in ("tied_embed_lr", "embed_lr", "head_lr", "matrix_lr", "scalar_lr", "muon_wd", "adam_wd"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(self, name)}")
        if self.embed_wd is not None and self.embed_wd < 0:
            raise ConfigError(f"optim.embed_wd: must be >= 0 or null, got {self.embed_wd}")
        for name in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}: must lie in [0, 1), got {getattr(self, name)}")
        if self.muon_momentum_warmup_steps < 0:
            raise ConfigError(
                f"optim.muon_momentum_warmup_steps: must be >= 0, got {self.muon_momentum_warmup_steps}"
            )
        if self.muon_backend_steps < 1:
            raise ConfigError(f"optim.muon_backend_steps: must be >= 1, got {self.muon_backend_steps}")
        if self.adam_eps <= 0:
            raise ConfigError(f"optim.adam_eps: must be > 0, got {self.adam_eps}")
        if self.grad_clip_norm < 0:
            raise ConfigError(f"optim.grad_clip_norm: must be >= 0 (0 = off), got {self.grad_clip_norm}")
        if self.adam_class not in ("Adam", "AdamW"):
            raise ConfigError(f"optim.adam_class: expected 'Adam' or 'AdamW', got {self.adam_class!r}")
        if self.adam_class == "Adam" and (self.adam_wd or self.embed_wd):
            raise ConfigError(
                "optim.adam_wd/embed_wd: decay needs adam_class AdamW (torch Adam's weight_decay is an L2 "
                "penalty on the gradient, which no script uses)"
            )

    @property
    def token_wd(self) -> float:
        return self.adam_wd if self.embed_wd is None else self.embed_wd

    def muon_momentum_at(self, step: int) -> float:
        """The Muon momentum for the step with 0-based index ``step`` (warmup, spec §3.4)."""
        return momentum_warmup(
            step, self.muon_momentum_warmup_start, self.muon_momentum, self.muon_momentum_warmup_steps
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "OptimConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(
                f"optim: unknown field(s) {unknown}; known fields are listed in pgolf_lit/optim/groups.py"
            )
        return cls(**d)

    def replace(self, **changes: Any) -> "OptimConfig":
        return OptimConfig.from_dict({**self.to_dict(), **changes})


Named = list[tuple[str, nn.Parameter]]


@dataclass
class ParamRouting:
    """Which optimizer each parameter goes to, by qualified name, in optimizer order.

    ``token`` entries each become their own param group. ``no_optimizer`` holds what is deliberately left
    out: empty skip tables (a 1-layer model) and, with ``train_embed_projections=False``, the embedding
    projections — they still receive gradients (and count in the clipping norm), as in the scripts.
    """

    token: Named
    head: Named
    muon: Named
    scalar: Named
    no_optimizer: Named


def route_parameters(model: nn.Module, cfg: OptimConfig) -> ParamRouting:
    """Route every parameter of a pgolf GPT to exactly one optimizer, or raise naming the ones left over.

    Order of the hand-listed tensors outside ``blocks`` (the union of the scripts' lists, which never
    conflict): Muon gets ``mtp_heads``, ``bigram.proj``, ``ve_shared.proj`` (then ``embed_proj``,
    ``head_proj`` when trained); scalar gets ``skip_weights``, ``skip_gates``, ``lane_merge``, ``iter_embed``,
    ``iter_gate``, ``smear.gate``, ``bigram.scale``, ``ve_shared.scale``, ``ve_layer_scales.*``; the token
    optimizer gets ``tok_emb``, ``bigram.embed``, ``ve_shared.embed``.
    """
    remaining = dict(model.named_parameters())
    routing = ParamRouting(token=[], head=[], muon=[], scalar=[], no_optimizer=[])

    def take(dest: Named, name: str) -> None:
        if name in remaining:
            dest.append((name, remaining.pop(name)))

    patterns = tuple(cfg.control_tensor_patterns)
    for rel, p in model.blocks.named_parameters():
        name = f"blocks.{rel}"
        is_matrix = p.ndim == 2 and not any(pat in rel for pat in patterns)
        take(routing.muon if is_matrix else routing.scalar, name)

    for name in [n for n in remaining if n.startswith("mtp_heads.")]:
        take(routing.muon, name)
    take(routing.muon, "bigram.proj.weight")
    take(routing.muon, "ve_shared.proj.weight")
    for name in ("embed_proj.weight", "head_proj.weight"):
        take(routing.muon if cfg.train_embed_projections else routing.no_optimizer, name)

    for name in ("skip_weights", "skip_gates", "lane_merge", "iter_embed", "iter_gate", "smear.gate"):
        empty_skip_table = name.startswith("skip_") and name in remaining and remaining[name].numel() == 0
        take(routing.no_optimizer if empty_skip_table else routing.scalar, name)
    take(routing.scalar, "bigram.scale")
    take(routing.scalar, "ve_shared.scale")
    for name in [n for n in remaining if n.startswith("ve_layer_scales.")]:
        take(routing.scalar, name)

    for name in ("tok_emb.weight", "bigram.embed.weight", "ve_shared.embed.weight"):
        take(routing.token, name)
    take(routing.head, "lm_head.weight")

    if remaining:
        raise ConfigError(
            f"optim: no optimizer routing for parameter(s) {sorted(remaining)}; add them in route_parameters"
        )
    return routing


def build_optimizers(model: nn.Module, cfg: OptimConfig) -> list[torch.optim.Optimizer]:
    """The records' optimizers for ``model`` in step order: token, [head], Muon, scalar.

    Every param group carries ``base_lr`` (the unscheduled lr) and starts with ``lr = base_lr``; Muon
    starts at ``muon_momentum`` (the schedule overwrites lr and momentum before every step).
    """
    routing = route_parameters(model, cfg)
    adam_cls = torch.optim.AdamW if cfg.adam_class == "AdamW" else torch.optim.Adam
    common = dict(betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps, fused=cfg.fused)
    token_lr = cfg.embed_lr if routing.head else cfg.tied_embed_lr  # an lm_head exists only when untied

    def groups(named: Named, lr: float, one_per_tensor: bool = False) -> list[dict[str, Any]]:
        chunks = [[p] for _, p in named] if one_per_tensor else [[p for _, p in named]]
        return [{"params": ps, "lr": lr, "base_lr": lr} for ps in chunks]

    optimizers: list[torch.optim.Optimizer] = [
        adam_cls(groups(routing.token, token_lr, one_per_tensor=True), weight_decay=cfg.token_wd, **common)
    ]
    if routing.head:
        optimizers.append(torch.optim.Adam(groups(routing.head, cfg.head_lr), **common))
    optimizers.append(
        Muon(
            [p for _, p in routing.muon],
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            backend_steps=cfg.muon_backend_steps,
            nesterov=cfg.muon_nesterov,
            weight_decay=cfg.muon_wd,
            row_normalize=cfg.muon_row_normalize,
            compile_cuda=cfg.muon_compile_cuda,
        )
    )
    optimizers.append(adam_cls(groups(routing.scalar, cfg.scalar_lr), weight_decay=cfg.adam_wd, **common))
    return optimizers
