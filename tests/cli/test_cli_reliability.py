"""Reliability through the real ``pgolf`` command (issue 20; docs/reliability.md, the rows marked ²): checkpoints
that are atomic and verified, NaN that never reaches a checkpoint, explicit settings that win over ``--ckpt_path``,
bounded loading of untrusted artifacts, and one ``error:`` line with exit status 2 for every bad input, OS error and
DDP failure, each through the real CLI (``pgolf_lit.cli.main``, or a subprocess where a process must be killed or
several ranks run). The same guarantees at the library level: test_reliability.py."""

from __future__ import annotations

import contextlib
import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from pgolf_lit.checkpoint import CHECKSUM_KEY, load_checkpoint_file
from pgolf_lit.cli import main
from pgolf_lit.errors import CheckpointError, DataError
from trainer_utils import TINY_GPT, fit, tiny_datamodule, tiny_module, tiny_trainer

HERE = Path(__file__).resolve().parent  # this room (the callbacks below), and the tests' shared helpers above it
TESTS = (HERE, HERE.parent)


# --- helpers ----------------------------------------------------------------------------------------------


def pgolf_line(args, capsys) -> tuple[int, str]:
    """Run ``pgolf ARGS`` in this process; (exit status, last stderr line)."""
    capsys.readouterr()
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        code = e.code or 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    return code, lines[-1] if lines else ""


def assert_one_line(args, capsys, *parts: str) -> str:
    code, line = pgolf_line(args, capsys)
    assert code == 2 and line.startswith("error: "), (code, line)
    for part in parts:
        assert part in line, (part, line)
    return line


def tiny_config(data_root: Path, path: Path, *, callbacks=(), **model) -> Path:
    """A pgolf config of TINY_GPT on the embedded dataset: 4 steps, no logger; ``callbacks`` as YAML entries."""
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "max_epochs": -1,
            "val_check_interval": 10_000,
            "check_val_every_n_epoch": None,
            "num_sanity_val_steps": 0,
            "use_distributed_sampler": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": False,
            "callbacks": list(callbacks),
        },
        "model": {
            "gpt": dict(TINY_GPT),
            "evaluation": {"seq_len": 64, "stride": 32},
            "test_methods": ["standard"],
            "train_log_every": 1000,
            **model,
        },
        "data": {
            "data_dir": str(data_root / "datasets" / "fineweb10B_sp1024"),
            "train_batch_tokens": 1024,
            "train_seq_len": 64,
            "grad_accum_base": 1,
            "val_batch_tokens": 2048,
            "val_max_tokens": 2048,
        },
    }
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def checkpoints(dirpath, every: int = 2) -> dict:
    return {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"dirpath": str(dirpath), "every_n_train_steps": every, "save_top_k": -1, "filename": "{step}"},
    }


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (root only; the test skips where mounting is not permitted)."""
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def unwritable_dir(tmp_path):
    """A folder no file can be created in: mode 0555 for a normal user, a read-only tmpfs for root."""
    path = tmp_path / "readonly"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with tmpfs(path, "ro,size=64k"):
        yield path


class PoisonAfterStep(Callback):
    """Fills one weight with inf after step ``step``: the loss of the next step is NaN."""

    def __init__(self, step: int = 3):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.blocks[0].mlp.fc.weight.fill_(float("inf"))


class RaiseOnRank(Callback):
    """A data error on one rank only, at one step (as a damaged shard that only that rank reads)."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step = rank, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise DataError("fineweb_train_000003.bin: token id 5000 at or above vocab_size 1024 (rank 1 only)")


# --- a real run with checkpoints, shared by the tests below ----------------------------------------------


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory, embedded_data_root):
    """``pgolf fit`` of the tiny config, a checkpoint every 2 steps: (cwd, config, checkpoint folder)."""
    cwd = tmp_path_factory.mktemp("ckpt_run")
    config = tiny_config(embedded_data_root, cwd / "tiny.yaml", callbacks=[checkpoints(cwd / "ckpts")])
    old = os.getcwd()
    os.chdir(cwd)
    try:
        main(["fit", "--config", str(config)])
    finally:
        os.chdir(old)
    return cwd, config, cwd / "ckpts"


def test_checkpoints_carry_a_checksum_and_are_written_in_their_folder(ckpt_run):
    _, _, ckpts = ckpt_run
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=2.ckpt", "step=4.ckpt"]  # no temporary left over
    raw = torch.load(ckpts / "step=4.ckpt", weights_only=True)
    assert raw[CHECKSUM_KEY]["sha256"] and raw["global_step"] == 4
    assert CHECKSUM_KEY not in load_checkpoint_file(ckpts / "step=4.ckpt")  # verified and removed


def test_disk_full_while_checkpointing_stops_with_one_line_and_leaves_nothing(
    tmp_path, embedded_data_root, monkeypatch, capsys
):
    """On a 64 KiB tmpfs when this process may mount one (a real ENOSPC), else with torch.save failing part-way
    through the way a full disk fails a write."""
    ckpts = tmp_path / "ckpts"
    config = tiny_config(embedded_data_root, tmp_path / "c.yaml", callbacks=[checkpoints(ckpts)])
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(tmpfs(ckpts, "size=64k"))
        except pytest.skip.Exception:
            real_save = torch.save

            def full_disk(obj, f, *args, **kwargs):
                real_save({"part": torch.zeros(1000)}, f)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(torch, "save", full_disk)
        monkeypatch.chdir(tmp_path)
        assert_one_line(
            ["fit", "--config", config],
            capsys,
            f"{ckpts}/step=2.ckpt: no space left on the device while writing the checkpoint",
            "nothing was written under that name",
        )
        assert list(ckpts.iterdir()) == []  # neither a truncated step=2.ckpt nor a temporary file


def test_unwritable_checkpoint_folder_fails_at_setup(tmp_path, embedded_data_root, unwritable_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(embedded_data_root, tmp_path / "c.yaml", callbacks=[checkpoints(unwritable_dir)])
    assert_one_line(["fit", "--config", config], capsys, f"{unwritable_dir}: the checkpoint folder is not writable")


def test_corrupted_checkpoint_is_refused_on_resume_test_and_export(ckpt_run, tmp_path, embedded_data_root, capsys):
    """A flipped bit in an Adam moment (the stored checksum now describes other contents) and a flipped byte in the
    file's tensor data are refused by resume (the CLI and the Trainer itself), pgolf test and pgolf export."""
    cwd, config, ckpts = ckpt_run
    ckpt = torch.load(ckpts / "step=4.ckpt", weights_only=True)
    states = [s for chain in ckpt["optimizer_states"] for opt in chain["optimizers"] for s in opt["state"].values()]
    adam = next(s for s in states if "exp_avg_sq" in s)  # the OptimizerChain's Adam (Muon has no second moment)
    flat = adam["exp_avg_sq"].view(-1).view(torch.int32)
    flat[0] ^= 1 << 20
    flipped = tmp_path / "flipped.ckpt"
    torch.save(ckpt, flipped)
    raw = bytearray((ckpts / "step=2.ckpt").read_bytes())
    with zipfile.ZipFile(ckpts / "step=2.ckpt") as z:  # the middle byte of the largest tensor record
        record = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack_from("<HH", raw, record.header_offset + 26)
    raw[record.header_offset + 30 + name_len + extra_len + record.file_size // 2] ^= 0x04
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(raw))
    for bad in (flipped, damaged):
        for args in (
            ["fit", "--config", config, "--ckpt_path", bad],
            ["test", "--config", config, "--ckpt_path", bad],
            ["export", "--ckpt", bad, "--config", config, "--out", tmp_path / "m.pgolf"],
        ):
            code, line = pgolf_line(args, capsys)
            assert code == 2 and line.startswith(f"error: {bad}: "), (args[0], line)
            assert "checksum mismatch" in line or "not a loadable checkpoint" in line, line
    with pytest.raises(CheckpointError, match="checksum mismatch"):  # the Trainer's own loading verifies too
        fit(tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 6), ckpt_path=str(flipped))
    assert not (tmp_path / "m.pgolf").exists()


def test_nan_never_reaches_a_checkpoint_and_the_newest_finite_one_is_named(
    tmp_path, embedded_data_root, capsys, monkeypatch
):
    """Poisoned after step 3, checked only every 50 steps: the checkpoint of step 4 is refused before it is written
    and the message names step=2.ckpt, which holds finite weights."""
    monkeypatch.chdir(tmp_path)
    ckpts = tmp_path / "ckpts"
    config = tiny_config(
        embedded_data_root,
        tmp_path / "c.yaml",
        check_finite_every=50,
        callbacks=[
            {"class_path": "test_cli_reliability.PoisonAfterStep", "init_args": {"step": 3}},
            checkpoints(ckpts),
        ],
    )
    assert_one_line(
        ["fit", "--config", config, "--trainer.max_steps", "6"],
        capsys,
        "training loss is not finite (nan/inf) at step 4: stopping before writing the checkpoint of step 4",
        f"last good checkpoint: {ckpts}/step=2.ckpt",
    )
    assert sorted(p.name for p in ckpts.iterdir()) == ["step=2.ckpt"]
    state = load_checkpoint_file(ckpts / "step=2.ckpt")["state_dict"]
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_ckpt_path_keeps_explicit_settings_and_refuses_another_architecture(
    ckpt_run, embedded_data_root, capsys, monkeypatch
):
    from pgolf_lit.cli import make_cli

    cwd, config, ckpts = ckpt_run
    monkeypatch.chdir(cwd)
    data_dir = embedded_data_root / "datasets" / "fineweb10B_sp1024"
    cli = make_cli(
        [
            "test",
            "--ckpt_path",
            str(ckpts / "step=4.ckpt"),
            "--data.data_dir",
            str(data_dir),
            "--data.val_max_tokens",
            "2048",
            "--model.evaluation.stride",
            "16",
            "--model.test_methods",
            "[standard]",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ]
    )
    assert cli.model.evaluation.stride == 16  # given: kept (the checkpoint says 32)
    assert cli.model.evaluation.seq_len == 64 and cli.model.gpt_config.num_layers == 2  # not given: the checkpoint's
    assert cli.model.test_results and cli.model.test_results[0].method == "standard"
    assert_one_line(
        ["test", "--config", config, "--ckpt_path", ckpts / "step=4.ckpt", "--model.gpt.num_layers", "3"],
        capsys,
        "model.gpt.num_layers: the command line gives 3, but the checkpoint",
        "was trained with 2",
    )


# --- bad inputs: one line each ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from pgolf_lit.config import GPTConfig
    from pgolf_lit.model.gpt import GPT
    from pgolf_lit.quant import ExportConfig, export_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("art") / "model.pgolf"
    export_model(
        GPT(GPTConfig(**TINY_GPT)),
        ExportConfig(prune="none", gptq={"fallback": "rtn"}),
        path,
        hessians={},
        progress=False,
    )
    return path


def test_bad_values_end_in_one_line_naming_the_field(tmp_path, embedded_data_root, artifact, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(embedded_data_root, tmp_path / "c.yaml")
    data_dir = embedded_data_root / "datasets" / "fineweb10B_sp1024"
    fit = ["fit", "--config", config]
    cases = [
        (fit + ["--data.train_seq_len", "0"], "data.train_seq_len: must be a positive integer, got 0"),
        (fit + ["--data.grad_accum_base", "0"], "data.grad_accum_base: must be a positive integer, got 0"),
        (fit + ["--data.grad_accum_base", "-1"], "data.grad_accum_base: must be a positive integer, got -1"),
        (fit + ["--data.val_max_tokens", "-5"], "data.val_max_tokens: must be 0 (the whole split)"),
        (fit + ["--model.evaluation.seq_len", "0"], "evaluation.seq_len: must be positive, got 0"),
        (fit + ["--model.evaluation.stride", "0"], "evaluation.stride: must lie in [1, seq_len=64], got 0"),
        (["eval", artifact, "--data", data_dir, "--val-max-tokens", "-1"], "--val-max-tokens: must be 0"),
        (["eval", artifact, "--data", data_dir, "--seq-len", "0"], "evaluation.seq_len: must be positive, got 0"),
    ]
    for callback, expected in [
        (
            {"class_path": "pgolf_lit.callbacks.EMA", "init_args": {"decay": 2.0}},
            "EMA.decay: must be a number in [0, 1]",
        ),
        ({"class_path": "pgolf_lit.callbacks.SWA", "init_args": {"every": 0}}, "SWA.every: must be a positive number"),
        (
            {"class_path": "pgolf_lit.callbacks.GPTQExport", "init_args": {"export": {"mlp": {"method": "gptq9"}}}},
            "export.mlp.method: unknown quantizer 'gptq9'",
        ),
    ]:
        path = tiny_config(embedded_data_root, tmp_path / f"cb{len(cases)}.yaml", callbacks=[callback])
        cases.append((["fit", "--config", path], expected))
    mistyped = tmp_path / "mistyped.yaml"
    mistyped.write_text(yaml.safe_dump({"model": {"gpt": {**TINY_GPT, "num_layers": "2"}}}))
    cases.append(
        (
            ["eval", artifact, "--data", data_dir, "--config", mistyped],
            f"{mistyped}: gpt.num_layers: expected an integer, got '2'",
        )
    )
    broken_yaml = tmp_path / "broken.yaml"
    broken_yaml.write_text("model:\n  gpt: {num_layers: 2\n")
    cases.append((["fit", "--config", broken_yaml], f"{broken_yaml}: not valid YAML"))
    for settings, expected in [
        ('{"mlp": {"method": "nope"}}', "export.mlp.method: unknown quantizer 'nope'"),
        ('{"codecs": "brotli"}', "export: unknown field(s) ['codecs']"),
    ]:
        cases.append(
            (["export", "--ckpt", "x.ckpt", "--config", config, "--out", "m.pgolf", "--settings", settings], expected)
        )
    for args, expected in cases:
        assert_one_line(args, capsys, expected)


def test_bad_files_end_in_one_line_naming_the_file(
    ckpt_run, tmp_path, embedded_data_root, artifact, capsys, monkeypatch
):
    cwd, config, ckpts = ckpt_run
    monkeypatch.chdir(tmp_path)
    truncated, empty, missing = tmp_path / "truncated.ckpt", tmp_path / "empty.ckpt", tmp_path / "missing.ckpt"
    truncated.write_bytes((ckpts / "step=2.ckpt").read_bytes()[:5000])
    empty.write_bytes(b"")
    for path, expected in [
        (truncated, "not a loadable checkpoint"),
        (empty, "empty file, not a checkpoint"),
        (missing, "checkpoint not found"),
    ]:
        assert_one_line(["test", "--config", config, "--ckpt_path", path], capsys, f"{path}: {expected}")
        assert_one_line(["fit", "--config", config, "--ckpt_path", path], capsys, f"{path}: {expected}")
    assert_one_line(
        ["export", "--upstream", truncated, "--config", config, "--out", "m.pgolf"],
        capsys,
        f"{truncated}: not a loadable state dict",
    )
    assert_one_line(
        ["convert", "--from-upstream", empty, "--config", config, "--out", "m.ckpt"],
        capsys,
        f"{empty}: empty file, not a state dict",
    )
    # a val shard shorter than its header whose size is no multiple of 4
    root = tmp_path / "root"
    shutil.copytree(embedded_data_root, root, symlinks=True)
    val = root / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin"
    val.write_bytes(b"\x01" * 1001)
    bad_data = tiny_config(root, tmp_path / "bad_data.yaml")
    assert_one_line(["fit", "--config", bad_data], capsys, f"{val}: unexpected shard header: file has 1001 bytes")
    # pgolf eval with a missing data folder names the folder, not its tokenizer
    nowhere = tmp_path / "nowhere" / "datasets" / "fineweb10B_sp1024"
    assert_one_line(["eval", artifact, "--data", nowhere], capsys, f"{nowhere}: dataset directory not found")


def test_pgolf_test_loads_a_convert_output(ckpt_run, tmp_path, capsys, monkeypatch):
    from pgolf_lit.config import GPTConfig
    from pgolf_lit.model.gpt import GPT

    cwd, config, _ = ckpt_run
    monkeypatch.chdir(tmp_path)
    torch.save(GPT(GPTConfig(**TINY_GPT)).state_dict(), tmp_path / "final_model.pt")
    main(
        [
            "convert",
            "--from-upstream",
            str(tmp_path / "final_model.pt"),
            "--config",
            str(config),
            "--out",
            str(tmp_path / "m.ckpt"),
        ]
    )
    assert CHECKSUM_KEY in torch.load(tmp_path / "m.ckpt", weights_only=True)
    code, _ = pgolf_line(["test", "--config", config, "--ckpt_path", tmp_path / "m.ckpt"], capsys)
    assert code == 0
    assert_one_line(
        ["fit", "--config", config, "--ckpt_path", tmp_path / "m.ckpt"],
        capsys,
        "holds model weights only",
        "no training state to resume from",
    )


def test_permission_denied_and_disk_full_on_export_name_the_path(
    ckpt_run, tmp_path, unwritable_dir, capsys, monkeypatch
):
    cwd, config, ckpts = ckpt_run
    monkeypatch.chdir(cwd)
    export = [
        "export",
        "--ckpt",
        ckpts / "step=4.ckpt",
        "--config",
        config,
        "--calibration-batches",
        "1",
        "--settings",
        '{"prune": "none"}',
        "--out",
    ]
    out = unwritable_dir / "m.pgolf"
    assert_one_line(export + [out], capsys, f"error: {out}: ")
    with tmpfs(tmp_path / "full", "size=4k") as full:
        assert_one_line(export + [full / "m.pgolf"], capsys, f"error: {full / 'm.pgolf'}: No space left on device")
        assert list(full.iterdir()) == []


def test_another_tokenizer_with_the_same_vocab_size_is_refused(
    tmp_path, embedded_data_root, other_build, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    manifest = json.loads((embedded_data_root / "manifest.json").read_text())
    assert manifest["tokenizers"][0]["pieces_sha256"]
    other = other_build[0] / "tokenizers" / "fineweb_1024_bpe.model"
    config = tiny_config(embedded_data_root, tmp_path / "c.yaml")
    assert_one_line(
        ["fit", "--config", config, "--data.tokenizer_path", other],
        capsys,
        f"{other}: not the tokenizer {embedded_data_root / 'datasets' / 'fineweb10B_sp1024'} was built with",
    )


# --- untrusted artifacts ----------------------------------------------------------------------------------


def _native(payload: bytes, raw_len: int, codec: str = "zlib") -> bytes:
    """A native artifact around ``payload`` whose header claims ``raw_len`` decompressed bytes (valid checksum)."""
    from pgolf_lit.quant.artifact import _CHECKED, _HEADER, FORMAT_VERSION, MAGIC, _checksum

    fields = _HEADER.pack(MAGIC, FORMAT_VERSION, codec.encode(), 0, len(payload), raw_len, b"")
    return fields[:_CHECKED] + _checksum(fields, payload) + payload


def test_crafted_artifacts_are_refused_within_bounded_memory(tmp_path, artifact, embedded_data_root, capsys):
    from pgolf_lit.quant.artifact import decode_native, encode_native

    data_dir = embedded_data_root / "datasets" / "fineweb10B_sp1024"
    bomb = tmp_path / "bomb.pgolf"
    bomb.write_bytes(_native(zlib.compress(bytes(256 << 20), 9), raw_len=4096))  # 256 MiB of zeros in ~250 KB
    tracemalloc.start()
    try:
        assert_one_line(
            ["eval", bomb, "--data", data_dir],
            capsys,
            f"{bomb}: malformed payload",
            "decompresses to more than the 4096 bytes the header allows",
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak
    art = decode_native(artifact.read_bytes(), str(artifact))
    for name, changes, expected in [
        (
            "huge.pgolf",
            {"vocab_size": 65536, "model_dim": 8192, "num_heads": 64, "num_kv_heads": 8},
            "is larger than the",
        ),
        ("shapes.pgolf", {"mlp_mult": 3.0}, "the tensors do not match the stored model config"),
        ("mistyped.pgolf", {"num_layers": "2"}, "stored model config is invalid (gpt.num_layers: expected an integer"),
    ]:
        crafted = tmp_path / name
        crafted.write_bytes(
            encode_native(art.quant, art.meta, {**art.config, **changes}, art.info, art.codec, art.shuffle_stride)
        )
        assert_one_line(["eval", crafted, "--data", data_dir], capsys, f"{crafted}: ", expected)


# --- interrupted data builds ------------------------------------------------------------------------------


def _mid_corpus(path: Path) -> Path:
    """~2 MB of JSONL documents: a vocab-1024 build runs a few seconds, long enough to interrupt."""
    rng = np.random.default_rng(0)
    syllables = ["ka", "ri", "to", "men", "sa", "lo", "vi", "da", "ne", "qu", "ro", "bi", "tsu", "el", "or", "an"]
    words = ["".join(rng.choice(syllables, size=int(rng.integers(1, 5)))) for _ in range(3000)]
    with open(path, "w") as f:
        for _ in range(3000):
            f.write(json.dumps({"text": " ".join(rng.choice(words, size=120))}) + "\n")
    return path


def _build_in_child(corpus: Path, out: Path) -> None:
    os.environ["PYTHONWARNINGS"] = "ignore"
    main(["data", "build", "--input", str(corpus), "--vocab-size", "1024", "--out", str(out), "--no-progress"])


def _interrupted_build(corpus: Path, out: Path, sig: int) -> int:
    """``pgolf data build`` in a forked child, sent ``sig`` once its own staging folder exists; its exit code."""
    child = multiprocessing.get_context("fork").Process(target=_build_in_child, args=(corpus, out))
    child.start()
    deadline = time.time() + 120
    while not set(out.glob(f".pgolf-build-*-{child.pid}-*")):
        assert child.is_alive() and time.time() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    os.kill(child.pid, sig)
    child.join(60)
    return child.exitcode


@pytest.fixture(scope="module")
def other_build(tmp_path_factory):
    """A build killed with SIGKILL (its staging folder stays), then one stopped with SIGTERM (it removed the killed
    build's folder when it started, and its own when the signal came), then one that completes: a vocab-1024
    tokenizer trained on other text than the embedded corpus, for the tokenizer test."""
    tmp = tmp_path_factory.mktemp("builds")
    corpus, out = _mid_corpus(tmp / "docs.jsonl"), tmp / "data"
    assert _interrupted_build(corpus, out, signal.SIGKILL) == -signal.SIGKILL
    killed = list(out.glob(".pgolf-build-*"))
    assert len(killed) == 1
    assert _interrupted_build(corpus, out, signal.SIGTERM) == -signal.SIGTERM
    left = list(out.glob(".pgolf-build-*"))
    main(["data", "build", "--input", str(corpus), "--vocab-size", "1024", "--out", str(out), "--no-progress"])
    return out, left


def test_interrupted_data_builds_leave_no_staging_folder(other_build):
    out, left_after_sigterm = other_build
    assert left_after_sigterm == []  # neither the SIGTERM build's nor the SIGKILLed one's
    assert list(out.glob(".pgolf-build-*")) == []
    assert (out / "datasets" / "fineweb10B_sp1024" / "fineweb_val_000000.bin").is_file()


# --- DDP --------------------------------------------------------------------------------------------------


def test_an_error_on_one_ddp_rank_ends_every_rank_with_its_line(tmp_path, embedded_data_root):
    """Two gloo ranks launched as torchrun / SLURM launch them (LOCAL_RANK etc. set, started together); rank 1
    fails alone at step 2 while rank 0 waits in a collective: both end with rank 1's line, exit 2, no traceback."""
    config = tiny_config(
        embedded_data_root,
        tmp_path / "ddp.yaml",
        callbacks=[{"class_path": "test_cli_reliability.RaiseOnRank", "init_args": {"rank": 1, "step": 2}}],
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "NODE_RANK": "0",
            "LOCAL_RANK": str(rank),
            "RANK": str(rank),
            "PYTHONPATH": os.pathsep.join([*map(str, TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "pgolf_lit.cli",
                    "fit",
                    "--config",
                    str(config),
                    "--trainer.devices",
                    "2",
                    "--trainer.strategy",
                    "ddp",
                    "--data.grad_accum_base",
                    "2",
                ],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    expected = "error: fineweb_train_000003.bin: token id 5000 at or above vocab_size 1024 (rank 1 only)"
    for rank, proc in enumerate(procs):
        _, err = proc.communicate(timeout=300)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode == 2 and lines[-1] == expected, (rank, err[-2000:])
        assert "Traceback" not in err, (rank, err[-2000:])
