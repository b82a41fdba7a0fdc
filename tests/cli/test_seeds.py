"""``pgolf seeds``: real tiny record runs on CPU through the real CLI (3 seeds × 6 steps), their results file,
resuming, failing seeds, and baselines. The finished sweep is shared with test_record.py and test_report.py
(``finished_sweep``: whichever module asks first runs it; a sweep is resumable, so a second run is a no-op)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

from cli_process import run_pgolf
from pgolf_lit.errors import ConfigError
from pgolf_lit.tools import seeds as seeds_tool
from pgolf_lit.tools.seeds import ResultsError, load_baseline, load_results

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "records" / "pr1421_recur_ema9965_tiny.yaml"
SEEDS = (42, 1337, 2024)
FAST = ["--trainer.max_steps", "6", "--trainer.val_check_interval", "3"]


def pgolf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The pgolf command line of this interpreter, as a user runs it. One OpenMP thread per process (inherited by
    the runs pgolf seeds starts): on a small machine shared with other jobs, two spinning threads per process
    made the tiny steps up to 60 times slower."""
    return run_pgolf(args, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def sweep_cwd(tmp_path_factory, embedded_data_root: Path, name: str) -> Path:
    """A working directory whose data/demo is the session's embedded dataset (what the tiny configs read)."""
    cwd = tmp_path_factory.getbasetemp() / name
    if not cwd.is_dir():
        (cwd / "data").mkdir(parents=True)
        (cwd / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
    return cwd


def finished_sweep(tmp_path_factory, embedded_data_root: Path) -> Path:
    """The results.json of a finished 3-seed sweep of the tiny PR #1421 config, run once per test session."""
    cwd = sweep_cwd(tmp_path_factory, embedded_data_root, "shared_sweep")
    results = cwd / "sweep" / "results.json"
    if not results.is_file():
        run = pgolf(
            "seeds", "--config", str(CONFIG), "--seeds", ",".join(map(str, SEEDS)), "--out", "sweep", *FAST, cwd=cwd
        )
        assert run.returncode == 0, run.stdout + run.stderr
    return results


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, embedded_data_root) -> Path:
    return finished_sweep(tmp_path_factory, embedded_data_root)


@pytest.mark.slow  # the shared 3-seed sweep (~35 s)
def test_sweep_collects_every_figure_of_every_seed(sweep):
    results = load_results(sweep)
    out = sweep.parent
    assert results["methods"] == ["standard", "sliding"] and results["score"] == "sliding"
    assert results["score_label"] == "final_int6_sliding_window"
    assert [e["seed"] for e in results["seeds"]] == list(SEEDS)
    for entry in results["seeds"]:
        assert entry["status"] == "done" and entry["error"] == ""
        fit = json.loads((out / entry["fit_dir"] / "summary.json").read_text())
        test = json.loads((out / entry["test_dir"] / "summary.json").read_text())
        assert entry["steps"] == fit["train"]["steps"] and 1 <= entry["steps"] <= 6
        assert entry["pre_quant_val_bpb"] == fit["pre_quant"]["val_bpb"]
        assert entry["roundtrip_val_loss"] == fit["roundtrip"]["val_loss"]
        assert entry["bytes_total"] == fit["artifact"]["total_bytes"] == entry["bytes_model"] + entry["bytes_code"]
        assert entry["standard_val_bpb"] == test["test"]["standard"]["val_bpb"]
        assert entry["val_loss"] == entry["sliding_val_loss"] == test["test"]["sliding"]["val_loss"]
        assert (out / entry["artifact"]).is_file()
        run_config = yaml.safe_load((out / entry["fit_dir"] / "config.yaml").read_text())
        assert run_config["seed_everything"] == entry["seed"]
        assert run_config["trainer"]["max_steps"] == 6  # the extra arguments reached pgolf fit
        assert (out / f"seed_{entry['seed']}" / "fit.out").is_file()
    losses = [e["val_loss"] for e in results["seeds"]]
    assert len(set(losses)) == 3, "different seeds must give different runs"
    assert results["summary"]["finished"] == 3
    assert results["summary"]["val_loss_mean"] == pytest.approx(sum(losses) / 3, rel=1e-15)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["seed"]) for r in rows] == list(SEEDS)
    assert [float(r["val_loss"]) for r in rows] == losses
    assert [float(r["sliding_val_bpb"]) for r in rows] == [e["sliding_val_bpb"] for e in results["seeds"]]


@pytest.mark.slow  # ~30 s: reruns a seed of the sweep, after the shared 3-seed sweep
def test_resume_reruns_only_what_did_not_finish(sweep, tmp_path, tmp_path_factory, embedded_data_root):
    out = tmp_path / "sweep"
    shutil.copytree(sweep.parent, out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("seed_*/*/train.log")}
    results = json.loads((out / "results.json").read_text())
    # Killed while training seed 1337: results.json never heard of it, and a half-written run lies there.
    results["seeds"] = [e for e in results["seeds"] if e["seed"] != 1337]
    (out / "seed_1337" / "fit" / "half_written").write_text("x")
    # Killed while evaluating seed 2024: its training was recorded, its evaluation directory is half-written.
    entry = next(e for e in results["seeds"] if e["seed"] == 2024)
    entry.update(status="trained", test="")
    (out / "seed_2024" / "test" / "train.log").write_text("final_int6_roundtrip val_loss:9")
    (out / "results.json").write_text(json.dumps(results))

    run = pgolf(
        "seeds",
        "--config",
        str(CONFIG),
        "--seeds",
        "42,1337,2024",
        "--out",
        str(out),
        *FAST,
        cwd=sweep_cwd(tmp_path_factory, embedded_data_root, "shared_sweep"),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "seed 42: finished earlier, kept" in run.stdout
    assert "seed 2024: fit finished earlier, kept" in run.stdout
    assert "seed 1337: fit done" in run.stdout and "seed 2024: test done" in run.stdout
    after = {p: p.stat().st_mtime_ns for p in out.glob("seed_*/*/train.log")}
    unchanged = {p.relative_to(out).as_posix() for p in before if after[p] == before[p]}
    assert unchanged == {"seed_42/fit/train.log", "seed_42/test/train.log", "seed_2024/fit/train.log"}
    assert not (out / "seed_1337" / "fit" / "half_written").exists()
    assert "val_loss:9\n" not in (out / "seed_2024" / "test" / "train.log").read_text()
    resumed = load_results(out / "results.json")
    assert sorted(e["seed"] for e in resumed["seeds"]) == sorted(SEEDS)
    assert all(e["status"] == "done" for e in resumed["seeds"])
    rerun = next(e for e in resumed["seeds"] if e["seed"] == 1337)
    rerun_summary = json.loads((out / "seed_1337" / "test" / "summary.json").read_text())
    assert rerun["val_loss"] == rerun_summary["test"]["sliding"]["val_loss"]


@pytest.mark.slow  # ~10 s: a sweep of two seeds, one failing
def test_a_failing_seed_is_reported_and_the_sweep_goes_on(tmp_path, tmp_path_factory, embedded_data_root):
    cwd = sweep_cwd(tmp_path_factory, embedded_data_root, "shared_sweep")
    out = tmp_path / "failing"
    run = pgolf(
        "seeds", "--config", str(CONFIG), "--seeds", "1,2", "--out", str(out), "--model.gpt.num_layers", "0", cwd=cwd
    )
    assert run.returncode == 1
    for seed in (1, 2):
        assert f"seed {seed}: fit FAILED" in run.stdout
        assert f"seed {seed}: not finished: fit: exit status 2: error: gpt.num_layers" in run.stdout
    results = load_results(out / "results.json")
    assert [(e["seed"], e["status"], e["fit"]) for e in results["seeds"]] == [
        (1, "failed", "failed"),
        (2, "failed", "failed"),
    ]
    assert results["summary"]["finished"] == 0 and results["summary"]["failed"] == 2


@pytest.mark.slow  # the shared 3-seed sweep (~35 s)
def test_a_resumed_sweep_must_keep_its_config_and_arguments(sweep, tmp_path_factory, embedded_data_root):
    cwd = sweep_cwd(tmp_path_factory, embedded_data_root, "shared_sweep")
    run = pgolf(
        "seeds",
        "--config",
        str(CONFIG),
        "--seeds",
        "42",
        "--out",
        str(sweep.parent),
        "--trainer.max_steps",
        "7",
        cwd=cwd,
    )
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {sweep}: this sweep ran with fit_args {FAST!r}, not ['--trainer.max_steps', '7']; "
        "resume with the same config and arguments, or use another --out"
    ]


@pytest.mark.slow  # the shared 3-seed sweep (~35 s)
def test_stats_command_tests_the_sweep_against_a_baseline(sweep, tmp_path_factory, embedded_data_root):
    cwd = sweep_cwd(tmp_path_factory, embedded_data_root, "shared_sweep")
    results = load_results(sweep)
    losses = [e["val_loss"] for e in results["seeds"]]
    # Ten standard errors above the margin (t = 10, df = 2, p ≈ 0.005) whatever the seeds' spread: a loaded
    # machine stops these wallclock-capped runs after different numbers of steps.
    baseline = sum(losses) / 3 + 0.005 + 10 * statistics.stdev(losses) / math.sqrt(3)
    run = pgolf("stats", str(sweep), "--baseline", repr(baseline), cwd=cwd)
    assert run.returncode == 0, run.stderr
    assert "tested metric: val_loss (nats/token) of the 'sliding' pass (final_int6_sliding_window)" in run.stdout
    assert "\nclaim holds: p = " in run.stdout and "< 0.01 for improvement ≥ 0.005 nats" in run.stdout
    # Against itself (Welch, three seeds each) no improvement can be claimed.
    run = pgolf("stats", str(sweep), "--baseline", str(sweep), cwd=cwd)
    assert "Welch two-sample t-test" in run.stdout and "\nclaim does NOT hold: p = " in run.stdout
    assert f"mean {sum(losses) / 3:.8f}" in run.stdout


@pytest.mark.slow  # the shared 3-seed sweep (~35 s)
def test_baselines_from_numbers_results_and_upstream_submissions(tmp_path, sweep):
    assert load_baseline("2.80428") == ([2.80428], "2.80428000 nats")
    values, source = load_baseline(str(sweep))
    assert values == [e["val_loss"] for e in load_results(sweep)["seeds"]] and "3 values" in source
    # Upstream records keep per-seed results under "seeds" (PR #1413) or "seed_results" (PR #1394), or only a mean.
    per_seed = {"val_loss": 2.79, "seeds": {"0": {"val_loss": 2.7951}, "42": {"val_loss": 2.7978}}}
    (tmp_path / "a.json").write_text(json.dumps(per_seed))
    assert load_baseline(str(tmp_path / "a.json"))[0] == [2.7951, 2.7978]
    bpb_only = {"val_loss": 2.80428, "seed_results": {"1": {"val_bpb": 1.08554}}}
    (tmp_path / "b.json").write_text(json.dumps(bpb_only))
    assert load_baseline(str(tmp_path / "b.json"))[0] == [2.80428]
    (tmp_path / "c.json").write_text(json.dumps({"val_bpb": 1.1}))
    with pytest.raises(ResultsError, match="c.json: no val_loss to compare against"):
        load_baseline(str(tmp_path / "c.json"))
    with pytest.raises(ResultsError, match="neither a number nor an existing file"):
        load_baseline("records/nowhere.json")


def fake_sweep(path: Path, config_sha256: str, losses: dict[int, float]) -> Path:
    """A finished sweep's results.json with given scored val_loss per seed (the other figures filled in)."""
    entry = dict(status="done", steps=6, pre_quant_val_bpb=1.5, roundtrip_val_bpb=1.5, sliding_val_bpb=1.4)
    entry.update(bytes_total=9000, score_tokens=100, score_bytes=400)
    seeds = [dict(seed=s, val_loss=v, **entry) for s, v in losses.items()]
    results = dict(
        format=seeds_tool.RESULTS_FORMAT,
        config=str(CONFIG),
        config_sha256=config_sha256,
        fit_args=[],
        devices=None,
        methods=["sliding"],
        score="sliding",
        score_label="final_int6_sliding_window",
        seeds=seeds,
    )
    path.write_text(json.dumps(results))
    return path


def test_stats_help_names_both_significance_policies(capsys):
    with pytest.raises(SystemExit):
        seeds_tool.stats_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "'original' (improvement >= 0.005 nats at p < 0.01, one-sided)" in text
    assert "'final' (one-sided Welch t-test at p < 0.25 against the chronological frontier)" in text
    assert "--policy {final,original}" in text


def test_stats_pools_reproduction_seeds_and_prints_both_policies(tmp_path, capsys):
    a = fake_sweep(tmp_path / "a.json", "cfg", {42: 2.3180, 1337: 2.3190})
    b = fake_sweep(tmp_path / "b.json", "cfg", {42: 2.3185, 2024: 2.3200})
    frontier = fake_sweep(tmp_path / "frontier.json", "other", {1: 2.3200, 2: 2.3210, 3: 2.3220})
    seeds_tool.stats_main([str(a), str(b), "--baseline", str(frontier), "--policy", "final"])
    out = capsys.readouterr().out
    assert f"results file 1: {a} (seeds marked @1)" in out and "4 finished seed(s)" in out
    assert "42@1" in out and "42@2" in out and "2024@2" in out
    assert "original policy: improvement ≥ 0.005 nats at p < 0.01" in out
    assert "final policy (the verdict): one-sided Welch t-test at p < 0.25" in out
    pooled = [2.3180, 2.3190, 2.3185, 2.3200]
    assert f"4 seeds: mean {statistics.mean(pooled):.8f}" in out
    assert out.rstrip().splitlines()[-2].startswith("claim holds: p = ")
    assert out.rstrip().splitlines()[-2].endswith("< 0.25 for an improvement over the baseline (final policy)")
    with pytest.raises(ResultsError, match=r"c.json: another sweep than .*a.json \(config_sha256 differs\)"):
        seeds_tool.pool_results([a, fake_sweep(tmp_path / "c.json", "other config", {7: 2.0})])
    with pytest.raises(ResultsError, match="a number cannot be pooled"):
        seeds_tool.load_baselines([str(frontier), "2.5"])


@pytest.mark.parametrize("seeds", ["42,42", "42,x", ""])
def test_bad_seed_lists_fail_before_anything_runs(seeds, tmp_path):
    with pytest.raises(ConfigError, match="--seeds"):
        seeds_tool.main(["--config", str(CONFIG), "--seeds", seeds, "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


@pytest.mark.slow  # the shared 3-seed sweep (~35 s)
def test_margin_in_bits_per_byte(sweep):
    results = load_results(sweep)
    entry = results["seeds"][0]
    expected = 0.005 / math.log(2) * entry["score_tokens"] / entry["score_bytes"]
    assert seeds_tool.margin_in_bpb(results) == pytest.approx(expected)
