"""Reading PR #1855's PGRP per-group artifact (``COMPRESSOR=pergroup``): the bounded reader; the writer is
``pergroup.py``, which describes the layout and re-exports these names.

Reading never runs pickled code (``torch.load(weights_only=True)``) and is bounded: every stream's decompressed
size is known before it is decompressed (the remainder's is capped; the groups' and the permutations' follow
from the shape manifest and must match lrzip's header), lrzip runs on private temp files with a file-size and
address-space limit, and anything malformed raises ``PergroupError`` (an ``ArtifactError``) naming the source.
Corruption cannot pass silently where it would change a tensor: lrzip checks its MD5, the remainder's zip
records are checked against their CRC-32 (brotli has none, and ``torch.load`` does not check them), the row
orders must be permutations. lrzip always runs with ``LRZIP=NOCONFIG``: no lrzip.conf changes its output.
"""

from __future__ import annotations

import io
import math
import os
import re
import resource
import shutil
import subprocess
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.errors import ArtifactError, PgolfError
from pgolf_lit.eval.context import Weights
from pgolf_lit.quant.brotli_bounded import brotli_decompress_bounded
from pgolf_lit.quant.awq_read import KEY_SUFFIXES as AWQ_KEY_SUFFIXES
from pgolf_lit.quant.awq_read import AwqGroups
from pgolf_lit.quant.lqer_read import ASYM, KEY_SUFFIXES, META_SUFFIX, LqerFactors
from pgolf_lit.quant.quantized import dequantize
from pgolf_lit.quant.reader import Container, LoadedArtifact, record_config_required, record_dtypes, register_container

PACK_MAGIC = b"PGRP"

GROUP_ORDER = (
    "_tok_emb.weight.q",
    "attn.c_k.weight.q",
    "attn.c_q.weight.q",
    "attn.c_v.weight.q",
    "attn.proj.weight.q",
    "mlp.fc.weight.q",
    "mlp.proj.weight.q",
)

SIMILARITY_SORTED_GROUPS = frozenset({"_tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q"})

N_STREAMS = len(GROUP_ORDER) + 2

REMAINDER_STREAM = len(GROUP_ORDER)

PERMUTATION_STREAM = len(GROUP_ORDER) + 1

PASSTHROUGH_META = "passthrough (float16)"
# QuantGate tensors (``gate.py``): int8 codes NAME.gq, fp16 row scales NAME.gs, meta "gate_int8_row".
GATE_META = "gate_int8_row"
CODES_SUFFIX = ".gq"
SCALE_SUFFIX = ".gs"

LRZIP_MAGIC = b"LRZI"

LRZIP_HEADER_BYTES = 24  # lrzip 0.6 magic header: b"LRZI", major 0, minor 6, u64 LE expanded size, ...

INSTALL_HINT = "install it with `apt-get install lrzip` (Debian/Ubuntu; lrzip 0.651 writes the record's bytes)"

PathLike = Union[str, Path]

_U32 = np.dtype("<u4")

_U16 = np.dtype("<u2")

_META_RE = re.compile(r"gptq \(int([2-8])\)(?:\+awqgrpint([2-8]))?(\+lqer_asym|\+lqer)?")

_LQER_BY_SUFFIX = {v: k for k, v in META_SUFFIX.items()}


class PergroupError(ArtifactError):
    """A PGRP artifact that cannot be written or read: truncated, corrupted, oversized, inconsistent."""


class LrzipNotFoundError(PgolfError, RuntimeError):
    """The ``lrzip`` executable PGRP artifacts need is not installed."""


@dataclass(frozen=True)
class PergroupSettings:
    """Knobs of the PGRP writer and reader (the defaults write the record's bytes).

    lrzip: the lrzip executable, a name looked up on PATH or a path.
    lrzip_level: ``-L`` of the ZPAQ back end (record: 9).
    lrzip_threads: ``-p`` when writing; None lets lrzip choose (its CPU count), as the record did.
    remainder_quality, remainder_lgwin: brotli settings of the remainder stream (record: 11, 24).
    permutation_quality: brotli quality of the permutation stream (record: 11, default window).
    workers: lrzip processes run at once (the record decompresses its 7 groups in a 7-thread pool).
    timeout_s: wall-clock limit of one lrzip run.
    max_raw_bytes: the most decompressed bytes an artifact may claim over all its streams (reading).
    lrzip_memory_bytes: address-space limit of each decompressing lrzip process; None: no limit.
    """

    lrzip: str = "lrzip"
    lrzip_level: int = 9
    lrzip_threads: Optional[int] = None
    remainder_quality: int = 11
    remainder_lgwin: int = 24
    permutation_quality: int = 11
    workers: int = 1
    timeout_s: float = 600.0
    max_raw_bytes: int = 1 << 30
    lrzip_memory_bytes: Optional[int] = 8 << 30


@dataclass(frozen=True)
class MetaEntry:
    """One parsed meta string: kind ``"passthrough"`` | ``"gate"`` | ``"gptq"``, GPTQ bits, LQER kind or None,
    AWQ-lite's protected-group bits or None (PR #1945's ``+awqgrpint8``)."""

    kind: str
    bits: Optional[int] = None
    lqer: Optional[str] = None
    awq_bits: Optional[int] = None


def parse_meta(info: Any) -> MetaEntry:
    """Parse one meta string (ValueError for anything the record does not write)."""
    if info == PASSTHROUGH_META:
        return MetaEntry("passthrough")
    if info == GATE_META:
        return MetaEntry("gate")
    m = _META_RE.fullmatch(info) if isinstance(info, str) else None
    if m is None:
        raise ValueError(f"unknown meta {info!r}")
    lqer = _LQER_BY_SUFFIX.get(m.group(3)) if m.group(3) else None
    return MetaEntry("gptq", int(m.group(1)), lqer, int(m.group(2)) if m.group(2) else None)


def meta_entry_keys(name: str, entry: MetaEntry) -> tuple[str, ...]:
    """The quantized-dict keys one PGRP meta entry owns (quantized.tensor_keys: the same for the native meta)."""
    if entry.kind == "passthrough":
        return (name,)
    if entry.kind == "gate":
        return (name + CODES_SUFFIX, name + SCALE_SUFFIX)
    keys = (name + ".q", name + ".scale") + (tuple(name + s for s in AWQ_KEY_SUFFIXES) if entry.awq_bits else ())
    return keys + tuple(name + s for s in KEY_SUFFIXES[entry.lqer]) if entry.lqer else keys


def validate_quant(quant: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    """Raise ValueError unless ``quant`` holds exactly the tensors ``meta`` describes, with consistent shapes."""
    if not isinstance(meta, Mapping):
        raise ValueError("meta is not a mapping")
    expected: set[str] = set()
    for name, info in meta.items():
        if not isinstance(name, str):
            raise ValueError(f"meta key {name!r} is not a string")
        entry = parse_meta(info)
        keys = meta_entry_keys(name, entry)
        missing = [k for k in keys if not isinstance(quant.get(k), Tensor)]
        if missing:
            raise ValueError(f"tensor(s) {missing} of {name!r} ({info}) are missing")
        expected.update(keys)
        if entry.kind == "gate":
            q, s = quant[keys[0]], quant[keys[1]]
            _expect(q.dtype == torch.int8 and q.ndim == 2, name, f"gate codes must be 2-D int8, got {_desc(q)}")
            fits = s.is_floating_point() and s.shape == q.shape[:1]
            _expect(fits, name, f"gate scales {_desc(s)} do not fit {_desc(q)}")
        elif entry.kind == "gptq":
            q, s = quant[keys[0]], quant[keys[1]]
            _expect(q.dtype == torch.int8 and q.ndim >= 1, name, f"codes must be int8, got {_desc(q)}")
            per_row = s.ndim == 1 and s.shape[0] == q.shape[0]
            fits = s.is_floating_point() and (per_row or s.ndim == 0)
            _expect(fits, name, f"scale {_desc(s)} does not fit {_desc(q)}")
            if entry.awq_bits:
                _check_awq(name, q, AwqGroups.from_tensors(quant, name))
            if entry.lqer:
                _check_lqer(name, q, LqerFactors.from_tensors(quant, name, entry.lqer))
    extra = sorted(set(quant) - expected)
    if extra:
        raise ValueError(f"tensor(s) {extra[:3]} are not described by the meta")


def _check_lqer(name: str, q: Tensor, f: LqerFactors) -> None:
    _expect(q.ndim == 2, name, "LQER needs 2-D codes")
    rank = f.qA.shape[1] if f.qA.ndim == 2 else -1
    ok = (
        f.qA.dtype == f.qB.dtype == torch.int8
        and f.qA.ndim == f.qB.ndim == 2
        and f.qA.shape[0] == q.shape[0]
        and f.qB.shape == (rank, q.shape[1])
        and f.sA.is_floating_point()
        and f.sB.is_floating_point()
    )
    if f.kind == ASYM:
        ok = ok and f.sA.ndim == 0 and f.sB.ndim == 1 and f.sB.numel() > 0 and f.qB.numel() % f.sB.numel() == 0
    else:
        ok = ok and f.sA.shape == (q.shape[0],) and f.sB.shape == (rank,)
    _expect(ok, name, f"LQER factors {_desc(f.qA)}, {_desc(f.sA)}, {_desc(f.qB)}, {_desc(f.sB)} do not fit {_desc(q)}")


def _check_awq(name: str, q: Tensor, g: AwqGroups) -> None:
    size = int(g.size.item()) if g.size.numel() == 1 and not g.size.is_floating_point() else -1
    cols = q.shape[1] if q.ndim == 2 else 0
    ok = (
        q.ndim == 2
        and g.starts.ndim == 1
        and not g.starts.is_floating_point()
        and g.size.ndim == 0
        and size > 0
        and g.s_hi.is_floating_point()
        and g.s_hi.shape == (q.shape[0],)
        and all(0 <= s and s + size <= cols for s in g.starts.tolist())
    )
    _expect(ok, name, f"AWQ groups {_desc(g.starts)}, {_desc(g.s_hi)}, {_desc(g.size)} do not fit {_desc(q)}")


def _expect(cond: bool, name: str, what: str) -> None:
    if not cond:
        raise ValueError(f"{name!r}: {what}")


def _desc(t: Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def unpack_streams(data: bytes, source: str = "PGRP artifact") -> list[bytes]:
    """The streams of a PGRP container, checking magic, count and that the lengths cover the bytes exactly."""
    if len(data) < 8 or data[:4] != PACK_MAGIC:
        what = "shorter than the 8-byte header" if len(data) < 8 else f"bad magic {bytes(data[:4])!r}"
        raise PergroupError(f"{source}: not a PGRP artifact ({what}; expected {PACK_MAGIC!r} + stream count)")
    n = int(np.frombuffer(data, dtype=_U32, count=1, offset=4)[0])
    if n != N_STREAMS:
        raise PergroupError(f"{source}: PGRP header declares {n} streams, expected {N_STREAMS}")
    start = 8 + 4 * n
    if len(data) < start:
        raise PergroupError(f"{source}: truncated: {len(data)} bytes, shorter than the {start}-byte stream table")
    lengths = np.frombuffer(data, dtype=_U32, count=n, offset=8).astype(np.int64)
    total = start + int(lengths.sum())
    if total != len(data):
        what = "truncated" if len(data) < total else "trailing bytes"
        raise PergroupError(f"{source}: {what}: {len(data)} bytes, the stream table says {total}")
    offsets = start + np.concatenate([[0], np.cumsum(lengths)])
    return [bytes(data[offsets[i] : offsets[i + 1]]) for i in range(n)]


def lrzip_executable(settings: "PergroupSettings" = PergroupSettings()) -> str:
    """The lrzip executable's path; ``LrzipNotFoundError`` (one line, with the install command) when absent."""
    exe = shutil.which(settings.lrzip)
    if exe is None:
        raise LrzipNotFoundError(
            f"lrzip: the {settings.lrzip!r} executable is not on PATH and PGRP artifacts need it; " + INSTALL_HINT
        )
    return exe


def lrzip_env(workdir: Optional[str]) -> dict[str, str]:
    env = dict(os.environ, LRZIP="NOCONFIG", MALLOC_ARENA_MAX="2")  # no user lrzip.conf changes the output
    if workdir is not None:
        env.update(TMPDIR=workdir, TMP=workdir)
    return env


def lrzip_expanded_size(stream: bytes) -> int:
    """The decompressed size an lrzip 0.6 stream's header declares (ValueError when it is no such header)."""
    if len(stream) < LRZIP_HEADER_BYTES or stream[:4] != LRZIP_MAGIC:
        raise ValueError("not an lrzip stream (no LRZI header)")
    if (stream[4], stream[5]) != (0, 6):
        raise ValueError(f"lrzip format {stream[4]}.{stream[5]}, expected 0.6")
    return int.from_bytes(stream[6:14], "little")


def lrzip_decompress(
    stream: bytes,
    expected_size: int,
    settings: PergroupSettings = PergroupSettings(),
    workdir: Optional[str] = None,
    what: str = "lrzip stream",
) -> bytes:
    """``lrzip -d -f -o out in`` (PR #1855 train_gpt.py `_lrzip_decompress`), bounded: the header must declare
    ``expected_size``, the process may write no file larger than that (RLIMIT_FSIZE), its memory is capped
    (RLIMIT_AS, ``settings.lrzip_memory_bytes``), and the output must have exactly that size.
    Raises ValueError describing the failure (the caller names the file)."""
    declared = lrzip_expanded_size(stream)
    if declared != expected_size:
        raise ValueError(f"{what}: lrzip header declares {declared} bytes, the shape manifest {expected_size}")
    exe = lrzip_executable(settings)
    limits = [(resource.RLIMIT_FSIZE, max(expected_size, 1)), (resource.RLIMIT_CORE, 0)]
    if settings.lrzip_memory_bytes:
        limits.append((resource.RLIMIT_AS, settings.lrzip_memory_bytes))

    def set_limits() -> None:  # runs in the child between fork and exec: setrlimit only
        for which, value in limits:
            resource.setrlimit(which, (value, value))

    with tempfile.TemporaryDirectory(prefix="pgrp_dec_", dir=workdir) as tmp:
        src, dst = os.path.join(tmp, "group.lrz"), os.path.join(tmp, "group.bin")
        with open(src, "wb") as f:
            f.write(stream)
        try:
            run = subprocess.run(
                [exe, "-d", "-f", "-o", dst, src],
                capture_output=True,
                timeout=settings.timeout_s,
                env=lrzip_env(tmp),
                preexec_fn=set_limits,
            )
        except subprocess.TimeoutExpired:
            raise ValueError(f"{what}: lrzip took longer than {settings.timeout_s} s") from None
        if run.returncode != 0:
            why = "its output exceeded the declared size" if run.returncode == -25 else last_line(run)
            raise ValueError(f"{what}: lrzip failed (exit {run.returncode}): {why}")
        size = os.path.getsize(dst) if os.path.isfile(dst) else -1
        if size != expected_size:
            raise ValueError(f"{what}: lrzip wrote {size} bytes, expected {expected_size}")
        with open(dst, "rb") as f:
            return f.read()


def last_line(run: subprocess.CompletedProcess) -> str:
    text = (run.stderr or b"").decode("utf-8", "replace").strip() or (run.stdout or b"").decode("utf-8", "replace")
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def group_tensor_names(group: str, count: int) -> list[str]:
    """The names the reader gives a group's tensors: ``blocks.0..count-1.<group>`` or the global name."""
    return [group[1:]] if group.startswith("_") else [f"blocks.{i}.{group}" for i in range(count)]


def is_pergroup(data: bytes) -> bool:
    return data[:4] == PACK_MAGIC and data[4:8] != b"\2\0\0\0"  # version 2 there: PGRP v2 (pergroup_v2_read.py)


def decode_pergroup(
    data: bytes, source: str = "PGRP artifact", settings: PergroupSettings = PergroupSettings()
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The quantized dict and meta strings of a PGRP artifact (PR #1855 train_gpt.py `_deserialize_pergroup`).

    ``source`` names the file in errors. The tensors come back exactly as written (codes in their original row
    order); the dict holds the remainder's tensors (in their stored order) then the groups' codes.
    """
    streams = unpack_streams(data, source)
    budget = settings.max_raw_bytes
    try:
        raw = brotli_decompress_bounded(streams[REMAINDER_STREAM], budget, "the remainder stream (7)")
        budget -= len(raw)
        _check_zip_records(raw)
        try:
            obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        except Exception as e:  # untrusted bytes: any failure is a bad artifact
            raise ValueError(f"the remainder stream does not load safely ({type(e).__name__}: {e})") from None
        remainder, meta, manifest = _check_remainder(obj)
        _check_names(remainder, meta, manifest)  # before any lrzip run: a wrong meta fails in milliseconds
        sizes = {g: sum(math.prod(s) for s in shapes) for g, shapes in manifest.items()}
        sorted_groups = [g for g in GROUP_ORDER if g in SIMILARITY_SORTED_GROUPS]
        perm_rows = [s[0] for g in sorted_groups for s in manifest.get(g, []) if len(s) == 2]
        claimed = sum(sizes.values()) + 2 * sum(perm_rows)
        if claimed > budget:
            raise ValueError(f"the shape manifest claims {claimed} bytes of codes, more than the {budget} allowed")
        for i, group in enumerate(GROUP_ORDER):
            if bool(streams[i]) != (group in manifest):
                raise ValueError(
                    f"stream {i} ({group}) is {'present' if streams[i] else 'empty'}, the manifest "
                    f"{'lists' if group in manifest else 'lacks'} that group"
                )
        perm_stream = streams[PERMUTATION_STREAM]
        if bool(perm_stream) != bool(perm_rows):
            raise ValueError(
                f"the permutation stream (8) is {'present' if perm_stream else 'empty'} but "
                f"{2 * sum(perm_rows)} bytes of row orders are expected"
            )
        perms = b""
        if perm_stream:
            perms = brotli_decompress_bounded(perm_stream, 2 * sum(perm_rows), "the permutation stream (8)")
        if len(perms) != 2 * sum(perm_rows):
            raise ValueError(f"the permutation stream holds {len(perms)} bytes, expected {2 * sum(perm_rows)}")
        orders = np.frombuffer(perms, dtype=_U16).astype(np.int64)
        for rows, start in zip(perm_rows, np.cumsum([0] + perm_rows[:-1])):
            if not np.array_equal(np.sort(orders[start : start + rows]), np.arange(rows)):
                raise ValueError(
                    f"the permutation stream's order at row offset {start} is not a permutation of {rows} rows"
                )

        jobs = [(i, g) for i, g in enumerate(GROUP_ORDER) if g in manifest]
        raws = _map(
            lambda job: lrzip_decompress(streams[job[0]], sizes[job[1]], settings, what=f"stream {job[0]} ({job[1]})"),
            jobs,
            settings.workers,
        )
        quant = dict(remainder)
        perm_offset = 0
        for (i, group), blob in zip(jobs, raws):
            codes = np.frombuffer(blob, dtype=np.int8)
            offset = 0
            for name, shape in zip(group_tensor_names(group, len(manifest[group])), manifest[group]):
                n = math.prod(shape)
                chunk = codes[offset : offset + n].copy()
                offset += n
                if len(shape) == 2:
                    rows, cols = shape
                    chunk = chunk.reshape(cols, rows).T
                    if group in SIMILARITY_SORTED_GROUPS:
                        perm = orders[perm_offset : perm_offset + rows]
                        perm_offset += rows
                        inverse = np.empty_like(perm)
                        inverse[perm] = np.arange(rows)
                        chunk = chunk[inverse]
                quant[name] = torch.from_numpy(np.ascontiguousarray(chunk).reshape(shape))
        validate_quant(quant, meta)
    except PgolfError:
        raise
    except ValueError as e:
        raise PergroupError(f"{source}: {e}") from None
    except Exception as e:  # any other failure on untrusted bytes is a bad artifact, never a crash trace
        raise PergroupError(f"{source}: malformed PGRP artifact ({type(e).__name__}: {e})") from None
    return quant, meta


def _map(fn, items: list, workers: int) -> list:
    """``fn`` over ``items``, in a thread pool when ``workers`` > 1 (lrzip runs release the GIL)."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _check_names(remainder: Mapping[str, Tensor], meta: Mapping[str, str], manifest: Mapping[str, list]) -> None:
    """The remainder plus the names the groups will get are exactly the tensors the meta describes."""
    grouped = [n for g in GROUP_ORDER if g in manifest for n in group_tensor_names(g, len(manifest[g]))]
    clash = sorted(set(grouped) & set(remainder))
    if clash:
        raise ValueError(f"{clash[:3]} are both in a group and in the remainder")
    expected = {k for name, info in meta.items() for k in meta_entry_keys(name, parse_meta(info))}
    present = set(remainder) | set(grouped)
    if expected != present:
        missing, extra = sorted(expected - present), sorted(present - expected)
        raise ValueError(
            f"tensor(s) {missing[:3]} are missing"
            if missing
            else f"tensor(s) {extra[:3]} are not described by the meta"
        )


def _check_zip_records(raw: bytes) -> None:
    """Check the CRC-32 of every record of the remainder's ``torch.save`` zip: brotli has no checksum and
    ``torch.load`` does not verify the records', so a flipped bit would otherwise load as a different value."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            infos = archive.infolist()
            for info in infos:
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise ValueError(f"record {info.filename!r} is not stored uncompressed, as torch.save writes it")
            bad = archive.testzip()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError) as e:
        raise ValueError(f"the remainder stream is not a torch.save archive ({e})") from None
    if bad is not None:
        raise ValueError(f"the remainder stream is corrupted (CRC mismatch in record {bad!r})")


def _check_remainder(obj: Any) -> tuple[dict[str, Tensor], dict[str, str], dict[str, list[tuple[int, ...]]]]:
    if not isinstance(obj, dict) or set(obj) != {"r", "m", "s"}:
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"the remainder holds {keys}, expected a dict of 'r', 'm', 's'")
    remainder, meta, manifest = obj["r"], obj["m"], obj["s"]
    if not isinstance(remainder, dict) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in remainder.items()
    ):
        raise ValueError("the remainder's 'r' is not a dict of named tensors")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("the remainder's 'm' is not a dict of meta strings")
    if not isinstance(manifest, dict):
        raise ValueError("the remainder's 's' (shape manifest) is not a dict")
    for group, shapes in manifest.items():
        if group not in GROUP_ORDER:
            raise ValueError(f"the shape manifest names an unknown group {group!r}")
        ok = (
            isinstance(shapes, list)
            and shapes
            and all(isinstance(s, tuple) and s and all(isinstance(d, int) and d > 0 for d in s) for s in shapes)
        )
        if not ok:
            raise ValueError(f"the shape manifest of {group} is not a non-empty list of positive shapes: {shapes!r}")
        if not group.startswith("_") or len(shapes) == 1:
            continue
        raise ValueError(f"the global group {group} lists {len(shapes)} shapes, expected 1")
    return remainder, meta, manifest


def read_pergroup(
    path: PathLike, settings: PergroupSettings = PergroupSettings()
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``decode_pergroup`` of a file."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PergroupError(f"{path}: cannot read the artifact ({e.strerror or e})") from None
    return decode_pergroup(data, str(path), settings)


def quantized_from_pergroup(
    quant: Mapping[str, Tensor], meta: Mapping[str, str], dtypes: Mapping[str, torch.dtype]
) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]]]:
    """pgolf's quantized dict of a record PGRP artifact; ``dtypes`` are what each tensor dequantizes to (the record's
    model: bf16 ``tok_emb``, fp32 elsewhere)."""
    out: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    for name, info in meta.items():
        entry = parse_meta(info)
        dtype = str(dtypes.get(name, torch.float32)).removeprefix("torch.")
        if entry.kind == "passthrough":
            out[name] = quant[name]
            entries[name] = {
                "kind": "float",
                "dtype": dtype if quant[name].dtype == torch.float16 else str(quant[name].dtype).removeprefix("torch."),
            }
        elif entry.kind == "gate":
            out[name + ".q"], out[name + ".scale"] = quant[name + CODES_SUFFIX], quant[name + SCALE_SUFFIX]
            entries[name] = {"kind": "int", "bits": 8, "dtype": dtype, "method": "rtn", "scale": "row_amax"}
        else:
            for key in meta_entry_keys(name, entry):
                out[key] = quant[key]
            entries[name] = {"kind": "int", "bits": entry.bits, "dtype": dtype, "method": "gptq"}
            if entry.lqer:
                entries[name]["lqer"] = entry.lqer
            if entry.awq_bits:
                entries[name]["awq"] = entry.awq_bits
    return out, entries


def read_pergroup_artifact(data: bytes, source: str, config: Optional[GPTConfig] = None) -> LoadedArtifact:
    """A PGRP file's model: the record's ``config`` (the file holds none) and its dequantized weights."""
    config = record_config_required(config, source)
    quant, meta = quantized_from_pergroup(*decode_pergroup(data, source), record_dtypes(config))
    weights = Weights.artifact(quant, meta)
    return LoadedArtifact(config, dequantize(quant, meta), "pergroup", {"codec": "pergroup"}, weights)


PERGROUP = register_container(Container("pergroup", read_pergroup_artifact, sniff=is_pergroup))
