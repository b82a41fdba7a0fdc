"""Export: route every tensor, quantize, prune to the budget, write the artifact, and read it back.

``ExportConfig`` holds every knob; ``ExportConfig.preset(record)`` gives a record's exact settings
(spec/quantization.md §10), and the default is pgolf's own scheme: PR #1394's quantization (SDClip GPTQ int6
matrices, int8 GPTQ tied embedding) in the native container, with a GPTQ failure falling back to RTN instead of
crashing and pruning searched on the real compressed size.

Flow of ``export_model``: Hessians (``hessians.py``) → ``quantize_state_dict`` → ``selective_prune`` (each probe
serializes and compresses for real) → budget check on model bytes + code bytes (``code_size.py``) → atomic write →
size re-read from disk. ``load_artifact`` / ``build_model_from_artifact`` reverse it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from pgolf_lit.config import GPTConfig
from pgolf_lit.errors import ArtifactError, ConfigError, PgolfError
from pgolf_lit.fileio import atomic_write_bytes
from pgolf_lit.model.convert import load_upstream_state_dict, to_upstream_state_dict
from pgolf_lit.model.gpt import GPT
from pgolf_lit.quant.artifact import (
    RECORD_UPSTREAM_STYLE,
    decode_native,
    decode_upstream,
    encode_native,
    encode_upstream,
    is_native,
    read_bytes,
)
from pgolf_lit.quant.code_size import CodeSize, measure_code_size
from pgolf_lit.quant.compress import CODECS
from pgolf_lit.quant.gptq import BLOCK_SIZE, DAMPING, gptq_percentile_search, gptq_sdclip
from pgolf_lit.quant.hessians import HessianReport, collect_hessians
from pgolf_lit.quant.prune import PruneReport, selective_prune
from pgolf_lit.quant.quantized import Meta, dequantize, dtype_name, tensor_keys
from pgolf_lit.quant.routing import (
    BASELINE_CONTROL_PATTERNS,
    KEEP_FLOAT_MAX_NUMEL,
    PR1263_CONTROL_PATTERNS,
    PR1333_CONTROL_PATTERNS,
    PR1394_CONTROL_PATTERNS,
    Category,
    classify,
    is_control,
)
from pgolf_lit.quant.rtn import (
    Quantized,
    clip_range,
    quantize_percentile_search,
    quantize_quantile_clip,
    quantize_sdclip,
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
    "quantize_state_dict",
    "read_artifact",
]

PathLike = Union[str, Path]
CATEGORIES: tuple[Category, ...] = ("mlp", "attn", "embed", "other")


# ---------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TensorRule:
    """How the large tensors of one category are quantized.

    method: ``rtn`` (round to nearest) or ``gptq`` (needs a Hessian).
    scale: ``quantile`` (baseline int8 clip, RTN only), ``percentile_search`` (five clip percentiles, 1/R floor),
    ``sdclip`` (``clip_sigmas`` row standard deviations, no floor).
    """

    bits: int = 6
    method: Literal["rtn", "gptq"] = "gptq"
    scale: Literal["quantile", "percentile_search", "sdclip"] = "sdclip"
    clip_sigmas: float = 12.85

    def validate(self, where: str) -> None:
        try:
            clip_range(self.bits)
        except ConfigError:
            raise ConfigError(f"{where}.bits: must lie in [2, 8], got {self.bits}") from None
        if self.method not in ("rtn", "gptq"):
            raise ConfigError(f"{where}.method: expected 'rtn' or 'gptq', got {self.method!r}")
        if self.scale not in ("quantile", "percentile_search", "sdclip"):
            raise ConfigError(f"{where}.scale: expected quantile, percentile_search or sdclip, got {self.scale!r}")
        if self.method == "gptq" and self.scale == "quantile":
            raise ConfigError(f"{where}.scale: GPTQ takes 'percentile_search' or 'sdclip', not 'quantile'")
        if self.scale == "sdclip" and not self.clip_sigmas > 0:
            raise ConfigError(f"{where}.clip_sigmas: must be positive, got {self.clip_sigmas}")


INT8_QUANTILE = TensorRule(8, "rtn", "quantile")
INT6_SEARCH = TensorRule(6, "rtn", "percentile_search")
GPTQ_INT6_SEARCH = TensorRule(6, "gptq", "percentile_search")
GPTQ_INT6_SDCLIP = TensorRule(6, "gptq", "sdclip", 12.85)
GPTQ_INT8_SDCLIP = TensorRule(8, "gptq", "sdclip", 20.0)


@dataclass
class ExportConfig:
    """Every export knob. Field groups: routing, per-category rules, GPTQ, container, budget."""

    scheme: str = "pgolf"  # the preset these settings came from; with format "upstream" it picks the container
    # routing (spec §3): small floats are kept (controls in fp32 if small_controls_fp32, else fp16); large control
    # tensors are kept fp32; the rest follow their category's rule
    keep_float_max_numel: int = KEEP_FLOAT_MAX_NUMEL
    control_patterns: tuple[str, ...] = PR1394_CONTROL_PATTERNS
    small_controls_fp32: bool = False
    mlp: TensorRule = field(default_factory=lambda: GPTQ_INT6_SDCLIP)
    attn: TensorRule = field(default_factory=lambda: GPTQ_INT6_SDCLIP)
    embed: TensorRule = field(default_factory=lambda: GPTQ_INT8_SDCLIP)
    other: TensorRule = field(default_factory=lambda: INT8_QUANTILE)
    # mixed int5/int6: rank the GPTQ mlp/attn matrices by trace(H); all but the top N get low bits
    trace_rank_keep: Optional[int] = None
    trace_rank_low_bits: int = 5
    # GPTQ
    hessian_modules: Literal["large", "all"] = "large"
    hessian_damping: float = 0.0  # added at collection (PR #1263: 0.01, on top of gptq_damping)
    gptq_damping: float = DAMPING
    gptq_block_size: int = BLOCK_SIZE
    gptq_fallback: Literal["rtn", "error"] = "rtn"  # no Hessian or a failed Cholesky: RTN with the rule's scale
    gptq_device: str = "cpu"  # the records' choice; "cuda" is far faster, codes may differ at rounding ties
    calibration_batches: Optional[int] = None  # cap on batches taken from the iterable given to export_model
    # container
    format: Literal["native", "upstream"] = "native"
    codec: str = "brotli"
    shuffle_stride: int = 2
    # budget
    budget_bytes: int = 16_000_000
    prune: Literal["none", "upstream", "search"] = "search"
    prune_resolution: float = 0.01
    allow_over_budget: bool = False

    def __post_init__(self) -> None:
        self.control_patterns = tuple(self.control_patterns)
        for name in CATEGORIES:
            rule = getattr(self, name)
            # a private copy: presets share their rule objects; YAML gives plain mappings
            rule = TensorRule(**rule) if isinstance(rule, Mapping) else dataclasses.replace(rule)
            rule.validate(f"export.{name}")
            setattr(self, name, rule)
        self.validate()

    def validate(self) -> None:
        if self.codec not in CODECS:
            raise ConfigError(f"export.codec: unknown codec {self.codec!r}; expected one of {sorted(CODECS)}")
        if self.format not in ("native", "upstream"):
            raise ConfigError(f"export.format: expected 'native' or 'upstream', got {self.format!r}")
        if self.format == "upstream" and self.scheme not in RECORD_UPSTREAM_STYLE:
            raise ConfigError(
                f"export.scheme: format 'upstream' writes a record's container; scheme must be one of "
                f"{sorted(RECORD_UPSTREAM_STYLE)}, got {self.scheme!r}"
            )
        if self.prune not in ("none", "upstream", "search"):
            raise ConfigError(f"export.prune: expected none, upstream or search, got {self.prune!r}")
        if self.gptq_fallback not in ("rtn", "error"):
            raise ConfigError(f"export.gptq_fallback: expected 'rtn' or 'error', got {self.gptq_fallback!r}")
        if self.hessian_modules not in ("large", "all"):
            raise ConfigError(f"export.hessian_modules: expected 'large' or 'all', got {self.hessian_modules!r}")
        if not 0 <= self.shuffle_stride <= 255:
            raise ConfigError(f"export.shuffle_stride: must lie in [0, 255], got {self.shuffle_stride}")
        if self.budget_bytes <= 0:
            raise ConfigError(f"export.budget_bytes: must be positive, got {self.budget_bytes}")
        if self.trace_rank_keep is not None and self.trace_rank_keep < 0:
            raise ConfigError(f"export.trace_rank_keep: must be >= 0 or null, got {self.trace_rank_keep}")
        clip_range(self.trace_rank_low_bits)
        try:
            torch.device(self.gptq_device)
        except RuntimeError:
            raise ConfigError(f"export.gptq_device: not a torch device: {self.gptq_device!r}") from None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ExportConfig":
        """A record's export settings (``baseline``, ``pr1263`` … ``pr1421``, ``pr1394``) or ``pgolf``."""
        if name not in PRESETS:
            raise ConfigError(f"export preset '{name}' is unknown; expected one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def rule(self, name: str) -> TensorRule:
        return getattr(self, classify(name))

    @property
    def uses_gptq(self) -> bool:
        return any(getattr(self, c).method == "gptq" for c in CATEGORIES)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _record(scheme: str, **fields: Any) -> dict[str, Any]:
    return {"scheme": scheme, "format": "upstream", "prune": "none", **fields}


_INT6_SCRIPT_RULES = {"embed": INT8_QUANTILE, "other": INT8_QUANTILE}
_PR1321 = _record(
    "pr1321", mlp=INT6_SEARCH, attn=INT6_SEARCH, **_INT6_SCRIPT_RULES,
    control_patterns=PR1263_CONTROL_PATTERNS, codec="lzma", shuffle_stride=0,
)
_PR1333 = _record(
    "pr1333", mlp=GPTQ_INT6_SEARCH, attn=GPTQ_INT6_SEARCH, **_INT6_SCRIPT_RULES,
    control_patterns=PR1333_CONTROL_PATTERNS, codec="brotli", shuffle_stride=2, prune="upstream",
)
PRESETS: dict[str, dict[str, Any]] = {
    "pgolf": {},
    "baseline": _record(
        "baseline", mlp=INT8_QUANTILE, attn=INT8_QUANTILE, embed=INT8_QUANTILE, other=INT8_QUANTILE,
        control_patterns=BASELINE_CONTROL_PATTERNS, small_controls_fp32=True, codec="zlib", shuffle_stride=0,
    ),
    "pr1263": _record(
        "pr1263", mlp=GPTQ_INT6_SEARCH, attn=GPTQ_INT6_SEARCH, **_INT6_SCRIPT_RULES,
        control_patterns=PR1263_CONTROL_PATTERNS, hessian_modules="all", hessian_damping=0.01,
        codec="zstd", shuffle_stride=0,
    ),
    "pr1278": {**_PR1321, "scheme": "pr1278"},
    "pr1321": _PR1321,
    "pr1333": _PR1333,
    "pr1334": {**_PR1333, "scheme": "pr1334"},
    "pr1421": {**_PR1333, "scheme": "pr1421"},
    "pr1394": _record(
        "pr1394", mlp=GPTQ_INT6_SDCLIP, attn=GPTQ_INT6_SDCLIP, embed=GPTQ_INT8_SDCLIP, other=GPTQ_INT6_SDCLIP,
        control_patterns=PR1394_CONTROL_PATTERNS, gptq_fallback="error", codec="brotli", shuffle_stride=2,
    ),
}


# ---------------------------------------------------------------------------------------------------------
# Quantizing a state dict
# ---------------------------------------------------------------------------------------------------------


def quantize_state_dict(
    state_dict: Mapping[str, Tensor],
    cfg: ExportConfig,
    hessians: Optional[Mapping[str, Tensor]] = None,
    progress: bool = False,
) -> tuple[dict[str, Tensor], Meta]:
    """Route and quantize every entry (see ``quantized.py`` for the result's layout), in state-dict order.

    Tensors arrive in the dtypes they should dequantize to (reproduce mode: the record's live dtypes, bf16 tables).
    """
    hessians = hessians or {}
    low_bits = _trace_ranked_low_bits(state_dict, cfg, hessians)
    quant: dict[str, Tensor] = {}
    meta: Meta = {}
    for name, tensor in tqdm(state_dict.items(), desc="quantize", disable=not progress, leave=False):
        t = tensor.detach().cpu().contiguous()
        if not t.is_floating_point():
            quant[name], meta[name] = t, {"kind": "raw"}
            continue
        kept = {"kind": "float", "dtype": dtype_name(t.dtype)}
        control = is_control(name, cfg.control_patterns)
        if t.numel() <= cfg.keep_float_max_numel:
            quant[name], meta[name] = (t.float() if control and cfg.small_controls_fp32 else _to_fp16(t)), kept
            continue
        if control:
            quant[name], meta[name] = t.float(), kept
            continue
        rule = cfg.rule(name)
        bits = low_bits.get(name, rule.bits)
        q, how = _quantize_tensor(name, t, rule, bits, hessians.get(name), cfg)
        quant[f"{name}.q"], quant[f"{name}.scale"] = q.q, q.scale
        meta[name] = {"kind": "int", "bits": bits, "dtype": dtype_name(t.dtype), **how}
    return quant, meta


def _to_fp16(t: Tensor) -> Tensor:
    """The keep-float storage: fp32 and bf16 become fp16, other float dtypes stay as they are (baseline rule)."""
    return t.to(torch.float16) if t.dtype in (torch.float32, torch.bfloat16) else t


def _quantize_tensor(
    name: str, t: Tensor, rule: TensorRule, bits: int, hessian: Optional[Tensor], cfg: ExportConfig
) -> tuple[Quantized, dict[str, Any]]:
    """One tensor by its rule; returns the codes and the meta keys saying how they were made."""
    if rule.method == "gptq" and t.ndim == 2:
        if hessian is None:
            if cfg.gptq_fallback == "error":
                raise ArtifactError(f"{name}: GPTQ needs a Hessian and none was collected (gptq_fallback='error')")
            return _rtn(t, rule, bits)
        w, h = t.to(cfg.gptq_device), hessian.to(cfg.gptq_device)
        try:
            if rule.scale == "sdclip":
                q = gptq_sdclip(w, h, bits, rule.clip_sigmas, cfg.gptq_damping, cfg.gptq_block_size)
                how = {"method": "gptq", "clip_sigmas": rule.clip_sigmas}
            else:
                q = gptq_percentile_search(w, h, bits, cfg.gptq_damping, cfg.gptq_block_size)
                how = {"method": "gptq", "percentile": q.percentile}
            return Quantized(q.q.cpu(), q.scale.cpu(), q.percentile), how
        except torch.linalg.LinAlgError:
            if cfg.gptq_fallback == "error":
                raise ArtifactError(
                    f"{name}: GPTQ Cholesky failed (Hessian not positive definite after damping); "
                    "collect more calibration data or set gptq_fallback='rtn'"
                ) from None
            q, how = _rtn(t, rule, bits)
            return q, {**how, "method": "gptq", "fallback": "rtn"}  # the records label this tensor GPTQ
    return _rtn(t, rule, bits)


def _rtn(t: Tensor, rule: TensorRule, bits: int) -> tuple[Quantized, dict[str, Any]]:
    if rule.scale == "quantile":
        return quantize_quantile_clip(t, bits), {"method": "rtn"}
    if rule.scale == "sdclip":
        return quantize_sdclip(t, bits, rule.clip_sigmas), {"method": "rtn", "clip_sigmas": rule.clip_sigmas}
    q = quantize_percentile_search(t, bits)
    if q.percentile is None:  # 1-D tensors take the per-tensor amax path
        return q, {"method": "rtn"}
    return q, {"method": "rtn", "percentile": q.percentile}


def _trace_ranked_low_bits(
    state_dict: Mapping[str, Tensor], cfg: ExportConfig, hessians: Mapping[str, Tensor]
) -> dict[str, int]:
    """int5/int6 mixing: names of the GPTQ matrices outside the top ``trace_rank_keep`` by trace(H) → low bits."""
    if cfg.trace_rank_keep is None:
        return {}
    ranked = [
        name
        for name, t in state_dict.items()
        if name in hessians and classify(name) in ("mlp", "attn") and t.ndim == 2
        and t.numel() > cfg.keep_float_max_numel and cfg.rule(name).method == "gptq"
    ]
    ranked.sort(key=lambda name: -float(torch.trace(hessians[name].float())))
    return {name: cfg.trace_rank_low_bits for name in ranked[cfg.trace_rank_keep :]}


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
    code: Optional[CodeSize] = None,
    progress: bool = True,
) -> ExportReport:
    """Quantize ``model`` (a GPT) with ``cfg`` and write the artifact to ``out_path``.

    GPTQ needs ``hessians`` or ``calib_batches`` (token batches ``[B, T]`` on the model's device; the model's
    recurrence state is used as it is). ``code`` defaults to this package's wrapped source size. Raises
    ``ArtifactError`` (writing nothing) when model + code bytes exceed the budget, unless ``allow_over_budget``.
    """
    out_path = Path(out_path)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    hessian_report = None
    if cfg.uses_gptq and hessians is None:
        if calib_batches is None:
            raise ConfigError("export: GPTQ needs calibration batches or precomputed Hessians")
        hessians, hessian_report = collect_hessians(
            model, calib_batches, modules=cfg.hessian_modules, head=cfg.embed.method == "gptq",
            damping=cfg.hessian_damping, num_batches=cfg.calibration_batches, min_numel=cfg.keep_float_max_numel,
            progress=progress,
        )
        seconds["hessians"] = hessian_report.seconds

    mark = time.perf_counter()
    quant, meta = quantize_state_dict(_export_state_dict(model, cfg), cfg, hessians, progress)
    seconds["quantize"] = time.perf_counter() - mark

    code = code if code is not None else measure_code_size()
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
        path=str(out_path), format=cfg.format, codec=cfg.codec, model_bytes=len(blob), code=code,
        budget_bytes=cfg.budget_bytes, category_bytes=_category_bytes(quant, meta),
        num_quantized=sum(e["kind"] == "int" for e in meta.values()),
        num_kept=sum(e["kind"] != "int" for e in meta.values()),
        seconds=seconds, prune=prune_report if cfg.prune != "none" else None, hessians=hessian_report,
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


def _export_state_dict(model: nn.Module, cfg: ExportConfig) -> dict[str, Tensor]:
    """CPU weights to quantize: as the model holds them (native), or in the record's live dtypes (upstream).
    Multi-token-prediction heads are training-only and dropped, as upstream drops them from final_model.pt."""
    if cfg.format == "upstream":
        sd = to_upstream_state_dict(model)
    else:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v for k, v in sd.items() if not k.startswith("mtp_heads.")}


def _serialize(quant: Mapping[str, Tensor], meta: Meta, model: nn.Module, cfg: ExportConfig) -> bytes:
    if cfg.format == "upstream":
        return encode_upstream(quant, meta, RECORD_UPSTREAM_STYLE[cfg.scheme], cfg.codec, cfg.shuffle_stride)
    model_cfg = getattr(model, "config", None)
    config = model_cfg.replace(mtp_num_heads=0).to_dict() if isinstance(model_cfg, GPTConfig) else {}
    info = {"recurrence_active": bool(getattr(model, "recurrence_active", False)), "export": cfg.to_dict()}
    return encode_native(quant, meta, config, info, cfg.codec, cfg.shuffle_stride)


def _prunable(quant: Mapping[str, Tensor], meta: Meta) -> tuple[list[str], list[str]]:
    """Pruning candidates' tensors, in meta order: per-row quantized tensors below 8 bits."""
    names = [
        n for n, e in meta.items() if e["kind"] == "int" and e["bits"] < 8 and quant[f"{n}.scale"].ndim == 1
    ]
    return [f"{n}.q" for n in names], [f"{n}.scale" for n in names]


def _category_bytes(quant: Mapping[str, Tensor], meta: Meta) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for name, entry in meta.items():
        category = classify(name) if entry["kind"] == "int" else "kept"
        nbytes = sum(quant[k].numel() * quant[k].element_size() for k in tensor_keys(name, entry))
        sizes[category] = sizes.get(category, 0) + nbytes
    return sizes


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


@dataclass
class LoadedArtifact:
    config: GPTConfig
    state_dict: dict[str, Tensor]
    format: str  # "native" or the upstream container style
    info: dict[str, Any]


def read_artifact(path: PathLike, config: Optional[GPTConfig] = None) -> LoadedArtifact:
    """Read a native or upstream artifact into a dequantized state dict.

    A native file carries its GPTConfig (``config``, when given, must equal it). An upstream record file holds
    none: ``config`` is required, and its weights dequantize to the record's live dtypes (bf16 tables).
    """
    source = str(path)
    data = read_bytes(path)
    if is_native(data):
        art = decode_native(data, source)
        try:
            stored = GPTConfig.from_dict(art.config)
        except PgolfError as e:
            raise ArtifactError(f"{source}: stored model config is invalid ({e})") from None
        if config is not None and config != stored:
            differs = sorted(k for k, v in config.to_dict().items() if art.config.get(k) != v)
            raise ArtifactError(f"{source}: exported for another model config (differs in {differs})")
        return LoadedArtifact(stored, dequantize(art.quant, art.meta), "native", art.info)
    if config is None:
        raise ArtifactError(f"{source}: an upstream record artifact holds no model config; pass the record's config")
    template = {k: v.dtype for k, v in to_upstream_state_dict(GPT(config)).items()}
    art = decode_upstream(data, source, template)
    return LoadedArtifact(config, art.state_dict, art.style, {"codec": art.codec, "shuffled": art.shuffled})


def load_artifact(path: PathLike, config: Optional[GPTConfig] = None) -> tuple[GPTConfig, dict[str, Tensor]]:
    """``(GPTConfig, dequantized state dict)`` of an artifact; see ``read_artifact``."""
    art = read_artifact(path, config)
    return art.config, art.state_dict


def build_model_from_artifact(
    path: PathLike, config: Optional[GPTConfig] = None, device: Union[str, torch.device] = "cpu"
) -> GPT:
    """A GPT holding the artifact's dequantized weights, with recurrence as it was at export (native files)."""
    art = read_artifact(path, config)
    model = GPT(art.config)
    load_upstream_state_dict(model, art.state_dict, str(path))
    model.set_recurrence(bool(art.info.get("recurrence_active", False)))
    return model.to(device).eval()
