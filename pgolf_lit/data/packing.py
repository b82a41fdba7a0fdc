"""Document boundaries of a packed token row, as variable-length attention wants them (``cu_seqlens``).

PR #1855 train_gpt.py ``_build_cu_seqlens``: a packed row of N tokens holds several documents, each starting with
a BOS token. Attention is causal inside each segment ``[cu[s], cu[s+1])`` and never crosses one. Segments start at
position 0 (always, even mid-document) and at every BOS; a document longer than ``max_doc_len`` is cut every
``max_doc_len`` tokens. The boundary list (starts, then N) is padded with N to a multiple of ``bucket`` entries, so
compiled attention sees only a few shapes; the padding adds empty segments, which attend to nothing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

CU_SEQLENS_BUCKET = 64


def build_cu_seqlens(
    bos_positions: Sequence[int] | np.ndarray | torch.Tensor,
    total_len: int,
    max_doc_len: int | None = None,
    bucket: int = CU_SEQLENS_BUCKET,
) -> tuple[torch.Tensor, int]:
    """Return ``(cu_seqlens, max_seqlen)``: int32 CPU segment boundaries for a row of ``total_len`` tokens whose
    BOS tokens sit at ``bos_positions`` (sorted, in ``[0, total_len)``), and the longest segment's length.

    ``max_doc_len`` (None or <= 0: no limit) caps each segment; ``bucket`` pads the boundary count to its multiple.
    """
    if total_len < 1:
        raise ValueError(f"total_len {total_len}: a packed row needs at least one token")
    if bucket < 1:
        raise ValueError(f"bucket {bucket}: must be positive")
    bos = torch.as_tensor(bos_positions).cpu().numpy().astype(np.int64, copy=False).reshape(-1)
    if bos.size and (bos[0] < 0 or bos[-1] >= total_len or np.any(np.diff(bos) <= 0)):
        raise ValueError(f"bos_positions must be increasing positions in [0, {total_len}), got {bos.tolist()[:8]}...")
    doc_starts = bos if bos.size and bos[0] == 0 else np.concatenate([[0], bos])
    doc_lengths = np.diff(np.append(doc_starts, total_len))
    if max_doc_len is not None and max_doc_len > 0:
        pieces = -(-doc_lengths // max_doc_len)  # ceil: a document of length d gives ceil(d / max_doc_len) pieces
        first_piece = np.repeat(np.cumsum(pieces) - pieces, pieces)
        starts = np.repeat(doc_starts, pieces) + (np.arange(first_piece.size) - first_piece) * max_doc_len
    else:
        starts = doc_starts
    boundaries = np.append(starts, total_len)
    max_seqlen = int(np.diff(boundaries).max())
    padded = -(-boundaries.size // bucket) * bucket
    cu = np.full(padded, total_len, dtype=np.int32)
    cu[: boundaries.size] = boundaries
    return torch.from_numpy(cu), max_seqlen
