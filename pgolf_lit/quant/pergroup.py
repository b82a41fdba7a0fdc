"""The PGRP per-group artifact of PR #1855 (``COMPRESSOR=pergroup``): the writer and the record's dequantization;
the bounded reader is ``pergroup_read.py`` (reading never imports the writer), whose names this module re-exports.

Layout (PR #1855 train_gpt.py `_pack_streams`), little-endian::

    b"PGRP" | u32 n_streams (9) | n_streams × u32 stream length | the streams, back to back

Streams 0–6, one per group of ``GROUP_ORDER``: the int8 codes ``NAME.q`` of that group (block tensors
``blocks.<i>.<group>`` in layer order 0..n−1, the global one as ``_<name>``), each 2-D tensor with its rows
reordered by ``similarity_sort_l1`` when the group is in ``SIMILARITY_SORTED_GROUPS``, then transposed
(column-major bytes), concatenated and compressed with the ``lrzip`` executable (``-z -L 9``: the ZPAQ back end).
An absent group is an empty stream. Stream 7: brotli (quality 11, lgwin 24) of ``torch.save({"r": remainder,
"m": meta, "s": shape_manifest})`` — every other tensor (fp16 scales and passthrough, gate ``.gq``/``.gs``, LQER
factors), the meta strings, and each present group's list of original shapes. Stream 8: brotli (quality 11) of
the row orders as uint16, in group then layer order (empty when there are none).

The meta is the record's: one string per tensor, in state-dict order — ``"passthrough (float16)"``,
``"gate_int8_row"``, ``"gptq (int6)"``, ``"gptq (int6)+lqer_asym"``, ``"gptq (int6)+lqer"``, and from PR #1945
``"gptq (int7)+awqgrpint8[+lqer_asym]"`` (AWQ-lite's ``.awqg_*`` tensors go to the remainder) (``gptq_meta``
builds them, ``parse_meta`` reads them).

Writing is byte-exact against the record (same torch, brotli and lrzip builds): the remainder is pickled with the
string sharing the script has (a passthrough tensor's name is the same object in the remainder and the meta; the
passthrough and gate meta strings are one object each; every ``gptq …`` string is its own object), because pickle
writes a repeated object as a back-reference. The lrzip output depends on lrzip's thread count for groups of
megabytes (``-p 1`` differs from the default on a 12 MB stream; equal on the 74 KB groups of the fixture), so
``PergroupSettings.lrzip_threads`` defaults to lrzip's own choice, as the record ran it.

Reading never runs pickled code (``torch.load(weights_only=True)``) and is bounded: every stream's decompressed
size is known before it is decompressed (the remainder's is capped; the groups' and the permutations' follow
from the shape manifest and must match lrzip's header), lrzip runs on private temp files with a file-size and
address-space limit, and anything malformed raises ``PergroupError`` (an ``ArtifactError``) naming the source.
Corruption cannot pass silently where it would change a tensor: lrzip checks its MD5, the remainder's zip
records are checked against their CRC-32 (brotli has none, and ``torch.load`` does not check them), the row
orders must be permutations. lrzip always runs with ``LRZIP=NOCONFIG``: no lrzip.conf changes its output (its
sandbox: ``lrzip.py`` compresses, ``pergroup_read.py`` decompresses).

Why the executable: PyPI's ``lrzip`` is an unrelated 2017 binding and PyPI ``zpaq`` writes another format, so
neither reads or writes the record's streams; the record itself shells out to ``lrzip``.
"""

from __future__ import annotations

import io
import sys
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import brotli
import numpy as np
import torch
from torch import Tensor

from pgolf_lit.quant.brotli_bounded import brotli_decompress_bounded  # noqa: F401  (re-exported)
from pgolf_lit.quant.awq import KEY_SUFFIXES as AWQ_KEY_SUFFIXES
from pgolf_lit.quant.awq import AwqGroups
from pgolf_lit.quant.awq import meta_suffix as awq_meta_suffix
from pgolf_lit.quant.gate import dequantize_gate_rows
from pgolf_lit.quant.lqer import KEY_SUFFIXES, META_SUFFIX, LqerFactors, lqer_dequant
from pgolf_lit.quant.pergroup_read import (  # noqa: F401  (the reader's names, re-exported)
    _U16,
    _U32,
    CODES_SUFFIX,
    GATE_META,
    GROUP_ORDER,
    INSTALL_HINT,
    LRZIP_HEADER_BYTES,
    LRZIP_MAGIC,
    N_STREAMS,
    PACK_MAGIC,
    PASSTHROUGH_META,
    PERMUTATION_STREAM,
    REMAINDER_STREAM,
    SCALE_SUFFIX,
    SIMILARITY_SORTED_GROUPS,
    LrzipNotFoundError,
    MetaEntry,
    PergroupError,
    PergroupSettings,
    _map,
    decode_pergroup,
    group_tensor_names,
    is_pergroup,
    lrzip_decompress,
    lrzip_executable,
    lrzip_expanded_size,
    parse_meta,
    quantized_from_pergroup,
    read_pergroup,
    meta_entry_keys,
    unpack_streams,
    validate_quant,
)
from pgolf_lit.quant.lrzip import lrzip_compress
from pgolf_lit.quant.quantized import float_dtype


# ---------------------------------------------------------------------------------------------------------
# Meta strings
# ---------------------------------------------------------------------------------------------------------


def gptq_meta(bits: int, lqer: Optional[str] = None, awq_bits: Optional[int] = None) -> str:
    """The record's meta string of a GPTQ tensor: ``"gptq (int6)"``, plus ``"+awqgrpint8"`` (PR #1945's AWQ-lite
    groups), plus ``"+lqer_asym"`` / ``"+lqer"``."""
    return f"gptq (int{bits})" + (awq_meta_suffix(awq_bits) if awq_bits else "") + (META_SUFFIX[lqer] if lqer else "")


def dequantize_mixed(
    quant: Mapping[str, Tensor],
    meta: Mapping[str, str],
    template_dtypes: Optional[Mapping[str, Union[torch.dtype, str]]] = None,
) -> dict[str, Tensor]:
    """The float state dict, in meta order (PR #1855 train_gpt.py `dequantize_mixed`).

    ``template_dtypes`` are the dtypes of the model the weights go into (the record's eval model: bf16
    ``tok_emb``, fp32 elsewhere); a name it lacks gets float32. Passthrough fp16 goes to an fp32/bf16 target,
    other passthrough tensors stay as stored.
    """
    given = template_dtypes or {}
    dtypes = {k: v if isinstance(v, torch.dtype) else float_dtype(v) for k, v in given.items()}
    out: dict[str, Tensor] = {}
    for name, info in meta.items():
        entry = parse_meta(info)
        target = dtypes.get(name, torch.float32)
        if entry.kind == "passthrough":
            t = quant[name]
            out[name] = t.to(target) if t.dtype == torch.float16 and target in (torch.float32, torch.bfloat16) else t
        elif entry.kind == "gate":
            out[name] = dequantize_gate_rows(quant[name + CODES_SUFFIX], quant[name + SCALE_SUFFIX], target)
        else:
            factors = LqerFactors.from_tensors(quant, name, entry.lqer) if entry.lqer else None
            awq = AwqGroups.from_tensors(quant, name) if entry.awq_bits else None
            out[name] = lqer_dequant(quant[name + ".q"], quant[name + ".scale"], factors, target, awq)
    return out


# ---------------------------------------------------------------------------------------------------------
# Row order
# ---------------------------------------------------------------------------------------------------------


def similarity_sort_l1(matrix: Union[np.ndarray, Tensor]) -> np.ndarray:
    """Greedy nearest-neighbour row chain from row 0 under L1 distance, ties to the lowest index; uint16 order
    (PR #1855 train_gpt.py `_similarity_sort_l1`).

    The script's order, about twice as fast as its loop (2048×512: 0.7 s against 1.3 s here): the distances of
    int8 codes are exact in int16/int32, and a chosen row is removed by moving the last unused row into its slot
    (no copy of the unused rows per step); ties are broken on the original index, as the script's argmin over
    unused rows in index order does.
    """
    arr = matrix.detach().cpu().numpy() if isinstance(matrix, Tensor) else np.asarray(matrix)
    if arr.ndim != 2:
        raise ValueError(f"the similarity sort takes a 2-D matrix, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer) or arr.dtype.itemsize > 1:
        raise ValueError(f"the similarity sort takes int8/uint8 codes, got {arr.dtype}")
    n = arr.shape[0]
    if n > 1 << 16:
        raise ValueError(f"the similarity sort stores rows as uint16: {n} rows is more than 65536")
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    rows = arr.astype(np.int16)  # a copy: rows are swapped in place below
    index = np.arange(n)
    order = [0]
    cur = rows[0].copy()
    left = n - 1
    rows[0], index[0] = rows[left], index[left]
    while left:
        dist = np.abs(rows[:left] - cur).sum(axis=1, dtype=np.int32)
        ties = np.flatnonzero(dist == dist.min())
        slot = int(ties[np.argmin(index[ties])]) if len(ties) > 1 else int(ties[0])
        order.append(int(index[slot]))
        cur = rows[slot].copy()
        left -= 1
        rows[slot], index[slot] = rows[left], index[left]
    return np.array(order, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------------------
# Container and lrzip
# ---------------------------------------------------------------------------------------------------------


def pack_streams(streams: Sequence[bytes]) -> bytes:
    """``b"PGRP"`` + u32 count + u32 lengths + the streams (PR #1855 train_gpt.py `_pack_streams`)."""
    lengths = np.array([len(s) for s in streams], dtype=_U32)
    return PACK_MAGIC + np.array([len(streams)], dtype=_U32).tobytes() + lengths.tobytes() + b"".join(streams)


# ---------------------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------------------


def group_of(name: str) -> Optional[tuple[str, int]]:
    """``(group, layer)`` of an int8 codes name that goes to an lrzip group, None for the remainder
    (PR #1855 train_gpt.py `_serialize_pergroup` routing)."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isascii() and parts[1].isdigit():
        key = ".".join(parts[2:])
        return (key, int(parts[1])) if key in GROUP_ORDER else None
    return ("_" + name, 0) if "_" + name in GROUP_ORDER else None


def _fresh(s: str) -> str:
    """An equal string that is a new object (pickle then writes it in full, as the script's f-strings are)."""
    return s[:1] + s[1:] if len(s) > 1 else s


@dataclass
class PergroupPayloads:
    """The uncompressed contents of the PGRP streams: what ``encode_pergroup`` hands to lrzip and brotli.

    groups: one entry per ``GROUP_ORDER`` group, the sorted/transposed codes, None when the group is absent.
    remainder: the ``torch.save`` bytes of ``{"r", "m", "s"}``. permutations: the uint16 row orders.
    """

    groups: list[Optional[bytes]]
    remainder: bytes
    permutations: bytes


def pergroup_payloads(
    quant: Mapping[str, Tensor], meta: Mapping[str, str], target: str = "PGRP artifact"
) -> PergroupPayloads:
    """Route, row-sort, transpose and pickle, without compressing (PR #1855 train_gpt.py `_serialize_pergroup`).

    ``quant`` is the flat quantized dict (``NAME.q``, ``NAME.scale``, passthrough ``NAME``, gate ``NAME.gq`` /
    ``NAME.gs``, LQER ``NAME.lqA_a`` …), ``meta`` the record's meta strings in state-dict order; ``target``
    names the output in errors. Block codes of a group must be exactly layers 0..n−1 (the reader names them so).
    """
    if sys.byteorder != "little":
        raise PergroupError(f"{target}: PGRP is written little-endian; this machine is big-endian")
    try:
        validate_quant(quant, meta)
    except ValueError as e:
        raise PergroupError(f"{target}: {e}") from None
    shared = {PASSTHROUGH_META: PASSTHROUGH_META, GATE_META: GATE_META}
    meta_out = {name: shared.get(info) or _fresh(info) for name, info in meta.items()}
    meta_key = {name: name for name in meta_out}
    groups: dict[str, list[tuple[int, str, Tensor]]] = {}
    remainder: dict[str, Tensor] = {}
    for name in sorted(quant):
        t = quant[name].detach().cpu()
        routed = group_of(name) if t.dtype == torch.int8 else None
        if routed is None:
            remainder[meta_key.get(name, name)] = t.clone(memory_format=torch.contiguous_format)
        else:
            groups.setdefault(routed[0], []).append((routed[1], name, t))

    blobs: list[Optional[bytes]] = [None] * len(GROUP_ORDER)
    manifest: dict[str, list[tuple[int, ...]]] = {}
    permutations = []
    for i, group in enumerate(GROUP_ORDER):
        if group not in groups:
            continue
        members = sorted(groups[group], key=lambda m: m[0])
        names = [name for _, name, _ in members]
        if names != group_tensor_names(group, len(members)):
            raise PergroupError(
                f"{target}: group {group} holds {names}; PGRP needs exactly "
                f"{group_tensor_names(group, len(members))} (layers 0..n-1)"
            )
        parts, shapes = [], []
        for _, name, t in members:
            arr = t.contiguous().numpy()
            if arr.size == 0:
                raise PergroupError(f"{target}: {name} is empty; a PGRP group cannot hold an empty tensor")
            if arr.ndim == 2:
                if group in SIMILARITY_SORTED_GROUPS:
                    try:
                        order = similarity_sort_l1(arr)
                    except ValueError as e:
                        raise PergroupError(f"{target}: {name}: {e}") from None
                    permutations.append(order.astype(_U16).tobytes())
                    arr = arr[order]
                arr = np.ascontiguousarray(arr.T)
            parts.append(arr.tobytes())
            shapes.append(tuple(int(d) for d in t.shape))
        manifest[group] = shapes
        blobs[i] = b"".join(parts)
    buffer = io.BytesIO()
    torch.save({"r": remainder, "m": meta_out, "s": manifest}, buffer)
    return PergroupPayloads(blobs, buffer.getvalue(), b"".join(permutations))


def encode_pergroup(
    quant: Mapping[str, Tensor],
    meta: Mapping[str, str],
    settings: PergroupSettings = PergroupSettings(),
    target: str = "PGRP artifact",
) -> bytes:
    """The PGRP artifact's bytes: ``pergroup_payloads``, then lrzip per group and brotli for the remainder and
    the permutations (PR #1855 train_gpt.py `_serialize_pergroup`)."""
    lrzip_executable(settings)  # fail before the row sorts, not after
    payloads = pergroup_payloads(quant, meta, target)
    jobs = [(i, blob) for i, blob in enumerate(payloads.groups) if blob is not None]
    streams = [b""] * N_STREAMS
    for (i, _), stream in zip(jobs, _map(lambda job: lrzip_compress(job[1], settings), jobs, settings.workers)):
        streams[i] = stream
    streams[REMAINDER_STREAM] = brotli.compress(
        payloads.remainder, quality=settings.remainder_quality, lgwin=settings.remainder_lgwin
    )
    perms = payloads.permutations
    streams[PERMUTATION_STREAM] = brotli.compress(perms, quality=settings.permutation_quality) if perms else b""
    return pack_streams(streams)


# ---------------------------------------------------------------------------------------------------------
# pgolf's quantized dict <-> the record's
# ---------------------------------------------------------------------------------------------------------


def pergroup_from_quantized(quant: Mapping[str, Tensor], meta: Mapping[str, Mapping[str, Any]], target: str):
    """The record's (quant, meta strings) of pgolf's quantized dict (``quantized.py``): kept floats as fp16
    passthrough, ``row_amax`` int8 entries as gates (``.gq``/``.gs``), other int entries as GPTQ with their LQER
    factors. What the record's container cannot hold (fp32 kept floats, raw tensors) is one clear error."""
    out: dict[str, Tensor] = {}
    strings: dict[str, str] = {}
    for name, info in meta.items():
        if info["kind"] == "float":
            if quant[name].dtype != torch.float16:
                raise PergroupError(
                    f"{target}: {name} is kept as {quant[name].dtype}; the per-group container "
                    "stores kept floats as fp16 (set small_controls_fp32 false)"
                )
            out[name], strings[name] = quant[name], PASSTHROUGH_META
        elif info["kind"] == "int" and info.get("scale") == "row_amax":
            if info["bits"] != 8:
                raise PergroupError(f"{target}: {name}: the record's gate quantization is int8, got int{info['bits']}")
            out[name + CODES_SUFFIX], out[name + SCALE_SUFFIX] = quant[name + ".q"], quant[name + ".scale"]
            strings[name] = GATE_META
        elif info["kind"] == "int":
            awq = AWQ_KEY_SUFFIXES if info.get("awq") else ()
            for key in (".q", ".scale", *awq, *(KEY_SUFFIXES[info["lqer"]] if info.get("lqer") else ())):
                out[name + key] = quant[name + key]
            strings[name] = gptq_meta(int(info["bits"]), info.get("lqer"), info.get("awq"))
        else:
            raise PergroupError(f"{target}: {name} is a non-float tensor; the per-group container holds none")
    return out, strings
