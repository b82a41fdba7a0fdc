"""Export: route every tensor, quantize, prune to the budget, write the artifact, and read it back.

``ExportConfig`` holds every knob, and a record's YAML states all of them (``GPTQExport``'s ``export``); the defaults
are pgolf's own scheme: PR #1394's quantization (SDClip GPTQ int6 matrices, int8 GPTQ tied embedding) in the native
container, with a GPTQ failure falling back to RTN instead of crashing and pruning searched on the real compressed
size.

Which rule a tensor gets comes from its declared role (``pgolf_lit.model.roles``): small tensors and controls stay
floats, the rest are quantized by the rule of their quant group with a registered quantizer (``quantizers.py``).

Flow of ``export_model``: Hessians (``hessians.py``) → ``quantize_state_dict`` → ``selective_prune`` (each probe
serializes and compresses for real) → budget check on model bytes + code bytes (``code_size.py``) → atomic write →
size re-read from disk. ``load_artifact`` / ``build_model_from_artifact`` (``reader.py``) reverse it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pgolf_lit.config import GPTConfig
from pgolf_lit.errors import ArtifactError, CheckedConfig, ConfigError
from pgolf_lit.fileio import atomic_write_bytes
from pgolf_lit.model.convert import to_upstream_state_dict
from pgolf_lit.model.roles import ParamRole, parameter_roles
from pgolf_lit.quant.artifact import UPSTREAM_STYLES, encode_native, encode_upstream
from pgolf_lit.quant import code_lzma  # noqa: F401  (registers the lzma code wrapper)
from pgolf_lit.quant.code_size import CodeSize, measure_code_size
from pgolf_lit.quant.code_step import CodeStepSettings, step_codes
from pgolf_lit.quant.compress import CODECS
from pgolf_lit.quant.awq import AwqGroups, AwqSettings, protect_mask, select_groups
from pgolf_lit.quant.bank_percentile import bank_members, quantize_banks
from pgolf_lit.quant.gptq import gptq_sdclip_protected
from pgolf_lit.quant.gate import gate_shape_qualifies
from pgolf_lit.quant.keep_float import check_patterns, keeps_float, validate_patterns
from pgolf_lit.quant.lqer import LqerSettings, lqer_apply
from pgolf_lit.quant.magnitude_prune import MagnitudePruneSettings, magnitude_prune
from pgolf_lit.quant.pergroup import PergroupSettings, encode_pergroup, pergroup_from_quantized
from pgolf_lit.quant.pergroup_v2 import encode_pergroup_v2, record_v2_order
from pgolf_lit.quant.hessians import HessianReport, collect_hessians
from pgolf_lit.quant.prune import PruneReport, selective_prune
from pgolf_lit.quant.trace_rank import recurrent_layers, trace_ranked_int6
from pgolf_lit.quant.quantized import Meta, dequantize, dtype_name, tensor_keys
from pgolf_lit.quant.quantizers import KEEP_FLOAT_MAX_NUMEL, Quantized, TensorRule, clip_range, quantizers
from pgolf_lit.quant.reader import (  # the reading side, re-exported (reading never imports this module)
    LoadedArtifact,
    build_model_from_artifact,
    load_artifact,
    model_from_artifact,
    read_artifact,
)

__all__ = [
    "ExportConfig",
    "ExportReport",
    "LoadedArtifact",
    "TensorRule",
    "build_model_from_artifact",
    "dequantize",
    "export_model",
    "load_artifact",
    "model_from_artifact",
    "quantize_state_dict",
    "read_artifact",
]

PathLike = Union[str, Path]
RULE_GROUPS = ("mlp", "attn", "embed", "other")


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ExportBase(CheckedConfig):
    """Every export knob but the quantizers' own settings: routing, per-group rules, container, budget.
    ``ExportConfig`` adds one section per quantizer with settings (``quantizers.py``: ``gptq``)."""

    SECTION = "export"

    format: Literal["native", "upstream", "pergroup", "pergroup_v2"] = "native"
    """``native``: pgolf's container (config inside, no pickle); ``upstream``: the record script's own file;
    ``pergroup``: PR #1855's PGRP container (7 lrzip-ZPAQ code groups + brotli; needs the ``lrzip`` program);
    ``pergroup_v2``: PR #2130/#2135's PGRP v2 (every codes tensor row-sorted in one lrzip stream; COMPRESSOR=pergroup
    in those scripts)."""
    upstream_style: str = "pr1394"
    """With ``format: upstream``, whose container to write: baseline, pr1263, pr1333 or pr1394."""
    keep_float_max_numel: int = KEEP_FLOAT_MAX_NUMEL
    """Float tensors with at most this many elements are kept as floats (fp16; see ``small_controls_fp32``)."""
    small_controls_fp32: bool = False
    """Keep small control tensors in fp32 instead of fp16 (the baseline's INT8_KEEP_FLOAT_FP32 rule)."""
    keep_float: list[str] = field(default_factory=list)
    """Float keep of named tensors (``keep_float.py``): a tensor whose state-dict name contains one of these is
    stored fp16 instead of quantized, at any size (upstream FP16_KEEP_NAME_PATTERNS, PR #162/#180;
    FP16_PASSTHROUGH_PATTERNS, PR #63/#65; PR #42's and FP16_EMBED_EXPORT's tok_emb.weight)."""
    mlp: TensorRule = field(
        default_factory=lambda: TensorRule(bits=6, method="gptq", scale="sdclip", clip_sigmas=12.85)
    )
    """Rule for the MLP matrices."""
    attn: TensorRule = field(
        default_factory=lambda: TensorRule(bits=6, method="gptq", scale="sdclip", clip_sigmas=12.85)
    )
    """Rule for the attention matrices (and, as in the records, every other ``.proj`` weight)."""
    embed: TensorRule = field(
        default_factory=lambda: TensorRule(bits=8, method="gptq", scale="sdclip", clip_sigmas=20.0)
    )
    """Rule for the token embedding / output head tables."""
    other: TensorRule = field(default_factory=lambda: TensorRule(bits=8, method="rtn", scale="quantile"))
    """Rule for any other large tensor (hashed bigram and value-embedding tables, embedding projections)."""
    gate: Optional[TensorRule] = None
    """Rule for the attention gates (PR #1855's QuantGate: rtn, 8 bits, row_amax); null keeps them as floats."""
    trace_rank_keep: Optional[int] = None
    """Mixed int5/int6 (``trace_rank.py``; PR #1105, upstream MIXED_QUANT=1 with N_INT6_LAYERS=N): rank the GPTQ
    mlp/attn matrices by trace(H) (0 without a Hessian); all but the top N tensors get ``trace_rank_low_bits``."""
    trace_rank_low_bits: int = 5
    """Bits of the matrices outside the trace-ranked top N."""
    trace_rank_recurrent_first: bool = False
    """PR #1204's order (its MIXED_QUANT=1 with RECUR_LAYERS): the matrices of the recurrent layers (the physical
    layers the layer schedule runs twice, with their untied MLPs) take the top N first, by trace among themselves."""
    lqer: Optional[LqerSettings] = None
    """LQER (PR #1855): a low-rank correction of the top-k GPTQ tensors by quantization error; null = off."""
    awq: Optional[AwqSettings] = None
    """AWQ-lite (PR #1945, upstream AWQ_LITE_ENABLED): the top-k groups of input columns of the whole model, by
    activation RMS × mean |W|, quantized at ``awq.bits`` inside the GPTQ sweep (candidates: the sdclip-GPTQ
    tensors with fewer bits; the activation statistics come with the Hessians); LQER runs after it. null = off."""
    code_step: Optional[CodeStepSettings] = None
    """Per-layer code step (``code_step.py``; PR #39's INT4_LAYERS / INT4_STEP): the codes of the quantized tensors
    of blocks ``layers`` rounded to multiples of ``step`` after quantization. null = off."""
    magnitude_prune: Optional[MagnitudePruneSettings] = None
    """Magnitude pruning before quantization (``magnitude_prune.py``; PR #180's hard-coded 3 %, no env var): the
    ``fraction`` smallest |w| of each 2-D tensor above ``min_numel`` elements become zero. null = off."""
    pergroup: PergroupSettings = field(default_factory=PergroupSettings)
    """lrzip and brotli settings of the ``pergroup`` container."""
    codec: str = "brotli"
    """Byte compressor of the container: brotli, lzma, lzma9, zstd or zlib."""
    code_wrapper: str = "brotli"
    """How the counted code is wrapped (``code_size.py``): brotli (PR #1855: its pyminify flags, brotli 11,
    base85) or lzma (PR #2130/#2135's _compressed_code_size: pyminify with three flags, lzma preset 6, base85)."""
    shuffle_stride: int = 2
    """Byte shuffle before compression (2 groups the two bytes of fp16 values); 0 = off."""
    budget_bytes: int = 16_000_000
    """The challenge's limit on model bytes + code bytes."""
    prune: Literal["none", "upstream", "search"] = "search"
    """±1 pruning to fit the budget: none, PR #1333's rule, or a search on the real compressed size."""
    prune_resolution: float = 0.01
    """Search mode: stop when the bracket is this fraction of the candidates."""
    allow_over_budget: bool = False
    """Write an artifact even when it exceeds ``budget_bytes`` (an error otherwise)."""

    def __post_init__(self) -> None:
        for name in (*RULE_GROUPS, "gate"):
            rule = getattr(self, name)
            if rule is None:
                continue
            # a private copy: configs may share rule objects; YAML gives plain mappings
            rule = TensorRule(**rule) if isinstance(rule, Mapping) else dataclasses.replace(rule)
            rule.validate(f"export.{name}")
            setattr(self, name, rule)
        for name, settings_cls in quantizer_sections().items():  # a private copy each, as the rules
            section = getattr(self, name)
            if isinstance(section, Mapping):
                known = {f.name for f in dataclasses.fields(settings_cls)}
                unknown = sorted(set(section) - known)
                if unknown:
                    raise ConfigError(f"export.{name}: unknown field(s) {unknown}; expected some of {sorted(known)}")
                section = settings_cls(**section)
            setattr(self, name, dataclasses.replace(section))
        if isinstance(self.lqer, Mapping):
            self.lqer = LqerSettings(**self.lqer)
        if isinstance(self.awq, Mapping):
            self.awq = AwqSettings(**self.awq)
        if isinstance(self.pergroup, Mapping):
            self.pergroup = PergroupSettings(**self.pergroup)
        if isinstance(self.code_step, Mapping):
            self.code_step = CodeStepSettings(**self.code_step)
        if isinstance(self.magnitude_prune, Mapping):
            self.magnitude_prune = MagnitudePruneSettings(**self.magnitude_prune)
        self.validate()

    def validate(self) -> None:
        from pgolf_lit.quant.code_size import CODE_WRAPPERS

        if self.code_wrapper not in CODE_WRAPPERS:
            raise ConfigError(
                f"export.code_wrapper: unknown wrapper {self.code_wrapper!r}; expected one of {sorted(CODE_WRAPPERS)}"
            )
        if self.codec not in CODECS:
            raise ConfigError(f"export.codec: unknown codec {self.codec!r}; expected one of {sorted(CODECS)}")
        if self.format not in ("native", "upstream", "pergroup", "pergroup_v2"):
            raise ConfigError(f"export.format: expected native, upstream, pergroup or pergroup_v2, got {self.format!r}")
        if self.lqer is not None and not any(
            getattr(self, g) is not None and quantizers()[getattr(self, g).method].needs_hessian for g in RULE_GROUPS
        ):
            raise ConfigError("export.lqer: corrects GPTQ tensors, but no quant group uses gptq")
        if self.awq is not None and not any(
            getattr(self, g) is not None and getattr(self, g).method == "gptq" and getattr(self, g).scale == "sdclip"
            for g in RULE_GROUPS
        ):
            raise ConfigError("export.awq: protects columns inside SDClip GPTQ, but no quant group uses it")
        if self.awq is not None and self.gptq.hessian_clip_lambda:
            raise ConfigError("export.gptq.hessian_clip_lambda: AWQ-lite's protected sweep has no Hessian-aware scale")
        if self.awq is not None and self.format == "upstream":
            raise ConfigError(
                "export.awq: the upstream containers before PR #1945 hold no AWQ groups; use native or pergroup"
            )
        if self.format == "upstream" and self.upstream_style not in UPSTREAM_STYLES:
            raise ConfigError(
                f"export.upstream_style: expected one of {list(UPSTREAM_STYLES)}, got {self.upstream_style!r}"
            )
        if self.prune not in ("none", "upstream", "search"):
            raise ConfigError(f"export.prune: expected none, upstream or search, got {self.prune!r}")
        if not 0 <= self.shuffle_stride <= 255:
            raise ConfigError(f"export.shuffle_stride: must lie in [0, 255], got {self.shuffle_stride}")
        if self.budget_bytes <= 0:
            raise ConfigError(f"export.budget_bytes: must be positive, got {self.budget_bytes}")
        validate_patterns(self.keep_float)
        if self.magnitude_prune is not None:
            self.magnitude_prune.validate()
        if self.code_step is not None:
            self.code_step.validate()
        if self.keep_float_max_numel < 0:
            raise ConfigError(f"export.keep_float_max_numel: must be >= 0, got {self.keep_float_max_numel}")
        if self.trace_rank_keep is not None and self.trace_rank_keep < 0:
            raise ConfigError(f"export.trace_rank_keep: must be >= 0 or null, got {self.trace_rank_keep}")
        if self.trace_rank_recurrent_first and self.trace_rank_keep is None:
            raise ConfigError("export.trace_rank_recurrent_first: orders the trace ranking; set trace_rank_keep too")
        try:
            clip_range(self.trace_rank_low_bits)
        except ConfigError:
            raise ConfigError(
                f"export.trace_rank_low_bits: must lie in [2, 8], got {self.trace_rank_low_bits}"
            ) from None
        for name in quantizer_sections():
            section = getattr(self, name)
            if hasattr(section, "validate"):
                section.validate()

    def rule(self, role: ParamRole) -> Optional[TensorRule]:
        """The rule of a tensor's quant group (None: kept float)."""
        return getattr(self, role.quant) if role.quant is not None else None

    @property
    def uses_gptq(self) -> bool:
        rules = [getattr(self, g) for g in (*RULE_GROUPS, "gate")]
        return any(r is not None and quantizers()[r.method].needs_hessian for r in rules)

    @property
    def hessian_groups(self) -> tuple[str, ...]:
        """The matrix groups whose rule quantizes with a Hessian (GPTQ): the layers the calibration hooks."""
        rules = {g: getattr(self, g) for g in RULE_GROUPS if g != "embed"}
        return tuple(g for g, r in rules.items() if r is not None and quantizers()[r.method].needs_hessian)

    @property
    def head_uses_gptq(self) -> bool:
        return quantizers()[self.embed.method].needs_hessian

    def quantizer_settings(self, method: str) -> Any:
        """The settings section of quantizer ``method`` (None when it has none)."""
        return getattr(self, method) if method in quantizer_sections() else None


def quantizer_sections() -> dict[str, type]:
    """The quantizers with settings, by name: the sections ``ExportConfig`` adds to ``ExportBase``."""
    return {name: q.settings for name, q in quantizers().items() if q.settings is not None}


ExportConfig = dataclasses.make_dataclass(
    "ExportConfig",
    [(name, cls, field(default_factory=cls)) for name, cls in quantizer_sections().items()],
    bases=(ExportBase,),
)
ExportConfig.__module__ = __name__
ExportConfig.__doc__ = (
    "Every export knob: routing, per-group rules, container, budget, then one section per quantizer with settings "
    f"({', '.join(quantizer_sections())}). A record's YAML lists each value that differs from these defaults "
    "(pgolf's scheme)."
)


# ---------------------------------------------------------------------------------------------------------
# Quantizing a state dict
# ---------------------------------------------------------------------------------------------------------


def quantize_state_dict(
    state_dict: Mapping[str, Tensor],
    cfg: ExportConfig,
    hessians: Optional[Mapping[str, Tensor]] = None,
    *,
    roles: Mapping[str, ParamRole],
    progress: bool = False,
    act_rms: Optional[Mapping[str, Tensor]] = None,
    recurrent_layers: Optional[Collection[int]] = None,
) -> tuple[dict[str, Tensor], Meta]:
    """Route and quantize every entry by its role (see ``quantized.py`` for the result's layout), in state-dict order.

    ``roles`` is the model's ``parameter_roles`` table. Tensors arrive in the dtypes they should dequantize to
    (reproduce mode: the record's live dtypes, bf16 tables). ``act_rms``: the activation statistics AWQ-lite
    scores with (``HessianReport.act_rms``), needed when ``cfg.awq`` is set. ``recurrent_layers``: the physical
    layers the model runs more than once (``trace_rank.recurrent_layers``), needed with ``trace_rank_recurrent_first``.
    """
    hessians = hessians or {}
    missing = [name for name in state_dict if name not in roles]
    if missing:
        raise ConfigError(
            f"export: no declared role for state-dict entries {missing[:3]} (is this the model's state dict?)"
        )
    check_patterns(cfg.keep_float, state_dict)
    stepped = set(cfg.code_step.layers) if cfg.code_step is not None else set()
    absent = sorted(stepped - {roles[name].layer for name in state_dict})
    if absent:
        raise ConfigError(f"export.code_step.layers: the model has no block {absent}")
    low_bits = _trace_ranked_low_bits(state_dict, cfg, hessians, roles, recurrent_layers)
    protected = _awq_selection(state_dict, cfg, roles, act_rms, low_bits) if cfg.awq is not None else {}
    banked = _bank_searched(state_dict, cfg, roles) if cfg.rtn.percentile_scope == "bank" else {}
    quant: dict[str, Tensor] = {}
    meta: Meta = {}
    for name, tensor in tqdm(state_dict.items(), desc="quantize", disable=not progress, leave=False):
        t = tensor.detach().cpu().contiguous()
        role = roles[name]
        if not t.is_floating_point():
            quant[name], meta[name] = t, {"kind": "raw"}
            continue
        rule = _rule_for(name, t, role, cfg)
        if rule is None:
            kept_fp32 = role.is_control and (cfg.small_controls_fp32 or t.numel() > cfg.keep_float_max_numel)
            quant[name] = t.float() if kept_fp32 else _to_fp16(t)
            meta[name] = {"kind": "float", "dtype": dtype_name(t.dtype)}
            continue
        bits = low_bits.get(name, rule.bits)
        if name in protected:
            q, groups = _quantize_protected(name, t, rule, bits, hessians.get(name), cfg, protected[name])
            quant.update(groups.tensors(name))
            how = {"method": "gptq", "clip_sigmas": rule.clip_sigmas, "awq": cfg.awq.bits}
        elif name in banked:
            q, how = banked[name]
        else:
            settings = cfg.quantizer_settings(rule.method)
            q, how = quantizers()[rule.method].quantize(name, t, rule, bits, hessians.get(name), settings)
        if role.layer in stepped:
            q, how = Quantized(step_codes(q.q, cfg.code_step.step), q.scale), {**how, "code_step": cfg.code_step.step}
        quant[f"{name}.q"], quant[f"{name}.scale"] = q.q, q.scale
        meta[name] = {"kind": "int", "bits": bits, "dtype": dtype_name(t.dtype), **how}
    if cfg.lqer is not None:
        _add_lqer(state_dict, quant, meta, cfg.lqer)
    return quant, meta


def _bank_searched(
    state_dict: Mapping[str, Tensor], cfg: ExportConfig, roles: Mapping[str, ParamRole]
) -> dict[str, tuple[Quantized, dict[str, Any]]]:
    """The percentile-search RTN matrices that live in a parameter bank, quantized bank by bank (PR #1120)."""
    bits = {}
    for name, t in state_dict.items():
        rule = _rule_for(name, t, roles[name], cfg) if t.is_floating_point() else None
        if rule is not None and rule.method == "rtn" and rule.scale == "percentile_search" and t.ndim == 2:
            bits[name] = rule.bits
    return quantize_banks(state_dict, bank_members(bits, roles), bits)


def _awq_selection(
    state_dict: Mapping[str, Tensor],
    cfg: ExportConfig,
    roles: Mapping[str, ParamRole],
    act_rms: Optional[Mapping[str, Tensor]],
    low_bits: Mapping[str, int],
) -> dict[str, list[tuple[int, int]]]:
    """AWQ-lite's chosen groups by tensor among the SDClip-GPTQ matrices (PR #1945 ``gptq_mixed_quantize``)."""
    if act_rms is None:
        raise ConfigError("export.awq: needs the activation statistics of the calibration pass (act_rms)")
    weights, bits = {}, {}
    for name, t in state_dict.items():
        rule = _rule_for(name, t, roles[name], cfg) if t.is_floating_point() else None
        if rule is not None and rule.method == "gptq" and rule.scale == "sdclip" and t.ndim == 2:
            weights[name], bits[name] = t.detach().cpu(), low_bits.get(name, rule.bits)
    return select_groups(weights, act_rms, bits, cfg.awq)[1]


def _quantize_protected(
    name: str,
    t: Tensor,
    rule: TensorRule,
    bits: int,
    hessian: Optional[Tensor],
    cfg: ExportConfig,
    groups: list[tuple[int, int]],
) -> tuple[Quantized, AwqGroups]:
    """SDClip GPTQ with AWQ-lite's protected groups on the ``cfg.awq.bits`` grid, and their stored tensors."""
    if hessian is None:
        raise ArtifactError(f"{name}: AWQ-lite protects columns inside GPTQ, which needs a Hessian; none was collected")
    s = cfg.gptq
    try:
        q, s_hi = gptq_sdclip_protected(
            t.to(s.device),
            hessian.to(s.device),
            bits,
            rule.clip_sigmas,
            protect_mask(t.shape[1], groups),
            cfg.awq.bits,
            s.damping,
            s.block_size,
        )
    except torch.linalg.LinAlgError:
        raise ArtifactError(
            f"{name}: GPTQ Cholesky failed (Hessian not positive definite after damping) on an "
            "AWQ-protected tensor; collect more calibration data"
        ) from None
    starts = torch.tensor([start for start, _ in groups], dtype=torch.int16)
    size = torch.tensor(cfg.awq.group_size, dtype=torch.int16)
    return Quantized(q.q.cpu(), q.scale.cpu()), AwqGroups(starts, s_hi.cpu(), size)


def _add_lqer(state_dict: Mapping[str, Tensor], quant: dict[str, Tensor], meta: Meta, settings: LqerSettings) -> None:
    """PR #1855's LQER: among the GPTQ tensors (2-D, per-row scales), the top-k by ‖W − q·s‖_F get a packed
    rank-r correction, stored beside their codes (``quantized.py``)."""
    candidates = [
        n
        for n, e in meta.items()
        if e["kind"] == "int"
        and e.get("method") == "gptq"
        and quant[f"{n}.q"].ndim == 2
        and quant[f"{n}.scale"].ndim == 1
    ]
    weights = {n: state_dict[n].detach().cpu() for n in candidates}
    for name, factors in lqer_apply(weights, quant, candidates, settings).items():
        quant.update(factors.tensors(name))
        meta[name]["lqer"] = factors.kind


def _rule_for(name: str, t: Tensor, role: ParamRole, cfg: ExportConfig) -> Optional[TensorRule]:
    """The rule that quantizes this tensor, or None to keep it as a float (the records' routing, by role)."""
    if role.quant == "gate":
        return cfg.gate if cfg.gate is not None and gate_shape_qualifies(t) else None
    if keeps_float(name, cfg.keep_float):
        return None
    if t.numel() <= cfg.keep_float_max_numel or role.is_control or role.quant is None:
        return None
    return cfg.rule(role)


def _to_fp16(t: Tensor) -> Tensor:
    """The keep-float storage: fp32 and bf16 become fp16, other float dtypes stay as they are (baseline rule)."""
    return t.to(torch.float16) if t.dtype in (torch.float32, torch.bfloat16) else t


def _trace_ranked_low_bits(
    state_dict: Mapping[str, Tensor],
    cfg: ExportConfig,
    hessians: Mapping[str, Tensor],
    roles: Mapping[str, ParamRole],
    recurrent_layers: Optional[Collection[int]],
) -> dict[str, int]:
    """int5/int6 mixing (``trace_rank.py``): the GPTQ mlp/attn matrices outside the chosen top N → low bits."""
    if cfg.trace_rank_keep is None:
        return {}
    if cfg.trace_rank_recurrent_first and recurrent_layers is None:
        raise ConfigError("export.trace_rank_recurrent_first: needs the model's recurrent layers (recurrent_layers=)")
    candidates = []
    for name, t in state_dict.items():
        rule = _rule_for(name, t, roles[name], cfg) if t.is_floating_point() else None
        if roles[name].quant in ("mlp", "attn") and rule is not None and quantizers()[rule.method].needs_hessian:
            candidates.append(name)
    recurrent = set(recurrent_layers or ()) if cfg.trace_rank_recurrent_first else set()
    first = {name for name in candidates if roles[name].layer in recurrent}
    kept = set(trace_ranked_int6(candidates, hessians, cfg.trace_rank_keep, first))
    return {name: cfg.trace_rank_low_bits for name in candidates if name not in kept}


# ---------------------------------------------------------------------------------------------------------
# Exporting a model
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ExportReport:
    path: str
    format: str
    codec: str
    model_bytes: int
    code: CodeSize
    budget_bytes: int
    category_bytes: dict[str, int]  # uncompressed stored bytes (codes + scales, or kept floats) per category
    num_quantized: int
    num_kept: int
    seconds: dict[str, float]
    prune: Optional[PruneReport] = None
    hessians: Optional[HessianReport] = None

    @property
    def code_bytes(self) -> int:
        return self.code.counted_bytes

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.code_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    def summary(self) -> str:
        """One log line: the byte accounting and what was pruned."""
        pruned = ""
        if self.prune and self.prune.n_pruned:
            pruned = f", pruned {self.prune.n_pruned}/{self.prune.n_candidates} ±1"
        verdict = "within" if self.fits else "OVER"
        return (
            f"{self.path}: model {self.model_bytes:,} + code {self.code_bytes:,} = {self.total_bytes:,} bytes "
            f"({verdict} the {self.budget_bytes:,} budget; {self.format}, {self.codec}{pruned})"
        )


def export_model(
    model: nn.Module,
    cfg: ExportConfig,
    out_path: PathLike,
    *,
    calib_batches: Optional[Iterable[Tensor]] = None,
    hessians: Optional[Mapping[str, Tensor]] = None,
    act_rms: Optional[Mapping[str, Tensor]] = None,
    code: Optional[CodeSize] = None,
    progress: bool = True,
    eval_methods: Optional[Sequence[str]] = None,
) -> ExportReport:
    """Quantize ``model`` (a GPT) with ``cfg`` and write the artifact to ``out_path``.

    GPTQ needs ``hessians`` or ``calib_batches`` (token batches ``[B, T]`` on the model's device; the model's
    recurrence state is used as it is); AWQ-lite also needs ``act_rms`` with precomputed Hessians (calibration
    collects both). ``code`` defaults to the wrapped code that reading this artifact (``cfg.format``) and scoring it
    with ``eval_methods`` (its config's ``model.test_methods``; None: every registered pass) needs
    (``code_size.py``). Raises ``ArtifactError`` (writing nothing) when model + code bytes exceed the budget, unless
    ``allow_over_budget``.
    """
    out_path = Path(out_path)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    hessian_report = None
    if cfg.uses_gptq and hessians is None:
        if calib_batches is None:
            raise ConfigError("export: GPTQ needs calibration batches or precomputed Hessians")
        hessians, hessian_report = collect_hessians(
            model,
            calib_batches,
            modules=cfg.gptq.hessian_modules,
            head=cfg.head_uses_gptq,
            damping=cfg.gptq.hessian_damping,
            num_batches=cfg.gptq.calibration_batches,
            min_numel=cfg.keep_float_max_numel,
            groups=cfg.hessian_groups,
            progress=progress,
        )
        seconds["hessians"] = hessian_report.seconds
        act_rms = hessian_report.act_rms

    mark = time.perf_counter()
    roles = parameter_roles(model)
    weights = _export_state_dict(model, cfg, roles)
    if cfg.magnitude_prune is not None:
        weights = magnitude_prune(weights, cfg.magnitude_prune)
    model_cfg = _model_config(model)
    recurrent = recurrent_layers(model_cfg) if model_cfg is not None else None
    quant, meta = quantize_state_dict(
        weights, cfg, hessians, roles=roles, progress=progress, act_rms=act_rms, recurrent_layers=recurrent
    )
    seconds["quantize"] = time.perf_counter() - mark

    if code is None:  # counted for this model's config: its COUNTED_WHEN techniques only
        code = measure_code_size((cfg.format,), eval_methods, wrapper=cfg.code_wrapper, model=_model_config(model))
    blobs: dict[int, tuple[Mapping[str, Tensor], bytes]] = {}

    def total_bytes(candidate: Mapping[str, Tensor]) -> int:
        blob = _serialize(candidate, meta, model, cfg)
        blobs[id(candidate)] = (candidate, blob)
        return len(blob) + code.counted_bytes

    mark = time.perf_counter()
    code_keys, scale_keys = _prunable(quant, meta)
    quant, prune_report = selective_prune(
        quant, code_keys, scale_keys, total_bytes, cfg.budget_bytes, cfg.prune, cfg.prune_resolution
    )
    held, blob = blobs[id(quant)]
    assert held is quant, "the final dict was measured"
    blobs.clear()
    seconds["prune_and_compress"] = time.perf_counter() - mark

    report = ExportReport(
        path=str(out_path),
        format=cfg.format,
        codec="lrzip-zpaq + brotli" if cfg.format.startswith("pergroup") else cfg.codec,
        model_bytes=len(blob),
        code=code,
        budget_bytes=cfg.budget_bytes,
        category_bytes=_category_bytes(quant, meta, roles),
        num_quantized=sum(e["kind"] == "int" for e in meta.values()),
        num_kept=sum(e["kind"] != "int" for e in meta.values()),
        seconds=seconds,
        prune=prune_report if cfg.prune != "none" else None,
        hessians=hessian_report,
    )
    if not report.fits and not cfg.allow_over_budget:
        raise ArtifactError(
            f"{out_path}: {report.total_bytes:,} bytes (model {report.model_bytes:,} + code {report.code_bytes:,}) "
            f"exceed the {cfg.budget_bytes:,}-byte budget by {report.total_bytes - cfg.budget_bytes:,}; "
            "enable pruning, lower the bits or clip, or set allow_over_budget"
        )
    atomic_write_bytes(out_path, blob)
    on_disk = os.path.getsize(out_path)
    if on_disk != len(blob):
        raise ArtifactError(f"{out_path}: wrote {len(blob)} bytes but {on_disk} are on disk")
    seconds["total"] = time.perf_counter() - started
    return report


def _model_config(model: nn.Module):
    """The GPTConfig a model was built from (None for a module that is not a GPT: every technique is counted)."""
    from pgolf_lit.model.config import GPTConfig

    config = getattr(model, "config", None)
    return config if isinstance(config, GPTConfig) else None


def _export_state_dict(model: nn.Module, cfg: ExportConfig, roles: Mapping[str, ParamRole]) -> dict[str, Tensor]:
    """CPU weights to quantize: as the model holds them (native), or in the record's live dtypes (upstream).
    Training-only tensors (multi-token-prediction heads) are dropped, as upstream drops them from final_model.pt."""
    if cfg.format in ("upstream", "pergroup", "pergroup_v2"):
        sd = to_upstream_state_dict(model, banked=False)
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v for k, v in sd.items() if k not in roles or roles[k].exported}


def _serialize(quant: Mapping[str, Tensor], meta: Meta, model: nn.Module, cfg: ExportConfig) -> bytes:
    if cfg.format == "pergroup":
        return encode_pergroup(*pergroup_from_quantized(quant, meta, "export"), cfg.pergroup)
    if cfg.format == "pergroup_v2":
        return encode_pergroup_v2(*record_v2_order(*pergroup_from_quantized(quant, meta, "export")), cfg.pergroup)
    if cfg.format == "upstream":
        return encode_upstream(quant, meta, cfg.upstream_style, cfg.codec, cfg.shuffle_stride)
    model_cfg = getattr(model, "config", None)
    config = model_cfg.replace(mtp_num_heads=0).to_dict() if isinstance(model_cfg, GPTConfig) else {}
    info = {"recurrence_active": bool(getattr(model, "recurrence_active", False)), "export": cfg.to_dict()}
    return encode_native(quant, meta, config, info, cfg.codec, cfg.shuffle_stride)


def _prunable(quant: Mapping[str, Tensor], meta: Meta) -> tuple[list[str], list[str]]:
    """Pruning candidates' tensors, in meta order: per-row quantized tensors below 8 bits."""
    names = [n for n, e in meta.items() if e["kind"] == "int" and e["bits"] < 8 and quant[f"{n}.scale"].ndim == 1]
    return [f"{n}.q" for n in names], [f"{n}.scale" for n in names]


def _category_bytes(quant: Mapping[str, Tensor], meta: Meta, roles: Mapping[str, ParamRole]) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, entry in meta.items():
        category = (roles[name].quant or "other") if entry["kind"] == "int" else "kept"
        nbytes = sum(quant[k].numel() * quant[k].element_size() for k in tensor_keys(name, entry))
        sizes[category] = sizes.get(category, 0) + nbytes
    return sizes
