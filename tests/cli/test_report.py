"""``pgolf report``: plots and summary.md of a real tiny run (its artifact quantizes the larger matrices, and a
checkpoint is kept for ``--ckpt``), and the logger documentation's TensorBoard claim when tensorboard is installed."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pgolf_lit.config import load_config
from pgolf_lit.errors import PgolfError
from pgolf_lit.tools import report
from pgolf_lit.tools.report import ReportError, build_report
from test_seeds import CONFIG, pgolf, sweep_cwd

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_data_root) -> Path:
    """A fit run of the tiny PR #1421 config, 8 steps, with a checkpoint, exporting every matrix above 4096
    values as int6/int8 codes (the tiny model's are all small enough to be kept float by default)."""
    cwd = sweep_cwd(tmp_path_factory, embedded_data_root, "report_run")
    config = load_config(CONFIG)
    export = next(cb for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("GPTQExport"))
    export["init_args"]["export"]["keep_float_max_numel"] = 4096
    config["trainer"]["enable_checkpointing"] = True
    (cwd / "quantized.yaml").write_text(yaml.safe_dump(config))
    fit = pgolf(
        "fit",
        "--config",
        "quantized.yaml",
        "--trainer.max_steps",
        "8",
        "--trainer.val_check_interval",
        "4",
        "--trainer.logger.init_args.save_dir",
        "runs",
        "--trainer.logger.init_args.version",
        "v",
        cwd=cwd,
    )
    assert fit.returncode == 0, fit.stdout[-2000:] + fit.stderr[-2000:]
    return cwd / "runs" / "quantized" / "v"  # a config file logs under its own stem


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def category_rows(summary_md: str) -> dict[str, list[str]]:
    """summary.md's bytes table (its last table) as {category: cells after the first}."""
    rows = [line.strip("|").split("|") for line in summary_md.splitlines() if line.startswith("| ")]
    start = next(i for i, r in enumerate(rows) if r[0].strip() == "category")
    return {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[start + 1 :]}


def test_report_renders_the_plots_and_a_summary(run, tmp_path):
    out = tmp_path / "report"
    result = pgolf("report", str(run), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pngs = ["curves.png", "schedule.png", "weights.png", "bytes.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*pngs, "summary.md"])
    for name in pngs:
        width, height = png_size(out / name)
        assert width >= 800 and height >= 300, name
    image = pytest.importorskip("matplotlib.image").imread(out / "curves.png")
    assert image.std() > 0.05, "curves.png is blank"
    summary = (out / "summary.md").read_text()
    for name in pngs:
        assert f"]({name})" in summary
    fit = json.loads((run / "summary.json").read_text())
    loss, bpb = fit["roundtrip"]["val_loss"], fit["roundtrip"]["val_bpb"]
    assert f"| final_int6_roundtrip | val_loss {loss:.8f}, val_bpb {bpb:.8f} |" in summary
    assert "| recurrence:activated | 6 |" in summary and "| warmup:done | 0 |" in summary
    pre = fit["pre_quant"]["val_bpb"]
    assert f"Quantization gap (written on the val panels): {bpb - pre:+.5f} BPB" in summary
    rows = category_rows(summary)
    assert set(rows) == {"embed", "mlp", "other", "kept float"}
    assert rows["mlp"][2] == "6" and rows["embed"][2] == "8" and rows["kept float"][2] == "float"
    assert all(row[-1] == "—" for row in rows.values())  # no checkpoint given: no error measured
    stored = sum(int(row[3].replace(",", "")) for row in rows.values())
    assert stored > (run / "final_model.pgolf").stat().st_size  # the container compresses what it stores


def test_a_checkpoint_adds_the_weights_before_quantization(run, tmp_path):
    ckpt = next((run / "checkpoints").glob("*.ckpt"))
    build_report(run, tmp_path, ckpt)
    rows = category_rows((tmp_path / "summary.md").read_text())
    error = {name: float(row[-1].rstrip("%")) / 100 for name, row in rows.items()}
    assert error["kept float"] < 1e-3  # fp16 storage of the EMA weights the checkpoint holds
    assert 0 < error["embed"] < 0.1  # int8 codes
    assert 0 < error["mlp"] < 0.5  # int6 codes with SDClip, after 8 steps of training


def test_a_checkpoint_of_another_model_is_refused_by_name(run, tmp_path):
    state = torch.load(next((run / "checkpoints").glob("*.ckpt")), weights_only=True)["state_dict"]
    torch.save({"state_dict": {**state, "model.tok_emb.weight": torch.zeros(3, 3)}}, tmp_path / "other.ckpt")
    message = r"other.ckpt: tensor tok_emb.weight is \(3, 3\); the artifact's is \(1024, 64\)"
    with pytest.raises(PgolfError, match=message):
        build_report(run, tmp_path / "report", tmp_path / "other.ckpt")


def test_without_metrics_csv_there_is_no_lr_plot_and_it_says_why(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "metrics.csv").unlink()
    written = build_report(copy, tmp_path / "report")
    assert "schedule.png" not in [p.name for p in written]
    assert "No `lr_scale` in metrics.csv" in (tmp_path / "report" / "summary.md").read_text()


def test_a_directory_that_is_not_a_fit_run_is_named(tmp_path):
    with pytest.raises(ReportError, match=r"train.log: not found; pgolf report reads the directory of a pgolf fit run"):
        build_report(tmp_path, tmp_path / "report")


def test_without_matplotlib_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    with pytest.raises(PgolfError, match=r"pip install 'pgolf-lit\[report\]'"):
        report._figure()


def test_a_tensorboard_logger_needs_only_a_yaml_or_command_line_change(tmp_path_factory, embedded_data_root):
    pytest.importorskip("tensorboard")
    cwd = sweep_cwd(tmp_path_factory, embedded_data_root, "report_run")
    fit = pgolf(
        "fit",
        "--config",
        str(CONFIG),
        "--trainer.max_steps",
        "2",
        "--trainer.val_check_interval",
        "2",
        "--trainer.logger",
        "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.init_args.save_dir",
        "tb",
        "--trainer.logger.init_args.name",
        "tiny",
        cwd=cwd,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]
    run_dir = cwd / "tb" / "tiny" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*")) and (run_dir / "train.log").is_file()
    assert "roundtrip" in json.loads((run_dir / "summary.json").read_text())
