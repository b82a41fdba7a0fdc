"""``pgolf report RUN_DIR [--ckpt C] [--out DIR]``: plots of one ``pgolf fit`` run and a one-page summary.md.

From the run directory: ``train.log`` (train loss and val_bpb against step and training wallclock, and the
events: warmup, recurrence, late QAT, SWA, early stop), ``metrics.csv`` from Lightning's CSVLogger (the LR
multiplier; skipped with a note under other loggers), ``summary.json`` (the figures table) and the artifact.

The run keeps no float checkpoint by default, so the weight plots show what the artifact holds: per tensor
category, the histogram of the stored integer codes (mass piled at ±R is clipping) and of the dequantized
weights. ``--ckpt`` (a Lightning checkpoint or ``pgolf convert`` file of the same model) adds the float
weights before quantization and the relative RMS error per category. Bytes per category are the stored bytes
(int8 codes, fp16 scales, kept tensors) and the order-0 entropy of the codes: the artifact compresses all
tensors in one stream, so its real size does not split by category; the entropy is the per-category cost an
ideal coder of independent codes would pay, and summary.md sets its total against the artifact's size.

Plots need matplotlib (``pip install 'pgolf-lit[report]'``); it is imported only here.
"""

from __future__ import annotations

import argparse
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from pgolf_lit.config import GPTConfig, gpt_config_from_yaml
from pgolf_lit.errors import ArtifactError, ConfigError, PgolfError
from pgolf_lit.fileio import atomic_path, atomic_write_text
from pgolf_lit.model.gpt import roles_of
from pgolf_lit.model.roles import ParamRole
from pgolf_lit.quant.artifact import decode_native, decode_upstream, is_native, read_bytes
from pgolf_lit.quant.quantized import Meta, tensor_keys
from pgolf_lit.run_summary import read_summary

_TRAIN = re.compile(r"^step:(\d+)/\d+ train_loss:(\S+) train_time:(\d+)ms")
_VAL = re.compile(r"^step:(\d+)/\d+ val_loss:(\S+) val_bpb:(\S+) train_time:(\d+)ms")
_RESULT = re.compile(r"^(?!step:)(.+?) val_loss:(\S+) val_bpb:(\S+) eval_time:")
KEPT = "kept float"
CATEGORY_ORDER = ("embed", "attn", "mlp", "other", "gate", KEPT)
DPI = 110


class ReportError(PgolfError, ValueError):
    """A run directory that cannot be reported on (names the file)."""


# ---------------------------------------------------------------------------------------------------------
# Reading the run
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Timeline:
    """What train.log says over time; steps are optimizer steps done, times training wallclock in ms."""

    train: list[tuple[int, float, float]] = field(default_factory=list)  # step, train_loss, time
    val: list[tuple[int, float, float, float]] = field(default_factory=list)  # step, val_loss, val_bpb, time
    events: list[tuple[str, int, float]] = field(default_factory=list)  # name, step, time
    results: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> val_loss, val_bpb

    def time_at(self, step: int) -> float:
        """Training wallclock at ``step``, interpolated between the logged train lines."""
        steps, times = [s for s, _, _ in self.train], [t for _, _, t in self.train]
        return float(np.interp(step, [0, *steps], [0.0, *times]))


def read_timeline(log: Path, events: Optional[dict[str, Any]] = None) -> Timeline:
    """train.log's train/val/result lines; ``events`` is summary.json's ``events`` section (what the callbacks
    recorded through ``GolfModule.record_event``), in step order."""
    if not log.is_file():
        raise ReportError(f"{log}: not found; pgolf report reads the directory of a pgolf fit run")
    timeline = Timeline()
    for line in log.read_text(errors="replace").splitlines():
        if m := _TRAIN.match(line):
            timeline.train.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
        elif m := _VAL.match(line):
            timeline.val.append((int(m.group(1)), float(m.group(2)), float(m.group(3)), float(m.group(4))))
        elif m := _RESULT.match(line):
            timeline.results[m.group(1)] = (float(m.group(2)), float(m.group(3)))
    if not timeline.train:
        raise ReportError(f"{log}: no 'step:N/M train_loss:... train_time:...ms' lines; is this a pgolf fit run?")
    recorded = sorted((events or {}).items(), key=lambda kv: (kv[1]["step"], kv[1]["train_time_ms"]))
    timeline.events = [(name, int(e["step"]), float(e["train_time_ms"])) for name, e in recorded]
    return timeline


def read_lr_scale(metrics_csv: Path) -> list[tuple[int, float]]:
    """(step, LR multiplier) from Lightning's metrics.csv; empty when the run used another logger.

    The CSV's step counts the steps done before the logged one, so the multiplier of the step that train.log
    numbers N is at CSV step N − 1: it is moved to N to share the other plots' axis.
    """
    if not metrics_csv.is_file():
        return []
    with open(metrics_csv, newline="") as f:
        return [(int(row["step"]) + 1, float(row["lr_scale"])) for row in csv.DictReader(f) if row.get("lr_scale")]


def read_quantized(path: Path, run_dir: Path) -> tuple[dict[str, torch.Tensor], Meta, dict[str, ParamRole]]:
    """The stored tensors (codes, scales, kept floats), meta and the model's parameter roles of a native or upstream
    artifact (an upstream file holds no model config: the run's config.yaml gives it)."""
    data = read_bytes(path)
    if is_native(data):
        art = decode_native(data, str(path))
        return art.quant, art.meta, roles_of(GPTConfig.from_dict(art.config))
    art = decode_upstream(data, str(path))
    return art.quant, art.meta, roles_of(gpt_config_from_yaml(run_dir / "config.yaml"))


def read_float_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning checkpoint (``model.`` keys) or a ``pgolf convert`` file."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{path}: checkpoint not found") from None
    except Exception as e:  # a weights_only refusal or a corrupt file
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        raise ConfigError(f"{path}: not a loadable checkpoint ({reason})") from None
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    return {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")} or sd


def find_artifact(run_dir: Path, summary: dict[str, Any]) -> Optional[Path]:
    """The run's artifact: the file of summary.json's artifact name in the run dir (where GPTQExport writes a
    relative path), else summary.json's path as recorded (relative to the directory the run was started in)."""
    recorded = Path((summary.get("artifact") or {}).get("path", "final_model.pgolf"))
    for candidate in (run_dir / recorded.name, recorded):
        if candidate.is_file():
            return candidate
    return None


# ---------------------------------------------------------------------------------------------------------
# Per-category weights and bytes
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Category:
    """The tensors of one category: codes (int entries) or stored values (kept floats), and their bytes."""

    name: str
    tensors: int = 0
    bits: set = field(default_factory=set)
    codes: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)  # dequantized (or kept) weights, flattened
    floats: list[torch.Tensor] = field(default_factory=list)  # the checkpoint's weights, flattened
    stored_bytes: int = 0
    side_bytes: int = 0  # scales and kept tensors: counted raw in the entropy estimate

    @property
    def numel(self) -> int:
        return sum(v.numel() for v in self.values)

    def code_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(code values, counts) of all codes, over the range they occupy."""
        codes = torch.cat(self.codes).to(torch.int64)
        counts = torch.bincount(codes - int(codes.min())).numpy()
        return np.arange(int(codes.min()), int(codes.min()) + len(counts)), counts

    def entropy_bytes(self) -> float:
        """Order-0 entropy of the codes (bits per code × codes / 8) plus the raw bytes of scales and kept tensors."""
        if not self.codes:
            return float(self.side_bytes)
        counts = self.code_counts()[1]
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum() * counts.sum() / 8 + self.side_bytes)

    def relative_rms_error(self) -> Optional[float]:
        if not self.floats:
            return None
        w, q = torch.cat(self.floats).double(), torch.cat(self.values).double()
        return float((w - q).norm() / w.norm().clamp_min(1e-30))


def categorize(
    quant: dict[str, torch.Tensor],
    meta: Meta,
    roles: dict[str, ParamRole],
    floats: dict[str, torch.Tensor],
    floats_source: str = "",
) -> dict[str, Category]:
    """Group the artifact's tensors by their roles' quant groups (embed, attn, mlp, other, gate) plus kept floats;
    with ``floats`` (from ``floats_source``), each tensor's float weights beside its artifact values."""
    categories: dict[str, Category] = {}
    for name, info in meta.items():
        if info["kind"] == "raw":
            continue
        quantized = info["kind"] == "int"
        category = (roles[name].quant or "other") if quantized else KEPT
        cat = categories.setdefault(category, Category(category))
        cat.tensors += 1
        keys = tensor_keys(name, info)
        nbytes = sum(quant[k].numel() * quant[k].element_size() for k in keys)
        cat.stored_bytes += nbytes
        if quantized:
            q, scale = quant[f"{name}.q"], quant[f"{name}.scale"].float()
            row_scale = scale.reshape(-1, *[1] * (q.ndim - 1)) if scale.ndim else scale  # per row, or per tensor
            cat.bits.add(info["bits"])
            cat.codes.append(q.reshape(-1))
            cat.values.append((q.float() * row_scale).reshape(-1))
            cat.side_bytes += scale.numel() * quant[f"{name}.scale"].element_size()
        else:
            cat.values.append(quant[name].float().reshape(-1))
            cat.side_bytes += nbytes
        if floats:
            shape, found = tuple(quant[keys[0]].shape), tuple(floats[name].shape) if name in floats else "missing"
            if found != shape:
                raise ArtifactError(f"{floats_source}: tensor {name} is {found}; the artifact's is {shape}")
            cat.floats.append(floats[name].float().reshape(-1))
    return {name: categories[name] for name in CATEGORY_ORDER if name in categories}


# ---------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PgolfError(
            "pgolf report draws with matplotlib, which is not installed: pip install 'pgolf-lit[report]'"
        ) from None
    return Figure(**kwargs)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _mark_events(ax, events: Sequence[tuple[str, float]]) -> None:
    """Dashed vertical lines at the events, labelled along the top of the axes."""
    for i, (name, x) in enumerate(events):
        ax.axvline(x, color=f"C{3 + i % 6}", linestyle="--", linewidth=1)
        ax.text(
            x,
            1.0 - 0.07 * (i % 4),
            f" {name}",
            transform=ax.get_xaxis_transform(),
            fontsize=7,
            va="top",
            color=f"C{3 + i % 6}",
        )


def quantization_gap(summary: dict[str, Any]) -> Optional[tuple[float, float]]:
    """(pre-quantization val_bpb, roundtrip val_bpb) of the run's GPTQExport, from summary.json."""
    pre, post = summary.get("pre_quant") or {}, summary.get("roundtrip") or {}
    if "val_bpb" in pre and "val_bpb" in post:
        return float(pre["val_bpb"]), float(post["val_bpb"])
    return None


def plot_curves(timeline: Timeline, path: Path, gap: Optional[tuple[float, float]] = None) -> None:
    """Train loss and val_bpb, each against step and against training wallclock, with the events marked; the final
    passes as labelled markers and, when the run exported, the quantization gap written on the val panels."""
    fig = _figure(figsize=(12, 7.5), layout="constrained")
    axes = fig.subplots(2, 2)
    val_results = [(label, bpb) for label, (_, bpb) in timeline.results.items()]
    for col, (axis_name, index, scale) in enumerate((("step", 0, 1.0), ("training wallclock (s)", 2, 1e-3))):
        train = np.array(timeline.train)
        axes[0, col].plot(train[:, index] * scale, train[:, 1], marker=".", color="C0")
        axes[0, col].set_ylabel("train loss (nats/token)")
        if timeline.val:
            val = np.array(timeline.val)
            axes[1, col].plot(val[:, 0 if col == 0 else 3] * scale, val[:, 2], marker="o", color="C1", label="val_bpb")
            last_x = val[-1, 0 if col == 0 else 3] * scale
            for i, (label, bpb) in enumerate(val_results):
                axes[1, col].scatter(
                    [last_x],
                    [bpb],
                    marker="x^sv"[i % 4],
                    s=70,
                    linewidths=2,
                    color=f"C{5 + i}",
                    zorder=3,
                    label=f"{label}: {bpb:.4f}",
                )
            axes[1, col].legend(fontsize=8, loc="upper right")
            if gap is not None:
                pre, post = gap
                axes[1, col].text(
                    0.02,
                    0.04,
                    f"quantization gap {post - pre:+.5f} BPB\n(pre {pre:.5f} → roundtrip {post:.5f})",
                    transform=axes[1, col].transAxes,
                    fontsize=9,
                    va="bottom",
                    bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85},
                )
        axes[1, col].set_ylabel("val_bpb (bits/byte)")
        for row in range(2):
            axes[row, col].set_xlabel(axis_name)
            axes[row, col].grid(alpha=0.3)
            _mark_events(axes[row, col], [(n, (s if col == 0 else t * scale)) for n, s, t in timeline.events])
    fig.suptitle("Training curves (train.log); events dashed; final passes at the last step")
    _save(fig, path)


def plot_schedule(lr: list[tuple[int, float]], timeline: Timeline, path: Path) -> None:
    """The LR multiplier per step (metrics.csv) with the events of train.log."""
    fig = _figure(figsize=(10, 3.8), layout="constrained")
    ax = fig.subplots()
    steps, scales = zip(*lr)
    ax.plot(steps, scales, marker=".", color="C0")
    ax.set_xlabel("step")
    ax.set_ylabel("LR multiplier (lr_scale)")
    ax.set_ylim(-0.05, max(1.05, max(scales) * 1.05))
    ax.grid(alpha=0.3)
    _mark_events(ax, [(n, s) for n, s, _ in timeline.events])
    ax.set_title("LR schedule (metrics.csv) and events (train.log)")
    _save(fig, path)


def plot_weights(categories: dict[str, Category], path: Path) -> None:
    """Per category: stored integer codes (top), dequantized weights and, given a checkpoint, the float weights."""
    names = list(categories)
    fig = _figure(figsize=(3.6 * len(names), 6.5), layout="constrained")
    axes = fig.subplots(2, len(names), squeeze=False)
    for col, name in enumerate(names):
        cat = categories[name]
        top, bottom = axes[0, col], axes[1, col]
        if cat.codes:
            codes, counts = cat.code_counts()
            r = 2 ** (max(cat.bits) - 1) - 1
            at_edge = counts[(codes == r) | (codes == -r)].sum() / counts.sum()
            top.bar(codes, counts, width=1.0, color="C0")
            top.set_yscale("log")
            bits = "/".join(map(str, sorted(cat.bits)))
            top.set_title(f"{name}: int{bits} codes\n{at_edge:.3%} at ±{r}", fontsize=9)
            top.set_xlabel("code")
        else:
            top.axis("off")
            top.text(0.5, 0.5, f"{name}:\nstored as floats\n(no codes)", ha="center", va="center", fontsize=9)
        values = torch.cat(cat.values).numpy()
        lo, hi = np.percentile(values, [0.05, 99.95]) if values.size else (0.0, 1.0)
        bins = np.linspace(lo, hi, 121)
        bottom.hist(values, bins=bins, color="C1", alpha=0.7, label="after (artifact)")
        error = cat.relative_rms_error()
        if error is not None:
            bottom.hist(torch.cat(cat.floats).numpy(), bins=bins, histtype="step", color="k", label="before (--ckpt)")
        bottom.set_yscale("log")
        bottom.locator_params(axis="x", nbins=5)
        bottom.set_xlabel("weight value")
        title = f"{name}: {cat.tensors} tensors, {cat.numel:,} values"
        bottom.set_title(title + (f"\nrel. RMS error {error:.3%}" if error is not None else ""), fontsize=9)
        bottom.legend(fontsize=7)
    only_after = not any(c.floats for c in categories.values())
    fig.suptitle(
        "Weights by category: stored codes and weight values"
        + (" (after quantization only; --ckpt adds before)" if only_after else "")
    )
    _save(fig, path)


def plot_bytes(categories: dict[str, Category], artifact_bytes: int, path: Path) -> None:
    """Stored bytes and order-0 entropy per category, against the artifact's compressed size."""
    names = list(categories)
    stored = [categories[n].stored_bytes for n in names]
    entropy = [categories[n].entropy_bytes() for n in names]
    fig = _figure(figsize=(9, 0.7 * len(names) + 2.2), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y - 0.2, stored, height=0.4, color="C7", label="stored (int8 codes + fp16 scales, kept floats)")
    ax.barh(y + 0.2, entropy, height=0.4, color="C0", label="order-0 entropy of codes + raw scales/kept")
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlabel("bytes")
    fig.legend(fontsize=8, loc="outside lower center", ncol=2)
    ax.set_title(
        f"Bytes by category; the compressed artifact is {artifact_bytes:,} bytes in all "
        f"(entropy sum {sum(entropy):,.0f})",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)


# ---------------------------------------------------------------------------------------------------------
# summary.md
# ---------------------------------------------------------------------------------------------------------


def _figures_table(summary: dict[str, Any], timeline: Timeline) -> list[str]:
    rows = []
    if train := summary.get("train"):
        rows += [
            ("steps", f"{train['steps']}"),
            ("training wallclock", f"{train['train_time_ms'] / 1000:.1f} s"),
            ("step average", f"{train['step_avg_ms']:.1f} ms"),
            ("tokens/s", f"{train['tokens_per_s']:,.0f}"),
        ]
    if last := summary.get("last_val"):
        rows.append(
            (
                "last validation",
                f"val_loss {last['val_loss']:.4f}, val_bpb {last['val_bpb']:.4f} at step {last['step']}",
            )
        )
    for label, (loss, bpb) in timeline.results.items():
        rows.append((label, f"val_loss {loss:.8f}, val_bpb {bpb:.8f}"))
    for method, result in (summary.get("test") or {}).items():
        rows.append((f"test: {method}", f"val_loss {result['val_loss']:.8f}, val_bpb {result['val_bpb']:.8f}"))
    if art := summary.get("artifact"):
        verdict = "within" if art["fits"] else "OVER"
        rows.append(
            (
                "artifact",
                f"model {art['model_bytes']:,} + code {art['code_bytes']:,} = {art['total_bytes']:,} "
                f"bytes ({verdict} the {art['budget_bytes']:,} budget)",
            )
        )
    return ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def summary_markdown(
    run_dir: Path,
    summary: dict[str, Any],
    timeline: Timeline,
    lr: list,
    artifact: Optional[Path],
    categories: dict[str, Category],
    ckpt: Optional[Path],
) -> str:
    """One page: the run's figures, the plots in reading order with the events and the bytes table, and what
    each plot can and cannot show."""
    lines = [
        f"# Run report: `{run_dir}`",
        "",
        *_figures_table(summary, timeline),
        "",
        "## Training",
        "",
        "![training curves](curves.png)",
        "",
    ]
    gap = quantization_gap(summary)
    if gap is not None:
        lines += [
            f"Quantization gap (written on the val panels): {gap[1] - gap[0]:+.5f} BPB, pre-quantization "
            f"{gap[0]:.5f} → roundtrip {gap[1]:.5f}.",
            "",
        ]
    if timeline.events:
        lines += ["| event | step | training wallclock (s) |", "|---|---|---|"]
        lines += [f"| {name} | {step} | {time / 1000:.1f} |" for name, step, time in timeline.events]
        lines.append("")
    lines += ["## LR schedule", ""]
    lines.append(
        "![LR schedule](schedule.png)"
        if lr
        else "No `lr_scale` in metrics.csv (the run used another logger than CSVLogger): no LR plot."
    )
    lines += ["", "## Weights", ""]
    if artifact is None:
        lines.append("No artifact in the run directory: no weight or byte plots.")
        return "\n".join(lines) + "\n"
    before = (
        f"Float weights before quantization from `{ckpt}` (a checkpoint of a run with the EMA callback holds "
        "the EMA weights, the ones the artifact quantizes)."
        if ckpt
        else "The run keeps no float checkpoint, so this shows the artifact only: stored codes (mass at ±R is "
        "clipping) and dequantized weights. `--ckpt` adds the float weights and the quantization error."
    )
    lines += [
        f"Artifact `{artifact}`. {before}",
        "",
        "![weights](weights.png)",
        "",
        "## Bytes by category",
        "",
        "| category | tensors | values | bits | stored bytes | order-0 entropy bytes | rel. RMS error |",
        "|---|---|---|---|---|---|---|",
    ]
    for cat in categories.values():
        bits = "/".join(map(str, sorted(cat.bits))) or "float"
        error = cat.relative_rms_error()
        lines.append(
            f"| {cat.name} | {cat.tensors} | {cat.numel:,} | {bits} | {cat.stored_bytes:,} | "
            f"{cat.entropy_bytes():,.0f} | {'—' if error is None else f'{error:.3%}'} |"
        )
    total = sum(c.entropy_bytes() for c in categories.values())
    lines += [
        "",
        f"The artifact file is {artifact.stat().st_size:,} bytes; the entropy estimates sum to {total:,.0f}. "
        "The compressor codes all tensors in one stream, so the file's bytes do not split by category.",
        "",
        "![bytes by category](bytes.png)",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def build_report(run_dir: Path, out: Path, ckpt: Optional[Path] = None) -> list[Path]:
    """Write the plots and summary.md into ``out``; return the files written."""
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory")
    summary = read_summary(run_dir)
    timeline = read_timeline(run_dir / "train.log", summary.get("events"))
    lr = read_lr_scale(run_dir / "metrics.csv")
    artifact = find_artifact(run_dir, summary)
    written = [out / "curves.png"]
    plot_curves(timeline, written[0], quantization_gap(summary))
    if lr:
        written.append(out / "schedule.png")
        plot_schedule(lr, timeline, written[-1])
    categories: dict[str, Category] = {}
    if artifact is not None:
        floats = read_float_weights(ckpt) if ckpt else {}
        categories = categorize(*read_quantized(artifact, run_dir), floats, str(ckpt))
        written += [out / "weights.png", out / "bytes.png"]
        plot_weights(categories, written[-2])
        plot_bytes(categories, artifact.stat().st_size, written[-1])
    written.append(out / "summary.md")
    atomic_write_text(written[-1], summary_markdown(run_dir, summary, timeline, lr, artifact, categories, ckpt))
    return written


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False, prog="pgolf report", description="PNG plots and a one-page summary.md of a fit run"
    )
    p.add_argument("run_dir", help="a pgolf fit run directory (train.log, metrics.csv, summary.json, artifact)")
    p.add_argument("--ckpt", default=None, help="float weights to compare (a Lightning or pgolf convert checkpoint)")
    p.add_argument("--out", default=None, help="where to write (default: RUN_DIR/report)")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "report"
    written = build_report(run_dir, out, Path(args.ckpt) if args.ckpt else None)
    print("\n".join(f"wrote {path}" for path in written))
