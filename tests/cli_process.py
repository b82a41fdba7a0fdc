"""The pgolf command line in a process of its own, as a user runs it, without paying torch's and Lightning's
imports (~4 s of CPU each) once per call: each call is a child forked from a server process that imported them
once (multiprocessing's forkserver with a preload list). The child gets the call's cwd, environment, argv and
files for stdout/stderr, runs ``pgolf_lit.cli.main`` and exits with its status, so a test sees what
``subprocess.run([sys.executable, "-m", "pgolf_lit.cli", ...])`` gives: return code, stdout, stderr.

Environment variables that the preloaded libraries read when they are imported (the Python path, Triton's
interpreter switch, the visible devices) cannot change in a fork: a call that sets one of them to another value
runs as a real subprocess. ``OMP_NUM_THREADS`` is applied with ``torch.set_num_threads``.
"""

from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Mapping, Optional, Sequence

_PRELOAD = ["torch", "lightning.pytorch", "pgolf_lit.module", "pgolf_lit.cli"]
_READ_AT_IMPORT = ("PYTHONPATH", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "MKL_NUM_THREADS", "PYTHONHASHSEED")
_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(_PRELOAD)
    return _context


def _child(argv: list[str], cwd: str, env: dict[str, str], out_path: str, err_path: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if env.get("OMP_NUM_THREADS", "").isdigit():
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # Point file descriptors 1 and 2 at the call's files: objects bound to sys.stdout/sys.stderr at import time
    # (logging handlers) write there too.
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    import pgolf_lit.cli

    sys.argv = [pgolf_lit.cli.__file__, *argv]
    code = 0
    try:
        pgolf_lit.cli.main(argv)
    except SystemExit as stop:
        if stop.code is None:
            code = 0
        elif isinstance(stop.code, int):
            code = stop.code
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        atexit._run_exitfuncs()  # what interpreter exit runs (multiprocessing children skip it)
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


def run_pgolf(
    args: Sequence[str],
    cwd: Optional[Path | str] = None,
    env: Optional[Mapping[str, str]] = None,
    timeout: Optional[float] = 600,
) -> subprocess.CompletedProcess:
    """``pgolf ARGS`` in cwd with env (default: this process's), as a CompletedProcess with text output."""
    environment = dict(os.environ if env is None else env)
    argv = [str(a) for a in args]
    if any(environment.get(k) != os.environ.get(k) for k in _READ_AT_IMPORT):
        command = [sys.executable, "-m", "pgolf_lit.cli", *argv]
        return subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory(prefix="pgolf-call-") as tmp:
        out_path, err_path = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        Path(out_path).touch()
        Path(err_path).touch()
        child = _forkserver().Process(
            target=_child, args=(argv, str(cwd or os.getcwd()), environment, out_path, err_path), daemon=False
        )
        child.start()
        child.join(timeout)
        if child.is_alive():
            child.kill()
            child.join()
            raise subprocess.TimeoutExpired(["pgolf", *argv], timeout)
        stdout = Path(out_path).read_text(errors="replace")
        stderr = Path(err_path).read_text(errors="replace")
    return subprocess.CompletedProcess(["pgolf", *argv], child.exitcode, stdout, stderr)
