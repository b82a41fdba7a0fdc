"""Measured evaluation tables (issue 6): BPB and eval time of every evaluation procedure on models trained here on
CPU, next to the gains the seed records reported, plus the empirical causality audit.

    python bench/eval_table.py --work /tmp/pgolf_bench --out eval_tables.md
    python bench/eval_table.py --work /tmp/pgolf_bench --configs configs/demo_cpu.yaml --val-tokens 8192

The models are trained (or loaded from the cache) exactly as ``bench/quant_table.py`` does: through
``pgolf_lit.cli.make_cli(..., run=False)`` + ``trainer.fit`` from inside ``--work``, final weights (EMA applied
where the config keeps one) cached under ``--work/cache``; both scripts share that cache. Evaluation is on the
fp32 model (not a quantized artifact), depth recurrence on.

Every pass is ``pgolf_lit.eval.run_method`` on the first ``--val-tokens`` validation tokens (the SLOT
passes optionally on the first ``--slow-val-tokens`` only; their reference sliding pass is then re-run on the
same tokens). Window length L = the config's ``model.evaluation.seq_len`` and stride S = its
``model.evaluation.stride`` for every pass: the records' 2048-token windows scaled to the model's eval length.
SLOT passes take everything else from the record presets (``slot_preset``: steps, lr schedule, betas, logit bias,
delta position, window rule); TTT takes ``TTTSettings``'s PR #1334 defaults with chunks of 4 windows' worth of
tokens (16 in the records, 32,768 / 2,048, over a split ~4,000 times longer) and runs on all ``--val-tokens``.

Nothing printed is a constant except the quoted upstream figures, each cited to the record log or README it is
read from.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_table import (  # noqa: E402  (shared helpers: training/cache, machine info, markdown)
    DEFAULT_CONFIGS,
    QUICK_FIT_ARGS,
    Prepared,
    fmt,
    log,
    md_table,
    run_tables,
    set_val_tokens,
    val_token_count,
)

# The seeds' reported effects (method BPB − the same record's sliding BPB), each with the record file it is read from.
UPSTREAM = {
    "slot_pr1263": ("−0.191", "PR #1263 logs/seed{1337,42,7}.log (3-seed mean 0.93544 vs sliding 1.12633, s64)"),
    "slot_pr1278": ("−0.352", "PR #1278 README.md (0.7736 vs 1.1257; no logs)"),
    "slot_pr1321": ("−0.381", "PR #1321 train_seed{1337,42,2024}.log (0.74056 vs sliding 1.12168, s96)"),
    "causal_batch_shared": ("−0.0130", "PR #1333 train_seed{42,314,999}.log (1.0766 vs 1.0896)"),
    "ttt_exact": ("+0.2466", "PR #1334 train_seed42.log (1.33603 vs 1.08939; PR #1334 window rule)"),
}
UPSTREAM_TIME = {  # seconds per pass on 8×H100 over the full 62M-token val split (the same record logs)
    "sliding_exact": "76.2 (#1333)",
    "sliding_legacy": "119.4 (#1263)",
    "standard": "7.6 (#1333)",
    "slot_pr1263": "311.4",
    "slot_pr1278": "~304 (README)",
    "slot_pr1321": "408.5",
    "causal_batch_shared": "444.1",
    "ttt_exact": "405.4",
}


TTT_CHUNK_WINDOWS = 4


@dataclass
class Pass:
    key: str
    label: str
    method: str
    settings: Any  # EvalSettings
    slow: bool = False  # runs on the --slow-val-tokens subset
    reference: Optional[str] = None  # key of the pass whose BPB it must equal (a self-check)


def passes(seq_len: int, stride: int, quick: bool) -> list[Pass]:
    from pgolf_lit.eval import EvalSettings, SlidingSettings, SlotSettings, TTTSettings
    from pgolf_lit.eval.audit import record_slot

    base = EvalSettings(seq_len=seq_len, stride=stride)

    def with_(**changes: Any):
        return dataclasses.replace(base, **changes)

    # Chunks of 4 windows' worth of tokens (the records use 16 × 2,048 over 62 M tokens, ~1,900 chunks): with
    # 16 the few thousand tokens scored here would make one or two chunks, and the last chunk is never trained on.
    ttt = TTTSettings(window_rule="exact", chunk_tokens=TTT_CHUNK_WINDOWS * seq_len)
    out = [
        Pass("standard", "standard (non-overlapping)", "standard", base),
        Pass("sliding_exact", "sliding, exact windows", "sliding", base),
        Pass(
            "sliding_legacy", "sliding, legacy windows", "sliding", with_(sliding=SlidingSettings(window_rule="legacy"))
        ),
        Pass("slot_pr1263", "SLOT-16, PR #1263's config", "slot", with_(slot=record_slot("pr1263", "slot")), slow=True),
        Pass("slot_pr1278", "SLOT-32, PR #1278's config", "slot", with_(slot=record_slot("pr1278", "slot")), slow=True),
        Pass("slot_pr1321", "SLOT-48, PR #1321's config", "slot", with_(slot=record_slot("pr1321", "slot")), slow=True),
        Pass(
            "causal_per_window",
            "causal SLOT-16, per window (pgolf)",
            "causal_slot",
            with_(causal_slot=SlotSettings()),
            slow=True,
        ),
        Pass(
            "causal_batch_shared",
            "causal SLOT-16, batch-shared (#1333)",
            "causal_slot",
            with_(causal_slot=record_slot("pr1333", "slot")),
            slow=True,
        ),
        Pass(
            "ttt_exact",
            f"TTT score-first, exact windows (3 epochs, chunks of {TTT_CHUNK_WINDOWS * seq_len:,})",
            "ttt",
            with_(ttt=ttt),
        ),
        Pass(
            "ttt_epochs0",
            "TTT with 0 epochs (must equal sliding exact)",
            "ttt",
            with_(ttt=dataclasses.replace(ttt, epochs=0)),
            reference="sliding_exact",
        ),
    ]
    if quick:
        keep = ("standard", "sliding_exact", "causal_per_window", "ttt_epochs0")
        out = [p for p in out if p.key in keep]
        for p in out:  # a couple of optimisation steps are enough for a smoke test
            if p.method == "causal_slot":
                p.settings = dataclasses.replace(
                    p.settings, causal_slot=dataclasses.replace(p.settings.causal_slot, steps=2)
                )
    return out


def describe(p: Pass) -> str:
    """The settings that matter, from the config object actually run."""
    s = p.settings
    if p.method in ("standard",):
        return f"L {s.seq_len}"
    if p.method == "sliding":
        return f"L {s.seq_len}, S {s.stride}, {s.sliding.window_rule}"
    if p.method in ("slot", "causal_slot"):
        c = s.slot if p.method == "slot" else s.causal_slot
        lr = f"lr {c.lr:g}" + (f"→{c.lr_min:g} cos" if c.lr_min is not None else "")
        return (
            f"L {s.seq_len}, S {s.stride}, {c.window_rule}, {c.mode}, {c.steps} steps, {lr}, "
            f"{c.delta_position}{', logit bias' if c.logit_bias else ''}, batch {c.batch_windows}"
        )
    c = s.ttt
    return (
        f"L {s.seq_len}, S {s.stride}, {c.window_rule}, chunk {c.chunk_tokens}, {c.epochs} ep, SGD lr {c.lr:g} "
        f"mom {c.momentum:g}, batch {c.batch_seqs}"
    )


def measure_model(prep: Prepared, args: argparse.Namespace) -> str:
    from pgolf_lit.eval import Weights, evaluation_context, format_result_line, run_method

    model, dm, module = prep.model, prep.datamodule, prep.module
    seq_len = module.evaluation.seq_len
    stride = args.stride or module.evaluation.stride
    tokens = set_val_tokens(dm, args.val_tokens)
    slow_n = min(args.slow_val_tokens or val_token_count(tokens), val_token_count(tokens))
    slow_tokens = tokens[: slow_n + 1]
    subsets = {False: tokens, True: slow_tokens}
    results: dict[tuple[str, bool], Any] = {}
    rows_meta: list[tuple[Pass, bool]] = []

    def run(p: Pass, slow: bool):
        t = subsets[slow]
        with torch.enable_grad():  # SLOT and TTT optimise; the others run under no_grad themselves
            context = evaluation_context(
                p.settings,
                precision=str(prep.cli.trainer.precision),
                device=t.device,
                compile=module.compile,
                weights=Weights(quantized=True, tag="int6"),
            )
            r = run_method(p.method, model, t, dm.byte_counts, context)
        results[(p.key, slow)] = r
        log(f"[{prep.name}] {format_result_line(r)} tokens:{r.tokens}")
        return r

    plan = passes(seq_len, stride, args.quick)
    for p in plan:
        run(p, p.slow and slow_n < val_token_count(tokens))
        rows_meta.append((p, p.slow and slow_n < val_token_count(tokens)))
    if any(slow for _, slow in rows_meta):  # references on the reduced subset
        by_key = {p.key: p for p in plan}
        for key in ("sliding_exact", "sliding_legacy"):
            if key in by_key:
                run(by_key[key], True)

    def delta(key: str, slow: bool, ref: str) -> str:
        a, b = results.get((key, slow)), results.get((ref, slow))
        return fmt(a.val_bpb - b.val_bpb, 4, signed=True) if a is not None and b is not None else "—"

    rows = []
    checks = []
    for p, slow in rows_meta:
        r = results[(p.key, slow)]
        n = val_token_count(subsets[slow])
        up_gain, up_ref = UPSTREAM.get(p.key, ("—", ""))
        rows.append(
            [
                p.label,
                describe(p),
                f"{n:,}" + (" (reduced)" if slow else ""),
                f"{r.tokens:,}",
                fmt(r.val_bpb, 4),
                delta(p.key, slow, "sliding_exact"),
                delta(p.key, slow, "sliding_legacy"),
                f"{r.eval_time_ms / 1000:.1f}",
                f"{r.tokens / max(r.eval_time_ms / 1000, 1e-9):,.0f}",
                "yes" if r.compliant else "no",
                up_gain,
                UPSTREAM_TIME.get(p.key, "—"),
            ]
        )
        if p.reference:
            ref = results.get((p.reference, slow))
            if ref is not None:
                diff = abs(r.val_bpb - ref.val_bpb)
                checks.append(f"`{p.key}` − `{p.reference}` = {diff:.2e} BPB (same windows; expected ≈ 0)")
    caption = (
        f"**Evaluation passes, {prep.config.stem}** — {prep.caption(val_token_count(tokens))}"
        + (
            f"; SLOT passes on the first {slow_n:,} of them (reduced: CPU time), with the sliding references "
            f"re-run on that subset"
            if any(s for _, s in rows_meta)
            else ""
        )
        + f"; fp32 model, eval window L = {seq_len}, stride S = {stride}. "
        f"Δ columns: this pass's BPB − the sliding pass on the same tokens. Upstream: the seed's reported "
        f"effect of the same procedure at record scale (L 2048, stride 64/96, 8×H100, from the record logs); "
        f"upstream time = that pass over the full val split."
    )
    headers = [
        "pass",
        "settings",
        "val tokens",
        "scored",
        "BPB",
        "Δ vs sliding exact",
        "Δ vs sliding legacy",
        "eval s",
        "tok/s",
        "compliant",
        "upstream Δ",
        "upstream s",
    ]
    text = caption + "\n\n" + md_table(headers, rows)
    if checks:
        text += "\n\nSelf-check: " + "; ".join(checks) + "."
    sources = "; ".join(f"{k}: {ref}" for k, (_, ref) in UPSTREAM.items())
    text += f"\n\nUpstream Δ sources: {sources}."
    return text


def audit_section() -> str:
    from pgolf_lit.eval.audit import AuditSetup, audit_all

    started = time.perf_counter()
    reports = audit_all()
    secs = time.perf_counter() - started
    s = AuditSetup()

    def v(ok: Optional[bool]) -> str:
        return "n/a" if ok is None else ("pass" if ok else "**FAIL**")

    def d(x: Optional[float]) -> str:
        return "—" if x is None else f"{x:.2g}"

    def n(x: Optional[int]) -> str:
        return "—" if x is None else str(x)

    rows = [
        [
            r.method,
            r.violations_before,
            r.violations_self,
            f"{r.prefix_max_delta:.2g}",
            v(r.prefix_invariant),
            f"{r.extra_scorings}/{r.missing_targets}",
            f"{r.byte_count}/{r.expected_bytes}",
            v(r.exactly_once),
            r.update_violations,
            v(r.score_before_update),
            d(r.batch_delta),
            d(r.world_delta),
            v(r.batch_world_invariant),
            f"{r.norm_max_delta:.2g}",
            v(r.normalized),
            f"{r.early_updates}/{r.early_gradients}",
            v(r.read_after_scoring),
            n(r.isolation_violations),
            v(r.documents_isolated),
            n(r.order_violations),
            v(r.state_order_agrees),
            "yes" if r.compliant else "no",
        ]
        for r in reports
    ]
    headers = [
        "procedure",
        "A j<p",
        "A j=p",
        "A max|Δ log p|",
        "A",
        "B extra/missing",
        "B bytes",
        "B",
        "C violations",
        "C",
        "D batch Δ",
        "D world Δ",
        "D",
        "E max|log Σp|",
        "E",
        "F early updates/gradients",
        "F",
        "G violations",
        "G",
        "H violations",
        "H",
        "compliant",
    ]
    return (
        f"**Causality audit** — `pgolf audit` (`pgolf_lit.eval.audit.audit_all()`, the reports "
        f"`format_audit_table` prints), float64 tiny causal model (vocab {s.vocab_size}, d {s.model_dim}), "
        f"L {s.seq_len}, stride {s.stride}, batch {s.batch_windows}, world {s.world_size}, tol {s.tol:g}; "
        f"{secs:.1f} s. A = prefix invariance, B = every target scored exactly once, C = score before update, "
        f"D = batch/world invariance (diagnostic), E = normalized distributions (over the whole vocabulary, and what "
        f"was charged), F = nothing read before it is scored (reported updates / observed backward passes), "
        f"G = document isolation (where claimed), H = state order agrees with scoring order (state across "
        f"documents). Expected verdicts: docs/techniques.md §6 (Compliance verdicts)."
        "\n\n" + md_table(headers, rows)
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="bench_work", help="work dir shared with bench/quant_table.py (cache, data)")
    p.add_argument("--out", default=None, help="also write the markdown here")
    p.add_argument("--configs", nargs="+", default=[str(c) for c in DEFAULT_CONFIGS])
    p.add_argument("--val-tokens", type=int, default=16384, help="first N val tokens (0: the whole split)")
    p.add_argument(
        "--slow-val-tokens", type=int, default=0, help="SLOT passes on the first N of those only (0: all of them)"
    )
    p.add_argument("--stride", type=int, default=0, help="override the config's eval stride (0: keep it)")
    p.add_argument("--no-audit", action="store_true", help="skip the causality audit table")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see bench/quant_table.py)")
    p.add_argument("--quick", action="store_true", help="smoke-test size: a few steps, tokens and passes")
    p.add_argument("fit_args", nargs="*", help="after --: extra `pgolf fit` overrides (part of the cache key)")
    args = p.parse_args(argv)
    if args.quick:
        args.fit_args = [*QUICK_FIT_ARGS, *args.fit_args]
        args.val_tokens = min(args.val_tokens, 1024) if args.val_tokens else 1024
    return args


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_tables(
        args,
        "## Evaluation measurements (`bench/eval_table.py`)",
        lambda prep: [measure_model(prep, args)],
        tail=lambda: [] if args.no_audit else ["### Causality audit", audit_section()],
    )


if __name__ == "__main__":
    main()
