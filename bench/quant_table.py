"""Measured compression tables (issue 5): bytes and BPB gap per quantization scheme and codec, GPTQ's
Hessian-weighted error against RTN's, selective pruning, and export times, on models trained here on CPU.

    python bench/quant_table.py --work /tmp/pgolf_bench --out quant_tables.md
    python bench/quant_table.py --work /tmp/pgolf_bench --configs configs/demo_cpu.yaml --val-tokens 16384

Each config is trained once through the real package, exactly as ``pgolf fit`` would
(``make_cli([...], run=False)`` then ``trainer.fit``; the config's own callbacks, GPTQExport included, run), from
inside ``--work`` (the demo configs build their embedded dataset under ``./data/demo`` there on first use). The
final weights (EMA applied where the config keeps one) are cached under ``--work/cache`` and reused by later runs
of this script and of ``bench/eval_table.py``.

Every export variant then runs on that fp32 model through ``pgolf_lit.quant`` (a record's export settings +
overrides, ``collect_hessians``, ``export_model``, ``build_model_from_artifact``/``read_artifact``), and every BPB
is a standard (non-overlapping) eval with ``pgolf_lit.eval.run_method`` on the first ``--val-tokens`` validation
tokens: pre = the fp32 model, post = the model rebuilt from the artifact. Gap = post − pre.

Routing: at these widths every matrix is at most 65,536 weights, so the records' keep-float rule (tensors of
≤ 65,536 elements stay fp16) would quantize nothing but the demo's embedding. The variants therefore use
``keep_float_max_numel = --keep-float`` (default 1,024: every 2-D weight is quantized, the 1-D gains and the
control tensors stay float, as at record scale); one row shows the default rule for comparison.

Nothing printed is a constant: every number comes from this run. Tables go to stdout (progress to stderr) and
to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import sys
import time
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "demo_cpu.yaml"
TINY_CONFIG = ROOT / "configs" / "records" / "pr1394_sp8192_loop45_tiny.yaml"
DEFAULT_CONFIGS = (DEMO_CONFIG, TINY_CONFIG)

# Overrides that make a run take seconds (for tests): a few steps, small batches, a small val split.
QUICK_FIT_ARGS = (
    "--trainer.max_steps",
    "3",
    "--data.train_batch_tokens",
    "1024",
    "--data.val_max_tokens",
    "1024",
    "--trainer.val_check_interval",
    "1000",
)


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------
# Shared with bench/eval_table.py: machine info, markdown, training through the CLI with a cache
# ---------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(load[0], 2),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}; 1-min load average "
        f"{info['load_avg_1m']} at start: a shared machine), torch {info['torch']}, Python {info['python']}, "
        f"{info['date']}"
    )


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: Optional[float], digits: int = 4, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def rel(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass
class Prepared:
    """A trained (or cached) model and the objects ``pgolf fit`` built around it."""

    config: Path
    cli: Any
    module: Any
    datamodule: Any
    model: Any
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.config.name

    def caption(self, val_tokens: int) -> str:
        m = self.meta
        how = "loaded from the cache" if m.get("cached") else "trained in this run"
        return (
            f"config `{rel(self.config)}`{' + ' + ' '.join(m['fit_args']) if m.get('fit_args') else ''}; "
            f"{m['steps']} steps ({m['train_time_s']:.0f} s of training clock, {how}); "
            f"{m['params']:,} parameters; {val_tokens:,} val tokens"
        )


def cache_key(config: Path, fit_args: Sequence[str]) -> str:
    """Config file contents, the extra fit arguments and the torch thread count (a wallclock-budgeted config
    trains more steps with a faster setting)."""
    h = hashlib.sha256(config.read_bytes())
    h.update(json.dumps([*fit_args, f"threads={torch.get_num_threads()}"]).encode())
    return f"{config.stem}-{h.hexdigest()[:12]}"


def build_cli(config: Path, fit_args: Sequence[str]):
    from pgolf_lit.cli import make_cli

    args = ["--config", str(config), "--trainer.enable_progress_bar", "false", *fit_args]
    return make_cli(args, run=False)


def _callback_results(trainer) -> dict[str, Any]:
    """What the config's own GPTQExport reported (default routing), for the captions."""
    for cb in trainer.callbacks:
        if type(cb).__name__ == "GPTQExport":
            out: dict[str, Any] = {}
            for key, r in cb.results.items():
                out[key] = r.val_bpb
            if cb.report is not None:
                out["model_bytes"], out["total_bytes"] = cb.report.model_bytes, cb.report.total_bytes
            return out
    return {}


def train_or_load(config: Path, work: Path, fit_args: Sequence[str] = ()) -> Prepared:
    """Train ``config`` as ``pgolf fit`` would (cwd = ``work``), or load the cached final weights.

    The model comes back in fp32, in eval mode, with depth recurrence on (as export and evaluation run it).
    """
    config = Path(config).resolve()
    os.chdir(work)
    cache = work / "cache" / cache_key(config, fit_args)
    weights, meta_path = cache / "model.pt", cache / "meta.json"
    with contextlib.redirect_stdout(sys.stderr):  # the run's log lines; stdout carries only the tables
        cli = build_cli(config, fit_args)
        module, dm = cli.model, cli.datamodule
        if weights.is_file() and meta_path.is_file():
            module.model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            meta = json.loads(meta_path.read_text())
            meta["cached"] = True
            dm.prepare_data()
            dm.setup("fit")
            log(f"[{config.name}] loaded cached weights from {cache}")
        else:
            log(f"[{config.name}] training (cache: {cache}) ...")
            started = time.perf_counter()
            cli.trainer.fit(module, datamodule=dm)
            from pgolf_lit.run_summary import read_summary

            # the training clock as on_train_end saw it (the module's clock keeps running through the export)
            train = read_summary(module.run_dir).get("train", {})
            meta = {
                "config": str(config),
                "fit_args": list(fit_args),
                "steps": int(cli.trainer.global_step),
                "train_time_s": train.get("train_time_ms", module.clock.elapsed_ms()) / 1000.0,
                "threads": torch.get_num_threads(),
                "fit_wall_s": time.perf_counter() - started,
                "params": module.model.num_params(),
                "callback": _callback_results(cli.trainer),
                "machine": machine_info(),
            }
            cache.mkdir(parents=True, exist_ok=True)
            torch.save(module.model.state_dict(), weights)
            meta_path.write_text(json.dumps(meta, indent=1))
            meta["cached"] = False
            log(f"[{config.name}] trained {meta['steps']} steps in {meta['fit_wall_s']:.0f} s (wall, fit + export)")
    model = module.model.float().cpu().eval()
    model.set_recurrence(True)
    return Prepared(config, cli, module, dm, model, meta)


def set_val_tokens(dm, n: int) -> torch.Tensor:
    """Reload the val split trimmed to the first ``n`` tokens (whole ``val_seq_len`` sequences; 0 = all)."""
    dm.val_max_tokens = n
    dm.val_tokens = None
    dm.setup("validate")
    return dm.val_tokens


def val_token_count(tokens: torch.Tensor) -> int:
    return tokens.numel() - 1  # scored targets


# ---------------------------------------------------------------------------------------------------------
# Quantization variants
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scheme:
    key: str
    label: str
    preset: str  # the record config whose export settings it starts from ("pgolf": the defaults)
    overrides: dict[str, Any] = field(default_factory=dict)
    default_routing: bool = False  # keep the records' 65,536 keep-float threshold


def schemes(quick: bool, only: Sequence[str] = ()) -> list[Scheme]:
    from pgolf_lit.quant import TensorRule

    rtn6_sd, rtn8_sd = TensorRule(6, "rtn", "sdclip", 12.85), TensorRule(8, "rtn", "sdclip", 20.0)
    all_schemes = [
        Scheme("fp16", "fp16 passthrough (nothing quantized)", "pr1394", {"keep_float_max_numel": 1 << 40}),
        Scheme("int8_rtn", "RTN int8, quantile clip (baseline)", "baseline"),
        Scheme("int6_rtn_pct", "RTN int6, 5-pct search (#1321)", "pr1321"),
        Scheme(
            "int6_rtn_sdclip",
            "RTN int6 SDClip 12.85σ, emb RTN int8 20σ",
            "pr1394",
            {"mlp": rtn6_sd, "attn": rtn6_sd, "other": rtn6_sd, "embed": rtn8_sd},
        ),
        Scheme("int6_gptq_pct", "GPTQ int6, 5-pct search (#1333)", "pr1333"),
        Scheme("int6_gptq_sdclip", "GPTQ int6 SDClip, emb GPTQ int8 (#1394)", "pr1394"),
        Scheme(
            "default_routing", "GPTQ int6 SDClip (#1394), default keep-float 65,536", "pr1394", default_routing=True
        ),
        # PR #1855's per-group clips and int8 gate rule, with and without its LQER correction: the row pair
        # measures what LQER's low-rank factors buy per byte on this model.
        Scheme("pr1855_no_lqer", "GPTQ int6/int7 per-group SDClip (#1855), no LQER", "pr1855", {"lqer": None}),
        Scheme("pr1855_lqer", "GPTQ int6/int7 per-group SDClip + LQER asym (#1855)", "pr1855"),
    ]
    if only:
        unknown = sorted(set(only) - {s.key for s in all_schemes})
        if unknown:
            raise SystemExit(f"--schemes: unknown {unknown}; expected some of {[s.key for s in all_schemes]}")
        return [s for s in all_schemes if s.key in only]
    if quick:
        return [s for s in all_schemes if s.key in ("int8_rtn", "int6_rtn_pct", "int6_gptq_sdclip")]
    return all_schemes


def export_config(scheme: Scheme, keep_float: int, **more: Any):
    from pgolf_lit.quant import ExportConfig
    from pgolf_lit.records import record_export_config

    base = ExportConfig() if scheme.preset == "pgolf" else record_export_config(scheme.preset)
    fields: dict[str, Any] = {
        "format": "native",
        "codec": "brotli",
        "shuffle_stride": 2,
        "prune": "none",
        "allow_over_budget": True,
        "gptq": dataclasses.replace(base.gptq, fallback="rtn"),
    }
    if not scheme.default_routing:
        fields["keep_float_max_numel"] = keep_float
    fields.update(scheme.overrides)
    fields.update(more)
    return dataclasses.replace(base, **fields)


CODEC_GRID = (("zlib", "zlib-9"), ("lzma", "lzma-6"), ("zstd", "zstd-22"), ("brotli", "brotli-11"))


@dataclass
class VariantResult:
    scheme: Scheme
    report: Any
    path: Path
    post_bpb: float
    eval_s: float
    n_int: int
    codecs: dict[tuple[str, int], tuple[int, float]] = field(default_factory=dict)  # -> (model bytes, seconds)


def recode(path: Path, codec: str, stride: int) -> tuple[int, float, bytes]:
    """The same quantized payload re-encoded with another codec/shuffle (what export_model would write)."""
    from pgolf_lit.quant.artifact import decode_native, encode_native

    art = decode_native(path.read_bytes(), str(path))
    info = json.loads(json.dumps(art.info))
    info.setdefault("export", {}).update(codec=codec, shuffle_stride=stride)
    t = time.perf_counter()
    blob = encode_native(art.quant, art.meta, art.config, info, codec, stride)
    return len(blob), time.perf_counter() - t, blob


def code_stats(path: Path) -> dict[str, float]:
    """Over the per-row quantized tensors of an artifact: share of rows whose scale sits at the 1/R floor of the
    int6 scripts (fp16(1/R), R = 2^(bits-1) − 1), and shares of codes equal to 0 and to ±1."""
    from pgolf_lit.quant.artifact import decode_native

    art = decode_native(path.read_bytes(), str(path))
    rows = floored = codes = zeros = ones = 0
    for name, entry in art.meta.items():
        if entry["kind"] != "int":
            continue
        q, scale = art.quant[f"{name}.q"], art.quant[f"{name}.scale"]
        codes += q.numel()
        zeros += int((q == 0).sum())
        ones += int((q.abs() == 1).sum())
        if scale.ndim == 1:
            floor = torch.tensor(1.0 / (2 ** (entry["bits"] - 1) - 1), dtype=torch.float16)
            rows += scale.numel()
            floored += int((scale == floor).sum())
    return {
        "floored": floored / rows if rows else float("nan"),
        "zeros": zeros / codes if codes else float("nan"),
        "ones": ones / codes if codes else float("nan"),
    }


def pct(x: float) -> str:
    return "—" if x != x else f"{100 * x:.1f} %"


def top_tensors(counts: dict[str, int], k: int = 3) -> str:
    """'N tensors: a (n), b (n), …' in pruning order (the dict's order), largest share first."""
    hit = [(n, c) for n, c in counts.items() if c]
    if not hit:
        return "—"
    hit.sort(key=lambda nc: -nc[1])
    names = ", ".join(f"{n.removesuffix('.q')} ({c:,})" for n, c in hit[:k])
    return f"{len(hit)}: {names}" + (", …" if len(hit) > k else "")


def hessian_errors(model, hessians: dict, arts: dict[str, dict]) -> dict[str, dict[str, tuple[int, float]]]:
    """category -> scheme key -> (matrices, Σ tr((W−Ŵ)H(W−Ŵ)ᵀ)) over the matrices that have a Hessian."""
    from pgolf_lit.quant.gptq import hessian_weighted_error

    sd = model.state_dict()
    out: dict[str, dict[str, tuple[int, float]]] = {}
    for name, h in hessians.items():
        w = sd[name].float()
        cat = model.roles[name].quant or "other"
        for key, dq in arts.items():
            n, total = out.setdefault(cat, {}).get(key, (0, 0.0))
            out[cat][key] = (n + 1, total + hessian_weighted_error(w, dq[name].float(), h))
    return out


def matrix_wins(model, hessians: dict, a: dict, b: dict) -> tuple[int, int]:
    """(matrices where ``b`` has the lower Hessian-weighted error than ``a``, matrices compared)."""
    from pgolf_lit.quant.gptq import hessian_weighted_error

    sd = model.state_dict()
    wins = sum(
        hessian_weighted_error(sd[n].float(), b[n].float(), h) < hessian_weighted_error(sd[n].float(), a[n].float(), h)
        for n, h in hessians.items()
    )
    return wins, len(hessians)


def measure_model(prep: Prepared, args: argparse.Namespace) -> dict[str, str]:
    """All quantization measurements on one model; returns named markdown sections."""
    from pgolf_lit.eval import EvalSettings, evaluation_context, run_method
    from pgolf_lit.quant import collect_hessians, export_model, measure_code_size, model_from_artifact
    from pgolf_lit.quant import read_artifact

    model, dm = prep.model, prep.datamodule
    tokens = set_val_tokens(dm, args.val_tokens)
    n_val = val_token_count(tokens)
    cpu_fp32 = evaluation_context(
        EvalSettings(seq_len=dm.val_seq_len), precision="32-true", device=torch.device("cpu"), compile=False
    )
    with torch.no_grad():
        pre = run_method("standard", model, tokens, dm.byte_counts, cpu_fp32)
    log(
        f"[{prep.name}] pre-quant standard BPB {pre.val_bpb:.5f} on {pre.tokens} tokens "
        f"({pre.eval_time_ms / 1000:.1f} s)"
    )

    # GPTQ Hessians, once: every CastedLinear above the keep-float threshold plus the tied head (PR #1394's set),
    # replaying the first training batches as GPTQExport(calibration="train_replay") does
    loader = dm.make_train_loader()
    calib = [loader.next_batch()[0] for _ in range(args.calib_batches)]
    hessians, hrep = collect_hessians(
        model, calib, modules="large", head=True, min_numel=args.keep_float, progress=False
    )
    log(f"[{prep.name}] Hessians of {len(hessians)} matrices from {hrep.num_tokens} tokens in {hrep.seconds:.1f} s")
    code = measure_code_size(("native",), prep.module.test_methods)  # the variants are native artifacts of this config
    out_dir = Path(args.work) / "artifacts" / prep.config.stem
    out_dir.mkdir(parents=True, exist_ok=True)

    def export_and_score(scheme: Scheme, tag: str, **more: Any) -> VariantResult:
        cfg = export_config(scheme, args.keep_float, **more)
        path = out_dir / f"{tag}.pgolf"
        with torch.no_grad():
            report = export_model(
                model, cfg, path, hessians=hessians if cfg.uses_gptq else None, code=code, progress=False
            )
            t = time.perf_counter()
            art = read_artifact(path)
            rebuilt = model_from_artifact(art, str(path))
            post = run_method(
                "standard", rebuilt, tokens, dm.byte_counts, dataclasses.replace(cpu_fp32, weights=art.weights)
            )
        return VariantResult(scheme, report, path, post.val_bpb, time.perf_counter() - t, report.num_quantized)

    grid = CODEC_GRID if not args.quick else CODEC_GRID[:1]  # quick: zlib only (fast)
    results: list[VariantResult] = []
    for scheme in schemes(args.quick, args.schemes):
        r = export_and_score(scheme, scheme.key)
        log(
            f"[{prep.name}] {scheme.key}: {r.report.model_bytes:,} B, post {r.post_bpb:.5f} "
            f"(gap {r.post_bpb - pre.val_bpb:+.5f}), export {r.report.seconds['total']:.1f} s"
        )
        for codec, _ in grid:
            for stride in (0, 2):
                size, secs, blob = recode(r.path, codec, stride)
                if (codec, stride) == ("brotli", 2) and blob != r.path.read_bytes():
                    raise RuntimeError(f"{r.path}: re-encoding with the export's own codec changed the bytes")
                r.codecs[(codec, stride)] = (size, secs)
        results.append(r)

    sections: dict[str, str] = {}
    caption = prep.caption(n_val)
    tag = prep.config.stem

    # -- 1. gap and bytes per scheme
    rows = []
    for r in results:
        rep = r.report
        st = code_stats(r.path)
        rows.append(
            [
                r.scheme.label,
                "default" if r.scheme.default_routing else f"≤{args.keep_float:,}" if r.scheme.key != "fp16" else "all",
                rep.num_quantized,
                f"{rep.model_bytes:,}",
                f"{rep.code_bytes:,}",
                f"{rep.total_bytes:,}",
                fmt(pre.val_bpb, 5),
                fmt(r.post_bpb, 5),
                fmt(r.post_bpb - pre.val_bpb, 5, signed=True),
                pct(st["floored"]),
                pct(st["zeros"]),
                pct(st["ones"]),
            ]
        )
    sections["gap"] = (
        f"**Quantization gap, {tag}** — {caption}; calibration {hrep.num_batches} replayed train batches "
        f"({hrep.num_tokens:,} tokens); native container, brotli-11 + byte shuffle, no pruning; BPB = standard eval "
        f"(seq_len {dm.val_seq_len}). Rows at 1/R floor: share of the per-row scales equal to fp16(1/R), the scale "
        f"floor of the baseline/int6 scripts (upstream `quantize_float_tensor`, `quantize_int6_per_row`: when it "
        f"binds, the percentile search is a no-op and the grid is a fixed step); codes = 0 / ±1: shares over every "
        f"quantized tensor.\n\n"
        + md_table(
            [
                "scheme",
                "keep-float numel",
                "quantized tensors",
                "model bytes",
                "code bytes",
                "total bytes",
                "pre BPB",
                "post BPB",
                "gap (post − pre)",
                "rows at 1/R floor",
                "codes = 0",
                "codes = ±1",
            ],
            rows,
        )
    )
    cb = prep.meta.get("callback") or {}
    if cb.get("pre_quant") is not None and cb.get("roundtrip") is not None:
        sections["gap"] += (
            f"\n\nThe config's own `GPTQExport` (its export settings, default routing, full val split of the "
            f"training run) logged pre {cb['pre_quant']:.5f} / roundtrip {cb['roundtrip']:.5f} "
            f"(gap {cb['roundtrip'] - cb['pre_quant']:+.5f}), {cb.get('total_bytes', 0):,} total bytes."
        )

    # -- 2. codec grid
    codecs = grid
    headers = ["scheme"] + [f"{label}{' +shuffle' if s else ''}" for _, label in codecs for s in (0, 2)] + ["best"]
    rows = []
    for r in results:
        cells = [r.codecs[(c, s)][0] for c, _ in codecs for s in (0, 2)]
        best_i = min(range(len(cells)), key=cells.__getitem__)
        best = f"{codecs[best_i // 2][1]}{' +shuffle' if best_i % 2 else ''}"
        rows.append([r.scheme.label, *(f"{v:,}" for v in cells), best])
    time_rows = []
    for r in results:
        time_rows.append([r.scheme.label, *(f"{r.codecs[(c, s)][1]:.2f}" for c, _ in codecs for s in (0, 2))])
    sections["codecs"] = (
        f"**Model bytes per codec, {tag}** — the same quantized payload of each scheme re-encoded in the native "
        f"container (`encode_native`; the brotli-11 + shuffle entry is byte-identical to the exported file). "
        f"{caption}.\n\n"
        + md_table(headers, rows)
        + f"\n\n**Encode time (s) per codec, {tag}** (shuffle + compress of the whole payload, one run each, "
        f"single-threaded codecs; shared machine, so expect ±30 %). {caption}.\n\n" + md_table(headers[:-1], time_rows)
    )

    # -- 3. Hessian-weighted error on the same matrices and Hessians: GPTQ vs RTN, LQER vs none
    by_key = {r.scheme.key: r for r in results}
    deq = {k: read_artifact(r.path).state_dict for k, r in by_key.items() if k not in ("fp16", "default_routing")}
    errs = hessian_errors(model, hessians, deq)
    pairs = [
        (a, b, ratio)
        for a, b, ratio in (
            ("int6_rtn_pct", "int6_gptq_pct", "GPTQ / RTN"),
            ("int6_rtn_sdclip", "int6_gptq_sdclip", "GPTQ / RTN"),
            ("pr1855_no_lqer", "pr1855_lqer", "LQER / none"),
        )
        if a in deq and b in deq
    ]
    if not pairs and "int6_rtn_pct" in deq and "int6_gptq_sdclip" in deq:
        pairs = [("int6_rtn_pct", "int6_gptq_sdclip", "GPTQ / RTN")]
    rows = []
    for cat in ("attn", "mlp", "embed"):
        if cat not in errs:
            continue
        e = errs[cat]
        n = next(iter(e.values()))[0]
        cells = [cat, n]
        if "int8_rtn" in e:
            cells.append(f"{e['int8_rtn'][1]:.4g}")
        for a, b, _ in pairs:
            cells += [f"{e[a][1]:.4g}", f"{e[b][1]:.4g}", f"{e[b][1] / e[a][1]:.3f}" if e[a][1] > 0 else "—"]
        rows.append(cells)
    headers = ["category", "matrices"] + (["RTN int8"] if "int8_rtn" in deq else [])
    for a, b, ratio in pairs:
        headers += [by_key[a].scheme.label, by_key[b].scheme.label, ratio]
    wins = []
    for a, b, _ in pairs:
        w, n = matrix_wins(model, hessians, deq[a], deq[b])
        wins.append(f"{by_key[b].scheme.label} beats {by_key[a].scheme.label} on {w}/{n} matrices")
    sections["hessian"] = (
        f"**Hessian-weighted error Σ tr((W−Ŵ)H(W−Ŵ)ᵀ), {tag}** — H = the undamped calibration Hessians "
        f"({hrep.num_batches} batches; the embedding's is the tied head's input), Ŵ = the dequantized weights read "
        f"back from each artifact; summed over the matrices of each category. The embedding row is int8 (RTN "
        f"quantile for #1321/#1333, SDClip 20σ for the SDClip pair), int7 at 14σ in PR #1855's pair, whose LQER "
        f"corrects only its top-k error matrices. {caption}.\n\n"
        + md_table(headers, rows)
        + ("\n\n" + "; ".join(wins) + "." if wins else "")
    )

    # -- 4. pruning to a budget
    prune_rows = []
    if not args.quick:
        for key, mode in (("int6_gptq_pct", "upstream"), ("int6_gptq_sdclip", "search")):
            if key not in by_key:  # --schemes left it out
                continue
            base = by_key[key]
            for frac in args.prune_excess:
                budget = base.report.code_bytes + int(base.report.model_bytes * (1 - frac))
                r = export_and_score(base.scheme, f"{key}_prune_{mode}_{frac:g}", prune=mode, budget_bytes=budget)
                p = r.report.prune
                prune_rows.append(
                    [
                        base.scheme.label,
                        mode,
                        f"{frac:.0%}",
                        f"{budget:,}",
                        f"{p.excess_bytes:,}",
                        f"{p.n_pruned:,} / {p.n_candidates:,}",
                        f"{p.final_bytes:,}",
                        "yes" if p.fits else "**no**",
                        len(p.probes),
                        top_tensors(p.pruned_per_tensor),
                        fmt(r.post_bpb - pre.val_bpb, 5, signed=True),
                        fmt(r.post_bpb - base.post_bpb, 5, signed=True),
                        f"{r.report.seconds['prune_and_compress']:.1f}",
                    ]
                )
                log(f"[{prep.name}] prune {key} {mode} {frac:g}: {p.n_pruned}/{p.n_candidates}, fits {p.fits}")
        sections["prune"] = (
            f"**Selective ±1 pruning to a budget, {tag}** — budget = code bytes + (1 − x) × the unpruned model "
            f"bytes (brotli-11 + shuffle); `upstream` = PR #1333's n = 8 × excess, `search` = pgolf's bisection on "
            f"the real compressed size. {caption}.\n\n"
            + md_table(
                [
                    "scheme",
                    "mode",
                    "x",
                    "budget",
                    "excess bytes",
                    "pruned / candidates",
                    "final total",
                    "fits",
                    "size probes",
                    "tensors pruned (top 3)",
                    "gap vs fp32",
                    "Δ vs unpruned",
                    "prune+compress s",
                ],
                prune_rows,
            )
        )

    # -- 5. export time
    rows = []
    for r in results:
        s = r.report.seconds
        hs = (
            f"{hrep.seconds:.2f}"
            if r.report.num_quantized and export_config(r.scheme, args.keep_float).uses_gptq
            else "—"
        )
        rows.append(
            [
                r.scheme.label,
                hs,
                f"{s['quantize']:.2f}",
                f"{s['prune_and_compress']:.2f}",
                f"{s['total']:.2f}",
                f"{r.eval_s:.2f}",
            ]
        )
    sections["time"] = (
        f"**Export time (s), {tag}** — Hessians: one collection ({hrep.num_batches} batches, {len(hessians)} "
        f"matrices, shared by every GPTQ scheme; `export_model` received them precomputed, so its total excludes "
        f"them); quantize and prune+compress (no pruning here: one serialize + brotli-11) as `ExportReport.seconds`; "
        f"roundtrip = rebuild from the file + standard eval. {caption}.\n\n"
        + md_table(["scheme", "Hessians", "quantize", "prune+compress", "export total", "roundtrip eval"], rows)
    )
    return sections


UPSTREAM_GAPS = (
    "Upstream, for comparison (post-quant standard BPB − pre-quant BPB, mean over the seed logs in each record's "
    "folder, e.g. PR #1394 train_seed*.log; 8×H100, ~16 MB artifacts): baseline 0.0072; #1263 0.0035; "
    "#1321 0.0075; #1333 0.0116; #1334 0.0116; #1421 0.0141; #1394 0.0121."
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="bench_work", help="work dir: data/demo, runs/, the weight cache, artifacts")
    p.add_argument("--out", default=None, help="also write the markdown here")
    p.add_argument("--configs", nargs="+", default=[str(c) for c in DEFAULT_CONFIGS])
    p.add_argument("--val-tokens", type=int, default=0, help="first N val tokens scored (0: the whole split)")
    p.add_argument("--calib-batches", type=int, default=8, help="replayed training batches for the Hessians")
    p.add_argument("--keep-float", type=int, default=1024, help="keep_float_max_numel of the variants")
    p.add_argument(
        "--prune-excess",
        type=float,
        nargs="+",
        default=[0.01, 0.05],
        help="pruning budgets: unpruned model bytes × (1 − x)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine 2 threads oversubscribe and run "
        "5-30x slower and erratically)",
    )
    p.add_argument("--quick", action="store_true", help="smoke-test size: a few steps and variants")
    p.add_argument("--schemes", nargs="+", default=(), help="only these variants (keys of `schemes`)")
    p.add_argument("fit_args", nargs="*", help="after --: extra `pgolf fit` overrides (part of the cache key)")
    args = p.parse_args(argv)
    args.configs = [str(Path(c).resolve()) for c in args.configs]  # before run_tables changes into --work
    if args.quick:
        args.fit_args = [*QUICK_FIT_ARGS, *args.fit_args]
        args.calib_batches = min(args.calib_batches, 2)
        args.val_tokens = min(args.val_tokens, 2048) if args.val_tokens else 2048
    return args


def run_tables(
    args: argparse.Namespace,
    title: str,
    measure: Callable[[Prepared], list[str]],
    tail: Callable[[], list[str]] = lambda: [],
) -> str:
    """Train or load each of ``args.configs`` from inside ``args.work`` and join ``measure``'s sections into one
    markdown text (stdout and ``args.out``); ``tail`` adds sections after the configs. Shared by both tables."""
    threads_before = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    out = Path(args.out).resolve() if args.out else None
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.work = str(work)
    machine = machine_info()
    cwd = os.getcwd()
    started = time.perf_counter()
    parts = [f"{title}\n\nMachine: {machine_line(machine)}."]
    try:
        for config in args.configs:
            prep = train_or_load(Path(config).resolve(), work, args.fit_args)
            t = time.perf_counter()
            parts += [f"### {prep.config.stem}", *measure(prep)]
            log(f"[{prep.name}] measured in {time.perf_counter() - t:.0f} s")
        parts += tail()
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads_before)
    parts.append(f"Script wall time: {time.perf_counter() - started:.0f} s.")
    text = "\n\n".join(parts) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_tables(
        args,
        "## Compression measurements (`bench/quant_table.py`)",
        lambda prep: list(measure_model(prep, args).values()),
        tail=lambda: [UPSTREAM_GAPS],
    )


if __name__ == "__main__":
    main()
