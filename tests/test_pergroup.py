"""The PGRP per-group artifact (pgolf_lit.quant.pergroup) against PR #1855's fixture, and on synthetic models.

Fixture cases: see ``pr1855_case.py``. Synthetic models are made here with other shapes (two layers, non-square
matrices, every group present), quantized by RTN, to check what the fixture cannot: round trip of any shape,
bounded decompression, and one-line errors for truncated, bit-flipped and oversized artifacts.
"""

from __future__ import annotations

import functools
import hashlib
import io
import shutil

import brotli
import numpy as np
import pytest
import torch

from pgolf_lit.errors import ArtifactError, PgolfError
from pgolf_lit.quant import pergroup as pg
from pgolf_lit.quant.gate import GATE_META
from pgolf_lit.quant.lqer import LqerSettings, lqer_apply
from pgolf_lit.quant.pergroup import (
    GROUP_ORDER,
    PASSTHROUGH_META,
    LrzipNotFoundError,
    PergroupError,
    PergroupSettings,
    decode_pergroup,
    dequantize_mixed,
    encode_pergroup,
    gptq_meta,
    pack_streams,
    pergroup_payloads,
    read_pergroup,
    similarity_sort_l1,
    unpack_streams,
)
from pgolf_lit.quant.rtn import quantize_sdclip
from pgolf_lit.quant.lrzip import lrzip_compress
from pr1855_case import Case, add_lqer, case, pergroup_cases, quantize_gate_rows, quantize_without_lqer, tie_settings
from test_quant_fixtures import assert_tie_mismatches

CASES = pergroup_cases()
needs_lrzip = pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip is not installed (apt-get install lrzip)")


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def assert_same(ours: dict, expected: dict) -> None:
    assert sorted(ours) == sorted(expected), "tensor keys differ"
    for key, ref in expected.items():
        got = ours[key]
        assert (got.dtype, tuple(got.shape)) == (ref.dtype, tuple(ref.shape)), key
        assert torch.equal(got, ref), f"{key}: {(got != ref).sum().item()} values differ"


def assert_artifact_bytes(c: Case, quant: dict, meta: dict, blob: bytes) -> None:
    """``blob`` is artifact.ptz: per stream first (clearer failures), then the whole file. With other library
    builds than the fixture's, the uncompressed payloads are compared instead (hparams.json's tolerance)."""
    payloads = pergroup_payloads(quant, meta)
    raw = payloads.groups + [payloads.remainder, payloads.permutations]
    differ = c.versions_match()
    for info, stream, payload in zip(c.art["streams"], unpack_streams(blob), raw):
        expected_raw = info.get("raw_payload_sha256")
        if info["index"] == pg.REMAINDER_STREAM and any(d.startswith("torch") for d in differ):
            continue  # torch.save's bytes are torch's
        assert (sha(payload) if payload else None) == expected_raw, f"stream {info['index']} ({info['group']}) payload"
        if not differ:
            assert (len(stream), sha(stream)) == (info["bytes"], info["sha256"]), f"stream {info['index']} bytes"
    if differ:
        pytest.skip("payloads compared; compressed bytes not comparable: " + "; ".join(differ))
    assert len(blob) == c.art["bytes"] and sha(blob) == c.art["sha256"]


# ---------------------------------------------------------------------------------------------------------
# The fixture
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def encoded_reference(path) -> bytes:
    c = case(path)
    return encode_pergroup(c.tensors("expected_quant.pt"), c.qmeta["meta"])


@needs_lrzip
@pytest.mark.parametrize("path", CASES)
def test_state_dict_to_artifact_bytes(path):
    """state_dict + hessians → GPTQ (per-group clips/bits) → gate int8 → LQER → PGRP bytes == artifact.ptz."""
    c = case(path)
    expected = c.tensors("expected_quant.pt")
    weights = c.flat_state_dict()
    hessians = c.tensors(c.hp["hessians"]["file"])
    quant, meta, gptq_names = quantize_without_lqer(c, weights, hessians)
    for name in gptq_names:  # GPTQ codes: exact, or off at rounding ties only (then go on with the fixture's)
        key = name + ".q"
        if not torch.equal(quant[key], expected[key]):
            bits = int(meta[name][len("gptq (int") :].split(")")[0])
            assert_tie_mismatches(
                key,
                quant[key],
                expected[key],
                quant[name + ".scale"],
                weights[name].float(),
                hessians[name],
                bits,
                *tie_settings(),
            )
            quant[key] = expected[key]
    factors = add_lqer(c, weights, quant, meta, gptq_names)
    assert list(factors) == c.qmeta["lqer"]["chosen"]
    assert_same(quant, expected)
    assert list(meta.items()) == list(c.qmeta["meta"].items())
    assert_artifact_bytes(c, quant, meta, encode_pergroup(quant, meta))


@needs_lrzip
@pytest.mark.parametrize("path", CASES)
def test_encode_reference_quant_to_artifact_bytes(path):
    c = case(path)
    assert_artifact_bytes(c, c.tensors("expected_quant.pt"), c.qmeta["meta"], encoded_reference(path))


@needs_lrzip
@pytest.mark.parametrize("path", CASES)
def test_read_artifact_gives_codes_and_dequantized_tensors(path):
    c = case(path)
    quant, meta = read_pergroup(path / c.art["file"], PergroupSettings(workers=2))  # lrzip runs in a pool
    assert_same(quant, c.tensors("expected_quant.pt"))
    assert list(meta.items()) == list(c.qmeta["meta"].items())
    flat = dequantize_mixed(quant, meta, c.qmeta["template_dtypes"])
    assert_same(c.rebank(flat), c.tensors("expected_dequant.pt"))


@pytest.mark.parametrize("path", CASES)
def test_similarity_sort_gives_fixture_permutations(path):
    c = case(path)
    expected = c.tensors("expected_quant.pt")
    perms = c.tensors("permutations.pt")
    for name, order in perms.items():
        got = similarity_sort_l1(expected[name + ".q"])
        assert got.dtype == np.uint16 and np.array_equal(got.astype(np.int64), order.numpy()), name
    stream = unpack_streams(c.artifact_bytes)[pg.PERMUTATION_STREAM]
    stored = np.frombuffer(brotli.decompress(stream), dtype="<u2") if stream else np.zeros(0)
    assert np.array_equal(stored, np.concatenate([p.numpy() for p in perms.values()]) if perms else stored)


# ---------------------------------------------------------------------------------------------------------
# Synthetic models: other shapes, every group, both LQER packs
# ---------------------------------------------------------------------------------------------------------


def synthetic_quant(seed: int = 0, layers: int = 2, dim: int = 72, kv: int = 24, hidden: int = 176, vocab: int = 90):
    """A two-layer model quantized the record's way (RTN SDClip instead of GPTQ: no Hessians needed)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i in range(layers):
        for suffix, shape in (
            ("attn.c_q.weight", (dim, dim)),
            ("attn.c_k.weight", (kv, dim)),
            ("attn.c_v.weight", (kv, dim)),
            ("attn.proj.weight", (dim, dim)),
            ("mlp.fc.weight", (hidden, dim)),
            ("mlp.proj.weight", (dim, hidden)),
        ):
            weights[f"blocks.{i}.{suffix}"] = torch.randn(shape, generator=g) * 0.05
        weights[f"blocks.{i}.attn.attn_gate_w"] = torch.randn(3, 11, generator=g)
        weights[f"blocks.{i}.attn_scale"] = torch.rand(dim, generator=g)
    weights["tok_emb.weight"] = (torch.randn(vocab, dim, generator=g) * 0.3).bfloat16().float()
    weights["smear_lambda"] = torch.randn(1, generator=g)
    quant, meta, gptq_names = {}, {}, []
    for name, t in weights.items():
        if name.endswith(".attn_gate_w"):
            quant[name + ".gq"], quant[name + ".gs"] = quantize_gate_rows(t)
            meta[name] = GATE_META
        elif t.numel() <= 1024:
            quant[name] = t.half()
            meta[name] = PASSTHROUGH_META
        else:
            bits = 7 if "tok_emb" in name else 6
            r = quantize_sdclip(t, bits, 12.0)
            quant[name + ".q"], quant[name + ".scale"] = r.q, r.scale
            meta[name] = gptq_meta(bits)
            gptq_names.append(name)
    # every GPTQ tensor gets factors: cols 72 -> B of 4*72 = 288 values (not a multiple of 64: symmetric pack),
    # cols 176 -> 704 = 11*64 (asymmetric)
    for name, f in lqer_apply(weights, quant, gptq_names, LqerSettings(top_k=len(gptq_names))).items():
        quant.update(f.tensors(name))
        meta[name] += f.meta_suffix
    quant["blocks.0.attn.rope_index"] = torch.arange(5)  # a non-float passthrough: stored as is
    meta["blocks.0.attn.rope_index"] = PASSTHROUGH_META
    return weights, quant, meta


@functools.lru_cache(maxsize=None)
def synthetic_artifact() -> tuple[dict, dict, bytes]:
    _, quant, meta = synthetic_quant()
    return quant, meta, encode_pergroup(quant, meta)


def one_line_error(data: bytes, settings: PergroupSettings = PergroupSettings()) -> str:
    with pytest.raises(PergroupError) as info:
        decode_pergroup(data, "bad.ptz", settings)
    message = str(info.value)
    assert "\n" not in message and message.startswith("bad.ptz: ")
    assert isinstance(info.value, ArtifactError)
    return message


@needs_lrzip
def test_synthetic_roundtrip_is_exact_and_deterministic():
    quant, meta, blob = synthetic_artifact()
    assert {m.split("+")[-1] for m in meta.values() if "+" in m} == {"lqer", "lqer_asym"}
    streams = unpack_streams(blob)
    assert all(streams[i] for i in range(len(GROUP_ORDER))), "every group is present"
    got, got_meta = decode_pergroup(blob, "synthetic")
    assert_same(got, quant)
    assert list(got_meta.items()) == list(meta.items())
    assert_same(dequantize_mixed(got, got_meta), dequantize_mixed(quant, meta))
    assert encode_pergroup(got, got_meta) == blob  # what was read writes the same bytes


@needs_lrzip
def test_truncated_artifacts_fail_with_one_line():
    _, _, blob = synthetic_artifact()
    lengths = [len(s) for s in unpack_streams(blob)]
    for cut in (0, 3, 7, 20, 8 + 4 * len(lengths), len(blob) // 2, len(blob) - 1):
        assert "PGRP" in one_line_error(blob[:cut]) or "truncated" in one_line_error(blob[:cut])
    assert "trailing bytes" in one_line_error(blob + b"\0")


@pytest.mark.slow  # ~7 s: hundreds of decodes of flipped artifacts
@needs_lrzip
def test_bit_flips_fail_with_one_line_or_change_nothing():
    """A flipped bit is an error, never a different model: lrzip's MD5 guards the groups, the zip records' CRC-32
    the remainder (brotli has no checksum), the permutation check the row orders. A few bits are never read (lrzip
    header bytes, the padding of brotli's last byte): a flip there reads back the same tensors."""
    quant, meta, blob = synthetic_artifact()
    lengths = [len(s) for s in unpack_streams(blob)]
    starts = np.concatenate([[8 + 4 * len(lengths)], 8 + 4 * len(lengths) + np.cumsum(lengths)])
    positions = [0, 4, 8, 8 + 4 * pg.REMAINDER_STREAM]
    for i in (0, 2):  # a sorted and an unsorted lrzip group
        start, end = int(starts[i]), int(starts[i + 1])
        positions += [start, start + 7, start + 15, start + lengths[i] // 2, end - 1]
    for i in (pg.REMAINDER_STREAM, pg.PERMUTATION_STREAM):
        positions += [
            int(starts[i]) + 1,
            int(starts[i] + lengths[i] // 3),
            int(starts[i] + 2 * lengths[i] // 3),
            int(starts[i + 1]) - 1,
        ]
    unchanged = []
    for p in positions:
        flipped = bytearray(blob)
        flipped[p] ^= 0x10
        try:
            got, got_meta = decode_pergroup(bytes(flipped), "bad.ptz")
        except PergroupError as e:
            assert "\n" not in str(e) and str(e).startswith("bad.ptz: ")
            continue
        assert_same(got, quant)
        assert got_meta == meta
        unchanged.append(p)
    assert len(unchanged) <= 4, unchanged


def replace_stream(blob: bytes, index: int, stream: bytes) -> bytes:
    streams = unpack_streams(blob)
    streams[index] = stream
    return pack_streams(streams)


def remainder_object(blob: bytes) -> dict:
    raw = brotli.decompress(unpack_streams(blob)[pg.REMAINDER_STREAM])
    return torch.load(io.BytesIO(raw), weights_only=True)


def with_remainder(blob: bytes, obj: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return replace_stream(blob, pg.REMAINDER_STREAM, brotli.compress(buffer.getvalue(), quality=5))


@needs_lrzip
def test_oversized_claims_are_refused_before_or_while_decompressing(tmp_path):
    _, _, blob = synthetic_artifact()
    streams = unpack_streams(blob)
    # lrzip's header declares more than the shape manifest: refused before lrzip runs
    bigger = bytearray(streams[1])
    bigger[6:14] = (int.from_bytes(bigger[6:14], "little") + 4096).to_bytes(8, "little")
    assert "declares" in one_line_error(replace_stream(blob, 1, bytes(bigger)))
    # a stream whose data is larger than its (patched) header says: lrzip is stopped at the declared size
    expected = pg.lrzip_expanded_size(streams[1])
    lying = bytearray(lrzip_compress(bytes(4 * expected)))
    lying[6:14] = expected.to_bytes(8, "little")
    assert "exceeded the declared size" in one_line_error(replace_stream(blob, 1, bytes(lying)))
    # a remainder that decompresses past the cap (a brotli bomb): stopped at the cap
    bomb = brotli.compress(bytes(64 << 20), quality=5)
    assert "more than" in one_line_error(
        replace_stream(blob, pg.REMAINDER_STREAM, bomb), PergroupSettings(max_raw_bytes=1 << 20)
    )
    # a shape manifest claiming huge tensors: refused before lrzip runs
    obj = remainder_object(blob)
    obj["s"]["attn.c_k.weight.q"] = [(1 << 20, 1 << 20)] * 2
    assert "claims" in one_line_error(with_remainder(blob, obj))
    # a cap below the artifact's real size
    total = sum(len(p) for p in pergroup_payloads(*synthetic_artifact()[:2]).groups if p)
    assert "more than" in one_line_error(blob, PergroupSettings(max_raw_bytes=total // 2))


@needs_lrzip
def test_inconsistent_remainder_is_refused():
    _, _, blob = synthetic_artifact()
    obj = remainder_object(blob)
    obj["m"]["blocks.0.attn.c_q.weight"] = "int5 magic"
    assert "unknown meta" in one_line_error(with_remainder(blob, obj))
    obj = remainder_object(blob)
    del obj["r"]["blocks.0.attn.c_q.weight.scale"]
    assert "missing" in one_line_error(with_remainder(blob, obj))
    obj = remainder_object(blob)
    obj["s"]["mlp.gate.weight.q"] = [(4, 4)]
    assert "unknown group" in one_line_error(with_remainder(blob, obj))
    assert "expected a dict" in one_line_error(with_remainder(blob, {"w": {}, "m": {}}))


def test_missing_lrzip_is_one_line_with_install_hint():
    _, quant, meta = synthetic_quant(layers=1)
    settings = PergroupSettings(lrzip="lrzip-not-installed-here")
    with pytest.raises(LrzipNotFoundError) as info:
        encode_pergroup(quant, meta, settings)
    message = str(info.value)
    assert "\n" not in message and "apt-get install lrzip" in message and isinstance(info.value, PgolfError)
    # an artifact that passes every check before lrzip runs: real remainder and row orders, lrzip headers only
    payloads = pergroup_payloads(quant, meta)
    streams = [b"LRZI\x00\x06" + len(p).to_bytes(8, "little") + bytes(16) if p else b"" for p in payloads.groups]
    streams += [brotli.compress(payloads.remainder), brotli.compress(payloads.permutations)]
    with pytest.raises(LrzipNotFoundError, match="apt-get install lrzip"):
        decode_pergroup(pack_streams(streams), "x.ptz", settings)


def test_encode_refuses_what_the_reader_would_misname():
    _, quant, meta = synthetic_quant()
    gappy = {("blocks.5." + k[len("blocks.1.") :] if k.startswith("blocks.1.") else k): v for k, v in quant.items()}
    gappy_meta = {("blocks.5." + k[len("blocks.1.") :] if k.startswith("blocks.1.") else k): v for k, v in meta.items()}
    with pytest.raises(PergroupError, match="layers 0..n-1"):
        pergroup_payloads(gappy, gappy_meta)
    with pytest.raises(PergroupError, match="not described"):
        pergroup_payloads({**quant, "stray": torch.zeros(2)}, meta)


def naive_similarity_order(m: np.ndarray) -> list[int]:
    """The greedy chain written plainly: from row 0, always the unused row of least L1 distance, lowest index
    first on ties."""
    rows = [r.astype(np.int64) for r in m]
    order, unused = [0], set(range(1, len(rows)))
    while unused:
        cur = rows[order[-1]]
        best = min(unused, key=lambda j: (int(np.abs(rows[j] - cur).sum()), j))
        order.append(best)
        unused.remove(best)
    return order


@pytest.mark.parametrize("shape", [(1, 5), (2, 3), (37, 9), (64, 40), (90, 1)])
def test_similarity_sort_matches_plain_greedy_chain(shape):
    g = np.random.default_rng(shape[0])
    m = g.integers(-3, 4, size=shape).astype(np.int8)  # few values: many distance ties
    m[len(m) // 2 :] = m[: len(m) - len(m) // 2]  # duplicate rows: distance-0 ties
    expected = naive_similarity_order(m)
    assert similarity_sort_l1(m).tolist() == expected
    assert similarity_sort_l1(torch.from_numpy(m)).tolist() == expected


def test_bounded_brotli_limits_and_truncation(monkeypatch):
    data = bytes(range(256)) * 1000
    packed = brotli.compress(data)
    assert pg.brotli_decompress_bounded(packed, len(data)) == data
    with pytest.raises(ValueError, match="more than"):
        pg.brotli_decompress_bounded(packed, len(data) - 1)
    with pytest.raises(ValueError, match="truncated|corrupted"):
        pg.brotli_decompress_bounded(packed[: len(packed) // 2], len(data))

    real = brotli.Decompressor

    class OldDecompressor:  # brotli < 1.2: no output_buffer_limit
        def __init__(self):
            self._d = real()

        def process(self, chunk, **kwargs):
            if kwargs:
                raise TypeError("process() takes no keyword arguments")
            return self._d.process(chunk)

        def is_finished(self):
            return self._d.is_finished()

    monkeypatch.setattr(pg.brotli, "Decompressor", OldDecompressor)
    assert pg.brotli_decompress_bounded(packed, len(data)) == data
    with pytest.raises(ValueError, match="more than"):
        pg.brotli_decompress_bounded(brotli.compress(bytes(8 << 20)), 1 << 20)


def test_meta_strings_parse_and_build():
    assert pg.parse_meta(gptq_meta(6, "asym")) == pg.MetaEntry("gptq", 6, "asym")
    assert pg.parse_meta("gptq (int7)") == pg.MetaEntry("gptq", 7, None)
    assert pg.parse_meta("gptq (int6)+lqer") == pg.MetaEntry("gptq", 6, "sym")
    assert pg.parse_meta(PASSTHROUGH_META).kind == "passthrough" and pg.parse_meta(GATE_META).kind == "gate"
    for bad in ("gptq (int9)", "gptq (int6)+lqer_x", "passthrough", 3):
        with pytest.raises(ValueError):
            pg.parse_meta(bad)
