"""Upstream-style plain-text log lines (``step:100/20000 train_loss:3.1234 ...``) on rank 0: printed and appended
to ``<run dir>/train.log``, so existing log parsers and people used to the record logs read our runs as theirs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm


class TextLog:
    def __init__(self, path: Optional[str | os.PathLike] = None, enabled: bool = True, echo: bool = True):
        self.path = Path(path) if path else None
        self.enabled = enabled
        self.echo = echo
        if self.enabled and self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        if self.echo:
            # tqdm.write clears and redraws any progress bar on screen, so a line never lands inside one.
            tqdm.write(line)
            sys.stdout.flush()
        if self.path is not None:
            # Appending a line is the log's atomic unit; a summary file is written with fileio.atomic_path.
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
