"""``<run dir>/manifest.json``: what a reviewer needs to check and rerun a run, written when it ends.

Reruns of the challenge's records missed their claimed numbers for want of the exact shards and wheels, and 15 of
34 CaseOps-lineage record PRs trained on validation documents with nothing in their logs to show it but a shard
count. The manifest names, as measured at the end of the run: the package (version, git commit), the software
(Python, torch, Lightning, CUDA) and the hardware (GPU model and count), the dataset (every shard's name and sha256,
the val token count, the tokenizer's sha256, and the train/val disjointness its build recorded), the resolved
config (the run's ``config.yaml``) and the seed, and the clock ledger of a fit.

Shards are hashed once per file (``data/file_hashes.py``). Nothing here may fail a run: what cannot be found is
written as ``"unknown"`` (git) or null. Written atomically on rank 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

from pgolf_lit.errors import PgolfError
from pgolf_lit.fileio import atomic_write_text

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "pgolf-run-manifest/1"
UNKNOWN = "unknown"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------
# The package, the software, the hardware
# ---------------------------------------------------------------------------------------------------------


def _git(*args: str) -> Optional[str]:
    try:
        done = subprocess.run(
            ["git", "-C", str(PACKAGE_ROOT), *args], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def package_section() -> dict[str, Any]:
    """Version and git commit of the pgolf_lit that ran; the commit only when the package is a git checkout's own
    top folder (an installed copy inside some other repository is not that repository's commit)."""
    from pgolf_lit import __version__

    commit, dirty = UNKNOWN, UNKNOWN
    top = _git("rev-parse", "--show-toplevel")
    if top is not None and Path(top).resolve() == PACKAGE_ROOT:
        commit = _git("rev-parse", "HEAD") or UNKNOWN
        status = _git("status", "--porcelain", "--untracked-files=no")
        dirty = UNKNOWN if status is None else bool(status)
    return {"name": "pgolf-lit", "version": __version__, "git_commit": commit, "git_dirty": dirty}


def _dist_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def software_section() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _dist_version("lightning"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": _dist_version("triton"),
        "sentencepiece": _dist_version("sentencepiece"),
        "platform": platform.platform(),
    }


def hardware_section(accelerator: str, world_size: int) -> dict[str, Any]:
    """The accelerator the run used and how many processes it ran on; the GPU model and how many this node has."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "accelerator": accelerator,
        "world_size": world_size,
        "gpu_model": torch.cuda.get_device_name(0) if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
    }


# ---------------------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------------------


def _data_manifest_entry(data_dir: Path) -> tuple[Optional[Path], Optional[dict]]:
    """The data root's manifest.json and its entry for this dataset folder (pgolf data build, or upstream's)."""
    path = Path(os.path.abspath(data_dir)).parent.parent / "manifest.json"  # beside datasets/, links kept
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        entry = next(d for d in manifest["datasets"] if isinstance(d, dict) and d.get("name") == data_dir.name)
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return (path if path.is_file() else None), None
    return path, entry


def dataset_section(data_dir: str | os.PathLike, tokenizer_path: Optional[str | os.PathLike]) -> dict[str, Any]:
    """Every shard's name and sha256 (train, val, val byte sidecars), the token counts, the tokenizer's sha256, and
    what the data manifest says of train/val disjointness (``not recorded`` for a manifest without it, e.g. an
    upstream export's)."""
    from pgolf_lit.data.file_hashes import sha256_files
    from pgolf_lit.data.shards import BYTE_SIDECAR_MARK, read_num_tokens

    data_dir = Path(data_dir)
    files = sorted(data_dir.glob("fineweb_*.bin")) if data_dir.is_dir() else []
    hashes = sha256_files(files)
    groups = {
        "train_shards": [f for f in files if f.name.startswith("fineweb_train_")],
        "val_shards": [f for f in files if f.name.startswith("fineweb_val_") and BYTE_SIDECAR_MARK not in f.name],
        "val_byte_sidecars": [f for f in files if BYTE_SIDECAR_MARK in f.name],
    }
    section: dict[str, Any] = {"path": str(data_dir.resolve()), "name": data_dir.name}
    for key, group in groups.items():
        section[key] = {"count": len(group), "sha256": {f.name: hashes[f] for f in group}}
    section["train_tokens"] = sum(read_num_tokens(f) for f in groups["train_shards"])
    section["val_tokens"] = sum(read_num_tokens(f) for f in groups["val_shards"])
    tokenizer = Path(tokenizer_path) if tokenizer_path else None
    section["tokenizer"] = {
        "path": str(tokenizer.resolve()) if tokenizer else None,
        "sha256": sha256_files([tokenizer])[tokenizer] if tokenizer and tokenizer.is_file() else None,
    }
    manifest_path, entry = _data_manifest_entry(data_dir)
    section["data_manifest"] = str(manifest_path) if manifest_path else None
    section["val_disjointness"] = (entry or {}).get("val_disjointness") or {"checked": False, "note": "not recorded"}
    recorded = (entry or {}).get("sha256")
    # Whether the shards are the ones their build hashed (None: the manifest has no hashes to compare).
    section["matches_data_manifest"] = (
        None if not isinstance(recorded, dict) else recorded == {f.name: hashes[f] for f in files}
    )
    return section


def val_docs_in_train(manifest: dict[str, Any]) -> int:
    """How many validation documents a run manifest's data has in its training shards (0 when not recorded)."""
    disjointness = (manifest.get("dataset") or {}).get("val_disjointness") or {}
    return int(disjointness.get("val_docs_in_train") or 0)


# ---------------------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------------------


def config_section(run_dir: Path) -> tuple[Optional[dict], Optional[str]]:
    """The run's resolved config (the ``config.yaml`` LightningCLI saved in the run folder) and its sha256."""
    import yaml

    path = run_dir / "config.yaml"
    try:
        raw = path.read_bytes()
        return yaml.safe_load(raw), hashlib.sha256(raw).hexdigest()
    except (OSError, yaml.YAMLError):
        return None, None


def build_run_manifest(
    run_dir: str | os.PathLike,
    *,
    stage: str,
    accelerator: str,
    world_size: int,
    data_dir: Optional[str | os.PathLike],
    tokenizer_path: Optional[str | os.PathLike],
    val_tokens_used: Optional[int] = None,
    clock: Optional[dict] = None,
) -> dict[str, Any]:
    run_dir = Path(run_dir)
    config, config_sha256 = config_section(run_dir)
    seed = os.environ.get("PL_GLOBAL_SEED")  # what seed_everything set (the config's, or the one it drew)
    if seed is None and isinstance(config, dict) and not isinstance(config.get("seed_everything"), bool):
        seed = config.get("seed_everything")
    dataset = None
    if data_dir is not None:
        try:
            dataset = dataset_section(data_dir, tokenizer_path)
        except (OSError, PgolfError) as e:  # unreadable shards: the manifest says so instead of failing the run
            dataset = {"path": str(data_dir), "error": str(e)}
    if dataset is not None and val_tokens_used is not None:
        dataset["val_tokens_used"] = val_tokens_used
    return {
        "format": MANIFEST_FORMAT,
        "stage": stage,
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package": package_section(),
        "software": software_section(),
        "hardware": hardware_section(accelerator, world_size),
        "seed": int(seed) if str(seed).lstrip("-").isdigit() else None,
        "config": config,
        "config_sha256": config_sha256,
        "dataset": dataset,
        "clock": clock,
    }


def write_run_manifest(run_dir: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(run_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def read_run_manifest(run_dir: str | os.PathLike) -> Optional[dict[str, Any]]:
    path = Path(run_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def manifest_of_trainer(trainer, run_dir: str, stage: str, clock: Optional[dict] = None) -> dict[str, Any]:
    """The manifest of a Lightning run in ``run_dir``: its datamodule's dataset and tokenizer, its world and
    accelerator."""
    datamodule = getattr(trainer, "datamodule", None)
    data_dir = getattr(datamodule, "data_dir", None)
    tokenizer = getattr(datamodule, "tokenizer_path", None) or getattr(datamodule, "default_tokenizer_path", None)
    val_tokens = getattr(datamodule, "val_tokens", None)
    return build_run_manifest(
        run_dir,
        stage=stage,
        accelerator=type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
        world_size=trainer.world_size,
        data_dir=data_dir,
        tokenizer_path=tokenizer,
        val_tokens_used=int(val_tokens.numel()) if val_tokens is not None else None,
        clock=clock,
    )
