"""``pgolf data download --variant sp8192_caseops`` against fake hubs: the public CaseOps export's layout
(``romeerp/parameter-golf-caseops-v1``) with its val byte sidecar, through a local mirror, a pre-seeded HF cache
and an offline empty cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pgolf_lit.data import download
from pgolf_lit.data.shards import load_validation_byte_sidecar, load_validation_tokens
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
NAME = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"
DATASET = f"datasets/datasets/{NAME}"
TOKENIZER = "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved"
VAL_SHARDS, TRAIN_SHARDS = 2, 3


def caseops_manifest(**tokenizer_changes) -> dict:
    tokenizer = {
        "name": "sp_bpe_8192_lossless_caps_caseops_v1_reserved",
        "model_path": f"tokenizers/{TOKENIZER}.model",
        "vocab_path": f"tokenizers/{TOKENIZER}.vocab",
        "text_transform": "lossless_caps_caseops_v1",
    }
    tokenizer.update(tokenizer_changes)
    return {
        "datasets": [
            {
                "name": NAME,
                "tokenizer_name": tokenizer["name"],
                "val_bytes_glob": f"datasets/{NAME}/fineweb_val_bytes_*.bin",
                "stats": {"files_train": TRAIN_SHARDS, "files_val": VAL_SHARDS},
            }
        ],
        "tokenizers": [tokenizer],
    }


def fill_caseops_repo(root: Path, manifest: dict | None = None) -> Path:
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    (root / "datasets/manifest.json").write_text(json.dumps(manifest or caseops_manifest()))
    rng = np.random.default_rng(0)
    for i in range(VAL_SHARDS):
        tokens = rng.integers(8, 8192, 1500 + 100 * i)
        tokens[::50] = 1  # BOS every 50 tokens
        counts = rng.integers(0, 6, tokens.size)
        counts[tokens == 1] = 0
        write_shard(root / DATASET / f"fineweb_val_{i:06d}.bin", tokens)
        write_shard(root / DATASET / f"fineweb_val_bytes_{i:06d}.bin", counts)
    for i in range(TRAIN_SHARDS):
        write_shard(root / DATASET / f"fineweb_train_{i:06d}.bin", rng.integers(0, 8192, 2000))
    (root / "datasets/tokenizers").mkdir()
    (root / f"datasets/tokenizers/{TOKENIZER}.model").write_bytes(b"model bytes")
    (root / f"datasets/tokenizers/{TOKENIZER}.vocab").write_text("vocab text")
    return root


@pytest.fixture
def hub(tmp_path):
    return fill_caseops_repo(tmp_path / "hub")


def local_files(data_root: Path) -> list[str]:
    return sorted(p.relative_to(data_root).as_posix() for p in data_root.rglob("*") if p.is_file())


EXPECTED = sorted(
    [
        f"datasets/{NAME}/fineweb_train_000000.bin",
        f"datasets/{NAME}/fineweb_val_000000.bin",
        f"datasets/{NAME}/fineweb_val_000001.bin",
        f"datasets/{NAME}/fineweb_val_bytes_000000.bin",
        f"datasets/{NAME}/fineweb_val_bytes_000001.bin",
        "manifest.json",
        f"tokenizers/{TOKENIZER}.model",
        f"tokenizers/{TOKENIZER}.vocab",
    ]
)


def test_caseops_variant_names():
    assert download.dataset_name_for_variant("sp8192_caseops") == NAME
    assert download.dataset_name_for_variant("sp8192_lossless_caps_caseops_v1_reserved") == NAME  # upstream's name
    assert download.is_caseops_variant("sp1024_caseops") and not download.is_caseops_variant("sp8192")
    with pytest.raises(DataError, match="unsupported variant 'spx_caseops'"):
        download.dataset_name_for_variant("spx_caseops")


@pytest.mark.parametrize("variant", ["sp8192_caseops", "sp8192_lossless_caps_caseops_v1_reserved"])
def test_mirror_fetches_val_sidecars_with_the_shards(hub, tmp_path, variant):
    data = tmp_path / "data"
    summary = download.download_dataset(variant, 1, data_root=data, hub_root=hub, progress=False)
    assert local_files(data) == EXPECTED
    for rel in EXPECTED:
        assert (data / rel).read_bytes() == (hub / "datasets" / rel).read_bytes()
    assert summary["dataset_dir"] == data / "datasets" / NAME and summary["fetched"] == len(EXPECTED)
    tokens = load_validation_tokens(summary["dataset_dir"], 64)  # the sidecars are not read as token shards
    assert load_validation_byte_sidecar(summary["dataset_dir"], tokens.numel()).numel() == tokens.numel()


def test_missing_sidecar_on_the_hub_is_named(hub, tmp_path):
    (hub / DATASET / "fineweb_val_bytes_000001.bin").unlink()
    with pytest.raises(DataError, match="fineweb_val_bytes_000001.bin: not on the hub mirror"):
        download.download_dataset("sp8192_caseops", 0, data_root=tmp_path / "data", hub_root=hub, progress=False)


def test_misaligned_sidecar_on_the_hub_is_named(hub, tmp_path):
    write_shard(hub / DATASET / "fineweb_val_bytes_000000.bin", np.zeros(1499, dtype=np.int64))
    with pytest.raises(
        DataError,
        match="fineweb_val_bytes_000000.bin: byte sidecar has 1499 entries, its val shard "
        "fineweb_val_000000.bin has 1500 tokens",
    ):
        download.download_dataset("sp8192_caseops", 0, data_root=tmp_path / "data", hub_root=hub, progress=False)


def test_the_same_manifest_checks_as_the_other_variants(tmp_path):
    hub = fill_caseops_repo(tmp_path / "hub")
    with pytest.raises(DataError, match=f"sp8192_caseops has only {TRAIN_SHARDS} training shards on .*requested 4"):
        download.download_dataset("sp8192_caseops", 4, data_root=tmp_path / "a", hub_root=hub, progress=False)
    with pytest.raises(
        DataError, match="dataset fineweb10B_sp4096_lossless_caps_caseops_v1_reserved not in the manifest"
    ):
        download.download_dataset("sp4096_caseops", 0, data_root=tmp_path / "b", hub_root=hub, progress=False)
    other = fill_caseops_repo(tmp_path / "hub2", caseops_manifest(text_transform="identity"))
    with pytest.raises(
        DataError,
        match="has text_transform 'identity', the CaseOps variant sp8192_caseops needs 'lossless_caps_caseops_v1'",
    ):
        download.download_dataset("sp8192_caseops", 0, data_root=tmp_path / "c", hub_root=other, progress=False)


def run_cli(args: list[str], hf_home: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI in a fresh process (huggingface_hub reads HF_* at import), with no --repo-id: the CaseOps default."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("MATCHED_FINEWEB_REPO_ID", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pgolf_lit.data.download", "--variant", "sp8192_caseops", "--no-progress", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - start


def test_preseeded_hf_cache_of_the_public_caseops_repo(tmp_path):
    hf_home = tmp_path / "hf"
    repo_cache = hf_home / "hub" / f"datasets--{download.CASEOPS_REPO_ID.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    fill_caseops_repo(repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs/main").write_text(commit)
    proc, _ = run_cli(["--data-root", "data", "--train-shards", "1"], hf_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert local_files(tmp_path / "data") == EXPECTED


def test_offline_with_empty_cache_is_one_clear_line(tmp_path):
    proc, seconds = run_cli(["--data-root", "data"], tmp_path / "empty-hf", tmp_path)
    assert proc.returncode != 0
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message, message
    assert f"{download.CASEOPS_REPO_ID}:datasets/manifest.json" in message and "offline mode is on" in message
    assert seconds < 10
