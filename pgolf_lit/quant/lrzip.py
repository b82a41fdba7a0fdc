"""lrzip, the writer's side: ``lrzip -z`` in a private sandbox (a temp directory of its own, no lrzip.conf read, a
timeout) and the installed version. The reader's side (``lrzip -d`` bounded by the size the container declares)
is in ``pergroup_read.py``, which an artifact's counted program carries; this file only the export needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Optional

from pgolf_lit.quant.pergroup_read import PergroupError, PergroupSettings, last_line, lrzip_env, lrzip_executable


def lrzip_version(settings: "PergroupSettings" = PergroupSettings()) -> Optional[str]:
    """``lrzip -V``'s line (e.g. ``"lrzip version 0.651"``), None without the executable."""
    exe = shutil.which(settings.lrzip)
    if exe is None:
        return None
    run = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=60, env=lrzip_env(None))
    return (run.stdout.strip() or run.stderr.strip()).splitlines()[0] if (run.stdout or run.stderr) else None


def lrzip_compress(
    data: bytes, settings: PergroupSettings = PergroupSettings(), workdir: Optional[str] = None
) -> bytes:
    """``lrzip -z -L <level> -o out in`` on temp files in a private directory, without reading any lrzip.conf
    (PR #1855 train_gpt.py `_lrzip_compress`)."""
    exe = lrzip_executable(settings)
    with tempfile.TemporaryDirectory(prefix="pgrp_", dir=workdir) as tmp:
        src, dst = os.path.join(tmp, "group.bin"), os.path.join(tmp, "group.bin.lrz")
        with open(src, "wb") as f:
            f.write(data)
        threads = ["-p", str(settings.lrzip_threads)] if settings.lrzip_threads else []
        cmd = [exe, "-z", "-L", str(settings.lrzip_level), *threads, "-o", dst, src]
        try:
            run = subprocess.run(cmd, capture_output=True, timeout=settings.timeout_s, env=lrzip_env(tmp))
        except subprocess.TimeoutExpired:
            raise PergroupError(f"lrzip: compressing {len(data)} bytes took over {settings.timeout_s} s") from None
        if run.returncode != 0 or not os.path.isfile(dst):
            why = last_line(run)
            raise PergroupError(f"lrzip: compressing {len(data)} bytes failed (exit {run.returncode}): {why}")
        with open(dst, "rb") as f:
            return f.read()
