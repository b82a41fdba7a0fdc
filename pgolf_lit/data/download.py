"""Fetch the official pre-tokenized FineWeb shards (``pgolf data download``), as upstream
``data/cached_challenge_fineweb.py`` does.

Same remote paths, local layout and rules (its ``main`` and ``get``): the manifest decides how many shards exist; the
validation split is always fetched in full; ``--train-shards N`` fetches the first N training shards; files already
in the data root are not fetched again, so a complete local tree needs no network. On top of upstream: every shard
is validated (header and size) before it is put in place, an invalid local shard is fetched again, ``--hub-root``
reads a local mirror of the repository instead of the hub (tests, air-gapped machines), and an offline or
unreachable hub ends in one clear line instead of a traceback (at once with HF_HUB_OFFLINE=1; after
huggingface_hub's own retries, about half a minute, without it).

The CaseOps variant of PR #1855 (``--variant sp8192_caseops``, upstream's ``sp8192_lossless_caps_caseops_v1_reserved``)
is the public export ``romeerp/parameter-golf-caseops-v1`` (the default repo for it), fetched the same way plus the
validation byte sidecars ``fineweb_val_bytes_NNNNNN.bin``, each checked to align with its val shard (as the
CaseOps record's cached_challenge_fineweb.py, which fetches them when the dataset lists ``val_bytes_glob``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from pgolf_lit.data.caseops import RESERVED_SUFFIX, TRANSFORM_NAME
from pgolf_lit.data.shards import byte_sidecar_name, read_num_tokens, shard_name
from pgolf_lit.errors import DataError, PgolfError
from pgolf_lit.fileio import atomic_path

DEFAULT_REPO_ID = "willdepueoai/parameter-golf"
CASEOPS_REPO_ID = "romeerp/parameter-golf-caseops-v1"
CASEOPS_VARIANT_ALIAS = "_caseops"
DEFAULT_REMOTE_ROOT = "datasets"
DEFAULT_TRAIN_SHARDS = 80
MANIFEST = "manifest.json"
DOCS_FILES = ("docs_selected.jsonl", "docs_selected.source_manifest.json")
ESCAPE_ROUTES = (
    "connect to the network (and unset HF_HUB_OFFLINE), copy a complete data root into --data-root, "
    "or point --hub-root at a local copy of the repository"
)


def _caseops_vocab(variant: str) -> str | None:
    """The ``<V>`` of a CaseOps variant (``sp<V>_caseops`` or ``sp<V>_lossless_caps_caseops_v1_reserved``)."""
    for tail in (CASEOPS_VARIANT_ALIAS, f"_{RESERVED_SUFFIX}"):
        if variant.startswith("sp") and variant.endswith(tail) and variant[2 : -len(tail)].isdigit():
            return variant[2 : -len(tail)]
    return None


def is_caseops_variant(variant: str) -> bool:
    return _caseops_vocab(variant) is not None


def dataset_name_for_variant(variant: str) -> str:
    """``sp<V>`` -> ``fineweb10B_sp<V>``, ``byte260`` -> ``fineweb10B_byte260``, ``sp<V>_caseops`` ->
    ``fineweb10B_sp<V>_lossless_caps_caseops_v1_reserved``; anything else is an error."""
    if variant == "byte260" or (variant.startswith("sp") and variant[2:].isdigit()):
        return f"fineweb10B_{variant}"
    if (vocab := _caseops_vocab(variant)) is not None:
        return f"fineweb10B_sp{vocab}_{RESERVED_SUFFIX}"
    raise DataError(
        f"unsupported variant {variant!r}: expected sp<VOCAB_SIZE> (e.g. sp1024), sp<VOCAB_SIZE>_caseops "
        f"(e.g. sp8192_caseops) or byte260"
    )


def local_path_for_remote(path_in_repo: str, data_root: Path, remote_root: str) -> Path:
    """Where a repository file lands: the remote root is dropped, the rest is kept under the data root."""
    parts = Path(path_in_repo).parts
    if remote_root and parts[:1] == (remote_root,):
        parts = parts[1:]
    return data_root.joinpath(*parts)


class HubSource:
    """Files of a Hugging Face dataset repository, through the HF cache (``hf_hub_download``)."""

    def __init__(self, repo_id: str, revision: str | None = None):
        self.repo_id, self.revision = repo_id, revision

    def describe(self, path_in_repo: str) -> str:
        return f"{self.repo_id}:{path_in_repo}" + (f"@{self.revision}" if self.revision else "")

    def fetch(self, path_in_repo: str) -> Path:
        """The cached file's real path (the blob behind the snapshot symlink); a DataError for every failure."""
        try:
            import huggingface_hub
            from huggingface_hub import utils as hf_errors
        except ImportError:
            raise DataError(
                f"{self.describe(path_in_repo)}: huggingface_hub is not installed (pip install huggingface_hub), "
                f"or point --hub-root at a local copy of the repository"
            ) from None
        parent, name = os.path.split(path_in_repo)
        where = self.describe(path_in_repo)
        try:
            cached = huggingface_hub.hf_hub_download(
                repo_id=self.repo_id,
                filename=name,
                subfolder=parent or None,
                repo_type="dataset",
                revision=self.revision,
            )
        # LocalEntryNotFoundError subclasses EntryNotFoundError: it must be caught first (huggingface_hub 0.x and 2.x).
        except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled, ConnectionError):
            offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
            reason = "offline mode is on (HF_HUB_OFFLINE)" if offline else "the Hugging Face hub cannot be reached"
            raise DataError(f"{where}: not in the local HF cache and {reason}; {ESCAPE_ROUTES}") from None
        except hf_errors.RepositoryNotFoundError:
            raise DataError(
                f"{where}: dataset repository not found on the hub (or private: log in or set HF_TOKEN)"
            ) from None
        except hf_errors.RevisionNotFoundError:
            raise DataError(f"{where}: revision {self.revision!r} not found in {self.repo_id}") from None
        except hf_errors.EntryNotFoundError:
            raise DataError(
                f"{where}: file not published in this repository (wrong variant, repo or shard count?)"
            ) from None
        except hf_errors.HfHubHTTPError as e:
            raise DataError(f"{where}: hub request failed: {str(e).splitlines()[0]}") from None
        return Path(cached).resolve(strict=True)


class MirrorSource:
    """Files of a local copy of the repository: ``<hub_root>/<path in repo>`` (no network, no HF cache)."""

    def __init__(self, hub_root: str | os.PathLike):
        self.hub_root = Path(hub_root)

    def describe(self, path_in_repo: str) -> str:
        return str(self.hub_root / path_in_repo)

    def fetch(self, path_in_repo: str) -> Path:
        path = self.hub_root / path_in_repo
        if not path.is_file():
            raise DataError(
                f"{path}: not on the hub mirror {self.hub_root} (expected the repository's path {path_in_repo})"
            )
        return path.resolve()


def _is_shard(path_in_repo: str) -> bool:
    return path_in_repo.endswith(".bin")


def _local_is_valid(destination: Path, path_in_repo: str) -> bool:
    if not destination.is_file():
        return False
    if not _is_shard(path_in_repo):
        return True
    try:
        read_num_tokens(destination)
    except DataError:
        return False
    return True


def _place(source_file: Path, destination: Path, *, link: bool) -> None:
    """Hard-link (sharing the HF cache's or mirror's blocks) or copy the fetched file into place, atomically."""
    with atomic_path(destination) as tmp:
        if link:
            tmp.unlink()  # os.link needs a free name
            try:
                os.link(source_file, tmp)
                return
            except OSError:
                pass  # another filesystem, or no hard links there: copy
        shutil.copy2(source_file, tmp)


def fetch_file(
    source: HubSource | MirrorSource, path_in_repo: str, destination: Path, *, refresh: bool = False
) -> bool:
    """Put one repository file at ``destination``; return False when a valid local copy was already there.

    A shard is validated (header and file size) before it is put in place, so a truncated or corrupted download
    never lands under its final name. A local shard that fails validation (or a dangling link) is replaced; the
    replacement is a rename, so a failed fetch leaves the old file as it was. The manifest is copied, everything
    else hard-linked where possible: a linked manifest would silently follow later edits of a mirror's copy.
    """
    if not refresh and _local_is_valid(destination, path_in_repo):
        return False
    fetched = source.fetch(path_in_repo)
    if _is_shard(path_in_repo):
        try:
            read_num_tokens(fetched)
        except DataError as e:
            reason = str(e).removeprefix(f"{fetched}: ")
            raise DataError(f"{source.describe(path_in_repo)}: the fetched shard is invalid: {reason}") from None
    _place(fetched, destination, link=os.path.basename(path_in_repo) != MANIFEST)
    return True


def tokenizer_artifacts(entry: dict) -> list[str]:
    """The artifact paths of a manifest tokenizer entry (``model_path``, ``vocab_path``, ``path``; present ones)."""
    artifacts = [str(entry[key]) for key in ("model_path", "vocab_path", "path") if entry.get(key)]
    if not artifacts:
        raise DataError(f"tokenizer {entry.get('name')!r} in the manifest lists no downloadable artifacts")
    return artifacts


def _load_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable manifest ({e}); delete it or pass --refresh-manifest") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object; delete it or pass --refresh-manifest")
    return manifest


def _shard_counts(entry: dict, manifest_path: Path) -> tuple[int, int]:
    stats = entry.get("stats") or {}
    try:
        return int(stats["files_train"]), int(stats["files_val"])
    except (KeyError, TypeError, ValueError):
        raise DataError(
            f"{manifest_path}: dataset {entry.get('name')!r} has no stats.files_train/files_val shard counts"
        ) from None


def download_dataset(
    variant: str = "sp1024",
    train_shards: int = DEFAULT_TRAIN_SHARDS,
    *,
    data_root: str | os.PathLike = "data",
    repo_id: str | None = None,
    remote_root: str | None = None,
    revision: str | None = None,
    hub_root: str | os.PathLike | None = None,
    with_docs: bool = False,
    skip_manifest: bool = False,
    refresh_manifest: bool = False,
    progress: bool = True,
) -> dict:
    """Fetch the manifest, the val shards, the first ``train_shards`` train shards and the tokenizer of a variant.

    ``repo_id``/``remote_root`` default to $MATCHED_FINEWEB_REPO_ID / $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX as
    upstream (else willdepueoai/parameter-golf, or romeerp/parameter-golf-caseops-v1 for a CaseOps variant, and
    ``datasets``). A CaseOps variant also fetches the val byte sidecars and checks each against its val shard.
    Returns a summary: the dataset and tokenizer paths and how many files were fetched and already present.
    """
    caseops = is_caseops_variant(variant)
    repo_id = repo_id or os.environ.get("MATCHED_FINEWEB_REPO_ID", CASEOPS_REPO_ID if caseops else DEFAULT_REPO_ID)
    if remote_root is None:
        remote_root = os.environ.get("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", DEFAULT_REMOTE_ROOT)
    data_root = Path(data_root)
    dataset_name = dataset_name_for_variant(variant)
    if train_shards < 0:
        raise DataError(f"train_shards {train_shards}: must be non-negative")
    if skip_manifest and refresh_manifest:
        raise DataError("--skip-manifest and --refresh-manifest contradict each other; pass one")
    source = MirrorSource(hub_root) if hub_root is not None else HubSource(repo_id, revision)

    def remote(path: str) -> str:
        return f"{remote_root}/{path}" if remote_root else path

    def local(path_in_repo: str) -> Path:
        return local_path_for_remote(path_in_repo, data_root, remote_root)

    manifest_remote = remote(MANIFEST)
    manifest_path = local(manifest_remote)
    if skip_manifest and not manifest_path.is_file():
        raise DataError(
            f"{manifest_path}: --skip-manifest needs a local manifest.json (it gives the shard counts); "
            f"drop --skip-manifest to fetch it"
        )
    manifest_fetched = not skip_manifest and fetch_file(
        source, manifest_remote, manifest_path, refresh=refresh_manifest
    )
    manifest = _load_manifest(manifest_path)

    dataset = next((d for d in manifest.get("datasets", []) if d.get("name") == dataset_name), None)
    if dataset is None:
        listed = ", ".join(str(d.get("name")) for d in manifest.get("datasets", [])) or "none"
        raise DataError(
            f"{manifest_path}: dataset {dataset_name} not in the manifest of {repo_id} (it lists: {listed}); "
            f"another repo (--repo-id) may publish it, then pass --refresh-manifest"
        )
    files_train, files_val = _shard_counts(dataset, manifest_path)
    if train_shards > files_train:
        raise DataError(f"{variant} has only {files_train} training shards on {repo_id}, requested {train_shards}")
    tokenizer_name = dataset.get("tokenizer_name")
    tokenizer = next((t for t in manifest.get("tokenizers", []) if t.get("name") == tokenizer_name), None)
    if tokenizer is None:
        raise DataError(f"{manifest_path}: tokenizer {tokenizer_name!r} of dataset {dataset_name} not in the manifest")
    transform = tokenizer.get("text_transform")
    if caseops and transform not in (None, TRANSFORM_NAME):
        raise DataError(
            f"{manifest_path}: tokenizer {tokenizer_name!r} has text_transform {transform!r}, the CaseOps variant "
            f"{variant} needs {TRANSFORM_NAME!r}"
        )
    with_sidecar = caseops or bool(dataset.get("val_bytes_glob"))

    dataset_prefix = remote(f"datasets/{dataset_name}")
    wanted = [remote(name) for name in DOCS_FILES] if with_docs else []
    wanted += [f"{dataset_prefix}/{shard_name('val', i)}" for i in range(files_val)]
    if with_sidecar:
        wanted += [f"{dataset_prefix}/{byte_sidecar_name(i)}" for i in range(files_val)]
    wanted += [f"{dataset_prefix}/{shard_name('train', i)}" for i in range(train_shards)]
    wanted += [remote(path) for path in tokenizer_artifacts(tokenizer)]

    fetched = manifest_fetched + _fetch_all(source, wanted, local, progress=progress)
    if with_sidecar:
        for i in range(files_val):
            val, sidecar = (local(f"{dataset_prefix}/{name}") for name in (shard_name("val", i), byte_sidecar_name(i)))
            if read_num_tokens(sidecar) != read_num_tokens(val):
                raise DataError(
                    f"{sidecar}: byte sidecar has {read_num_tokens(sidecar)} entries, its val shard {val.name} has "
                    f"{read_num_tokens(val)} tokens (delete both and download again)"
                )
    return {
        "dataset_dir": local(dataset_prefix),
        "tokenizer_files": [local(remote(p)) for p in tokenizer_artifacts(tokenizer)],
        "manifest": manifest_path,
        "fetched": fetched,
        "present": 1 + len(wanted) - fetched,  # the manifest counts as one of the files
    }


def _fetch_all(
    source: HubSource | MirrorSource, paths: list[str], local: Callable[[str], Path], *, progress: bool
) -> int:
    from tqdm.auto import tqdm

    fetched = 0
    with tqdm(paths, unit="file", desc="downloading", disable=not progress) as bar:
        for path_in_repo in bar:
            bar.set_postfix_str(os.path.basename(path_in_repo), refresh=False)
            fetched += fetch_file(source, path_in_repo, local(path_in_repo))
    return fetched


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgolf data download",
        description=(
            "Download the challenge's pre-tokenized FineWeb shards from the Hugging Face hub into DATA_ROOT/"
            "datasets/fineweb10B_<variant>/ and its tokenizer into DATA_ROOT/tokenizers/, driven by the repo's "
            "manifest.json (as upstream data/cached_challenge_fineweb.py). Files already present are skipped."
        ),
    )
    parser.add_argument(
        "--variant",
        default="sp1024",
        help="sp<V> (sp1024, sp4096, sp8192), byte260, or sp8192_caseops (PR #1855's CaseOps export "
        "with its val byte sidecar; repo romeerp/parameter-golf-caseops-v1); default sp1024",
    )
    parser.add_argument(
        "--train-shards",
        type=int,
        default=DEFAULT_TRAIN_SHARDS,
        help=f"fetch the first N training shards (100M tokens each); default {DEFAULT_TRAIN_SHARDS}. "
        f"The validation split is always fetched in full.",
    )
    parser.add_argument("--data-root", default="data", help="local data root (default ./data, as upstream)")
    parser.add_argument(
        "--repo-id",
        default=None,
        help=f"dataset repo (default $MATCHED_FINEWEB_REPO_ID or {DEFAULT_REPO_ID}, for a CaseOps "
        f"variant {CASEOPS_REPO_ID}; kevclark/parameter-golf has sp4096 and sp8192)",
    )
    parser.add_argument(
        "--remote-root",
        default=None,
        help=f"folder inside the repo (default $MATCHED_FINEWEB_REMOTE_ROOT_PREFIX or {DEFAULT_REMOTE_ROOT})",
    )
    parser.add_argument("--revision", default=None, help="repo branch, tag or commit (default main)")
    parser.add_argument(
        "--hub-root",
        default=None,
        metavar="DIR",
        help="read the repo's files from DIR/<path in repo> instead of the hub (a local mirror)",
    )
    parser.add_argument(
        "--with-docs",
        action="store_true",
        help="also fetch docs_selected.jsonl and its sidecar (for re-tokenizing with pgolf data build)",
    )
    parser.add_argument(
        "--skip-manifest", action="store_true", help="never fetch manifest.json; a local one must exist"
    )
    parser.add_argument(
        "--refresh-manifest",
        action="store_true",
        help="fetch manifest.json again even if one is local (e.g. after switching --repo-id)",
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summary = download_dataset(
        args.variant,
        args.train_shards,
        data_root=args.data_root,
        repo_id=args.repo_id,
        remote_root=args.remote_root,
        revision=args.revision,
        hub_root=args.hub_root,
        with_docs=args.with_docs,
        skip_manifest=args.skip_manifest,
        refresh_manifest=args.refresh_manifest,
        progress=args.progress,
    )
    print(
        f"{summary['dataset_dir']}: {summary['fetched']} file(s) fetched, {summary['present']} already present; "
        f"tokenizer {', '.join(str(p) for p in summary['tokenizer_files'])}"
    )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PgolfError as e:
        sys.exit(f"error: {e}")
