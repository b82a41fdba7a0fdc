"""Checkpoint files: written atomically in their own folder and fsynced, carrying a checksum of their contents that
every load verifies, and loaded with ``torch.load(weights_only=True)`` (no pickled code runs).

``GolfCheckpointIO`` replaces Lightning's ``TorchCheckpointIO`` in every Trainer that runs a ``GolfModule`` (set in
``GolfModule.setup``). Lightning's default did not fit: its ``_atomic_save`` stages the file in the system temp folder
and moves it (a copy when that is another filesystem, which a full disk left truncated under the final name; a
failed move raising ``PermissionError`` was swallowed), and it stores no checksum, while ``torch.load`` does not check
the zip records' CRCs, so a flipped bit loads as a different value.

The checksum is a sha256 over the checkpoint's contents (every tensor's dtype, shape and bytes, every key and plain
value, in order), stored in the checkpoint itself under ``pgolf_checksum``: the file stays one file, survives copies
and renames, and a changed bit anywhere in the data it describes fails the load with one line.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch

from pgolf_lit.errors import CheckpointError
from pgolf_lit.fileio import atomic_path, fsync_dir

CHECKSUM_KEY = "pgolf_checksum"
_SCHEME = "sha256-contents-v1"
_LIGHTNING_VERSION_KEY = "pytorch-lightning_version"


# ---------------------------------------------------------------------------------------------------------
# Checksum
# ---------------------------------------------------------------------------------------------------------


def content_digest(obj: Any) -> str:
    """sha256 over a checkpoint's contents, walked in order: tensors by dtype, shape and bytes (wherever they live),
    mappings and sequences by their items, plain values by type and ``repr``."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        h.update(b"M%d" % len(obj))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for value in obj:
            _feed(h, value)
    elif isinstance(obj, (set, frozenset)):
        h.update(b"S" + repr(sorted(repr(v) for v in obj)).encode())
    elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:  # allowlisted types of weights_only loading (dtype, device, ...); an address-bearing repr is never used
        custom_repr = type(obj).__repr__ is not object.__repr__
        h.update(f"{type(obj).__qualname__}:{repr(obj) if custom_repr else ''};".encode())


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def _first_line(e: BaseException) -> str:
    """``Type: first sentence of the message`` (torch's messages run on for several sentences)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0][:160]}" if text else type(e).__name__


def write_error(path: str | os.PathLike, e: OSError, what: str = "checkpoint") -> CheckpointError:
    """The one line for a failed checkpoint write (nothing was left under the final name)."""
    import errno

    if e.errno == errno.ENOSPC:
        return CheckpointError(
            f"{path}: no space left on the device while writing the {what}; nothing was written under that name "
            f"(free space, or write {what}s to another disk)"
        )
    return CheckpointError(f"{path}: cannot write the {what} ({e.strerror or e})")


def save_checkpoint_file(checkpoint: Mapping[str, Any], path: str | os.PathLike, what: str = "checkpoint") -> None:
    """``torch.save`` the checkpoint with its checksum to a temporary file in ``path``'s folder, fsync it, rename it
    onto ``path`` and fsync the folder; any OS error becomes one ``CheckpointError`` line and leaves nothing."""
    path = Path(path)
    payload = {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY}
    payload[CHECKSUM_KEY] = {"scheme": _SCHEME, "sha256": content_digest(payload)}
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
        fsync_dir(path.parent)
    except Exception as e:
        # torch.save's zip writer turns a failed write into a RuntimeError when it closes; the OSError is its context
        cause = next((x for x in _causes(e) if isinstance(x, OSError)), None)
        if cause is None:
            raise
        raise write_error(path, cause, what) from None


def _causes(e: Optional[BaseException]):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def load_checkpoint_file(
    path: str | os.PathLike, map_location: Any = "cpu", what: str = "checkpoint", verify: bool = True
) -> Any:
    """Load a checkpoint (or any torch file of tensors and plain values) with ``weights_only=True`` and, when it
    carries a checksum, verify it (the checksum entry is removed from what is returned). Every failure is one
    ``CheckpointError`` line naming the file: missing, empty, truncated, not a torch file, pickled code, corrupted."""
    p = Path(path)
    try:
        if not p.exists():
            raise CheckpointError(f"{path}: {what} not found")
        if p.is_dir():
            raise CheckpointError(f"{path}: expected a {what} file, found a directory")
        if p.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file, not a {what} (an interrupted copy or write?)")
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({e.strerror or _first_line(e)})") from None
    except Exception as e:  # a truncated zip, a non-torch file, a weights_only refusal of pickled code
        import pickle

        why = (
            "it holds objects other than tensors and plain values, which are never unpickled"
            if isinstance(e, pickle.UnpicklingError)
            else "the file is truncated, corrupted or not a torch file"
        )
        raise CheckpointError(f"{path}: not a loadable {what} ({_first_line(e)}); {why}") from None
    if verify and isinstance(obj, dict) and CHECKSUM_KEY in obj:
        stored = obj.pop(CHECKSUM_KEY)
        expected = stored.get("sha256") if isinstance(stored, dict) else None
        if not isinstance(expected, str) or content_digest(obj) != expected:
            raise CheckpointError(
                f"{path}: checksum mismatch: the {what} is corrupted (its contents no longer match the sha256 stored "
                f"when it was written); use an earlier checkpoint"
            )
    return obj


def as_lightning_checkpoint(ckpt: Any, path: str | os.PathLike) -> dict[str, Any]:
    """A loaded file in the layout Lightning restores from: a ``pgolf convert`` output (``state_dict`` and
    ``pgolf_gpt``, weights only) gets the version entry Lightning's checkpoint migration reads."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{path}: not a Lightning checkpoint (no state_dict); is it an upstream state dict? "
            f"Convert it with pgolf convert --from-upstream"
        )
    if _LIGHTNING_VERSION_KEY not in ckpt:
        import lightning

        ckpt[_LIGHTNING_VERSION_KEY] = lightning.__version__
    return ckpt


def checkpoint_hparams(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The GolfModule arguments a checkpoint was made with: Lightning's ``hyper_parameters``, or the architecture
    alone for a ``pgolf convert`` output (``pgolf_gpt``)."""
    hparams = dict(ckpt.get("hyper_parameters") or {})
    hparams.pop("_instantiator", None)
    if not hparams and isinstance(ckpt.get("pgolf_gpt"), Mapping):
        hparams = {"gpt": dict(ckpt["pgolf_gpt"])}
    return hparams


def check_writable_dir(path: str | os.PathLike, what: str = "checkpoint folder") -> Optional[str]:
    """None if a file can be created in folder ``path`` (made if missing), else the one-line reason."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".pgolf-write-test-", dir=path)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return (
            f"{path}: the {what} is not writable ({e.strerror or e}); fix its permissions or set "
            f"ModelCheckpoint's dirpath to a writable folder"
        )
    return None


# ---------------------------------------------------------------------------------------------------------
# Lightning plugin
# ---------------------------------------------------------------------------------------------------------


def _is_local(path: Any) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def _lightning_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    return TorchCheckpointIO


class GolfCheckpointIO(_lightning_io()):
    """Lightning's ``TorchCheckpointIO`` with local files written by ``save_checkpoint_file`` (atomic in the
    destination folder, fsynced, checksummed) and read by ``load_checkpoint_file`` (verified, weights only);
    remote (fsspec URL) paths keep Lightning's behaviour.

    ``defer_errors`` (set by GolfModule under DDP, where only rank 0 writes while the other ranks wait): a failed
    write is kept in ``deferred_error`` instead of raised, so that every rank can raise it together.
    ``saved`` maps each checkpoint written (and not removed since) to its global step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.defer_errors = False
        self.deferred_error: Optional[str] = None
        self.saved: dict[str, int] = {}

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        try:
            save_checkpoint_file(checkpoint, str(path).removeprefix("file://"))
        except CheckpointError as e:
            if not self.defer_errors:
                raise
            self.deferred_error = self.deferred_error or str(e)
            return
        step = checkpoint.get("global_step")
        self.saved[str(path)] = int(step) if isinstance(step, int) else -1

    def load_checkpoint(
        self, path, map_location: Any = lambda storage, loc: storage, weights_only: Optional[bool] = None
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        # weights_only is always True here: loading a checkpoint never runs pickled code, whatever was asked.
        ckpt = load_checkpoint_file(str(path).removeprefix("file://"), map_location=map_location)
        return as_lightning_checkpoint(ckpt, path)

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        self.saved.pop(str(path), None)

    def newest_saved(self) -> Optional[str]:
        """The checkpoint of the highest step written by this process that is still on disk (the first written of
        that step: ``step=N.ckpt`` before ``last.ckpt``)."""
        best: Optional[tuple[int, str]] = None
        for path, step in self.saved.items():
            if os.path.exists(path) and (best is None or step > best[0]):
                best = (step, path)
        return best[1] if best else None


def install_checkpoint_io(trainer) -> Optional[GolfCheckpointIO]:
    """Put a ``GolfCheckpointIO`` in the trainer's strategy in place of Lightning's default ``TorchCheckpointIO``
    (a plugin the user chose is left alone); returns the one in use, or None."""
    strategy = trainer.strategy
    current = strategy.checkpoint_io
    if isinstance(current, GolfCheckpointIO):
        return current
    if type(current) is not _lightning_io():
        return None
    io = GolfCheckpointIO()
    strategy.checkpoint_io = io
    return io
