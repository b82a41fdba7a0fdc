"""How a failed ``pgolf`` command ends: one ``error: ...`` line and exit status 2, and under DDP every rank ends
with the failing rank's line (the DDP error relay).

``one_line`` decides which exceptions get a line (a ``PgolfError``, also wrapped; an OS error naming its path; a
collective broken by a failed peer) and which keep their traceback (genuine bugs). A rank that fails on its own
leaves its line in the process group's store; a peer whose collective then breaks reads it from there.
"""

from __future__ import annotations

import sys
import time
from typing import Optional

from pgolf_lit.errors import PgolfError


def _chain(e: BaseException) -> list[BaseException]:
    seen, out = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _dist_world() -> tuple[int, int]:
    """(rank, world size) of an initialized default process group, else (0, 1)."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except Exception:  # a half-torn-down process group answers nothing useful
        pass
    return 0, 1


def _is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another process of the run went away (gloo / NCCL / the store)."""
    import torch.distributed as dist

    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    marks = ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL", "Broken pipe")
    return isinstance(e, RuntimeError) and any(mark in text for mark in marks)


_ERROR_KEY, _DONE_KEY = "pgolf/error", "pgolf/done"


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def one_line(e: BaseException) -> Optional[str]:
    """The ``error:`` line for an exception, or None for a genuine bug (which keeps its traceback): a PgolfError
    (also inside a wrapper whose message quotes it, as jsonargparse wraps errors raised while it instantiates
    classes), an OS error naming its path, or, under DDP, a collective broken by a failed peer (that peer's line,
    read from the process group's store, else a line saying a peer failed)."""
    chain = _chain(e)
    for inner in chain:
        if isinstance(inner, PgolfError) and (inner is e or inner is e.__cause__ or str(inner) in str(e)):
            return str(inner)
    if isinstance(e, OSError):
        what = e.strerror or _first_line(e)
        return f"{e.filename}: {what}" if e.filename else what
    rank, world = _dist_world()
    if world > 1 and _is_peer_failure(e):
        try:
            from datetime import timedelta

            store = _store()
            store.set_timeout(timedelta(seconds=5))
            return store.get(_ERROR_KEY).decode("utf-8", "replace")
        except Exception:  # the failed peer left no line (killed, or it hosted the store)
            return f"rank {rank}: stopped because another process of this run failed ({_first_line(e)})"
    return None


def _finish_distributed(line: str, own: bool) -> None:
    """Under DDP, leave the line for the other ranks: a rank that failed on its own stores it, closes its process
    group (peers blocked in a gloo collective fail at once and read it) and waits, a few seconds at most, until every
    rank has ended, so that a store it hosts outlives their reads."""
    rank, world = _dist_world()
    if world < 2:
        return
    try:
        import torch.distributed as dist

        store = _store()
        if own:
            store.set(_ERROR_KEY, line)
        store.add(_DONE_KEY, 1)
        if own:
            dist.destroy_process_group()
            deadline = time.monotonic() + 10
            while store.add(_DONE_KEY, 0) < world and time.monotonic() < deadline:
                time.sleep(0.05)
    except Exception:  # best effort: the line is printed whatever happens here
        pass


def report_error_line(line: str, error: BaseException) -> None:
    """Print ``error: <line>`` and, under DDP, relay it: a rank whose own error this is leaves it for the others."""
    own = not (_dist_world()[1] > 1 and _is_peer_failure(error))
    print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    _finish_distributed(line, own)


def missing_package_line(error: ModuleNotFoundError) -> str:
    """What to install, in one line (Lightning's loggers raise without a module name: read the message)."""
    text = f"{error.name or ''} {error}".lower()
    for package, extra in (("tensorboard", "tensorboard"), ("matplotlib", "report")):
        if package in text:
            return f"the Python package '{package}' is not installed: pip install 'pgolf-lit[{extra}]'"
    name = error.name or str(error).split("'")[1] if "'" in str(error) else (error.name or str(error))
    return f"the Python package '{name}' is not installed: pip install {name}"
