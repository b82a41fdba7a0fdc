"""``pgolf seeds --config X.yaml --seeds 42,1337,2024 [--devices N] [--out DIR] [--baseline B] [FIT ARGS]``: one
record run per seed, every figure in one results file, and whether the seeds clear the record bar.

Each seed is two subprocesses (a crash is reported and the sweep goes on): ``pgolf fit`` (training, export and
the roundtrip score, by the config's GPTQExport callback) into ``DIR/seed_N/fit``, then ``pgolf test`` with that
run's own saved config.yaml and artifact (the config's ``model.test_methods`` passes) into ``DIR/seed_N/test``;
console output goes to ``DIR/seed_N/{fit,test}.out``. Arguments this command does not know (or everything
after ``--``) go to ``pgolf fit``. The run directories are set through the config's logger
(``trainer.logger.init_args.save_dir/name/version``: a CSVLogger or TensorBoardLogger; not a list of loggers).

``DIR/results.json`` (and ``results.csv``, one row per seed) is rewritten atomically after every stage and is
the resume state: a finished seed is skipped, a stage that did not finish is deleted and run again (a trained
seed whose evaluation failed keeps its training). It also pins the config's contents and the fit arguments, so
a resumed sweep cannot mix seeds of different experiments.

``pgolf stats RESULTS.json [MORE.json ...] --baseline B`` prints the table and the significance tests of a
finished sweep, or of several sweeps of one config pooled (reproduction seeds). The tested metric is the val_loss
(nats per token) of the scored pass, the last of the config's test_methods; the baseline is a number (nats) or
results / submission.json files (pooled when repeated; Welch's test when they hold several seeds). Both of the
challenge's significance policies are tested and printed (stats.py: ``original``, >= 0.005 nats at p < 0.01;
``final``, one-sided Welch at p < 0.25 against the chronological frontier); ``--policy`` picks the verdict.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from pgolf_lit.config import load_config
from pgolf_lit.errors import ConfigError, PgolfError
from pgolf_lit.fileio import atomic_write_text
from pgolf_lit.stats import (
    DEFAULT_POLICY,
    POLICIES,
    RECORD_MARGIN_NATS,
    ImprovementTest,
    StatsError,
    mean,
    policy_tests,
    sample_std,
)
from pgolf_lit.run_summary import read_summary

RESULTS_FORMAT = "pgolf-seeds/1"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
STAGES = ("fit", "test")


class ResultsError(PgolfError, ValueError):
    """A results file that is missing, malformed, or belongs to another sweep (names the file)."""


# ---------------------------------------------------------------------------------------------------------
# The results file
# ---------------------------------------------------------------------------------------------------------


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"{path}: results file not found (pgolf seeds writes DIR/{RESULTS_JSON})")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise ResultsError(f"{path}: not a pgolf seeds results file (expected format {RESULTS_FORMAT!r})")
    return results


def finished_seeds(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [entry for entry in results["seeds"] if entry["status"] == "done"]


def pool_results(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Several sweeps of one config (reproduction seeds on other machines) as one results dict: their finished seeds
    together, each marked with the 1-based index of its file (``pooled_index``). One file is returned as it is."""
    if len(paths) == 1:
        return load_results(paths[0])
    loaded = [(Path(p), load_results(p)) for p in paths]
    (first_path, first), *others = loaded
    for path, results in others:
        for key in ("config_sha256", "methods", "score"):
            if results.get(key) != first.get(key):
                raise ResultsError(
                    f"{path}: another sweep than {first_path} ({key} differs); only sweeps of one config pool"
                )
    seeds = [{**e, "pooled_index": k} for k, (_, r) in enumerate(loaded, start=1) for e in finished_seeds(r)]
    return {**first, "seeds": seeds, "pooled_from": [str(path) for path, _ in loaded]}


def scored_metric(results: dict[str, Any]) -> str:
    """What the significance test is about, in words."""
    return f"val_loss (nats/token) of the '{results['score']}' pass ({results['score_label']})"


def save_results(out: Path, results: dict[str, Any]) -> None:
    """results.json and results.csv, each written atomically, with the summary of the finished seeds."""
    done = finished_seeds(results)
    summary: dict[str, Any] = {"finished": len(done), "failed": sum(e["status"] == "failed" for e in results["seeds"])}
    for key in ("val_loss", "val_bpb"):
        values = [e[key] for e in done]
        summary[f"{key}_mean"] = mean(values) if values else None
        summary[f"{key}_std"] = sample_std(values) if len(values) > 1 else None
    summary["bytes_total_max"] = max((e["bytes_total"] for e in done), default=None)
    results["summary"] = summary
    atomic_write_text(out / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    columns: list[str] = []
    for entry in results["seeds"]:
        columns += [k for k in entry if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(results["seeds"])
    atomic_write_text(out / RESULTS_CSV, buffer.getvalue())


def _new_results(config: Path, config_sha256: str, fit_args: list[str], devices: Optional[str]) -> dict[str, Any]:
    return {
        "format": RESULTS_FORMAT,
        "config": str(config),
        "config_sha256": config_sha256,
        "fit_args": fit_args,
        "devices": devices,
        "methods": None,  # the config's test_methods, known after the first fit
        "score": None,
        "score_label": None,
        "seeds": [],
    }


def _check_same_sweep(path: Path, results: dict[str, Any], fresh: dict[str, Any]) -> None:
    for key in ("config_sha256", "fit_args", "devices"):
        if results.get(key) != fresh[key]:
            raise ResultsError(
                f"{path}: this sweep ran with {key} {results.get(key)!r}, not {fresh[key]!r}; "
                "resume with the same config and arguments, or use another --out"
            )


# ---------------------------------------------------------------------------------------------------------
# Figures of one seed, from its runs' summary.json
# ---------------------------------------------------------------------------------------------------------


def _section(summary: dict[str, Any], name: str, where: Path) -> dict[str, Any]:
    if name not in summary:
        hint = " (is GPTQExport among the config's callbacks?)" if name in ("artifact", "roundtrip") else ""
        raise ResultsError(f"{where}: no '{name}' section{hint}")
    return summary[name]


def fit_figures(fit_dir: Path) -> dict[str, Any]:
    """Training, pre-quantization, roundtrip and artifact figures of a finished ``pgolf fit`` run."""
    where = fit_dir / "summary.json"
    summary = read_summary(fit_dir)
    train, last_val = _section(summary, "train", where), _section(summary, "last_val", where)
    pre, post = _section(summary, "pre_quant", where), _section(summary, "roundtrip", where)
    artifact = _section(summary, "artifact", where)
    return {
        "steps": train["steps"],
        "train_time_ms": train["train_time_ms"],
        "step_avg_ms": train["step_avg_ms"],
        "tokens_per_s": train["tokens_per_s"],
        "last_val_loss": last_val["val_loss"],
        "last_val_bpb": last_val["val_bpb"],
        "pre_quant_val_loss": pre["val_loss"],
        "pre_quant_val_bpb": pre["val_bpb"],
        "roundtrip_val_loss": post["val_loss"],
        "roundtrip_val_bpb": post["val_bpb"],
        "roundtrip_eval_time_ms": post["eval_time_ms"],
        "bytes_model": artifact["model_bytes"],
        "bytes_code": artifact["code_bytes"],
        "bytes_total": artifact["total_bytes"],
        "artifact": artifact["path"],
    }


def eval_figures(test_dir: Path, methods: Sequence[str]) -> dict[str, Any]:
    """Every evaluation pass of a finished ``pgolf test`` run, then the scored (last) pass's figures."""
    where = test_dir / "summary.json"
    passes = _section(read_summary(test_dir), "test", where)
    missing = [m for m in methods if m not in passes]
    if missing:
        raise ResultsError(f"{where}: no result for pass(es) {missing}")
    figures: dict[str, Any] = {}
    for method in methods:
        result = passes[method]
        figures[f"{method}_val_loss"] = result["val_loss"]
        figures[f"{method}_val_bpb"] = result["val_bpb"]
        figures[f"{method}_eval_time_ms"] = result["eval_time_ms"]
        figures[f"{method}_compliant"] = result["compliant"]
    scored = passes[methods[-1]]
    figures.update(
        val_loss=scored["val_loss"],
        val_bpb=scored["val_bpb"],
        eval_time_ms=scored["eval_time_ms"],
        compliant=scored["compliant"],
        score_tokens=scored["tokens"],
        score_bytes=scored["bytes"],
    )
    return figures


def configured_methods(fit_dir: Path) -> list[str]:
    """The test passes of the config the run saved (``model.test_methods``), in order."""
    methods = (load_config(fit_dir / "config.yaml").get("model") or {}).get("test_methods")
    if not methods:
        raise ConfigError(f"{fit_dir / 'config.yaml'}: model.test_methods is empty; the sweep needs a scored pass")
    return list(methods)


# ---------------------------------------------------------------------------------------------------------
# Running the seeds
# ---------------------------------------------------------------------------------------------------------


def pgolf_command() -> list[str]:
    """``python -m pgolf_lit.cli`` of this interpreter: a module (not ``python -c``), because Lightning starts the
    other DDP ranks by re-running this process's command line."""
    return [sys.executable, "-m", "pgolf_lit.cli"]


def _logger_args(seed_dir: Path, version: str) -> list[str]:
    return [
        "--trainer.logger.init_args.save_dir",
        str(seed_dir.parent),
        "--trainer.logger.init_args.name",
        seed_dir.name,
        "--trainer.logger.init_args.version",
        version,
    ]


def _error_line(output: Path) -> str:
    """The line that says what went wrong: the last ``error: ...`` line, else the last line (a traceback's)."""
    lines = [line.strip() for line in output.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


def _run_stage(command: list[str], output: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(output, "w") as f:
        returncode = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT).returncode
    return returncode, time.perf_counter() - started


def _stage_done(out: Path, entry: dict[str, Any], stage: str) -> bool:
    """Recorded as done, and its run directory is still there."""
    return entry.get(stage) == "done" and (out / entry[f"{stage}_dir"] / "summary.json").is_file()


def _artifact_in(fit_dir: Path, out: Path, path: str) -> str:
    """The artifact's path relative to the sweep; it must lie in the seed's own run directory, else the seeds
    would overwrite one artifact."""
    artifact = Path(path).resolve()
    if artifact.parent != fit_dir.resolve():
        raise ResultsError(
            f"{fit_dir / 'summary.json'}: artifact {path} is outside the run; make GPTQExport.path relative"
        )
    return str(artifact.relative_to(out))


def _stage_command(
    stage: str, out: Path, entry: dict[str, Any], config: Path, fit_args: list[str], devices: Optional[str]
) -> list[str]:
    """``pgolf fit`` of the config with the extra arguments and the seed; ``pgolf test`` of the run's own saved
    config and artifact. Both log into the seed's directory; the seed and directories are set last, so they win."""
    seed, seed_dir = entry["seed"], out / f"seed_{entry['seed']}"
    device_args = ["--trainer.devices", devices] if devices else []
    if stage == "fit":
        return [
            *pgolf_command(),
            "fit",
            "--config",
            str(config),
            *fit_args,
            *device_args,
            "--seed_everything",
            str(seed),
            *_logger_args(seed_dir, "fit"),
        ]
    return [
        *pgolf_command(),
        "test",
        "--config",
        str(seed_dir / "fit" / "config.yaml"),
        "--artifact",
        str(out / entry["artifact"]),
        *device_args,
        *_logger_args(seed_dir, "test"),
    ]


def _collect(stage: str, out: Path, results: dict[str, Any], entry: dict[str, Any]) -> None:
    """Add a finished stage's figures to the seed's entry (and the sweep's passes after the first fit)."""
    run_dir = out / f"seed_{entry['seed']}" / stage
    if stage == "fit":
        entry.update(fit_dir=str(run_dir.relative_to(out)), **fit_figures(run_dir))
        entry["artifact"] = _artifact_in(run_dir, out, entry["artifact"])
        methods = configured_methods(run_dir)
        if results["methods"] is None:
            results["methods"], results["score"] = methods, methods[-1]
        elif methods != results["methods"]:
            raise ResultsError(
                f"{run_dir}/config.yaml: test_methods {methods} differ from the sweep's {results['methods']}"
            )
    else:
        entry.update(test_dir=str(run_dir.relative_to(out)), **eval_figures(run_dir, results["methods"]))
        results["score_label"] = read_summary(run_dir)["test"][results["score"]]["label"]


def run_seed(
    out: Path, results: dict[str, Any], seed: int, config: Path, fit_args: list[str], devices: Optional[str]
) -> dict[str, Any]:
    """Run the stages of ``seed`` that have not finished, recording each in results.json as it ends."""
    seed_dir = out / f"seed_{seed}"
    entry = next((e for e in results["seeds"] if e["seed"] == seed), None)
    if entry is None:
        entry = {}
        results["seeds"].append(entry)
    if _stage_done(out, entry, "test"):
        print(f"seed {seed}: finished earlier, kept", flush=True)
        return entry
    if _stage_done(out, entry, "fit"):
        print(f"seed {seed}: fit finished earlier, kept", flush=True)
    else:
        # A fit that did not finish is never resumed: its directory and figures go, and it starts over.
        shutil.rmtree(seed_dir, ignore_errors=True)
        entry.clear()
        entry.update(seed=seed, status="incomplete", fit="", test="", error="")
    shutil.rmtree(seed_dir / "test", ignore_errors=True)
    seed_dir.mkdir(parents=True, exist_ok=True)
    for stage in [s for s in STAGES if not _stage_done(out, entry, s)]:
        output = seed_dir / f"{stage}.out"
        print(f"seed {seed}: {stage} ... (output: {output})", flush=True)
        returncode, seconds = _run_stage(_stage_command(stage, out, entry, config, fit_args, devices), output)
        entry[f"{stage}_seconds"] = round(seconds, 1)
        try:
            if returncode != 0:
                raise PgolfError(f"exit status {returncode}: {_error_line(output)}")
            _collect(stage, out, results, entry)
        except PgolfError as e:
            entry.update({stage: "failed", "status": "failed", "error": f"{stage}: {e}"})
            save_results(out, results)
            print(f"seed {seed}: {stage} FAILED after {seconds:.1f} s: {e}", flush=True)
            return entry
        entry.update({stage: "done", "status": "done" if stage == "test" else "trained", "error": ""})
        save_results(out, results)
        print(f"seed {seed}: {stage} done in {seconds:.1f} s", flush=True)
    return entry


# ---------------------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------------------


def load_baseline(text: str) -> tuple[list[float], str]:
    """Baseline val_loss values (nats) and where they came from: a number, a pgolf results file (its finished
    seeds), or a record's submission.json (per-seed ``val_loss`` under seed_results/seeds, else ``val_loss``)."""
    try:
        return [float(text)], f"{float(text):.8f} nats"
    except ValueError:
        pass
    path = Path(text)
    if not path.is_file():
        raise ResultsError(f"--baseline {text}: neither a number nor an existing file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and data.get("format") == RESULTS_FORMAT:
        values = [e["val_loss"] for e in finished_seeds(data)]
    else:
        per_seed = data.get("seed_results") or data.get("seeds") if isinstance(data, dict) else None
        values = [r["val_loss"] for r in per_seed.values() if "val_loss" in r] if isinstance(per_seed, dict) else []
        if not values and isinstance(data, dict) and "val_loss" in data:
            values = [data["val_loss"]]
    if not values:
        raise ResultsError(f"{path}: no val_loss to compare against (per seed or overall)")
    return [float(v) for v in values], f"{path} ({len(values)} value{'s' if len(values) > 1 else ''})"


def load_baselines(texts: str | Sequence[str]) -> tuple[list[float], str]:
    """One baseline (``load_baseline``), or several files' seeds pooled: the frontier's own seeds and
    reproductions of it. A number is a baseline on its own."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if len(texts) == 1:
        return load_baseline(texts[0])
    loaded = [load_baseline(text) for text in texts]
    for text in texts:
        if not Path(text).is_file():
            raise ResultsError(f"--baseline {text}: a number cannot be pooled with other baselines; give files only")
    values = [v for vs, _ in loaded for v in vs]
    return values, f"{len(values)} values pooled from " + ", ".join(source for _, source in loaded)


def significance(
    values: Sequence[float], baseline: Sequence[float], metric: str, policy: str
) -> tuple[dict[str, ImprovementTest | StatsError], ImprovementTest | StatsError]:
    """Both policies' tests of the seeds' val_loss values (or why each could not run), and the one ``policy``
    names, whose verdict counts."""
    if policy not in POLICIES:
        raise ResultsError(f"--policy {policy}: expected one of {', '.join(POLICIES)}")
    tests = policy_tests(values, baseline, metric)
    return tests, tests[policy]


def significance_lines(tests: dict[str, ImprovementTest | StatsError], policy: str) -> list[str]:
    """Each policy's rule and test (or why it was not run), then the chosen policy's verdict as the last line."""
    lines = []
    for name, test in tests.items():
        lines.append(f"{name} policy{' (the verdict)' if name == policy else ''}: {POLICIES[name].rule}")
        if isinstance(test, StatsError):
            lines.append(f"  not tested: {test}")
        else:
            lines += [f"  {line}" for line in test.lines()]
    chosen = tests[policy]
    verdict = f"not tested: {chosen}" if isinstance(chosen, StatsError) else chosen.verdict()
    return [*lines, f"{verdict} ({policy} policy)"]


def margin_in_bpb(results: dict[str, Any]) -> Optional[float]:
    """The record margin (nats per token) in bits per byte of the scored pass: × tokens / bytes / ln 2."""
    done = finished_seeds(results)
    if not done:
        return None
    return RECORD_MARGIN_NATS / math.log(2) * done[0]["score_tokens"] / done[0]["score_bytes"]


def table_lines(results: dict[str, Any]) -> list[str]:
    """The finished seeds' main figures as an aligned text table, with the mean and std of each column."""
    done = finished_seeds(results)
    columns = ["steps", "pre_quant_val_bpb", "roundtrip_val_bpb"]
    columns += [f"{m}_val_bpb" for m in results["methods"] or []] + ["val_loss", "bytes_total"]
    rows = [["seed", *columns]]
    for entry in done:
        seed = f"{entry['seed']}@{entry['pooled_index']}" if "pooled_index" in entry else str(entry["seed"])
        rows.append([seed, *(_cell(entry[c]) for c in columns)])
    for name, statistic in (("mean", mean), ("std", sample_std)):
        if len(done) > 1:
            rows.append([name, *(_cell(statistic([e[c] for e in done]), column=c) for c in columns)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]


def _cell(value: Any, column: str = "") -> str:
    """Scores with 6 decimals; counts (steps, bytes) as integers, their mean and std with one decimal."""
    if column in ("steps", "bytes_total"):
        return f"{value:.1f}"
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def print_report(
    results: dict[str, Any], baseline_args: Optional[str | Sequence[str]], policy: str = DEFAULT_POLICY
) -> None:
    """The table of finished seeds, the unfinished ones with their error, and both policies' record tests if a
    baseline is given (``policy``'s verdict last)."""
    done = finished_seeds(results)
    print(f"\n{len(done)} finished seed(s)")
    for k, source in enumerate(results.get("pooled_from") or [], start=1):
        print(f"  results file {k}: {source} (seeds marked @{k})")
    if done:
        print(f"scored pass: {results['score']} ({results['score_label']})")
        print("\n".join(table_lines(results)))
    for entry in results["seeds"]:
        if entry["status"] != "done":
            print(f"seed {entry['seed']}: not finished: {entry.get('error') or 'interrupted'}")
    if baseline_args:
        values, source = load_baselines(baseline_args)
        print(f"\nbaseline: {source}")
        tests, _ = significance([e["val_loss"] for e in done], values, scored_metric(results), policy)
        print("\n".join(significance_lines(tests, policy)))
    if (bpb := margin_in_bpb(results)) is not None:
        print(f"(the {RECORD_MARGIN_NATS} nats/token margin is {bpb:.5f} bits/byte on this validation text)")


# ---------------------------------------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------------------------------------


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text}: expected comma-separated integers, e.g. 42,1337,2024") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text}: expected distinct seeds, at least one")
    return seeds


def main(argv: Sequence[str]) -> None:
    argv = list(argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="pgolf seeds",
        allow_abbrev=False,
        description="pgolf fit + pgolf test for each seed, every figure in DIR/results.json and results.csv "
        "(resumable); arguments not listed here (or after --) go to pgolf fit",
    )
    p.add_argument("--config", required=True, help="the record's pgolf YAML config")
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 42,1337,2024")
    p.add_argument("--devices", default=None, help="trainer.devices for fit and test (default: the config's)")
    p.add_argument("--out", default=None, help="sweep directory (default: runs/seeds/<config name>)")
    add_significance_arguments(p)
    args, unknown = p.parse_known_args(argv)
    fit_args = unknown + passthrough
    config = Path(args.config)
    if not config.is_file():
        raise ConfigError(f"{config}: config file not found")
    seeds = parse_seeds(args.seeds)
    if args.baseline:
        load_baselines(args.baseline)  # a bad baseline fails now, not after hours of training
    out = Path(args.out or Path("runs") / "seeds" / config.stem).resolve()
    fresh = _new_results(config, hashlib.sha256(config.read_bytes()).hexdigest(), fit_args, args.devices)
    results = fresh
    if (out / RESULTS_JSON).is_file():
        results = load_results(out / RESULTS_JSON)
        _check_same_sweep(out / RESULTS_JSON, results, fresh)
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        run_seed(out, results, seed, config, fit_args, args.devices)
    print(f"\nresults: {out / RESULTS_JSON} and {RESULTS_CSV}")
    print_report(results, args.baseline, args.policy)
    if any(e["status"] != "done" for e in results["seeds"] if e["seed"] in seeds):
        sys.exit(1)


POLICY_HELP = (
    "the significance policy whose verdict counts (both are tested and printed): "
    + "; ".join(f"'{name}': {policy.rule}" for name, policy in POLICIES.items())
    + f" (default: {DEFAULT_POLICY})"
)


def add_significance_arguments(p: argparse.ArgumentParser) -> None:
    """``--baseline`` (repeatable: pooled) and ``--policy``, as pgolf seeds, stats and record take them."""
    p.add_argument(
        "--baseline",
        action="append",
        default=None,
        help="val_loss to beat: a number (nats), or a results.json or submission.json (the chronological frontier's "
        "seeds, for the final policy); repeat to pool files (the frontier's seeds and reproductions of them)",
    )
    p.add_argument("--policy", choices=sorted(POLICIES), default=DEFAULT_POLICY, help=POLICY_HELP)


def stats_main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="pgolf stats",
        description="the table and the record tests of pgolf seeds sweeps, under both significance policies of the "
        "challenge: 'original' (improvement >= 0.005 nats at p < 0.01, one-sided) and 'final' (one-sided Welch "
        "t-test at p < 0.25 against the chronological frontier)",
    )
    p.add_argument(
        "results", nargs="+", help=f"a sweep's {RESULTS_JSON}; several sweeps of one config pool their seeds"
    )
    add_significance_arguments(p)
    args = p.parse_args(argv)
    print_report(pool_results(args.results), args.baseline, args.policy)
