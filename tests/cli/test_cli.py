"""The ``pgolf`` command end to end: every config prints, the demo pipeline, test on an artifact, summary, convert,
the Fabric evaluator agreeing with ``pgolf test``, and one-line errors."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from cli_process import run_pgolf
from pgolf_lit.cli import main
from pgolf_lit.config import CONFIG_DIR
from pgolf_lit.run_summary import read_summary

ALL_CONFIGS = sorted(CONFIG_DIR.glob("*.yaml")) + sorted((CONFIG_DIR / "records").glob("*.yaml"))


def pgolf(*args: str, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    return run_pgolf(args, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda p: p.stem)
def test_print_config_of_every_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    out = capsys.readouterr().out
    assert "gpt:" in out and "trainer:" in out and "data:" in out


def test_summary_prints_the_exact_total(capsys):
    main(["summary", "--config", str(CONFIG_DIR / "records" / "pr1394_sp8192_loop45.yaml")])
    out = capsys.readouterr().out
    assert "total_params: 35943512" in out
    assert "[0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10]" in out
    estimate = int(re.search(r"int6 artifact estimate: (\d+) bytes", out).group(1))
    assert 15_000_000 < estimate < 16_500_000  # PR #1394's real artifact: 15.97 MB


@pytest.mark.slow  # 35-70 s: `pgolf demo` trains and exports; the seed records' tiny fits cover the same path
def test_demo_pipeline_short(run_cwd):
    """The demo's path through the real CLI, cut to a few steps: step-0 val, training, export, roundtrip."""
    result = pgolf(
        "demo",
        "--trainer.max_steps",
        "12",
        "--trainer.val_check_interval",
        "6",
        "--trainer.enable_progress_bar",
        "false",
        cwd=run_cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = next((run_cwd / "runs" / "demo_cpu").iterdir())
    summary = read_summary(run_dir)
    assert summary["last_val"]["val_bpb"] < summary["initial_val"]["val_bpb"] - 0.3
    assert abs(summary["roundtrip"]["val_bpb"] - summary["pre_quant"]["val_bpb"]) < 0.02
    artifact = summary["artifact"]
    assert artifact["total_bytes"] == artifact["model_bytes"] + artifact["code_bytes"] <= 16_000_000
    assert (run_dir / "final_model.pgolf").stat().st_size == artifact["model_bytes"]
    log = (run_dir / "train.log").read_text()
    assert "step:0/" in log and "final_int6_roundtrip val_loss:" in log and "Serialized model bytes:" in log


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, embedded_data_root):
    """One short fit of the PR #1333 tiny config (causal SLOT record), shared by the tests below."""
    cwd = tmp_path_factory.mktemp("tiny_run")
    (cwd / "data").mkdir()
    (cwd / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
    config = CONFIG_DIR / "records" / "pr1333_sp4096_causal_slot_tiny.yaml"
    result = pgolf(
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps",
        "8",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.version",
        "fit",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, config, cwd / "runs" / "pr1333_sp4096_causal_slot_tiny" / "fit"


def test_fit_logs_every_event_of_the_record(tiny_run):
    _, _, run_dir = tiny_run
    log = (run_dir / "train.log").read_text()
    for event in (
        "warmup:done",
        "recurrence:activated step:6",
        "ema:applying",
        "pre-quantization post-ema",
        "final_int6_roundtrip",
    ):
        assert event in log, event


def test_fit_counts_the_code_its_artifact_needs(tiny_run):
    """The printed ``code bytes:N`` and summary.json's code_bytes are the length of the wrapper that reads this
    artifact's container and runs its config's passes (native; standard, sliding, causal_slot)."""
    from pgolf_lit.config import load_config
    from pgolf_lit.model.config import GPTConfig
    from pgolf_lit.quant.code_size import measure_code_size

    _, _, run_dir = tiny_run
    artifact = read_summary(run_dir)["artifact"]
    model = GPTConfig.from_dict(load_config(run_dir / "config.yaml")["model"]["gpt"])
    expected = measure_code_size(("native",), ["standard", "sliding", "causal_slot"], model=model).counted_bytes
    assert artifact["code_bytes"] == expected and artifact["total_bytes"] == artifact["model_bytes"] + expected
    assert f"code bytes:{expected} " in (run_dir / "train.log").read_text()


def test_fit_leaves_a_run_manifest(tiny_run):
    """manifest.json names what a reviewer needs to rerun the fit: versions, the hardware, every shard by sha256
    (hashed here independently), the tokenizer, the disjointness the data build recorded, config, seed, clock."""
    import lightning
    import yaml

    from pgolf_lit import __version__
    from pgolf_lit.data.shards import read_num_tokens
    from pgolf_lit.data.tokenizer import file_sha256

    cwd, _, run_dir = tiny_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert manifest["stage"] == "fit" and manifest["config"] == config
    assert manifest["seed"] == config["seed_everything"]
    assert manifest["clock"] == read_summary(run_dir)["clock"]
    package, software, hardware = manifest["package"], manifest["software"], manifest["hardware"]
    assert package["version"] == __version__
    assert re.fullmatch(r"[0-9a-f]{40}", package["git_commit"]) or package["git_commit"] == "unknown"
    assert (software["torch"], software["lightning"], software["cuda"]) == (
        torch.__version__,
        lightning.__version__,
        torch.version.cuda,
    )
    assert hardware["accelerator"] == "cpu" and hardware["world_size"] == 1
    assert hardware["gpu_count"] == torch.cuda.device_count()
    data = manifest["dataset"]
    data_dir = cwd / config["data"]["data_dir"]
    for key, pattern in (("train_shards", "fineweb_train_*.bin"), ("val_shards", "fineweb_val_*.bin")):
        files = sorted(data_dir.glob(pattern))
        assert data[key]["count"] == len(files) >= 1
        assert data[key]["sha256"] == {f.name: file_sha256(f) for f in files}
    assert data["val_tokens"] == sum(read_num_tokens(f) for f in data_dir.glob("fineweb_val_*.bin"))
    tokenizer = Path(data["tokenizer"]["path"])
    assert tokenizer.name == f"fineweb_{config['model']['gpt']['vocab_size']}_bpe.model"
    assert data["tokenizer"]["sha256"] == file_sha256(tokenizer)
    assert data["val_disjointness"]["checked"] and data["val_disjointness"]["val_docs_in_train"] == 0
    assert data["matches_data_manifest"] is True


@pytest.mark.slow  # ~50 s: three passes twice; the sp1024 records of the test below keep Trainer = Fabric fast
def test_pgolf_test_and_fabric_eval_agree_on_the_artifact(tiny_run):
    cwd, config, run_dir = tiny_run
    artifact = run_dir / "final_model.pgolf"
    result = pgolf(
        "test",
        "--config",
        str(config),
        "--artifact",
        str(artifact),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.version",
        "test",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tested = read_summary(cwd / "runs" / "pr1333_sp4096_causal_slot_tiny" / "test")["test"]
    assert set(tested) == {"standard", "sliding", "causal_slot"}
    assert tested["causal_slot"]["compliant"] and tested["causal_slot"]["extra"]["slot"] == "causal_per_window"

    # Same label, same computation, same number: the fit's roundtrip line and pgolf test's line on its artifact.
    def scores(log_text: str) -> dict[str, str]:
        return {
            m.group(1): m.group(2)
            for m in re.finditer(r"^(\S.*?) (val_loss:\S+ val_bpb:\S+) eval_time", log_text, re.M)
        }

    fit_lines = scores((run_dir / "train.log").read_text())
    test_lines = scores((cwd / "runs" / "pr1333_sp4096_causal_slot_tiny" / "test" / "train.log").read_text())
    assert tested["standard"]["label"] == "final_int6_roundtrip" and tested["standard"]["weights"] == "quantized int6"
    assert test_lines["final_int6_roundtrip"] == fit_lines["final_int6_roundtrip"]
    assert "pre-quantization post-ema" in fit_lines

    out = cwd / "fabric.json"
    result = pgolf(
        "eval",
        str(artifact),
        "--data",
        "data/demo/datasets/fineweb10B_sp1024",
        "--config",
        str(config),
        "--method",
        "standard",
        "--method",
        "sliding",
        "--method",
        "causal_slot",
        "--val-max-tokens",
        "8192",
        "--results-json",
        str(out),
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fabric = {r["label"]: r for r in json.loads(out.read_text())}
    for method, r in tested.items():
        f = fabric[r["label"]]
        assert f["tokens"] == r["tokens"] and f["bytes"] == r["bytes"]
        # The same method function over the same batches in both commands (only the runner differs: Fabric vs the
        # Trainer), so the per-token losses are the same numbers; 1e-9 leaves room for the float64 sum's order only.
        assert f["val_bpb"] == pytest.approx(r["val_bpb"], abs=1e-9)


def _builds_its_own_dataset(config: Path) -> bool:
    """A tiny twin at another vocabulary (or CaseOps) first trains its tokenizer and builds its dataset (10-80 s)."""
    from pgolf_lit.config import load_config

    return load_config(config)["data"]["data_dir"] != "data/demo/datasets/fineweb10B_sp1024"


TINY_RECORDS = [
    pytest.param(p, marks=pytest.mark.slow) if _builds_its_own_dataset(p) else p
    for p in sorted((CONFIG_DIR / "records").glob("*_tiny.yaml"))
]


@pytest.mark.parametrize("config", TINY_RECORDS, ids=lambda p: getattr(p, "values", [p])[0].stem)
def test_every_record_evaluation_is_equal_under_pgolf_test_and_the_fabric_evaluator(config, run_cwd):
    """Each seed's evaluation passes (the config's test_methods: SLOT-16/32/48, causal SLOT, sliding, ...) on an
    artifact of its tiny architecture (untrained, RTN int8: the passes, not the model, are under test), on the
    first 2,048 val tokens: ``pgolf test`` (Trainer) and ``pgolf eval`` (Fabric) give the same numbers."""
    from pgolf_lit.config import load_config
    from pgolf_lit.module import GolfModule
    from pgolf_lit.quant import export_model
    from pgolf_lit.records import record_export_config

    torch.manual_seed(0)
    module = GolfModule.from_config(load_config(config))
    module.model.set_recurrence(True)
    rtn_int8 = dataclasses.replace(record_export_config("baseline_sp1024"), allow_over_budget=True)
    export_model(module.model, rtn_int8, run_cwd / "m.pgolf", progress=False)
    main(
        [
            "test",
            "--config",
            str(config),
            "--artifact",
            "m.pgolf",
            "--data.val_max_tokens",
            "2048",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.version",
            "t",
        ]
    )
    tested = read_summary(run_cwd / "runs" / config.stem / "t")["test"]
    assert set(tested) == set(load_config(config)["model"]["test_methods"])
    # The record's own dataset (pgolf test built it): the CaseOps twin scores bytes from its sidecar.
    data_dir = load_config(config)["data"]["data_dir"]
    main(
        [
            "eval",
            "m.pgolf",
            "--data",
            data_dir,
            "--config",
            str(config),
            "--val-max-tokens",
            "2048",
            "--results-json",
            "fabric.json",
        ]
    )
    fabric = {r["label"]: r for r in json.loads((run_cwd / "fabric.json").read_text())}
    assert len(fabric) == len(tested)
    for method, r in tested.items():
        f = fabric[r["label"]]
        assert (f["tokens"], f["bytes"], f["compliant"]) == (r["tokens"], r["bytes"], r["compliant"]), method
        assert f["val_bpb"] == pytest.approx(r["val_bpb"], abs=1e-9), method  # same batches: see the test above


def test_export_command_matches_the_callback(tiny_run, tmp_path):
    """`pgolf export` from a converted checkpoint of the artifact's weights writes a loadable artifact."""
    cwd, config, run_dir = tiny_run
    from pgolf_lit.quant import read_artifact

    art = read_artifact(run_dir / "final_model.pgolf")
    upstream = tmp_path / "final_model.pt"
    torch.save(art.state_dict, upstream)
    out = tmp_path / "exported.pgolf"
    result = pgolf(
        "export",
        "--upstream",
        str(upstream),
        "--config",
        str(config),
        "--out",
        str(out),
        "--calibration-batches",
        "2",
        cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Serialized model bytes:" in result.stdout and out.stat().st_size > 0
    reread = read_artifact(out)
    assert reread.config == art.config


@pytest.mark.parametrize("step", [5, pytest.param(None, marks=pytest.mark.slow)])
def test_export_command_calibrates_like_the_callback(run_cwd, monkeypatch, capsys, step):
    """`pgolf export` takes the config's calibration: for PR #1263's train_continue the training stream after the
    checkpoint's step (as GPTQExport does at the end of fit), from the start when the file records no step."""
    from pgolf_lit.callbacks import GPTQExport
    from pgolf_lit.config import load_config
    from pgolf_lit.data.datamodule import TokenShardDataModule
    from pgolf_lit.module import GolfModule

    config_path = CONFIG_DIR / "records" / "pr1263_slot16_tiny.yaml"
    config = load_config(config_path)
    module = GolfModule.from_config(config)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()}}
    if step is not None:
        ckpt["global_step"] = step
    torch.save(ckpt, run_cwd / "run.ckpt")
    seen = {}
    real = GPTQExport.calibration_tokens

    def spy(self, model, datamodule, device, steps_trained=0):
        seen["calibration"], seen["steps"] = self.calibration, steps_trained
        seen["batches"] = real(self, model, datamodule, device, steps_trained)
        return seen["batches"]

    monkeypatch.setattr(GPTQExport, "calibration_tokens", spy)
    main(["export", "--ckpt", "run.ckpt", "--config", str(config_path), "--out", "m.pgolf", "--device", "cpu"])
    assert seen["calibration"] == "train_continue" and seen["steps"] == (step or 0)
    dm = TokenShardDataModule(**{**config["data"], "vocab_size": module.model.config.vocab_size})
    expected = dm.make_train_loader(skip_steps=step or 0).next_batch()[0]
    assert torch.equal(seen["batches"][0], expected)
    assert not torch.equal(expected, dm.make_train_loader().next_batch()[0]) or step is None
    assert ("records no training step" in capsys.readouterr().err) == (step is None)


@pytest.mark.slow  # ~30 s (a full-size model saved and converted twice); the fixture tests load upstream weights fast
def test_convert_round_trip_is_the_identity(tmp_path):
    from pgolf_lit.model.convert import record_gpt_config
    from pgolf_lit.model.gpt import GPT

    config = CONFIG_DIR / "records" / "pr1278_slot32_recur.yaml"
    torch.manual_seed(0)
    model = GPT(record_gpt_config("pr1278_slot32_recur"))
    upstream = tmp_path / "final_model.pt"
    torch.save(model.state_dict(), upstream)
    main(["convert", "--from-upstream", str(upstream), "--config", str(config), "--out", str(tmp_path / "m.ckpt")])
    main(
        [
            "convert",
            "--to-upstream",
            str(tmp_path / "m.ckpt"),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "back.pt"),
        ]
    )
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(back[k].float(), v.to(back[k].dtype).float()), k


def test_unknown_command_and_bad_config_give_one_line(tmp_path):
    result = pgolf("frobnicate")
    assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  gpt:\n    num_heads: 5\n")
    result = pgolf("summary", "--config", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "gpt.num_heads" in result.stderr


def test_eval_with_a_bad_config_names_the_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  gpt:\n    num_layerz: 3\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(tmp_path / "m.pgolf"), "--data", str(tmp_path), "--config", str(bad)])
    assert exit_info.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"error: {bad}: gpt: unknown field(s) ['num_layerz']; known fields are listed in pgolf_lit/model/config.py"
    )
