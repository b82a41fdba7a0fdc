"""Parameter routing and optimizer construction of the record scripts (upstream ``train_gpt.py`` of each record).

Every parameter goes where its declared role says (``pgolf_lit.model.roles``): matrices and MTP heads to Muon,
token tables to the token Adam(W) (one param group each), an untied head to the head Adam, controls to the scalar
Adam(W); the embedding projections to Muon unless ``train_embed_projections`` is off. This is what the scripts
decided with ``CONTROL_TENSOR_NAME_PATTERNS`` inside ``blocks`` and hand-written lists outside it.

The order inside a group follows the scripts too (it fixes which rank orthogonalises which Muon matrix): block
tensors first, in model order, then the rest by owning technique in ``SCRIPT_COMPONENT_ORDER``.

Optimizers, in the scripts' step order: token Adam(W), head Adam (untied models only), Muon, scalar Adam(W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from pgolf_lit.errors import CheckedConfig, ConfigError
from pgolf_lit.model.roles import ParamRole, parameter_roles
from pgolf_lit.optim.muon import Muon
from pgolf_lit.optim.schedule import momentum_warmup


@dataclass
class OptimConfig(CheckedConfig):
    """Optimizer knobs under their upstream names. Defaults are the upstream baseline's.

    ``adam_class`` is the torch class of the token and scalar optimizers (the baseline uses Adam without
    decay, every record AdamW); the head optimizer is always Adam without decay, as in every script.
    ``embed_wd`` is the token group's decay; None means ``adam_wd`` (PR #1263/#1278/#1321, where one decay
    serves both groups). ``train_embed_projections``: the scripts give ``embed_proj``/``head_proj`` (only
    present when embedding_dim != model_dim, never in a record) no optimizer, so they stay at their init;
    True (default) trains them with Muon like every other projection, False reproduces the scripts.
    ``muon_compile_cuda`` runs Newton–Schulz through torch.compile on CUDA, as the records do.
    """

    SECTION = "optim"

    tied_embed_lr: float = 0.05
    """lr of the tied token table (upstream TIED_EMBED_LR)."""
    embed_lr: float = 0.6
    """lr of the token table when the head is untied (upstream EMBED_LR)."""
    head_lr: float = 0.008
    """lr of an untied output head (upstream HEAD_LR)."""
    matrix_lr: float = 0.04
    """Muon lr (upstream MATRIX_LR; PR #1855: 0.026)."""
    scalar_lr: float = 0.04
    """lr of the control tensors' Adam(W) (upstream SCALAR_LR)."""
    muon_momentum: float = 0.95
    """Muon momentum after the warmup (upstream MUON_MOMENTUM; PR #1855: 0.97)."""
    muon_momentum_warmup_start: float = 0.85
    """Muon momentum at step 0, ramped linearly to muon_momentum (upstream MUON_MOMENTUM_WARMUP_START)."""
    muon_momentum_warmup_steps: int = 500
    """Length of the momentum ramp in steps (upstream MUON_MOMENTUM_WARMUP_STEPS)."""
    muon_backend_steps: int = 5
    """Newton–Schulz iterations (upstream MUON_BACKEND_STEPS; Polar Express has five tuples: more than five steps run
    just those five, as the script's slice does)."""
    muon_nesterov: bool = True
    """Nesterov momentum in Muon."""
    muon_row_normalize: bool = False
    """MuonEq-R: normalise every row of the update before the iteration (upstream MUON_ROW_NORMALIZE)."""
    matrix_lr_early: Optional[float] = None
    """PR #1179/#1204's split LR (upstream MATRIX_LR_EARLY, 0.025): the block matrices of layers below bank_split
    get their gradients scaled by matrix_lr_early / matrix_lr before Muon; null = matrix_lr (no split). Muon's
    Newton–Schulz normalises each update, so the scale does not shrink the step; it changes the bf16 rounding of the
    gradient, which the iteration amplifies along the gradient's weakest directions."""
    matrix_lr_late: Optional[float] = None
    """The same for the layers from bank_split on (upstream MATRIX_LR_LATE, 0.03 = MATRIX_LR in PR #1204)."""
    bank_split: int = 5
    """First layer of the late half of the split LR (upstream BANK_SPLIT)."""
    muon_wd: float = 0.0
    """Decoupled Muon weight decay, scaled by the scheduled lr (upstream MUON_WD; PR #1855: 0.095)."""
    muon_compile_cuda: bool = True
    """Run Newton–Schulz through torch.compile on CUDA tensors, as the records do."""
    muon_ns_coefficients: Literal["ns5", "polar_express"] = "ns5"
    """Newton–Schulz coefficients: ns5, the fixed quintic (3.4445, −4.775, 2.0315) of every record up to PR #1394;
    polar_express, one minimax tuple per iteration (PR #1344 via PR #1787/#1855, ``_PE_COEFFS``)."""
    muon_momentum_dtype: Literal["fp32", "bf16"] = "fp32"
    """bf16: PR #1855's Muon step: the gradient is cast to bf16 before the momentum, the momentum buffer is bf16 and
    the shape scale is applied in the fp32 update; fp32: the earlier records' step (buffer in the grad's dtype)."""
    muon_skip_params_without_grad: bool = False
    """True (PR #1855): a Muon parameter without a gradient is not touched at all; False (earlier records): it
    gets a zero update but is still decayed."""
    adam_class: Literal["Adam", "AdamW"] = "Adam"
    """Torch class of the token and scalar optimizers (the baseline: Adam without decay; the records: AdamW)."""
    beta1: float = 0.9
    """Adam β1 of the token, head and scalar optimizers (upstream BETA1)."""
    beta2: float = 0.95
    """Adam β2 of the token, head and scalar optimizers (upstream BETA2; PR #1855: 0.99)."""
    adam_eps: float = 1e-8
    """Adam ε (upstream ADAM_EPS)."""
    adam_wd: float = 0.0
    """Decoupled decay of the scalar AdamW (upstream ADAM_WD), and of the token table when embed_wd is null."""
    embed_wd: Optional[float] = None
    """Decoupled decay of the token AdamW (upstream EMBED_WD); null = adam_wd."""
    fused: bool = True
    """Fused Adam(W) kernels, as the scripts."""
    grad_clip_norm: float = 0.0
    """Clip the L2 norm of all gradients to this before the step; 0 = off (upstream GRAD_CLIP_NORM)."""
    grad_clip_scope: Literal["global", "local"] = "global"
    """Which gradient is clipped under data parallelism: global, the averaged gradient (every record up to PR
    #1394); local, each rank's own gradient before the all-reduce, with its own coefficient (PR #1855's step_fn:
    clip, then the optimizers reduce). Identical on one device."""
    train_embed_projections: bool = True
    """Train embed_proj/head_proj with Muon (True) or leave them at their init as the scripts do (False)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in ("tied_embed_lr", "embed_lr", "head_lr", "matrix_lr", "scalar_lr", "muon_wd", "adam_wd"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("matrix_lr_early", "matrix_lr_late"):
            if getattr(self, name) is not None and (getattr(self, name) < 0 or self.matrix_lr <= 0):
                raise ConfigError(f"optim.{name}: must be >= 0 or null, with matrix_lr > 0; got {getattr(self, name)}")
        if self.embed_wd is not None and self.embed_wd < 0:
            raise ConfigError(f"optim.embed_wd: must be >= 0 or null, got {self.embed_wd}")
        for name in ("muon_momentum", "muon_momentum_warmup_start", "beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}: must lie in [0, 1), got {getattr(self, name)}")
        if self.muon_momentum_warmup_steps < 0:
            raise ConfigError(f"optim.muon_momentum_warmup_steps: must be >= 0, got {self.muon_momentum_warmup_steps}")
        if self.muon_backend_steps < 1:
            raise ConfigError(f"optim.muon_backend_steps: must be >= 1, got {self.muon_backend_steps}")
        if self.adam_eps <= 0:
            raise ConfigError(f"optim.adam_eps: must be > 0, got {self.adam_eps}")
        if self.grad_clip_norm < 0:
            raise ConfigError(f"optim.grad_clip_norm: must be >= 0 (0 = off), got {self.grad_clip_norm}")
        if self.adam_class not in ("Adam", "AdamW"):
            raise ConfigError(f"optim.adam_class: expected 'Adam' or 'AdamW', got {self.adam_class!r}")
        choices = {
            "muon_ns_coefficients": ("ns5", "polar_express"),
            "muon_momentum_dtype": ("fp32", "bf16"),
            "grad_clip_scope": ("global", "local"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"optim.{name}: expected one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.adam_class == "Adam" and (self.adam_wd or self.embed_wd):
            raise ConfigError(
                "optim.adam_wd/embed_wd: decay needs adam_class AdamW (torch Adam's weight_decay is an L2 "
                "penalty on the gradient, which no script uses)"
            )

    @property
    def token_wd(self) -> float:
        return self.adam_wd if self.embed_wd is None else self.embed_wd

    def muon_momentum_at(self, step: int) -> float:
        """The Muon momentum for the step with 0-based index ``step`` (warmup as in upstream ``main``)."""
        return momentum_warmup(
            step, self.muon_momentum_warmup_start, self.muon_momentum, self.muon_momentum_warmup_steps
        )


Named = list[tuple[str, nn.Parameter]]


@dataclass
class ParamRouting:
    """Which optimizer each parameter goes to, by qualified name, in optimizer order.

    ``token`` entries each become their own param group. ``no_optimizer`` holds what is deliberately left
    out: empty skip tables (a 1-layer model), constants (PR #1945's softcap_pos/neg) and, with
    ``train_embed_projections=False``, the embedding projections — they still receive gradients where the loss
    reaches them (and count in the clipping norm), as in the scripts.
    """

    token: Named
    head: Named
    muon: Named
    scalar: Named
    no_optimizer: Named


# Where the scripts list the tensors outside ``blocks`` by hand, they list them in this order of techniques.
SCRIPT_COMPONENT_ORDER = (
    "embeddings",
    "mtp_heads",
    "skip",
    "parallel_residual",
    "iteration",
    "smear",
    "bigram",
    "value_embedding",
    "embed_projection",
)


def script_order(roles: dict[str, ParamRole]) -> list[str]:
    """Parameter names in the scripts' optimizer order: block tensors in model order, then by technique, and
    within a technique in the order the model declared them (the order the scripts create and list them)."""
    position = {name: i for i, name in enumerate(roles)}

    def key(name: str) -> tuple[int, int, int]:
        role = roles[name]
        if role.layer is not None:
            return 0, 0, position[name]
        rank = (
            SCRIPT_COMPONENT_ORDER.index(role.component)
            if role.component in SCRIPT_COMPONENT_ORDER
            else len(SCRIPT_COMPONENT_ORDER)
        )
        return 1 + rank, role.declared, position[name]

    return sorted(roles, key=key)


def route_parameters(model: nn.Module, cfg: OptimConfig) -> ParamRouting:
    """Route every parameter of a pgolf GPT to exactly one optimizer by its declared role (see module docstring).

    Empty tensors (the skip tables of a 1-layer model) get no optimizer, nor do the embedding projections with
    ``train_embed_projections=False``; both still receive gradients and count in the clipping norm, as upstream.
    """
    roles = parameter_roles(model)
    params = dict(model.named_parameters())
    routing = ParamRouting(token=[], head=[], muon=[], scalar=[], no_optimizer=[])
    destination = {
        "matrix": routing.muon,
        "aux_head": routing.muon,
        "projection": routing.muon if cfg.train_embed_projections else routing.no_optimizer,
        "embedding": routing.token,
        "head": routing.head,
        "control": routing.scalar,
        "constant": routing.no_optimizer,
        "unused": routing.no_optimizer,
    }
    for name in script_order(roles):
        p = params[name]
        dest = routing.no_optimizer if p.numel() == 0 else destination[roles[name].kind]
        dest.append((name, p))
    return routing


# The matrices PR #549's parameter banks hold (qo, kv, mlp_up, mlp_down): what PR #1179/#1204's split LR scales.
BANK_COMPONENTS = ("attention", "mlp")


def split_lr_groups(muon: Named, roles: dict[str, ParamRole], cfg: OptimConfig) -> list[dict[str, Any]]:
    """Muon's param groups. Without a split, one. With PR #1179/#1204's split LR (train_gpt.py, after the clip:
    ``bank.grad[:BANK_SPLIT].mul_(MATRIX_LR_EARLY / MATRIX_LR)``, the rest by MATRIX_LR_LATE / MATRIX_LR): the bank
    matrices of the layers below ``bank_split``, those from it on, and the other Muon matrices (unscaled)."""
    early, late = cfg.matrix_lr_early, cfg.matrix_lr_late
    if early is None and late is None:
        return [{"params": [p for _, p in muon]}]
    scales = {True: (early if early is not None else cfg.matrix_lr) / cfg.matrix_lr}
    scales[False] = (late if late is not None else cfg.matrix_lr) / cfg.matrix_lr
    groups = {True: [], False: [], None: []}
    for name, p in muon:
        role = roles[name]
        in_bank = role.layer is not None and role.component in BANK_COMPONENTS
        groups[role.layer < cfg.bank_split if in_bank else None].append(p)
    return [
        {"params": ps, "grad_scale": scales[key]} if key is not None else {"params": ps}
        for key, ps in groups.items()
        if ps
    ]


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
            split_lr_groups(routing.muon, parameter_roles(model), cfg),
            lr=cfg.matrix_lr,
            momentum=cfg.muon_momentum,
            backend_steps=cfg.muon_backend_steps,
            nesterov=cfg.muon_nesterov,
            weight_decay=cfg.muon_wd,
            row_normalize=cfg.muon_row_normalize,
            compile_cuda=cfg.muon_compile_cuda,
            coefficients=cfg.muon_ns_coefficients,
            momentum_dtype=cfg.muon_momentum_dtype,
            skip_without_grad=cfg.muon_skip_params_without_grad,
        )
    )
    optimizers.append(adam_cls(groups(routing.scalar, cfg.scalar_lr), weight_decay=cfg.adam_wd, **common))
    return optimizers
