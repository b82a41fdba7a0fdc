"""Every bad input gets one clear line naming the culprit, nothing half-written stays behind, and a run killed
with SIGKILL resumes to the same weights as an uninterrupted one (issue 8; docs/reliability.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pgolf_lit.config import load_config

from pgolf_lit.config import CONFIG_DIR, record_config_path
from pgolf_lit.data.shards import HEADER_BYTES, load_validation_tokens
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.data.tokenizer import NoByteFallbackWarning, build_byte_luts, load_tokenizer
from pgolf_lit.errors import ArtifactError, CheckpointError, ConfigError, DataError, PgolfError
from pgolf_lit.quant import ExportConfig, export_model
from trainer_utils import TINY_GPT, tiny_datamodule, tiny_module

from conftest import shared_tokenizer


def dataset(tmp_path: Path, embedded_data_root: Path) -> Path:
    """A private copy of the embedded dataset that a test may break."""
    root = tmp_path / "root"
    shutil.copytree(embedded_data_root, root)
    return root


def setup_error(root: Path, **changes) -> str:
    dm = tiny_datamodule(root, **changes)
    with pytest.raises(PgolfError) as e:
        dm.setup("fit")
    return str(e.value)


# --- shards ---------------------------------------------------------------------------------------------


def test_shard_with_wrong_magic_or_version_names_the_file(tmp_path, embedded_data_root):
    root = dataset(tmp_path, embedded_data_root)
    val = root / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    data = bytearray(val.read_bytes())
    data[0:4] = np.int32(12345).tobytes()
    val.write_bytes(bytes(data))
    msg = setup_error(root)
    assert "fineweb_val_000000.bin" in msg and "magic 12345" in msg
    data[0:4] = np.int32(20240520).tobytes()
    data[4:8] = np.int32(7).tobytes()
    val.write_bytes(bytes(data))
    assert "version 7" in setup_error(root)


def test_truncated_shard_reports_the_size_mismatch(tmp_path, embedded_data_root):
    root = dataset(tmp_path, embedded_data_root)
    val = root / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    val.write_bytes(val.read_bytes()[:-10])
    msg = setup_error(root)
    assert "fineweb_val_000000.bin" in msg and "size mismatch" in msg


def test_token_id_beyond_the_vocab_is_caught(tmp_path, embedded_data_root):
    root = dataset(tmp_path, embedded_data_root)
    val = root / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    tokens = np.fromfile(val, dtype="<u2", offset=HEADER_BYTES).copy()
    tokens[100] = 5000
    write_shard(val, tokens)
    msg = setup_error(root)
    assert "token id 5000" in msg and "vocab_size 1024" in msg and "fineweb_val_000000.bin" in msg


def test_missing_train_or_val_split_names_the_directory_and_pattern(tmp_path, embedded_data_root):
    root = dataset(tmp_path, embedded_data_root)
    data_dir = root / "datasets" / "fineweb10B_sp1024"
    for f in data_dir.glob("fineweb_train_*.bin"):
        f.unlink()
    assert "no train shards matching fineweb_train_*.bin" in setup_error(root)
    for f in data_dir.glob("fineweb_val_*.bin"):
        f.unlink()
    assert "no val shards matching fineweb_val_*.bin" in setup_error(root)
    shutil.rmtree(data_dir)
    assert "dataset directory not found" in setup_error(root)


def test_val_split_shorter_than_one_sequence(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(50))
    with pytest.raises(DataError, match=r"validation split has 50 tokens, shorter than one sequence of 64"):
        load_validation_tokens(tmp_path, 64)


def test_empty_val_shard(tmp_path):
    write_shard(tmp_path / "fineweb_val_000000.bin", np.zeros(0, dtype=np.uint16))
    with pytest.raises(DataError, match="shorter than one sequence"):
        load_validation_tokens(tmp_path, 64)


# --- tokenizer --------------------------------------------------------------------------------------------


def test_missing_tokenizer_and_vocab_mismatch(tmp_path, embedded_data_root):
    root = dataset(tmp_path, embedded_data_root)
    assert "tokenizer model not found" in setup_error(root, tokenizer_path=str(tmp_path / "nope.model"))
    tok = root / "tokenizers" / "fineweb_1024_bpe.model"
    msg = setup_error(root, vocab_size=2048, tokenizer_path=str(tok))
    assert "vocab_size 1024" in msg and "expects vocab_size 2048" in msg


def test_tokenizer_without_byte_fallback_warns():
    sp = load_tokenizer(shared_tokenizer("fineweb_1024_bpe.model"), 1024)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_byte_luts(sp, 1024)
    assert any(issubclass(w.category, NoByteFallbackWarning) for w in caught)


# --- configs ----------------------------------------------------------------------------------------------


def test_world_size_must_divide_the_accumulation_base(embedded_data_root):
    dm = tiny_datamodule(embedded_data_root, grad_accum_base=8)
    with pytest.raises(ConfigError, match=r"data.grad_accum_base: world size 3 does not divide 8"):
        dm._check_sizes(3)


def test_batch_that_does_not_split_into_sequences(embedded_data_root):
    with pytest.raises(ConfigError, match="data.train_batch_tokens"):
        tiny_datamodule(embedded_data_root, train_batch_tokens=1000)


def test_unknown_record_preset_and_method_names():
    from pgolf_lit.records import record_export_config

    with pytest.raises(ConfigError, match="unknown record 'pr9999'"):
        record_config_path("pr9999")
    with pytest.raises(ConfigError, match="unknown record 'pr9999'"):
        record_export_config("pr9999")
    with pytest.raises(ConfigError, match="model.test_methods: unknown method"):
        from pgolf_lit.module import GolfModule

        GolfModule(test_methods=["standard", "slot48"])


# --- artifacts --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from pgolf_lit.model.gpt import GPT
    from pgolf_lit.config import GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY_GPT))
    path = tmp_path_factory.mktemp("artifact") / "model.pgolf"
    export_model(model, ExportConfig(prune="none", gptq={"fallback": "rtn"}), path, hessians={}, progress=False)
    return path


def test_artifact_built_for_another_config_is_refused(artifact):
    module = tiny_module(num_layers=3)
    with pytest.raises(ArtifactError, match="exported for another model config.*num_layers"):
        module.load_artifact(str(artifact))


def test_truncated_and_bit_flipped_artifacts_fail_with_a_checksum_or_format_error(artifact, tmp_path):
    from pgolf_lit.quant import read_artifact

    data = artifact.read_bytes()
    rng = np.random.default_rng(0)
    for i in range(20):
        broken = tmp_path / f"b{i}.pgolf"
        if i % 2:
            cut = int(rng.integers(0, len(data)))
            broken.write_bytes(data[:cut])
        else:
            flipped = bytearray(data)
            pos = int(rng.integers(0, len(data)))
            flipped[pos] ^= 1 << int(rng.integers(0, 8))
            broken.write_bytes(bytes(flipped))
        with pytest.raises(ArtifactError, match=str(broken.name)):
            read_artifact(broken)


def test_over_budget_export_writes_nothing(tmp_path):
    from pgolf_lit.config import GPTConfig
    from pgolf_lit.model.gpt import GPT

    out = tmp_path / "big.pgolf"
    with pytest.raises(ArtifactError, match="exceed the 1,000-byte budget"):
        export_model(
            GPT(GPTConfig(**TINY_GPT)), ExportConfig(budget_bytes=1000, prune="none"), out, hessians={}, progress=False
        )
    assert not out.exists() and not list(tmp_path.iterdir())


def test_checkpoint_loading_never_runs_pickled_code(tmp_path):
    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Boom()}, bad)
    with pytest.raises(CheckpointError, match="evil.ckpt: not a loadable checkpoint"):
        tiny_module().load_checkpoint_weights(str(bad))
    assert not (tmp_path / "pwned").exists()


# --- kill and resume --------------------------------------------------------------------------------------


def _config_with_checkpoints(tmp_path: Path) -> Path:
    """The PR #1263 tiny config (EMA, SWA, late QAT, priming, export) with a checkpoint every 2 steps."""
    cfg = load_config(CONFIG_DIR / "records" / "pr1263_slot16_tiny.yaml")
    cfg["trainer"]["max_steps"] = 14
    cfg["trainer"]["enable_checkpointing"] = True
    cfg["trainer"]["enable_progress_bar"] = False
    cfg["trainer"]["callbacks"].append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {
                "dirpath": "ckpts",
                "every_n_train_steps": 2,
                "save_top_k": -1,
                "filename": "{step}",
                "save_last": True,
            },
        }
    )
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not c["class_path"].endswith("GPTQExport")]
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("SWA"):  # collect often enough that the SWA state is non-trivial
            c["init_args"].update(every=2, lr_scale_below=0.5)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(cwd: Path, config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pgolf_lit.cli", "fit", "--config", str(config), *extra],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow  # 65 s of three concurrent fits; test_trainer and test_console cover resume in CI
def test_sigkill_and_resume_gives_the_uninterrupted_weights(tmp_path, embedded_data_root):
    runs = {}
    for name in ("full", "killed"):
        cwd = tmp_path / name
        (cwd / "data").mkdir(parents=True)
        (cwd / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
        runs[name] = cwd
    config = _config_with_checkpoints(tmp_path)

    full = _fit(runs["full"], config)
    killed = _fit(runs["killed"], config)
    ckpts = runs["killed"] / "ckpts"
    deadline = time.time() + 300
    while not (ckpts / "step=6.ckpt").exists():  # kill somewhere after the 3rd checkpoint
        assert killed.poll() is None and time.time() < deadline, killed.stderr.read()[-2000:]
        time.sleep(0.05)
    time.sleep(float(np.random.default_rng().uniform(0, 0.5)))
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert full.wait(timeout=600) == 0, full.stderr.read()[-2000:]

    last_ok = max((p for p in ckpts.glob("step=*.ckpt")), key=lambda p: int(p.stem.split("=")[1]))
    resumed = _fit(runs["killed"], config, "--ckpt_path", str(last_ok))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-2000:]

    a = torch.load(runs["full"] / "ckpts" / "step=14.ckpt", weights_only=True)
    b = torch.load(ckpts / "step=14.ckpt", weights_only=True)
    for key in ("state_dict", "current_model_state"):  # EMA weights and raw weights
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    swa_a = next(v for k, v in a["callbacks"].items() if k.startswith("SWA"))
    swa_b = next(v for k, v in b["callbacks"].items() if k.startswith("SWA"))
    assert swa_a["count"] == swa_b["count"] > 0
    for name, tensor in swa_a["sums"].items():
        assert torch.equal(tensor, swa_b["sums"][name])
    # the training clock continued from the checkpoint instead of restarting at zero
    resumed_from = torch.load(last_ok, weights_only=True)["pgolf"]["clock"]["elapsed_ms"]
    assert b["pgolf"]["clock"]["elapsed_ms"] > resumed_from > 0


GPT, OPTIM = "pgolf_lit.model.config:GPTConfig", "pgolf_lit.optim.groups:OptimConfig"
SCHEDULE, EXPORT = "pgolf_lit.optim.schedule:ScheduleConfig", "pgolf_lit.quant.export:ExportConfig"


@pytest.mark.parametrize(
    "cls_path, section, values, message",
    [
        (GPT, "gpt", {"num_layerz": 3}, "gpt: unknown field(s) ['num_layerz']"),
        (GPT, "gpt", {"num_layers": "3"}, "gpt.num_layers: expected an integer, got '3'"),
        (OPTIM, "optim", {"matrix_lr": "fast"}, "optim.matrix_lr: expected a number"),
        (SCHEDULE, "schedule", {"warmdown_iterz": 1}, "schedule: unknown field(s)"),
        (EXPORT, "export", {"budget_bytes": 1.5}, "export.budget_bytes: expected an integer"),
        (EXPORT, "export", {"gptq": {"nope": 1}}, "export.gptq: unknown field(s) ['nope']"),
    ],
)
def test_every_file_config_names_its_bad_field_in_one_line(cls_path, section, values, message):
    """GPTConfig, OptimConfig, ScheduleConfig and ExportConfig share CheckedConfig: an unknown or mistyped field is
    one ConfigError line naming <section>.<field>; to_dict/from_dict round-trip."""
    import importlib

    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    assert cls.SECTION == section
    with pytest.raises(ConfigError) as err:
        cls.from_dict(values)
    assert message in str(err.value) and "\n" not in str(err.value)
    default = cls()
    assert cls.from_dict(default.to_dict()) == default
