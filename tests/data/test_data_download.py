"""``pgolf data download`` against fake hubs: a local mirror (--hub-root), a pre-seeded HF cache driven through the
real ``hf_hub_download``, and an offline empty cache (spec/data.md §12)."""

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
from pgolf_lit.data.shards import read_num_tokens
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
REPO_ID = "someone/parameter-golf"
DATASET = "datasets/datasets/fineweb10B_sp1024"
TRAIN_SHARDS = 3


def minimal_manifest(**dataset_changes) -> dict:
    """Only the fields the downloader reads (spec/data.md §4)."""
    dataset = {
        "name": "fineweb10B_sp1024",
        "tokenizer_name": "sp_bpe_1024",
        "stats": {"files_train": TRAIN_SHARDS, "files_val": 1},
    }
    dataset.update(dataset_changes)
    return {
        "datasets": [dataset],
        "tokenizers": [
            {
                "name": "sp_bpe_1024",
                "model_path": "tokenizers/fineweb_1024_bpe.model",
                "vocab_path": "tokenizers/fineweb_1024_bpe.vocab",
            }
        ],
    }


def fill_repo(root: Path, manifest: dict | None = None) -> Path:
    """The repository's files under ``root`` (their paths in the repo): manifest, tiny shards, tokenizer, docs."""
    (root / "datasets").mkdir(parents=True, exist_ok=True)
    (root / "datasets/manifest.json").write_text(json.dumps(manifest or minimal_manifest()))
    rng = np.random.default_rng(0)
    write_shard(root / DATASET / "fineweb_val_000000.bin", rng.integers(0, 1024, 3000))
    for i in range(TRAIN_SHARDS):
        write_shard(root / DATASET / f"fineweb_train_{i:06d}.bin", rng.integers(0, 1024, 2000 + 100 * i))
    (root / "datasets/tokenizers").mkdir()
    (root / "datasets/tokenizers/fineweb_1024_bpe.model").write_bytes(b"model bytes")
    (root / "datasets/tokenizers/fineweb_1024_bpe.vocab").write_text("vocab text")
    (root / "datasets/docs_selected.jsonl").write_text('{"text": "a document"}\n')
    (root / "datasets/docs_selected.source_manifest.json").write_text('{"num_docs": 1}')
    return root


@pytest.fixture
def hub(tmp_path):
    return fill_repo(tmp_path / "hub")


def local_files(data_root: Path) -> list[str]:
    return sorted(p.relative_to(data_root).as_posix() for p in data_root.rglob("*") if p.is_file())


def fetch(hub, data_root, train_shards=2, **kwargs):
    return download.download_dataset(
        "sp1024", train_shards, data_root=data_root, hub_root=hub, progress=False, **kwargs
    )


EXPECTED_TWO_SHARDS = [
    "datasets/fineweb10B_sp1024/fineweb_train_000000.bin",
    "datasets/fineweb10B_sp1024/fineweb_train_000001.bin",
    "datasets/fineweb10B_sp1024/fineweb_val_000000.bin",
    "manifest.json",
    "tokenizers/fineweb_1024_bpe.model",
    "tokenizers/fineweb_1024_bpe.vocab",
]


# ------------------------------------------------------------------------------------------------ (a) local mirror


def test_mirror_fetches_prefix_val_and_tokenizer(hub, tmp_path):
    data = tmp_path / "data"
    summary = fetch(hub, data)
    assert local_files(data) == EXPECTED_TWO_SHARDS
    for rel in EXPECTED_TWO_SHARDS:
        remote = hub / "datasets" / rel
        assert (data / rel).read_bytes() == remote.read_bytes()
    assert summary["fetched"] == 6 and summary["present"] == 0
    assert summary["dataset_dir"] == data / "datasets/fineweb10B_sp1024"
    assert summary["tokenizer_files"] == [
        data / "tokenizers/fineweb_1024_bpe.model",
        data / "tokenizers/fineweb_1024_bpe.vocab",
    ]


def test_zero_train_shards_still_fetches_val(hub, tmp_path):
    fetch(hub, tmp_path / "data", train_shards=0)
    assert "datasets/fineweb10B_sp1024/fineweb_val_000000.bin" in local_files(tmp_path / "data")
    assert not any("train" in f for f in local_files(tmp_path / "data"))


def test_existing_files_are_skipped(hub, tmp_path):
    data = tmp_path / "data"
    mine = data / "datasets/fineweb10B_sp1024/fineweb_train_000000.bin"
    write_shard(mine, np.arange(50))  # a valid shard that differs from the hub's
    summary = fetch(hub, data)
    assert read_num_tokens(mine) == 50
    assert summary["present"] == 1 and summary["fetched"] == 5
    again = fetch(hub, data, train_shards=3)
    assert again["fetched"] == 1 and again["present"] == 6


def test_invalid_local_shard_is_fetched_again(hub, tmp_path):
    data = tmp_path / "data"
    fetch(hub, data)
    local = data / "datasets/fineweb10B_sp1024/fineweb_train_000001.bin"
    truncated = local.read_bytes()[:-10]
    local.unlink()  # the local file is a hard link to the mirror's: write a new file, as an interrupted copy does
    local.write_bytes(truncated)
    assert fetch(hub, data)["fetched"] == 1
    assert local.read_bytes() == (hub / DATASET / "fineweb_train_000001.bin").read_bytes()


def test_corrupted_shard_on_the_hub_is_detected_and_not_placed(hub, tmp_path):
    remote = hub / DATASET / "fineweb_train_000001.bin"
    remote.write_bytes(remote.read_bytes()[:-2])
    with pytest.raises(DataError, match=f"{remote}: the fetched shard is invalid: .*shard size mismatch"):
        fetch(hub, tmp_path / "data")
    assert not (tmp_path / "data/datasets/fineweb10B_sp1024/fineweb_train_000001.bin").exists()
    assert not list((tmp_path / "data/datasets/fineweb10B_sp1024").glob(".*"))  # no temporary left either


def test_with_docs_and_refresh_manifest(hub, tmp_path):
    data = tmp_path / "data"
    fetch(hub, data, train_shards=0, with_docs=True)
    assert (data / "docs_selected.jsonl").read_text() == '{"text": "a document"}\n'
    assert (data / "docs_selected.source_manifest.json").is_file()
    (hub / "datasets/manifest.json").write_text(json.dumps(minimal_manifest(stats={"files_train": 9, "files_val": 1})))
    with pytest.raises(DataError, match="only 3 training shards"):  # the local manifest is used as is
        fetch(hub, data, train_shards=4)
    with pytest.raises(DataError, match="fineweb_train_000003.bin: not on the hub mirror"):
        fetch(hub, data, train_shards=4, refresh_manifest=True)
    assert json.loads((data / "manifest.json").read_text())["datasets"][0]["stats"]["files_train"] == 9


def test_more_shards_than_published(hub, tmp_path):
    with pytest.raises(DataError, match=f"sp1024 has only {TRAIN_SHARDS} training shards on .*requested 4"):
        fetch(hub, tmp_path / "data", train_shards=4)


def test_unknown_variant(hub, tmp_path):
    with pytest.raises(DataError, match="unsupported variant 'gpt2'"):
        download.download_dataset("gpt2", 1, data_root=tmp_path / "data", hub_root=hub, progress=False)
    assert not (tmp_path / "data").exists()


def test_variant_missing_from_manifest(hub, tmp_path):
    with pytest.raises(DataError, match="dataset fineweb10B_sp4096 not in the manifest .*lists: fineweb10B_sp1024"):
        download.download_dataset("sp4096", 1, data_root=tmp_path / "data", hub_root=hub, progress=False)


def test_tokenizer_entry_missing(tmp_path):
    hub = fill_repo(tmp_path / "hub", minimal_manifest(tokenizer_name="sp_bpe_999"))
    with pytest.raises(DataError, match="tokenizer 'sp_bpe_999' of dataset fineweb10B_sp1024 not in the manifest"):
        fetch(hub, tmp_path / "data")


def test_tokenizer_entry_without_artifacts(tmp_path):
    manifest = minimal_manifest()
    manifest["tokenizers"][0] = {"name": "sp_bpe_1024", "model_path": ""}
    hub = fill_repo(tmp_path / "hub", manifest)
    with pytest.raises(DataError, match="tokenizer 'sp_bpe_1024' in the manifest lists no downloadable artifacts"):
        fetch(hub, tmp_path / "data")


def test_skip_manifest_needs_a_local_one(hub, tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'data' / 'manifest.json'}: --skip-manifest needs a local"):
        fetch(hub, tmp_path / "data", skip_manifest=True)
    fetch(hub, tmp_path / "data", train_shards=0)
    (hub / "datasets/manifest.json").unlink()
    fetch(hub, tmp_path / "data", train_shards=1, skip_manifest=True)  # the local manifest is enough


def test_main_runs_with_hub_root(hub, tmp_path, capsys):
    data = tmp_path / "data"
    assert (
        download.main(["--hub-root", str(hub), "--data-root", str(data), "--train-shards", "2", "--no-progress"]) == 0
    )
    assert local_files(data) == EXPECTED_TWO_SHARDS
    assert "6 file(s) fetched, 0 already present" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ (b), (c) HF cache


def run_cli(args: list[str], hf_home: Path, cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m pgolf_lit.data.download`` in a fresh process: huggingface_hub reads HF_* only at import."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), HF_HUB_DISABLE_TELEMETRY="1")
    env.pop("MATCHED_FINEWEB_REPO_ID", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pgolf_lit.data.download", "--repo-id", REPO_ID, "--no-progress", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - start


def test_preseeded_hf_cache_through_hf_hub_download(tmp_path):
    hf_home = tmp_path / "hf"
    repo_cache = hf_home / "hub" / f"datasets--{REPO_ID.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    fill_repo(repo_cache / "snapshots" / commit)
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs/main").write_text(commit)
    proc, _ = run_cli(["--data-root", "data", "--train-shards", "2"], hf_home, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert local_files(tmp_path / "data") == EXPECTED_TWO_SHARDS
    for rel in EXPECTED_TWO_SHARDS:
        cached = repo_cache / "snapshots" / commit / "datasets" / rel
        assert (tmp_path / "data" / rel).read_bytes() == cached.read_bytes()


def test_offline_with_empty_cache_is_one_clear_line(tmp_path):
    proc, seconds = run_cli(["--data-root", "data"], tmp_path / "empty-hf", tmp_path)
    assert proc.returncode != 0
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert f"{REPO_ID}:datasets/manifest.json" in message
    assert "offline mode is on" in message and "--hub-root" in message and "--data-root" in message
    assert "Traceback" not in message
    assert seconds < 10
    assert not (tmp_path / "data").exists() or local_files(tmp_path / "data") == []


def test_complete_local_data_root_needs_no_hub(hub, tmp_path):
    fetch(hub, tmp_path / "data")
    proc, _ = run_cli(["--data-root", "data", "--train-shards", "2"], tmp_path / "empty-hf", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "0 file(s) fetched, 6 already present" in proc.stdout
