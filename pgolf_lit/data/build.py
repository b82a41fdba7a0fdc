"""Text or JSONL documents to token shards, with upstream's export rules (``pgolf data build``; its command line is
``tools/data_cmd.py``).

The output tree is the one the official download produces (upstream data/download_hf_docs_and_tokenize.py ``main``),
so every loader, the downloader's ``--hub-root`` and the record scripts read it unchanged::

    OUT/manifest.json
    OUT/tokenizers/fineweb_<V>_bpe.model, .vocab
    OUT/datasets/<name>_sp<V>/fineweb_val_000000.bin, fineweb_train_000000.bin, ...

The steps, each in its own module: the input documents (documents.py); the validation split and the guard that
keeps validation documents out of training (val_split.py); the tokenizer, SentencePiece BPE trained with the
upstream settings on every document, validation included (tokenizer_train.py); the shards (shard_export.py); the
manifest, which also records every shard's sha256 for the run manifests (manifest.py). ``--caseops`` builds the
PR #1855 CaseOps variant (caseops.py): the tokenizer reserves the four operators as pieces 4..7, names end in
``_lossless_caps_caseops_v1_reserved`` as the public CaseOps export's, and every val shard gets its byte sidecar.

This module stages the build: everything is written into a hidden folder inside OUT and moved into place (a few
renames) only once the tokenizer and every shard are written; the manifest is written last, atomically. A build
that fails or is interrupted before then (bad input, full disk, Ctrl-C or SIGTERM during the export) leaves OUT as
it was; the staging folder of a build that was killed outright (SIGKILL, power loss) is removed by the next build
into OUT.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path
from typing import Sequence

from pgolf_lit.data.documents import DocumentSource, find_input_files
from pgolf_lit.data.file_hashes import sha256_files
from pgolf_lit.data.manifest import build_manifest, read_existing_manifest, variant_names
from pgolf_lit.data.shard_export import export_shards
from pgolf_lit.data.shards import MAX_VOCAB
from pgolf_lit.data.tokenizer import load_tokenizer
from pgolf_lit.data.tokenizer_train import prepare_tokenizer
from pgolf_lit.data.val_split import (
    OFFICIAL_VAL_DOCS,
    declared_val_docs,
    default_val_docs,
    disjointness_entry,
    scan_documents,
)
from pgolf_lit.errors import DataError
from pgolf_lit.fileio import atomic_write_text

DEFAULT_NAME = "fineweb10B"
DEFAULT_SHARD_TOKENS = 100_000_000


_STAGING_PREFIX = ".pgolf-build-"


def _owner_tag() -> str:
    """Host and process of a staging folder's name, so a later build can tell a dead build's folder from a live one."""
    return f"{socket.gethostname().replace('-', '_')}-{os.getpid()}-"


def remove_stale_staging(out_dir: Path) -> list[Path]:
    """Delete the staging folders (and renamed-away old outputs) in ``out_dir`` left by builds on this host whose
    process no longer runs (killed with SIGKILL, or the machine went down); returns what was removed."""
    host = socket.gethostname().replace("-", "_")
    candidates = list(out_dir.glob(f"{_STAGING_PREFIX}*"))
    candidates += [p for sub in ("datasets", "tokenizers") for p in (out_dir / sub).glob(".*.old-*")]
    removed = []
    for path in candidates:
        tag = (
            path.name[len(_STAGING_PREFIX) :]
            if path.name.startswith(_STAGING_PREFIX)
            else f"{host}-" + path.name.rsplit(".old-", 1)[-1] + "-"
        )
        owner_host, _, rest = tag.partition("-")
        pid = rest.split("-", 1)[0]
        if owner_host != host or not pid.isdigit() or _process_alive(int(pid)):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class _Terminated(BaseException):
    """SIGTERM inside a build: unwinds it like Ctrl-C (its cleanup runs), then the signal is delivered again."""


@contextlib.contextmanager
def _terminate_after_cleanup():
    """While the build runs, SIGTERM (a scheduler's stop, ``kill``) raises, so the ``finally`` that removes the
    staging folder runs; the process then ends by the signal as it would have (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise _Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # a handler that chose not to end the process
    finally:
        signal.signal(signal.SIGTERM, previous)


def _move_into_place(staged: Path, final: Path) -> None:
    """Replace ``final`` (a file or a folder) by ``staged``; an old folder is renamed away before it is deleted."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old)
    else:
        os.replace(staged, final)


def build_dataset(
    inputs: Sequence[str | os.PathLike],
    vocab_size: int,
    out_dir: str | os.PathLike,
    *,
    name: str = DEFAULT_NAME,
    val_docs: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_path: str | os.PathLike | None = None,
    tokenizer_train_docs: int | None = None,
    txt_mode: str = "paragraphs",
    embedded: bool = False,
    num_threads: int | None = None,
    progress: bool = True,
    caseops: bool = False,
    keep_val_copies: bool = False,
) -> dict:
    """Build ``out_dir`` (tokenizer, val/train shards, manifest.json) from text inputs; return the manifest.

    ``inputs``: .txt/.jsonl files or folders of them; ``embedded`` appends the built-in corpus (corpus.py), so
    ``build_dataset([], 1024, "data", embedded=True)`` works offline. ``val_docs`` defaults to the validation size
    that the first input's source manifest declares (as upstream), else ``default_val_docs(number of documents)``.
    ``tokenizer_path`` reuses a SentencePiece model instead of training. ``tokenizer_train_docs`` limits tokenizer
    training to the first N documents (as upstream's option).

    ``caseops`` builds the PR #1855 CaseOps variant: documents are CaseOps-encoded (caseops.py) before
    tokenization, the tokenizer reserves the operators, names carry ``_lossless_caps_caseops_v1_reserved``, and
    the val split gets its byte sidecar ``fineweb_val_bytes_NNNNNN.bin``.

    A smaller ``val_docs`` than the source manifest declares stops the build before anything is written. A training
    document whose text repeats a validation document is left out of the training split (the count is the
    manifest's ``val_disjointness``), unless ``keep_val_copies`` (a byte-exact rebuild of an upstream export that
    had such copies: the manifest then says how many validation documents are in training).
    """
    out_dir = Path(out_dir)
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise DataError(f"vocab_size {vocab_size}: shard tokens are uint16, so the vocabulary must be 1..{MAX_VOCAB}")
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens {shard_tokens}: must be positive")
    reuse_path = Path(tokenizer_path) if tokenizer_path is not None else None
    files = find_input_files(inputs)
    if not files and not embedded:
        listed = ", ".join(str(i) for i in inputs) or "none given"
        raise DataError(f"no input files: expected .txt or .jsonl files (inputs: {listed}), or use --embedded")
    source = DocumentSource(files, txt_mode=txt_mode, embedded=embedded)
    declared = declared_val_docs(files)
    if declared is not None and val_docs is not None and val_docs < declared[1]:
        raise DataError(
            f"val_docs {val_docs}: {declared[0]} declares the first {declared[1]} documents the validation set, so "
            f"{declared[1] - val_docs} validation documents would land in training; pass --val-docs {declared[1]} "
            f"or more"
        )
    if val_docs is None and declared is not None:
        val_docs = declared[1]
    scan = scan_documents(source, val_cap=val_docs if val_docs is not None else OFFICIAL_VAL_DOCS, caseops=caseops)
    num_docs = scan.num_docs
    if not scan.any_text:
        raise DataError(f"empty text set: the inputs ({', '.join(source.describe())}) hold no non-blank text")
    val_docs = default_val_docs(num_docs) if val_docs is None else val_docs
    if not 1 <= val_docs < num_docs:
        raise DataError(
            f"val_docs {val_docs}: the inputs hold {num_docs} documents; the validation split needs at least 1 and "
            f"must leave at least 1 for training"
        )
    copies = scan.train_copies_of_val(val_docs)
    disjointness = disjointness_entry(copies, kept=keep_val_copies)
    leave_out = frozenset() if keep_val_copies else frozenset(index for index, _, _ in copies)
    threads = num_threads or os.cpu_count() or 1
    names = variant_names(name, vocab_size, caseops)

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    with _terminate_after_cleanup():
        return _build_staged(
            out_dir,
            source,
            vocab_size,
            names,
            reuse_path=reuse_path,
            tokenizer_train_docs=tokenizer_train_docs,
            threads=threads,
            num_docs=num_docs,
            val_docs=val_docs,
            shard_tokens=shard_tokens,
            progress=progress,
            caseops=caseops,
            disjointness=disjointness,
            leave_out=leave_out,
        )


def _build_staged(
    out_dir,
    source,
    vocab_size,
    names,
    *,
    reuse_path,
    tokenizer_train_docs,
    threads,
    num_docs,
    val_docs,
    shard_tokens,
    progress,
    caseops,
    disjointness,
    leave_out,
) -> dict:
    """``build_dataset`` after its checks: everything is written into a staging folder, then moved into place."""
    dataset_name, model_name = names.dataset, names.model
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX + _owner_tag(), dir=out_dir))
    try:
        model_path = prepare_tokenizer(
            source,
            vocab_size,
            staging / "tokenizers" / model_name,
            reuse_path=reuse_path,
            train_docs=tokenizer_train_docs,
            num_threads=threads,
            caseops=caseops,
        )
        sp = load_tokenizer(model_path, vocab_size)
        if sp.bos_id() < 0:
            raise DataError(
                f"{reuse_path or model_path}: the tokenizer has no BOS piece; every document starts with one"
            )
        staged_dataset = staging / "datasets" / dataset_name
        staged_dataset.mkdir(parents=True)
        stats = export_shards(
            source,
            sp,
            staged_dataset,
            num_docs=num_docs,
            val_docs=val_docs,
            vocab_size=vocab_size,
            shard_tokens=shard_tokens,
            num_threads=threads,
            progress=progress,
            caseops=caseops,
            leave_out=leave_out,
        )
        # Hashed here, once: the run manifests name every shard's sha256 (file_hashes caches them by identity,
        # which the renames below keep).
        shard_hashes = sha256_files(sorted(staged_dataset.iterdir()))
        vocab_file = model_path.with_suffix(".vocab")
        manifest_path = out_dir / "manifest.json"
        manifest = build_manifest(
            read_existing_manifest(manifest_path),
            source=source,
            dataset_name=dataset_name,
            vocab_size=vocab_size,
            val_docs=val_docs,
            shard_tokens=shard_tokens,
            model_path=model_path,
            vocab_file=vocab_file if vocab_file.is_file() else None,
            reuse_path=reuse_path,
            train_docs=tokenizer_train_docs,
            stats=stats,
            sp=sp,
            tokenizer_name=names.tokenizer,
            caseops=caseops,
            disjointness=disjointness,
            shard_sha256={path.name: digest for path, digest in shard_hashes.items()},
        )
        for artifact in (model_path, vocab_file):  # a reused model without .vocab must not keep a stale one
            final = out_dir / "tokenizers" / artifact.name
            if artifact.is_file():
                _move_into_place(artifact, final)
            else:
                final.unlink(missing_ok=True)
        final_dataset = out_dir / "datasets" / dataset_name
        _move_into_place(staged_dataset, final_dataset)
        sha256_files(final_dataset / p.name for p in shard_hashes)  # no hashing: the cache learns the new paths
        atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def build_embedded_dataset(
    dataset_dir: str | os.PathLike,
    vocab_size: int,
    *,
    shard_tokens: int = 100_000,
    progress: bool = True,
    caseops: bool | None = None,
) -> dict:
    """Build the embedded corpus so that ``dataset_dir`` (``<root>/datasets/<name>_sp<V>``) holds its shards.

    For a data module that is pointed at a dataset folder and wants it created offline on first use; the tokenizer
    lands in ``<root>/tokenizers/`` as usual. The small default shard size splits the ~0.5M training tokens into
    several shards, so the shuffled and coprime loaders have shards to mix and to share among ranks.

    ``caseops`` builds the CaseOps variant (folder ``<name>_sp<V>_lossless_caps_caseops_v1_reserved``, tokenizer
    ``fineweb_<V>_bpe_lossless_caps_caseops_v1_reserved.model``, val byte sidecar): a tiny twin of the PR #1855 data.
    By default it follows the folder name, so a data module pointed at a CaseOps folder gets CaseOps data.
    """
    dataset_dir = Path(dataset_dir)
    if caseops is None:
        caseops = dataset_dir.name.endswith(variant_names("", vocab_size, True).dataset)
    suffix = variant_names("", vocab_size, caseops).dataset
    if dataset_dir.parent.name != "datasets" or not dataset_dir.name.endswith(suffix) or dataset_dir.name == suffix:
        raise DataError(f"{dataset_dir}: expected a dataset folder named <root>/datasets/<name>{suffix}")
    return build_dataset(
        [],
        vocab_size,
        dataset_dir.parent.parent,
        name=dataset_dir.name[: -len(suffix)],
        embedded=True,
        shard_tokens=shard_tokens,
        progress=progress,
        caseops=caseops,
    )
