"""PR #2130/#2135's PGRP v2 container (``COMPRESSOR=pergroup``, ``_pack_pergroup``; spec/frontier.md §5.5), the
writer; the bounded reader is ``pergroup_v2_read.py``, which describes the frame.

Where PR #1855's PGRP (``pergroup.py``) compresses seven role groups as seven lrzip streams and row-sorts three of
them, v2 takes every int8 codes tensor whose name ends in ``.mlp.fc/.mlp.proj/.attn.c_q/.attn.proj/.attn.c_k/
.attn.c_v.weight.q`` or ``tok_emb.weight.q`` (67 in the record), in sorted name order, orders each one's rows by the
greedy L1 chain (``similarity_sort_l1``, the same as v1's), transposes it, and compresses all of them as ONE lrzip
``-z -L 9`` stream; the row orders are stored raw in the frame (106,496 B in the record). Everything else (scales,
LQER factors, fp16 passthrough tensors and the meta) is ``torch.save({"w": ..., "m": ...})`` in the quantized dict's
order, byte-shuffled with stride 2 (``BSHF`` header) and brotli-11 compressed. The record falls back to brotli for
the codes when lrzip is missing (method byte 0); this writer needs lrzip, as v1's does, and the reader reads both.
"""

from __future__ import annotations

import io
import struct
import sys
from typing import Mapping

import brotli
import numpy as np
import torch
from torch import Tensor

from pgolf_lit.quant.lqer import KEY_SUFFIXES as LQER_KEY_SUFFIXES
from pgolf_lit.quant.lrzip import lrzip_compress
from pgolf_lit.quant.pergroup import (
    GATE_META,
    PASSTHROUGH_META,
    PergroupError,
    PergroupSettings,
    _fresh,
    lrzip_executable,
    similarity_sort_l1,
    validate_quant,
)
from pgolf_lit.quant.pergroup_v2_read import (  # noqa: F401  (the reader's names, re-exported)
    HEADER,
    LRZIP,
    SHUFFLE_MAGIC,
    VERSION,
    byte_unshuffle,
    decode_pergroup_v2,
    is_pergroup_v2,
)

CODES_SUFFIXES = (
    ".mlp.fc.weight.q",
    ".mlp.proj.weight.q",
    ".attn.c_q.weight.q",
    ".attn.proj.weight.q",
    ".attn.c_k.weight.q",
    ".attn.c_v.weight.q",
    "tok_emb.weight.q",
)
SHUFFLE_STRIDE = 2
REMAINDER_QUALITY = 11  # brotli.compress(..., quality=11), default window


def byte_shuffle(data: bytes, stride: int = SHUFFLE_STRIDE) -> bytes:
    """Every ``stride``-th byte together (the fp16 values' low bytes, then their high bytes) behind a ``BSHF`` +
    stride header (the record's ``_byte_shuffle``)."""
    if stride <= 1 or len(data) < stride:
        return data
    src = np.frombuffer(data, dtype=np.uint8)
    return SHUFFLE_MAGIC + bytes([stride]) + np.concatenate([src[pos::stride] for pos in range(stride)]).tobytes()


def encode_pergroup_v2(
    quant: Mapping[str, Tensor],
    meta: Mapping[str, str],
    settings: PergroupSettings = PergroupSettings(),
    target: str = "PGRP v2 artifact",
) -> bytes:
    """The PGRP v2 bytes of the record's quantized dict and meta strings (``pergroup.py``'s names; the remainder
    keeps ``quant``'s order, which the bytes depend on)."""
    if sys.byteorder != "little":
        raise PergroupError(f"{target}: PGRP is written little-endian; this machine is big-endian")
    try:
        validate_quant(quant, meta)
    except ValueError as e:
        raise PergroupError(f"{target}: {e}") from None
    lrzip_executable(settings)  # fail before the row sorts, not after
    codes = sorted(n for n, t in quant.items() if n.endswith(CODES_SUFFIXES))
    frame, blobs = [HEADER, struct.pack("<I", len(codes))], []
    for name in codes:
        arr = quant[name].detach().cpu().contiguous().numpy()
        if arr.ndim != 2 or arr.dtype != np.int8:
            raise PergroupError(f"{target}: {name} must be 2-D int8 codes, got {arr.dtype}{list(arr.shape)}")
        order = similarity_sort_l1(arr)
        encoded = name.encode("utf-8")
        frame += [
            struct.pack("<H", len(encoded)),
            encoded,
            struct.pack("<II", *arr.shape),
            order.astype("<u2").tobytes(),
        ]
        blobs.append(np.ascontiguousarray(arr[order.astype(np.int64)].T).tobytes())
    codes_stream = lrzip_compress(b"".join(blobs), settings)
    shared = {PASSTHROUGH_META: PASSTHROUGH_META, GATE_META: GATE_META}  # the script's literals: pickled once
    meta_out = {name: shared.get(info) or _fresh(info) for name, info in meta.items()}
    same_key = {name: name for name in meta_out}  # a kept tensor's key is its meta key object: pickled once
    remainder = {
        same_key.get(name, name): t.detach().cpu().clone(memory_format=torch.contiguous_format)
        for name, t in quant.items()
        if name not in codes
    }
    buffer = io.BytesIO()
    torch.save({"w": remainder, "m": meta_out}, buffer)
    rem_stream = brotli.compress(byte_shuffle(buffer.getvalue()), quality=REMAINDER_QUALITY)
    frame += [
        struct.pack("<BI", LRZIP, len(codes_stream)),
        codes_stream,
        struct.pack("<I", len(rem_stream)),
        rem_stream,
    ]
    return b"".join(frame)


def record_v2_order(
    quant: Mapping[str, Tensor], meta: Mapping[str, str]
) -> tuple[dict[str, Tensor], Mapping[str, str]]:
    """The record's ``gptq_mixed_quantize`` order, which the remainder's bytes follow: every tensor's own keys in
    meta order, then the LQER factors (the record appends them after the sweep, in its top-k order by error; here
    in meta order, the same wherever the top tensors' errors fall in state-dict order)."""
    suffixes = tuple({s for keys in LQER_KEY_SUFFIXES.values() for s in keys})
    first = {k: t for k, t in quant.items() if not k.endswith(suffixes)}
    return {**first, **{k: t for k, t in quant.items() if k not in first}}, meta
