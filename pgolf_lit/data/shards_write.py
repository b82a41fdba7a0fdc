"""Writing token shards in the upstream format (``shards.py`` describes it and reads them).

Apart from the readers so that evaluation, which only reads, does not count the writer (``quant/code_size.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pgolf_lit.data.shards import HEADER_INTS, MAX_VOCAB, SHARD_MAGIC, SHARD_VERSION
from pgolf_lit.errors import DataError
from pgolf_lit.fileio import atomic_path


def write_shard(path: str | os.PathLike, tokens: np.ndarray | Sequence[int] | torch.Tensor) -> Path:
    """Write tokens as one shard, to a temporary name first, then rename."""
    path = Path(path)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise DataError(f"{path}: tokens must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size >= 2**31:
        raise DataError(f"{path}: {arr.size} tokens do not fit one shard (< 2^31)")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= MAX_VOCAB):
        raise DataError(f"{path}: token ids must lie in [0, {MAX_VOCAB}) to fit uint16; the vocabulary is too large")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.astype("<u2", copy=False).tobytes())
    return path
