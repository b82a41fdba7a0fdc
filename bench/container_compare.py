"""PR #1855's per-group container against single-stream codecs, on the same quantized tensors.

    python bench/container_compare.py [ARTIFACT.ptz ...]

Each argument is a PGRP artifact (a PR #1855 ``final_model.int6.ptz``, or ``pgolf export`` with the per-group
container); without arguments the PR #1855 quant fixture's ``artifact.ptz`` (``PGOLF_PR1855_FIXTURES``). The
artifact is decoded, then the same tensors and meta are written four ways and timed once each:

- PGRP as the record: lrzip (ZPAQ) per tensor group, row-sorted and transposed, brotli for the rest;
- the same per-group payloads (sorted, transposed) with brotli-11 instead of lrzip: what lrzip itself buys;
- one ``torch.save`` stream of all tensors, byte-shuffled, brotli-11 (the earlier records' container) and lzma-9.

It prints a markdown table and one ratio line: PGRP bytes / the best single stream's. Needs ``lrzip`` on PATH.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import brotli
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pgolf_lit.quant.compress import compress, decompress  # noqa: E402
from pgolf_lit.quant.lrzip import lrzip_version  # noqa: E402
from pgolf_lit.quant.pergroup import (  # noqa: E402
    PergroupSettings,
    decode_pergroup,
    encode_pergroup,
    pack_streams,
    pergroup_payloads,
)

FIXTURE_ARTIFACT = "quant/pr1855_lqer_pergroup/artifact.ptz"


def default_artifact() -> Path:
    root = Path(os.environ.get("PGOLF_PR1855_FIXTURES", ROOT.parent / "shared" / "fixtures" / "pr1855"))
    return root / FIXTURE_ARTIFACT


def timed(fn: Callable[[], bytes]) -> tuple[bytes, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def per_group_brotli(quant, meta) -> bytes:
    payloads = pergroup_payloads(quant, meta)
    streams = [brotli.compress(b, quality=11) if b else b"" for b in payloads.groups]
    streams += [
        brotli.compress(payloads.remainder, quality=11, lgwin=24),
        brotli.compress(payloads.permutations, quality=11) if payloads.permutations else b"",
    ]
    return pack_streams(streams)


def one_stream(quant, meta) -> bytes:
    buffer = io.BytesIO()
    torch.save({"q": dict(quant), "m": dict(meta)}, buffer)
    return buffer.getvalue()


def measure(path: Path) -> str:
    data = path.read_bytes()
    (quant, meta), t_decode = timed(lambda: decode_pergroup(data, str(path)))
    settings = PergroupSettings()
    pgrp, t_pgrp = timed(lambda: encode_pergroup(quant, meta, settings))
    _, t_pgrp_dec = timed(lambda: decode_pergroup(pgrp, "re-encoded"))
    raw = one_stream(quant, meta)
    rows = [
        ("PGRP: lrzip per group + brotli remainder (record)", len(pgrp), t_pgrp, t_pgrp_dec),
    ]
    pgb, t_pgb = timed(lambda: per_group_brotli(quant, meta))
    rows.append(("same per-group payloads, brotli-11 instead of lrzip", len(pgb), t_pgb, float("nan")))
    singles = []
    for codec, label in (
        ("brotli", "one stream, byte shuffle + brotli-11"),
        ("lzma9", "one stream, byte shuffle + lzma-9"),
    ):
        blob, t_enc = timed(lambda: compress(raw, codec, shuffle_stride=2))
        _, t_dec = timed(lambda: decompress(blob, codec, shuffle_stride=2))
        rows.append((label, len(blob), t_enc, t_dec))
        singles.append(len(blob))
    same = "byte-identical to the input" if pgrp == data else f"differs from the input ({len(data):,} B)"
    lines = [
        f"**{path}** — {len(quant)} tensors, {len(raw):,} B uncompressed (`torch.save`); re-encoded PGRP {same}; "
        f"{lrzip_version(settings) or 'lrzip version unknown'}; times of one run each on a shared machine (±30 %).",
        "",
        "| container | bytes | encode s | decode s |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {label} | {size:,} | {enc:.2f} | {'—' if dec != dec else f'{dec:.2f}'} |" for label, size, enc, dec in rows
    ]
    lines += [
        "",
        f"ratio PGRP / best single stream = {len(pgrp) / min(singles):.4f} "
        f"(PGRP / per-group brotli = {len(pgrp) / len(pgb):.4f}); decode of the input {t_decode:.2f} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifacts", nargs="*", type=Path, help="PGRP artifacts (default: the PR #1855 quant fixture's)")
    args = p.parse_args(argv)
    paths = args.artifacts or [default_artifact()]
    for path in paths:
        if not path.is_file():
            raise SystemExit(
                f"container_compare: {path}: no such artifact (give a PGRP file, or set PGOLF_PR1855_FIXTURES)"
            )
    text = "\n\n".join(measure(path) for path in paths)
    print(text)
    return text


if __name__ == "__main__":
    main()
