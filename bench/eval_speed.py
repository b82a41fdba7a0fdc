"""Evaluation speed: tokens/s of the evaluation passes (pgolf_lit.eval.run_method) on a model from a config.

    python bench/eval_speed.py --config configs/records/pr1321_slot48_tiny.yaml --methods sliding slot
    python bench/eval_speed.py --config configs/records/pr1394_sp8192_loop45.yaml --val-tokens 1048576 --device cuda
    python bench/eval_speed.py --config X.yaml -- --data.data_dir D --data.build_embedded true   # extra fit arguments

The model is the config's architecture at its random initialisation (speed does not depend on the weights)
with depth recurrence on, as every evaluation runs it; the passes use the config's ``model.evaluation``
settings (window length, stride, SLOT/TTT presets) and, on CUDA, the precision ``pgolf test`` uses (bf16
autocast and torch.compile when the config compiles). The first ``--val-tokens`` tokens of the validation
split are scored.

Each pass runs ``--repeats`` times: the first includes compilation (run_method's clock covers the whole pass,
as in the records' logs), later ones reuse the compiled code and give the steady-state rate. One line per
method::

    eval method=sliding tokens=... first_ms=... eval_ms=... tok_s=... device=... config=...

``tokens`` are scored positions; ``eval_ms`` / ``tok_s`` are the median over the repeats after the first
(the first itself when ``--repeats 1``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from pgolf_lit.cli import make_cli
from pgolf_lit.eval import eval_methods, evaluation_context, run_method


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a pgolf YAML config")
    p.add_argument("--methods", nargs="+", choices=list(eval_methods()), default=["sliding", "slot"])
    p.add_argument("--val-tokens", type=int, default=65536, help="score the first N val tokens (0: the whole split)")
    p.add_argument("--repeats", type=int, default=2, help="passes per method; the first includes compilation")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    own, extra = (
        (list(argv), [])
        if "--" not in argv
        else (list(argv[: list(argv).index("--")]), list(argv[list(argv).index("--") + 1 :]))
    )
    args = p.parse_args(own)
    args.extra = extra
    if args.repeats < 1 or args.val_tokens < 0:
        p.error("--repeats must be at least 1 and --val-tokens non-negative")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(name)


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device = resolve_device(args.device)
    fit_args = ["--config", args.config, "--data.val_max_tokens", str(args.val_tokens), "--trainer.logger", "false"]
    if device.type == "cpu":
        fit_args += ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--model.compile", "false"]
    fit_args += args.extra  # e.g. -- --data.data_dir ... --data.build_embedded true
    cli = make_cli(fit_args, run=False)
    module, dm = cli.model, cli.datamodule
    dm.prepare_data()
    dm.setup("validate")
    model = module.model.to(device).eval()
    model.set_recurrence(True)
    # The evaluation `pgolf test` runs: the config's settings, its precision and compile flag.
    context = evaluation_context(
        module.evaluation, precision=str(cli.trainer.precision), device=device, compile=module.compile
    )
    tokens = dm.val_tokens.to(device)

    rows = []
    for method in args.methods:
        results = [run_method(method, model, tokens, dm.byte_counts, context) for _ in range(args.repeats)]
        steady = results[1:] or results
        eval_ms = statistics.median(r.eval_time_ms for r in steady)
        row = {
            "method": method,
            "tokens": results[0].tokens,
            "first_ms": results[0].eval_time_ms,
            "eval_ms": eval_ms,
            "tok_s": results[0].tokens / (eval_ms / 1000.0),
        }
        rows.append(row)
        print(
            f"eval method={method} tokens={row['tokens']} first_ms={row['first_ms']:.0f} eval_ms={eval_ms:.0f} "
            f"tok_s={row['tok_s']:.1f} device={device.type} config={Path(args.config).name}",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
