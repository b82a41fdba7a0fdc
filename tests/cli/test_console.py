"""What a user sees: the progress bar and text lines, a quiet first screen, resume in place, honest Trainer flags,
the wheel, loggers, --version and the argument parser. Every test runs the real CLI in a process of its own
(tests/cli_process.py)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from pgolf_lit.config import CONFIG_DIR
from cli_process import run_pgolf

ROOT = Path(__file__).resolve().parents[2]
TINY = CONFIG_DIR / "records" / "pr1394_sp8192_loop45_tiny.yaml"
QUIET = [
    "--trainer.max_steps",
    "4",
    "--trainer.val_check_interval",
    "2",
    "--model.evaluation.sliding.batch_windows",
    "64",
    "--data.val_max_tokens",
    "2048",
]


def pgolf(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return run_pgolf(args, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=timeout)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, embedded_data_root):
    """One short fit of the PR #1394 tiny twin with the progress bar on, and the run resumed in place after it."""
    cwd = tmp_path_factory.mktemp("console")
    (cwd / "data").mkdir()
    (cwd / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
    # Record configs write no checkpoint during the timed run; the switch turns the step checkpoints on for resuming.
    first = pgolf(
        "fit", "--config", "pr1394_sp8192_loop45_tiny", *QUIET, "--trainer.enable_checkpointing", "true", cwd=cwd
    )
    assert first.returncode == 0, first.stderr[-3000:]
    run = cwd / "runs" / "pr1394_sp8192_loop45_tiny" / "version_0"
    before = {"metrics": (run / "metrics.csv").read_text(), "summary": json.loads((run / "summary.json").read_text())}
    resumed = pgolf(
        "fit",
        "--config",
        "pr1394_sp8192_loop45_tiny",
        *QUIET,
        "--trainer.max_steps",
        "6",
        "--ckpt_path",
        "last",
        "--trainer.enable_progress_bar",
        "false",
        cwd=cwd,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return cwd, run, first, resumed, before


def test_the_bar_counts_steps_or_budget_and_text_lines_stand_alone(fitted):
    _, _, first, _, _ = fitted
    screen = first.stdout
    assert "train (steps)" in screen and "/4 [" in screen and "v_num" not in screen
    assert re.search(r"step=4, tok/s=[\d,]+, val_bpb=\d\.\d{4}", screen)
    # every upstream-style line starts a line of its own (after the bar's carriage return), never inside a bar
    for chunk in re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", screen).replace("\r", "\n").split("\n"):
        if re.search(r"step:\d+/\d+ (train_loss|val_loss)", chunk):
            assert re.match(r"\s*step:\d+/\d+ ", chunk), chunk
    assert re.search(r"Validation DataLoader 0: +\d+%\|.*\| \d+/\d+", screen), "validation bars need a length"


@pytest.mark.slow  # ~13 s of wallclock budget by design; the step bar is tested in the default suite
def test_budget_bar_counts_seconds(tmp_path, embedded_data_root):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
    # the twin keeps its record's 12 s GPTQ reserve: a 15 s max_time leaves a 3 s training budget
    out = pgolf(
        "fit",
        "--config",
        str(TINY),
        *QUIET,
        "--trainer.max_time",
        "00:00:00:15",
        "--trainer.max_steps",
        "1000",
        "--trainer.enable_checkpointing",
        "false",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train (budget)" in out.stdout and "stopping_early: wallclock_cap" in out.stdout
    assert re.search(r"\d+\.\d/3\.0 \[", out.stdout), "the bar shows elapsed / cap seconds"
    short = pgolf("fit", "--config", str(TINY), "--trainer.max_time", "00:00:00:05", cwd=tmp_path)
    assert short.returncode == 2 and "WallclockBudget.reserve_seconds 12" in short.stderr.strip().splitlines()[-1]


def test_the_first_screen_is_quiet(fitted):
    _, _, first, _, _ = fitted
    noise = (
        "💡",
        "litlogger",
        "litmodels",
        "LeafSpec",
        "LightningCLI's args",
        "FLOPs",
        "Total Flops",
        "sync_dist=True",
        "Warning",
    )
    for text in (first.stdout, first.stderr):
        for word in noise:
            assert word not in text, word
    assert "Trainable params" in first.stdout  # the model summary is still there


def test_resume_in_place_continues_the_run_and_its_logs(fitted):
    cwd, run, _, resumed, before = fitted
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]
    assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    old_rows = list(csv.DictReader(before["metrics"].splitlines()))
    steps = [int(r["step"]) for r in rows if r.get("lr_scale")]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) and max(steps) >= 4
    assert len(rows) > len(old_rows) and rows[: len([r for r in old_rows if int(r["step"]) < 4])]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["initial_val"] == before["summary"]["initial_val"]
    assert summary["train"]["steps"] == 6
    assert "tok_s" in rows[0] and yaml.safe_load((run / "hparams.yaml").read_text())["evaluation"]
    log = (run / "train.log").read_text()
    assert "step:4/" in log and "step:6/6" in log
    # The config checkpoints nothing, but a resumed run keeps checkpointing as the run it resumed did: one last.ckpt,
    # now at step 6 (no last-v1.ckpt from the final validation saving the same step again).
    import torch

    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6


def test_trainer_flags_are_mapped_or_refused(tmp_path):
    from pgolf_lit.cli import make_cli

    cli = make_cli(
        [
            "--config",
            str(TINY),
            "--trainer.gradient_clip_val",
            "0.7",
            "--trainer.max_time",
            "00:00:01:30",
            "--trainer.logger",
            "false",
        ],
        run=False,
    )
    assert cli.model.optim_config.grad_clip_norm == 0.7 and cli.trainer.gradient_clip_val is None
    budget = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "WallclockBudget")
    assert budget.max_seconds == 90
    out = pgolf("fit", "--config", str(TINY), "--trainer.accumulate_grad_batches", "4", cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(
        "error: trainer.accumulate_grad_batches: pgolf accumulates data.grad_accum_base"
    )
    out = pgolf("predict", "--config", str(TINY), cwd=tmp_path)
    assert out.returncode == 2 and "pgolf sample" in out.stderr


@pytest.mark.slow  # ~15 s: a subprocess fit just for the folder a fast_dev_run writes into
def test_fast_dev_run_writes_into_the_run_folder(tmp_path, embedded_data_root):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
    out = pgolf("fit", "--config", str(TINY), "--trainer.fast_dev_run", "true", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "train.log").exists() and not (tmp_path / "summary.json").exists()
    assert (tmp_path / "runs" / "fast_dev_run" / "train.log").is_file()


def test_version_and_no_prefix_matching(tmp_path):
    out = pgolf("--version", cwd=tmp_path)
    assert out.returncode == 0 and re.fullmatch(r"pgolf-lit \d+\.\d+\.\d+\S*\n", out.stdout)
    out = pgolf("fit", "--config", str(TINY), "--model.gpt.num_layer", "3", "--print_config", cwd=tmp_path)
    assert out.returncode == 2 and "num_layer" in out.stderr


def test_a_missing_logger_package_is_one_line(tmp_path):
    pytest.importorskip("lightning")
    if shutil.which("python") and __import__("importlib").util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    out = pgolf(
        "fit",
        "--config",
        str(TINY),
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir",
        "runs",
        cwd=tmp_path,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "pgolf-lit[tensorboard]" in last and "Traceback" not in out.stderr


def test_the_wheel_carries_the_configs_and_runs_away_from_the_repository(tmp_path):
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("pgolf_lit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pgolf_lit/configs/records/pr1394_sp8192_loop45.yaml" in names and "pgolf_lit/configs/demo_cpu.yaml" in names
    assert "pgolf_lit/callbacks/gptq_export.py" in names and not any(n.startswith("callbacks/") for n in names)
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    away = tmp_path / "elsewhere"
    away.mkdir()
    out = pgolf("summary", "--config", "pr1394_sp8192_loop45", cwd=away, env={"PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "total_params: 35943512" in out.stdout
    probe = subprocess.run(
        [sys.executable, "-c", "import pgolf_lit.config as c; print(c.CONFIG_DIR)"],
        cwd=away,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert Path(probe.stdout.strip()).is_relative_to(target)


def test_sample_writes_text_from_the_artifact(fitted):
    cwd, run, _, _, _ = fitted
    out = pgolf(
        "sample",
        "--config",
        "pr1394_sp8192_loop45_tiny",
        "--artifact",
        str(run / "final_model.pgolf"),
        "--prompt",
        "The",
        "--tokens",
        "8",
        "--samples",
        "2",
        cwd=cwd,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("--- sample ") == 2 and all(len(t.strip()) > 3 for t in out.stdout.split("---")[2::2])
