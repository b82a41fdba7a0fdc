"""Step anatomy: the ms per optimizer step of a record config's Lightning path, with each speed-parity switch of
issue 23 turned off in turn, beside the record's own logged ms/step.

    python bench/step_anatomy.py --config configs/records/pr1855_sp8192_lqer_sparsegate.yaml --device cuda
    python bench/step_anatomy.py --config configs/records/pr1855_sp8192_lqer_sparsegate_tiny.yaml --device cpu

One GPU runs one rank's share of the record's step: one micro-batch of ``train_batch_tokens / grad_accum_base``
tokens (98,304 for PR #1855), which is what each of the record's 8 GPUs computed per step; the gradient reduction
(item 5) and the world (item 3) need several devices and are reported as such. Every variant trains the same
module (compiled once; a switch that changes the graph recompiles during its untimed warmup steps) for ``warmup``
untimed and ``steps`` timed steps, the device synchronised at both ends of the timed span; the variants run in
turn for ``rounds`` rounds and the table gives each one's median. Switches:

1. varlen ``max_seqlen``: the packed loader's segment bound (shipped) vs the packed row length (the old launch);
2. checkpoints: none during the run (shipped) vs ``Checkpoint(every_n_train_steps=K)`` inside the timed span, and
   that save's cost spread over the old 1000-step cadence (two files per save: the step one and last.ckpt);
4. fused kernels: the config's ``model.fused_kernels`` switch on vs off (CUDA only: off CUDA both rows are the same
   PyTorch path).

The last line is machine-readable: ``step_anatomy shipped_ms=... record_ms=... config=... device=...``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import LightningSide, fit_args, make_fit_cli, resolve_device  # noqa: E402

from pgolf_lit.callbacks import Checkpoint  # noqa: E402
from pgolf_lit.model.fused_kernels import use_fused_kernels  # noqa: E402

# The records' own logs (upstream records/track_10min_16mb/<record>/train_seed*.log, line
# "stopping_early: wallclock_cap train_time: <ms> step: <steps>"): (train_time_ms, steps) per seed, 8×H100.
RECORD_LOGS = {
    "pr1855": ((599433, 4932), (599544, 4917), (599592, 4945)),  # 2026-04-27_SP8192_LQER_SparseGate_..._1.0611
}


def record_ms_per_step(config: str) -> Optional[float]:
    """The record's logged ms/step (mean over its seeds' logs), for the config of that record or its twin."""
    name = Path(config).name
    for key, runs in RECORD_LOGS.items():
        if name.startswith(key):
            return statistics.mean(ms / steps for ms, steps in runs)
    return None


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    own, extra = (
        (list(argv), []) if "--" not in argv else (list(argv[: argv.index("--")]), list(argv[argv.index("--") + 1 :]))
    )
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a record config (configs/records/...)")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per variant per round")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them (compile, allocations)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; each runs every variant once")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = p.parse_args(own)
    if args.steps < 2 or args.warmup < 1 or args.rounds < 1:
        p.error("--steps must be at least 2, --warmup and --rounds at least 1")
    return args, extra


def one_rank_args(cli) -> list[str]:
    """``pgolf fit`` overrides that make one device run one rank's micro-batch per step (none when it already does)."""
    dm = cli.datamodule
    if dm.grad_accum_base == 1:
        return []
    micro = dm.train_batch_tokens // dm.grad_accum_base
    return ["--data.train_batch_tokens", str(micro), "--data.grad_accum_base", "1"]


class Variant:
    """One row of the table: ``apply`` turns the switch off on the live objects and returns the undo."""

    def __init__(
        self, label: str, apply: Callable[[], Callable[[], None]], observers: Callable[[], list] = list, **trainer_flags
    ):
        self.label, self.apply, self.observers, self.trainer_flags = label, apply, observers, trainer_flags
        self.seconds: list[float] = []


def variants(side: LightningSide, workdir: Path, steps: int, warmup: int) -> list[Variant]:
    module, dm = side.cli.model, side.cli.datamodule
    rows = [Variant("as shipped", lambda: lambda: None)]
    if dm.loader_kind == "packed":
        from pgolf_lit.data.loaders import DocumentPackingLoader

        def row_length_bound():
            original = DocumentPackingLoader.seqlen_bound
            DocumentPackingLoader.seqlen_bound = property(lambda self: self.span - 1)  # the packed row length
            return lambda: setattr(DocumentPackingLoader, "seqlen_bound", original)

        rows.append(Variant("1 off: varlen max_seqlen = packed row length", row_length_bound))
    every = max(1, warmup + steps // 2)
    rows.append(
        Variant(
            f"2 off: Checkpoint every {every} steps (one save in the timed span)",
            lambda: lambda: None,
            lambda: [Checkpoint(every_n_train_steps=every, dirpath=str(workdir / "ckpt"))],
            enable_checkpointing=True,
        )
    )
    if getattr(module, "fused_kernels", False):

        def fused_off():
            use_fused_kernels(module.model, False)
            return lambda: use_fused_kernels(module.model, True)

        rows.append(Variant("4 off: fused kernels off (PyTorch ops)", fused_off))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="pgolf_anatomy_") as tmp:
        workdir = Path(tmp)
        cli = make_fit_cli(fit_args(args, device, workdir, extra))
        cli = make_fit_cli(fit_args(args, device, workdir, one_rank_args(cli) + extra))
        cli.datamodule.prepare_data()
        side = LightningSide(cli, args.warmup, args.steps)
        rows = variants(side, workdir, args.steps, args.warmup)
        tokens = cli.datamodule.micro_batch_tokens * cli.datamodule.grad_accum_base
        print(
            f"config={args.config} device={device} tokens/step={tokens} warmup={args.warmup} steps={args.steps} "
            f"rounds={args.rounds}",
            flush=True,
        )
        for r in range(args.rounds):
            for row in rows:
                undo = row.apply()
                try:
                    row.seconds.append(side.run(*row.observers(), **row.trainer_flags))
                finally:
                    undo()
                print(
                    f"round {r + 1}/{args.rounds}: {row.label}: {1000 * row.seconds[-1] / args.steps:.1f} ms/step",
                    flush=True,
                )

    record = record_ms_per_step(args.config)
    shipped = 1000 * statistics.median(rows[0].seconds) / args.steps
    print("\nstep anatomy")
    print(f"{'variant':<64} {'ms/step':>9} {'vs shipped':>11}")
    for row in rows:
        ms = 1000 * statistics.median(row.seconds) / args.steps
        print(f"{row.label:<64} {ms:>9.1f} {ms / shipped:>10.3f}x")
        if row.label.startswith("2 off"):
            per_save_ms = (ms - shipped) * args.steps
            print(
                f"{'  the save spread over the old cadence (2 files / 1000 steps)':<64} "
                f"{shipped + 2 * per_save_ms / 1000:>9.1f} {(shipped + 2 * per_save_ms / 1000) / shipped:>10.3f}x"
            )
    world_note = "n/a: one device" if (cli.trainer.world_size or 1) == 1 else "see bench/throughput.py under DDP"
    print(f"{'3 world (8 GPUs, local clip, per-rank calibration)':<64} {world_note:>21}")
    print(f"{'5 off: fp32 gradient reduction instead of bf16':<64} {world_note:>21}")
    if record is not None:
        print(f"{'the record, logged (8xH100, one rank per GPU)':<64} {record:>9.1f}")
    print(
        f"step_anatomy shipped_ms={shipped:.2f} record_ms={record if record is None else round(record, 2)} "
        f"config={Path(args.config).name} device={device.type}",
        flush=True,
    )
    return {"shipped_ms": shipped, "rows": {row.label: row.seconds for row in rows}, "record_ms": record}


if __name__ == "__main__":
    main()
