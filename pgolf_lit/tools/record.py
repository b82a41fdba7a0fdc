"""``pgolf record --results DIR/results.json --out records/<name>/ [--name --github-id --author --blurb --baseline]``:
the folder a record pull request adds: README.md, submission.json, and each seed's logs and config.

Every number is read from the copied logs (the evidence a reviewer checks) and checked against the sweep's
summary.json figures in results.json; a disagreement stops the command with both values named. The README
table and submission.json are then generated from those same numbers, so the three cannot disagree (the
review comments on hand-made records found steps, means and tables that did not match their logs). Means and
standard deviations are of the logged, 8-decimal values, rounded to 8 decimals.

Per seed: ``train_seed<N>.log`` (the fit run's train.log: training, pre-quantization, export bytes, roundtrip)
and ``eval_seed<N>.log`` (the test run's: one line per evaluation pass), both unmodified copies, and
``config.yaml`` (the first seed's merged run config; the seeds' configs must differ only in seed_everything and
the logger). The folder is written under a temporary name and renamed, so it is complete or absent.

The folder also ships ``artifact_code.py``, the counted code (the self-extracting program that reads the artifact
and runs its scored passes, quant/code_size.py), and ``manifest.json``: every seed's run manifests (versions,
hardware, shard sha256s, config, seed, clock ledger), the shipped size measured from the files (the code file as
written + each seed's artifact file), and the sha256 of every file of the folder. A seed without a run manifest, or
whose data manifest shows validation documents in the training shards, is refused; so is a shipped size that
differs from the one the run logged (the code changed since the run) or exceeds the budget.

Significance: both of the challenge's policies are tested against the baseline (stats.py ``POLICIES``), and
``--policy`` picks the one whose verdict is the record's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

from pgolf_lit.eval.registry import DEFAULT_TEST_METHODS
from pgolf_lit.config import callback_init_args, load_config
from pgolf_lit.errors import PgolfError
from pgolf_lit.run_manifest import package_section, read_run_manifest, val_docs_in_train
from pgolf_lit.stats import DEFAULT_POLICY, POLICIES, RECORD_MARGIN_NATS, ImprovementTest, StatsError, mean, sample_std
from pgolf_lit.run_summary import read_summary
from pgolf_lit.tools.seeds import (
    add_significance_arguments,
    finished_seeds,
    load_baselines,
    load_results,
    margin_in_bpb,
    scored_metric,
    significance,
)

LOG_DECIMALS = 8  # the result lines' precision (format_result_line)
CODE_FILE = "artifact_code.py"
MANIFEST_FORMAT = "pgolf-record-manifest/1"
_STEP_LINE = re.compile(r"^step:(\d+)/\d+ .*\btrain_time:(\d+)ms")
_BYTES_LINE = re.compile(r"^Serialized model bytes:(\d+) code bytes:(\d+) total:(\d+)")


class RecordError(PgolfError, ValueError):
    """A sweep that cannot become a record folder: missing logs, logs that disagree with the results (names both)."""


# ---------------------------------------------------------------------------------------------------------
# Reading the logs
# ---------------------------------------------------------------------------------------------------------


def _last_match(log: Path, pattern: re.Pattern, what: str) -> re.Match:
    if not log.is_file():
        raise RecordError(f"{log}: log not found")
    matches = [m for m in map(pattern.match, log.read_text(errors="replace").splitlines()) if m]
    if not matches:
        raise RecordError(f"{log}: no {what} line")
    return matches[-1]


def log_result(log: Path, label: str) -> dict[str, Any]:
    """``{label} val_loss:X val_bpb:Y eval_time:Zms ... compliant:yes|no`` (the last such line) as values."""
    pattern = re.compile(rf"^{re.escape(label)} val_loss:(\S+) val_bpb:(\S+) eval_time:(\d+)ms.*? compliant:(yes|no)$")
    m = _last_match(log, pattern, f"'{label} val_loss:... val_bpb:... compliant:...'")
    return {
        "val_loss": float(m.group(1)),
        "val_bpb": float(m.group(2)),
        "eval_time_ms": int(m.group(3)),
        "compliant": m.group(4) == "yes",
    }


def seed_figures(fit_dir: Path, test_dir: Path, methods: Sequence[str]) -> dict[str, Any]:
    """One seed's record numbers, each from its line in the fit or test log."""
    train_log, eval_log = fit_dir / "train.log", test_dir / "train.log"
    step = _last_match(train_log, _STEP_LINE, "'step:N/M ... train_time:...ms'")
    size = _last_match(train_log, _BYTES_LINE, "'Serialized model bytes:... code bytes:... total:...'")
    fit = read_summary(fit_dir)
    figures: dict[str, Any] = {
        "steps": int(step.group(1)),
        "train_time_ms": int(step.group(2)),
        "pre_quant_val_bpb": log_result(train_log, fit["pre_quant"]["label"])["val_bpb"],
        "roundtrip_val_bpb": log_result(train_log, fit["roundtrip"]["label"])["val_bpb"],
    }
    passes = read_summary(test_dir)["test"]
    for method in methods:
        result = log_result(eval_log, passes[method]["label"])
        figures[f"{method}_val_loss"], figures[f"{method}_val_bpb"] = result["val_loss"], result["val_bpb"]
    scored = log_result(eval_log, passes[methods[-1]]["label"])
    figures.update(scored)
    figures.update(artifact_bytes=int(size.group(3)), bytes_code=int(size.group(2)), bytes_model=int(size.group(1)))
    return figures


def check_against_results(figures: dict[str, Any], entry: dict[str, Any], logs: str, results_path: Path) -> None:
    """The logged numbers must be the results file's (summary.json) numbers at the log's precision."""
    pairs = {"steps": "steps", "artifact_bytes": "bytes_total", "bytes_code": "bytes_code", "val_loss": "val_loss"}
    pairs.update({k: k for k in figures if k.endswith("_val_bpb") or k.endswith("_val_loss")})
    if figures["compliant"] != entry["compliant"]:
        raise RecordError(
            f"seed {entry['seed']}: the scored pass's compliant flag differs between {logs} and {results_path}"
        )
    tolerance = 0.5 * 10.0**-LOG_DECIMALS + 1e-12  # counts must be equal; scores equal once rounded
    for log_key, results_key in pairs.items():
        logged, recorded = figures[log_key], entry[results_key]
        if abs(logged - recorded) > tolerance:
            raise RecordError(f"seed {entry['seed']}: {log_key} is {logged} in {logs} but {recorded} in {results_path}")


def check_same_config(configs: dict[int, Path]) -> None:
    """The seeds' merged run configs must be one experiment: equal but for the seed and the logger."""

    def essence(path: Path) -> dict[str, Any]:
        config = load_config(path)
        config.pop("seed_everything", None)
        (config.get("trainer") or {}).pop("logger", None)
        return config

    (first_seed, first), *others = configs.items()
    reference = essence(first)
    for seed, path in others:
        config = essence(path)
        if config != reference:
            differs = sorted(k for k in set(config) | set(reference) if config.get(k) != reference.get(k))
            raise RecordError(f"{path}: seed {seed} ran another config than seed {first_seed} (differs in {differs})")


# ---------------------------------------------------------------------------------------------------------
# The folder's documents
# ---------------------------------------------------------------------------------------------------------


def _round(value: float) -> float:
    return round(value, LOG_DECIMALS)


def _std(values: Sequence[float]) -> Optional[float]:
    return _round(sample_std(values)) if len(values) > 1 else None


def _test_fields(test: ImprovementTest | StatsError, policy: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"policy": policy, "rule": POLICIES[policy].rule}
    if isinstance(test, StatsError):
        return {**fields, "not_tested": str(test)}
    return {
        **fields,
        "metric": test.metric,
        "test": test.kind,
        "n": test.n,
        "baseline_mean": test.baseline_mean,
        "baseline_n": test.baseline_n,
        "margin_nats": test.margin,
        "alpha": test.alpha,
        "t": test.t if math.isfinite(test.t) else str(test.t),
        "df": test.df,
        "p": test.p,
        "holds": test.holds,
        "verdict": test.verdict(),
    }


def submission(
    results: dict[str, Any],
    seeds: dict[int, dict[str, Any]],
    meta: dict[str, Any],
    tests: Optional[dict[str, ImprovementTest | StatsError]],
    policy: str = DEFAULT_POLICY,
) -> dict[str, Any]:
    """submission.json in the upstream records' field names (name, author, github_id, date, val_bpb, val_loss,
    bytes_total, seeds, seed_results, blurb), with the scored pass and the significance tests added: the verdict
    of ``policy`` as ``significance``, every policy's under ``significance_policies``."""
    losses = [f["val_loss"] for f in seeds.values()]
    bpbs = [f["val_bpb"] for f in seeds.values()]
    doc = {
        **meta,
        "val_loss": _round(mean(losses)),
        "val_loss_std": _std(losses),
        "val_bpb": _round(mean(bpbs)),
        "val_bpb_std": _std(bpbs),
        "val_bpb_method": f"{results['score']} ({results['score_label']})",
        "bytes_total": max(f["artifact_bytes"] for f in seeds.values()),
        "bytes_code": max(f["bytes_code"] for f in seeds.values()),
        "scored_pass_compliant": all(f["compliant"] for f in seeds.values()),
        "seeds": list(seeds),
        "seed_results": {str(seed): f for seed, f in seeds.items()},
    }
    if tests is not None:
        doc["significance"] = _test_fields(tests[policy], policy)
        doc["significance_policies"] = {name: _test_fields(test, name) for name, test in tests.items()}
    return doc


def table(results: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """The README results table: one row per seed, then the mean and std of the scores (not of counts)."""
    methods, score = results["methods"], results["score"]
    columns = [
        ("Steps", "steps"),
        ("Train time (ms)", "train_time_ms"),
        ("Pre-quant val_bpb", "pre_quant_val_bpb"),
        ("Roundtrip val_bpb", "roundtrip_val_bpb"),
    ]
    columns += [(f"{m} val_bpb{' (scored)' if m == score else ''}", f"{m}_val_bpb") for m in methods]
    columns += [
        (f"{score} val_loss (scored)", "val_loss"),
        ("Eval time (ms)", "eval_time_ms"),
        ("Artifact bytes", "artifact_bytes"),
    ]
    scores = [key for _, key in columns if key.endswith(("_val_bpb", "val_loss"))]

    def cell(key: str, value: Any) -> str:
        if value is None:
            return ""
        return f"{value:.{LOG_DECIMALS}f}" if key in scores else f"{value:,}" if key == "artifact_bytes" else str(value)

    rows = [[str(seed), *(cell(k, f[k]) for _, k in columns)] for seed, f in doc["seed_results"].items()]
    values = {k: [f[k] for f in doc["seed_results"].values()] for k in scores}
    rows.append(["Mean", *(cell(k, _round(mean(values[k])) if k in scores else None) for _, k in columns)])
    if len(doc["seeds"]) > 1:
        rows.append(["Std", *(cell(k, _std(values[k]) if k in scores else None) for _, k in columns)])
    header = ["Seed", *(title for title, _ in columns)]
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(r)} |" for r in rows)]


def compliance(doc: dict[str, Any]) -> str:
    """Whether the scored pass obeys the causality rules (the ``compliant:`` field of its log lines)."""
    if doc["scored_pass_compliant"]:
        return "The scored pass is marked `compliant:yes` in every eval log (pgolf's causality rules)."
    seeds = [seed for seed, f in doc["seed_results"].items() if not f["compliant"]]
    return (
        f"**Warning: the scored pass is marked `compliant:no` in the eval logs of seeds {', '.join(seeds)}: "
        "it lets a target shape the prediction that scores it (see `pgolf audit` and pgolf_lit's "
        "docs/techniques.md §6).**"
    )


def significance_section(tests: Optional[dict[str, ImprovementTest | StatsError]], policy: str, baseline: str):
    """The README's significance lines: the chosen policy's test and bold verdict, then the other policies'."""
    if tests is None:
        return ["Not tested: no baseline was given (`pgolf record --baseline VAL_LOSS_NATS|submission.json`)."]
    lines = [f"Baseline: {baseline}."]
    for name in [policy, *(n for n in tests if n != policy)]:
        test = tests[name]
        role = "the verdict" if name == policy else "also tested"
        lines += ["", f"**{name} policy** ({role}): {POLICIES[name].rule}.", ""]
        if isinstance(test, StatsError):
            lines.append(f"Not tested: {test}.")
            continue
        *inputs, verdict = test.lines()
        lines += [*(f"- {line}" for line in inputs), "", f"**{verdict}**" if name == policy else verdict]
    return lines


def readme(
    results: dict[str, Any],
    doc: dict[str, Any],
    labels: dict[str, str],
    tests: Optional[dict[str, ImprovementTest | StatsError]],
    policy: str,
    baseline: str,
    commands: Sequence[str],
) -> str:
    """README.md: the headline, the generated table and where each number comes from, the significance test,
    the files, and the commands that made the folder."""
    score, label = results["score"], results["score_label"]
    n = len(doc["seeds"])
    std = f", std {doc['val_bpb_std']:.{LOG_DECIMALS}f}" if doc["val_bpb_std"] is not None else ""
    passes = ", ".join(f"`{m}` = `{labels[m]}`" for m in results["methods"])
    lines = [
        f"# {doc['name']}",
        "",
        f"**val_bpb {doc['val_bpb']:.{LOG_DECIMALS}f}** ({n}-seed mean{std}) · val_loss "
        f"{doc['val_loss']:.{LOG_DECIMALS}f} nats/token · scored pass `{score}` (`{label}`) · largest artifact "
        f"{doc['bytes_total']:,} bytes",
        "",
        doc["blurb"],
        "",
        compliance(doc),
        "",
        "## Results",
        "",
        *table(results, doc),
        "",
        "Every number is read from the logs in this folder. From `train_seed<N>.log`: Steps and Train time "
        "(the last `step:` line), Pre-quant (`pre-quantization ...`), Roundtrip (the artifact reloaded, "
        "`final_*_roundtrip`) and Artifact bytes (`Serialized model ... total:`, model + code). From "
        f"`eval_seed<N>.log`, one line per evaluation pass: {passes}; Eval time is the scored pass's. Mean and "
        "Std (sample) are of the logged values. submission.json holds the same numbers.",
        "",
        "## Significance",
        "",
    ]
    lines += significance_section(tests, policy, baseline)
    if (bpb := margin_in_bpb(results)) is not None:
        lines += [
            "",
            f"The challenge's margin of {RECORD_MARGIN_NATS} nats/token is {bpb:.5f} bits/byte on this "
            "validation text (scored tokens / bytes of the scored pass).",
        ]
    lines += [
        "",
        "## Files",
        "",
        *(f"- `train_seed{s}.log`, `eval_seed{s}.log`: seed {s}'s training and evaluation logs" for s in doc["seeds"]),
        f"- `config.yaml`: the merged run config of seed {doc['seeds'][0]} (the seeds differ only in "
        "`seed_everything` and the logger's directory)",
        "- `submission.json`: the numbers above, per seed and aggregated",
        f"- `{CODE_FILE}`: the counted code, the self-extracting program that reads the artifact and runs its scored "
        "passes; its length is the code bytes of the artifact's total",
        "- `manifest.json`: each seed's run manifests (package commit, torch / Lightning / CUDA, GPU, every data "
        "shard's sha256, config, seed, clock ledger), the shipped size and the sha256 of every file here",
        "",
        "## Reproduce",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def seed_manifests(dirs: dict[int, tuple[Path, Path]]) -> dict[str, dict[str, Any]]:
    """Each seed's fit and test run manifests; a seed without a fit manifest, or whose data has validation
    documents in its training shards, is refused."""
    manifests = {}
    for seed, (fit_dir, test_dir) in dirs.items():
        runs = {}
        for stage, run_dir in (("fit", fit_dir), ("test", test_dir)):
            try:
                runs[stage] = read_run_manifest(run_dir)
            except (ValueError, UnicodeDecodeError) as e:
                raise RecordError(f"{run_dir / 'manifest.json'}: not readable JSON ({e})") from None
        if runs["fit"] is None:
            raise RecordError(
                f"{fit_dir / 'manifest.json'}: not found: seed {seed}'s run has no run manifest (data hashes, "
                "versions); rerun it with this pgolf"
            )
        if count := val_docs_in_train(runs["fit"]):
            data = runs["fit"]["dataset"]
            raise RecordError(
                f"seed {seed}: the data manifest {data.get('data_manifest')} shows {count} validation documents in "
                f"the training shards of {data.get('path')} (built with --keep-val-copies); a record cannot train on "
                "validation text"
            )
        manifests[str(seed)] = runs
    return manifests


def shipped_code(config_path: Path) -> str:
    """The counted code of the run's artifact (its export format, its config's scored passes), as the export
    measured it: the two-line self-extracting program (quant/code_size.py)."""
    from pgolf_lit.model.config import GPTConfig
    from pgolf_lit.quant.code_size import CODE_WRAPPERS, package_program
    from pgolf_lit.quant.export import ExportConfig

    config = load_config(config_path)
    export = ExportConfig.from_dict((callback_init_args(config, "GPTQExport") or {}).get("export") or {})
    methods = (config.get("model") or {}).get("test_methods") or list(DEFAULT_TEST_METHODS)
    model = GPTConfig.from_dict((config.get("model") or {}).get("gpt") or {})
    how = CODE_WRAPPERS[export.code_wrapper]  # ExportConfig checked the name against the registered wrappers
    program, _, _ = package_program((export.format,), methods, minify_options=how.minify_options, model=model)
    return how.wrap(program)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shipped_size(
    folder: Path, seeds: dict[int, dict[str, Any]], artifacts: dict[int, Path], budget: int
) -> dict[str, Any]:
    """What each seed ships, measured on disk: the code file written in ``folder`` plus the seed's artifact file.
    Refused when it differs from the total the run logged (the code changed since the run) or exceeds ``budget``."""
    code_bytes = os.path.getsize(folder / CODE_FILE)
    models = {}
    for seed, artifact in artifacts.items():
        model_bytes, total = os.path.getsize(artifact), code_bytes + os.path.getsize(artifact)
        logged = seeds[seed]["artifact_bytes"]
        if total != logged:
            raise RecordError(
                f"seed {seed}: ships {total:,} bytes ({CODE_FILE} {code_bytes:,} + {artifact.name} {model_bytes:,}) "
                f"but its train.log counted {logged:,} (code {seeds[seed]['bytes_code']:,}): the package's code "
                "changed since the run; make the record from the run's commit, or rerun"
            )
        models[str(seed)] = {"path": str(artifact), "bytes": model_bytes, "sha256": _sha256(artifact), "total": total}
    largest = max(m["total"] for m in models.values())
    if largest > budget:
        raise RecordError(f"the largest artifact ships {largest:,} bytes, over the {budget:,}-byte limit")
    return {
        "code_file": CODE_FILE,
        "code_bytes": code_bytes,
        "models": models,
        "largest_total_bytes": largest,
        "budget_bytes": budget,
    }


def shipped_line(shipped: dict[str, Any]) -> str:
    largest = max(shipped["models"].items(), key=lambda item: item[1]["total"])
    return (
        f"shipped size (measured from the files): {shipped['code_file']} {shipped['code_bytes']:,} bytes + seed "
        f"{largest[0]}'s {Path(largest[1]['path']).name} {largest[1]['bytes']:,} bytes = "
        f"{shipped['largest_total_bytes']:,} bytes, within the {shipped['budget_bytes']:,}-byte limit"
    )


def build_record(
    results_path: Path,
    out: Path,
    meta: dict[str, Any],
    baseline_arg: Optional[str | Sequence[str]] = None,
    policy: str = DEFAULT_POLICY,
) -> dict[str, Any]:
    """Check the sweep's logs against its results and write the record folder; return submission.json's content."""
    results = load_results(results_path)
    base = results_path.parent
    done = finished_seeds(results)
    if not done:
        raise RecordError(f"{results_path}: no finished seed to make a record of")
    if out.exists() and any(out.iterdir()):
        raise RecordError(f"{out}: exists and is not empty; choose a new folder or delete it")
    seeds: dict[int, dict[str, Any]] = {}
    dirs: dict[int, tuple[Path, Path]] = {}
    artifacts: dict[int, Path] = {}
    for entry in done:
        fit_dir, test_dir = base / entry["fit_dir"], base / entry["test_dir"]
        figures = seed_figures(fit_dir, test_dir, results["methods"])
        check_against_results(figures, entry, f"{fit_dir}/train.log and {test_dir}/train.log", results_path)
        seeds[entry["seed"]], dirs[entry["seed"]] = figures, (fit_dir, test_dir)
        artifacts[entry["seed"]] = base / entry["artifact"]
    check_same_config({seed: fit_dir / "config.yaml" for seed, (fit_dir, _) in dirs.items()})
    manifests = seed_manifests(dirs)
    first_fit_dir, first_test_dir = next(iter(dirs.values()))
    labels = {m: read_summary(first_test_dir)["test"][m]["label"] for m in results["methods"]}
    tests, baseline = None, ""
    if baseline_arg:
        baseline_values, baseline = load_baselines(baseline_arg)
        losses = [f["val_loss"] for f in seeds.values()]
        tests, chosen = significance(losses, baseline_values, scored_metric(results), policy)
        if isinstance(chosen, StatsError):
            raise RecordError(f"--policy {policy}: {chosen}")
    meta = {**meta, "blurb": meta["blurb"] or f"{len(seeds)} seeds of {Path(results['config']).name} (pgolf seeds)"}
    doc = submission(results, seeds, meta, tests, policy)
    sweep = ["pgolf seeds --config", results["config"], "--seeds", ",".join(map(str, seeds)), "--out", str(base)]
    record = ["pgolf record --results", str(results_path), "--out", str(out)]
    baselines = [baseline_arg] if isinstance(baseline_arg, str) else list(baseline_arg or [])
    record += [item for b in baselines for item in ("--baseline", b)]
    record += ["--policy", policy] if baselines and policy != DEFAULT_POLICY else []
    commands = [" ".join([*sweep, *results["fit_args"]]), " ".join(record)]
    budget = read_summary(first_fit_dir)["artifact"]["budget_bytes"]
    code = shipped_code(first_fit_dir / "config.yaml")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for seed, (fit_dir, test_dir) in dirs.items():
            shutil.copyfile(fit_dir / "train.log", staging / f"train_seed{seed}.log")
            shutil.copyfile(test_dir / "train.log", staging / f"eval_seed{seed}.log")
        shutil.copyfile(first_fit_dir / "config.yaml", staging / "config.yaml")
        (staging / CODE_FILE).write_text(code, encoding="utf-8")
        (staging / "submission.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        (staging / "README.md").write_text(readme(results, doc, labels, tests, policy, baseline, commands))
        manifest = {
            "format": MANIFEST_FORMAT,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "made_by": package_section(),
            "shipped": shipped_size(staging, seeds, artifacts, budget),
            "files": {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(staging.iterdir())},
            "seeds": manifests,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o755)
        staging.replace(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return doc


def main(argv: Sequence[str]) -> None:
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="pgolf record",
        description="a record folder (README.md, submission.json, logs, config) from a pgolf seeds results file",
    )
    p.add_argument("--results", required=True, help="a pgolf seeds results.json")
    p.add_argument("--out", required=True, help="the record folder to create, e.g. records/track_10min_16mb/<name>")
    p.add_argument("--name", default=None, help="the record's title (default: the folder's name)")
    p.add_argument("--github-id", default=None, help="the submitter's GitHub id")
    p.add_argument("--author", default=None, help="the author's name (default: the GitHub id)")
    p.add_argument("--blurb", default=None, help="one paragraph on what the record does")
    p.add_argument("--date", default=None, help="YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--track", default="10min_16mb")
    add_significance_arguments(p)
    args = p.parse_args(argv)
    out = Path(args.out)
    meta = {
        "name": args.name or out.name,
        "author": args.author or args.github_id,
        "github_id": args.github_id,
        "date": args.date or datetime.now(timezone.utc).date().isoformat(),
        "track": args.track,
        "blurb": args.blurb,
    }
    doc = build_record(Path(args.results), out, meta, args.baseline, args.policy)
    print(
        f"wrote {out}/: README.md, submission.json, config.yaml, {CODE_FILE}, manifest.json, train_seed*.log and "
        f"eval_seed*.log for seeds {doc['seeds']}: val_bpb {doc['val_bpb']:.{LOG_DECIMALS}f}"
    )
    print(shipped_line(json.loads((out / "manifest.json").read_text())["shipped"]))
    for name, fields in (doc.get("significance_policies") or {}).items():
        if name != args.policy:
            print(f"{name} policy (also tested): {fields.get('verdict') or 'not tested: ' + fields['not_tested']}")
    if "significance" in doc:
        print(f"{doc['significance']['verdict']} ({args.policy} policy, the verdict)")
    if args.github_id is None:
        print("note: --github-id not given: submission.json has github_id null")
