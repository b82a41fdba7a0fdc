"""A brotli decompression that stops at a size limit: the readers' defence against a crafted stream that expands
without bound (the native and upstream readers through ``compress.decompress_bounded``, and the PGRP reader)."""

from __future__ import annotations

import brotli


def brotli_decompress_bounded(data: bytes, limit: int, what: str = "brotli stream") -> bytes:
    """brotli-decompress at most ``limit`` bytes (ValueError beyond, or when the stream is cut short).

    Uses the output limit of brotli ≥ 1.2's Decompressor; older bindings are fed 1 KiB of input at a time, which
    bounds the overshoot only by what 1 KiB expands to."""
    d = brotli.Decompressor()
    step = min(limit + 1, 1 << 20)
    try:
        try:
            out = bytearray(d.process(data, output_buffer_limit=step))
        except TypeError:  # brotli < 1.2: no output limit
            out = bytearray()
            for i in range(0, len(data), 1024):
                out += d.process(data[i : i + 1024])
                if len(out) > limit:
                    break
        else:
            while not d.is_finished() and len(out) <= limit:
                chunk = d.process(b"", output_buffer_limit=step)
                if not chunk:
                    break
                out += chunk
    except brotli.error:
        raise ValueError(f"{what}: corrupted brotli data") from None
    if len(out) > limit:
        raise ValueError(f"{what}: decompresses to more than the {limit} bytes allowed")
    if not d.is_finished():
        raise ValueError(f"{what}: truncated brotli data")
    return bytes(out)
