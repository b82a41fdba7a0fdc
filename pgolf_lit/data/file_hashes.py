"""sha256 of data files, hashed once: a cache keyed by each file's identity (device, inode, size, mtime).

A run manifest names the sha256 of every shard it trained on, and the shards are gigabytes (80 × 200 MB for the
sp8192 export), so a file is hashed only when no cached hash matches its current identity. A rewritten file gets a
new mtime (or inode) and is hashed again; a renamed one keeps its inode and mtime, so the hashes ``pgolf data build``
takes in its staging folder still hold after the build moves the folder into place.

The cache is one JSON file, ``$PGOLF_CACHE_DIR`` or ``$XDG_CACHE_HOME/pgolf_lit`` or ``~/.cache/pgolf_lit``, then
``sha256.json``. It is an accelerator only: an unreadable or unwritable cache is ignored (the file is hashed again);
entries whose file is gone or changed are dropped whenever the cache is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from pgolf_lit.fileio import atomic_write_text

CACHE_NAME = "sha256.json"
_CHUNK = 1 << 22


def cache_path() -> Path:
    explicit = os.environ.get("PGOLF_CACHE_DIR")
    if explicit:
        return Path(explicit) / CACHE_NAME
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pgolf_lit" / CACHE_NAME


def _identity(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _well_formed(entry) -> bool:
    """A cache entry: ``{"path": ..., "sha256": ...}`` under the file's identity key."""
    return isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("sha256"), str)


def sha256_files(paths: Iterable[str | os.PathLike]) -> dict[Path, str]:
    """The sha256 of each file, from the cache where its identity matches, else hashed (and the cache updated)."""
    where = cache_path()
    cache = _read_cache(where)
    out: dict[Path, str] = {}
    changed = False
    for path in map(Path, paths):
        key = _identity(path)
        entry = cache.get(key)
        if _well_formed(entry):
            out[path] = entry["sha256"]
            if entry["path"] != str(path.resolve()):  # moved (the build's staging folder): remember where it is now
                entry["path"], changed = str(path.resolve()), True
            continue
        out[path] = _hash_file(path)
        cache[key] = {"path": str(path.resolve()), "sha256": out[path]}
        changed = True
    if changed:
        _write_cache(where, cache)
    return out


def _write_cache(where: Path, cache: dict) -> None:
    kept = {}
    for key, entry in cache.items():
        try:
            if _well_formed(entry) and _identity(Path(entry["path"])) == key:
                kept[key] = entry
        except OSError:
            continue  # the file is gone: forget it
    try:
        atomic_write_text(where, json.dumps(kept, indent=0, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only home or cache folder: the hashes are simply taken again next time


def sha256_file(path: str | os.PathLike) -> str:
    return sha256_files([path])[Path(path)]
