"""The run manifest's parts that need no training run: shard hashes taken once (data/file_hashes.py), git provenance
outside a checkout, the dataset section of a real build. The manifest of a real fit: test_cli.py."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from pgolf_lit import run_manifest
from pgolf_lit.data import file_hashes
from pgolf_lit.data.corpus import embedded_corpus
from pgolf_lit.data.build import build_dataset


@pytest.fixture
def counted_hashing(monkeypatch, tmp_path):
    """A fresh cache and a count of the files actually read and hashed."""
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(tmp_path / "cache"))
    hashed = []
    real = file_hashes._hash_file

    def counting(path):
        hashed.append(path.name)
        return real(path)

    monkeypatch.setattr(file_hashes, "_hash_file", counting)
    return hashed


def test_a_file_is_hashed_once_until_it_changes(tmp_path, counted_hashing):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 1000)
    b.write_bytes(b"y")
    first = file_hashes.sha256_files([a, b])
    assert first == {a: hashlib.sha256(b"x" * 1000).hexdigest(), b: hashlib.sha256(b"y").hexdigest()}
    assert file_hashes.sha256_files([a, b]) == first and counted_hashing == ["a.bin", "b.bin"]
    moved = tmp_path / "moved.bin"
    os.replace(a, moved)  # a rename keeps the identity: no second read
    assert file_hashes.sha256_file(moved) == first[a] and counted_hashing == ["a.bin", "b.bin"]
    b.write_bytes(b"z")  # rewritten: hashed again
    os.utime(b, ns=(0, 12345))
    assert file_hashes.sha256_file(b) == hashlib.sha256(b"z").hexdigest() and counted_hashing[-1] == "b.bin"
    cache = json.loads(file_hashes.cache_path().read_text())
    assert sorted(entry["path"] for entry in cache.values()) == sorted([str(moved), str(b)])  # the stale ones go


def test_an_unusable_cache_never_fails_the_hash(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("PGOLF_CACHE_DIR", str(blocker))
    f = tmp_path / "f.bin"
    f.write_bytes(b"data")
    assert file_hashes.sha256_file(f) == hashlib.sha256(b"data").hexdigest()


def test_outside_a_git_checkout_the_commit_is_unknown(tmp_path, monkeypatch):
    monkeypatch.setattr(run_manifest, "PACKAGE_ROOT", tmp_path)
    section = run_manifest.package_section()
    assert section["git_commit"] == section["git_dirty"] == "unknown"


def test_dataset_section_of_a_build_with_a_dropped_copy(tmp_path, counted_hashing):
    texts = embedded_corpus(include_docstrings=False)[:12]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [*texts, texts[0]]))
    build_dataset([path], 512, tmp_path / "out", val_docs=2, shard_tokens=4000, progress=False)
    hashed_by_build = list(counted_hashing)
    data_dir = tmp_path / "out" / "datasets" / "fineweb10B_sp512"
    section = run_manifest.dataset_section(data_dir, tmp_path / "out" / "tokenizers" / "fineweb_512_bpe.model")
    assert counted_hashing[: len(hashed_by_build)] == hashed_by_build
    assert counted_hashing[len(hashed_by_build) :] == ["fineweb_512_bpe.model"]  # the shards' hashes were cached
    assert section["train_shards"]["count"] == len(list(data_dir.glob("fineweb_train_*"))) >= 2
    assert section["val_disjointness"]["dropped"] == 1 and section["val_disjointness"]["val_docs_in_train"] == 0
    assert section["matches_data_manifest"] is True
    (data_dir / "fineweb_train_000001.bin").write_bytes((data_dir / "fineweb_train_000000.bin").read_bytes())
    assert run_manifest.dataset_section(data_dir, None)["matches_data_manifest"] is False
