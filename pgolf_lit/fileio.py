"""Atomic file output: write to a temporary name in the same directory, then rename.

Written here rather than taken from a library: the one maintained package for this (``atomicwrites``) is
archived, and the whole job is ``os.replace`` plus cleanup.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# mkstemp creates 0600 files; a finished output gets the permissions a plain open() would have given it.
_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it onto ``path``, on error delete it.

    An interrupted write therefore never leaves a file under the final name that looks complete. An ``OSError``
    without a file name (a ``write`` on a full disk) gets ``path`` as its file name, so the message can name it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:  # named after the file asked for, not the temporary name tried
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, _FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if isinstance(e, OSError) and e.filename is None:
            raise _named(e, path) from None
        raise


def _named(e: OSError, path: Path) -> OSError:
    """``e`` with ``path`` as its file name (the same OSError subclass: the constructor picks it from errno)."""
    if e.filename is not None or e.errno is None:
        return e
    return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in directory ``path`` durable (POSIX); a filesystem that cannot fsync a directory is skipped."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
