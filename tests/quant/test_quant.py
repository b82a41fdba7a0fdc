"""pgolf_lit.quant on its own: error bounds, GPTQ vs RTN, Hessians, pruning, codecs, the native container's
integrity under damage, size accounting, export → load exactness and the budget gate."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import random
import zlib

import pytest
import torch

from pgolf_lit.config import GPTConfig
from pgolf_lit.errors import ArtifactError, ConfigError
from pgolf_lit.model.convert import to_upstream_state_dict
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.roles import matrix
from pgolf_lit.model.layers import CastedLinear
from pgolf_lit.quant import artifact as art
from pgolf_lit.quant.artifact import decode_native, encode_native, encode_upstream, read_upstream_artifact
from pgolf_lit.quant.calibration import generate_calibration_tokens, token_batches
from pgolf_lit.quant.code_size import measure_code_size
from pgolf_lit.quant.compress import CODECS, byte_shuffle, byte_unshuffle, compress, decompress, sniff_codec
from pgolf_lit.quant.export import (
    ExportConfig,
    TensorRule,
    build_model_from_artifact,
    export_model,
    load_artifact,
    quantize_state_dict,
)
from pgolf_lit.quant.gptq import (
    factor_hessian,
    gptq_percentile_search,
    gptq_sdclip,
    gptq_sweep,
    hessian_weighted_error,
    permuted_weight,
)
from pgolf_lit.quant.hessians import collect_hessians
from pgolf_lit.quant.prune import find_candidates, prune_first, selective_prune
from pgolf_lit.quant.quantized import dequantize
from pgolf_lit.records import record_export_config
from pgolf_lit.quant.rtn import (
    clip_range,
    dequantize_codes,
    quantize_percentile_search,
    quantize_quantile_clip,
    quantize_sdclip,
    sdclip_scale,
)

SMALL = 512  # keep-float threshold for the tiny models here, so that their matrices get quantized


def tiny_config(**changes) -> GPTConfig:
    base = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=4.0)
    return GPTConfig(**{**base, **changes})


def tiny_model(seed: int = 0, **changes) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**changes))
    with torch.no_grad():  # give zero-initialised weights (proj, gates) some content
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def calib(n: int = 3, seed: int = 1, vocab: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, 24), generator=g) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class NoCode:
    """Stands in for the package code size where a test is about model bytes only."""

    counted_bytes: int = 0


def no_code() -> NoCode:
    return NoCode()


def correlated_inputs(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    return torch.randn(rows, cols, generator=g) @ mix


# ---------------------------------------------------------------------------------------------------------
# RTN
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_rtn_error_within_half_step_inside_the_clip(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 256, generator=g) * (4 * torch.rand(48, 1, generator=g) + 2)  # rows above the 1/R floor
    r = clip_range(bits)
    for q in (quantize_percentile_search(w, bits), quantize_sdclip(w, bits, 4.0)):
        assert q.q.dtype == torch.int8 and q.scale.dtype == torch.float16 and q.scale.shape == (48,)
        assert q.q.abs().max() <= r
        s = q.scale.float()[:, None]
        inside = w.abs() <= r * s
        err = (w - dequantize_codes(q.q, q.scale, torch.float32)).abs()
        assert (err[inside] <= 0.5 * s.expand_as(w)[inside] * (1 + 1e-6)).all()
        assert (err[~inside] <= (w.abs() - r * s)[~inside] + 1e-5).all()  # saturated at ±R


@pytest.mark.parametrize("bits", [5, 6, 8])
def test_quantile_clip_rounds_with_fp32_scale_and_stores_fp16(bits):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 512, generator=g) * 3
    q = quantize_quantile_clip(w, bits)
    r = clip_range(bits)
    clip = torch.quantile(w.abs(), 99.99984 / 100, dim=1)
    s32 = (clip / r).clamp_min(1 / r)
    assert torch.equal(q.scale, s32.half())
    expected = torch.round(torch.maximum(torch.minimum(w, clip[:, None]), -clip[:, None]) / s32[:, None])
    assert torch.equal(q.q, expected.clamp(-r, r).to(torch.int8))


def test_scale_floor_binds_for_small_weights_and_makes_the_search_a_no_op():
    w = torch.randn(8, 300) * 0.05
    q = quantize_percentile_search(w, 6)
    assert torch.equal(q.scale, torch.full((8,), 1 / 31).half())
    assert q.percentile == 0.999  # all candidates tie; the first wins
    assert torch.equal(quantize_quantile_clip(w).scale, torch.full((8,), 1 / 127).half())


def test_per_tensor_paths_for_vectors_and_scalars():
    v = torch.randn(100)
    q6 = quantize_percentile_search(v, 6)
    assert q6.scale.ndim == 0 and q6.scale.dtype == torch.float16 and q6.percentile is None
    q8 = quantize_quantile_clip(v)
    assert q8.scale.ndim == 0 and q8.scale.dtype == torch.float32
    assert torch.equal(quantize_quantile_clip(torch.zeros(5)).scale, torch.tensor(1.0))
    assert quantize_percentile_search(torch.tensor(0.0), 6).scale.item() == 1.0
    assert (dequantize_codes(q8.q, q8.scale, torch.float32) - v).abs().max() <= q8.scale / 2 + 1e-6


def test_sdclip_has_no_floor():
    w = torch.randn(4, 256) * 1e-3
    assert torch.equal(quantize_sdclip(w, 6, 12.85).scale, sdclip_scale(w, 12.85, 31))
    assert quantize_sdclip(w, 6, 12.85).scale.float().max() < 1e-3


# ---------------------------------------------------------------------------------------------------------
# GPTQ
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_beats_rtn_on_hessian_weighted_error(seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 160, generator=g)
    x = correlated_inputs(2000, 160, seed)
    h = x.T @ x / 2000
    for bits, k in [(6, 12.85), (8, 20.0), (5, 8.0)]:
        gptq = gptq_sdclip(w, h, bits, k)
        rtn = quantize_sdclip(w, bits, k)
        assert torch.equal(gptq.scale, rtn.scale)
        e_gptq = hessian_weighted_error(w, dequantize_codes(gptq.q, gptq.scale, torch.float32), h)
        e_rtn = hessian_weighted_error(w, dequantize_codes(rtn.q, rtn.scale, torch.float32), h)
        assert e_gptq < 0.8 * e_rtn, (bits, e_gptq, e_rtn)
    searched = gptq_percentile_search(w * 0.3, h)
    rtn = quantize_percentile_search(w * 0.3)
    assert hessian_weighted_error(
        w * 0.3, dequantize_codes(searched.q, searched.scale, torch.float32), h
    ) < hessian_weighted_error(w * 0.3, dequantize_codes(rtn.q, rtn.scale, torch.float32), h)


def test_gptq_beats_rtn_with_hessians_of_a_real_model():
    model = tiny_model(model_dim=64, mlp_mult=3.0)
    hessians, _ = collect_hessians(model, calib(4), min_numel=SMALL, progress=False)
    assert hessians
    sd = model.state_dict()
    for name, h in hessians.items():
        w = sd[name]
        gptq, rtn = gptq_sdclip(w, h, 6, 12.85), quantize_sdclip(w, 6, 12.85)
        assert hessian_weighted_error(
            w, dequantize_codes(gptq.q, gptq.scale, torch.float32), h
        ) <= hessian_weighted_error(w, dequantize_codes(rtn.q, rtn.scale, torch.float32), h), name


def test_gptq_with_identity_hessian_is_rtn():
    w = torch.randn(16, 200)
    gptq = gptq_sdclip(w, torch.eye(200), 6, 12.85)
    assert torch.equal(gptq.q, quantize_sdclip(w, 6, 12.85).q)


def test_gptq_dead_columns_are_zero_and_scale_is_fixed_before_the_sweep():
    x = correlated_inputs(500, 40, 0)
    x[:, [3, 17]] = 0
    h = x.T @ x
    w = torch.randn(8, 40)
    out = gptq_sdclip(w, h, 6, 12.85)
    assert (out.q[:, [3, 17]] == 0).all()
    assert torch.equal(out.scale, sdclip_scale(w, 12.85, 31))
    factor = factor_hessian(h)
    assert factor.dead.nonzero().flatten().tolist() == [3, 17]
    codes = gptq_sweep(permuted_weight(w, factor), factor.upper, out.scale.float(), 31)
    assert torch.equal(codes[:, factor.inv_perm], out.q)


def test_gptq_cholesky_failure_policy():
    w = torch.randn(8, 16)
    with pytest.raises(torch.linalg.LinAlgError):
        gptq_sdclip(w, -torch.eye(16), 6, 12.85)
    sd = {"blocks.0.mlp.fc.weight": torch.randn(40, 16)}
    bad = {"blocks.0.mlp.fc.weight": -torch.eye(16)}
    roles = {"blocks.0.mlp.fc.weight": matrix("mlp", "mlp")}
    quant, meta = quantize_state_dict(sd, ExportConfig(keep_float_max_numel=SMALL), bad, roles=roles)
    assert meta["blocks.0.mlp.fc.weight"]["fallback"] == "rtn"
    assert torch.equal(quant["blocks.0.mlp.fc.weight.q"], quantize_sdclip(sd["blocks.0.mlp.fc.weight"], 6, 12.85).q)
    with pytest.raises(ArtifactError, match="blocks.0.mlp.fc.weight.*Cholesky"):
        quantize_state_dict(sd, export_cfg("pr1394", keep_float_max_numel=SMALL), bad, roles=roles)
    with pytest.raises(ArtifactError, match="needs a Hessian"):
        quantize_state_dict(sd, export_cfg("pr1394", keep_float_max_numel=SMALL), {}, roles=roles)


# ---------------------------------------------------------------------------------------------------------
# Hessians and calibration
# ---------------------------------------------------------------------------------------------------------


def test_hessians_sum_every_recurrent_pass_and_the_tied_head():
    model = tiny_model(num_layers=3, recurrence="loop", num_loops=2, loop_start=1, loop_end=1)
    model.set_recurrence(True)
    batches = calib(2)
    inputs: list[torch.Tensor] = []
    handle = model.blocks[1].mlp.fc.register_forward_hook(lambda _m, i, _o: inputs.append(i[0].reshape(-1, 32)))
    with torch.no_grad():
        normed = [model.normalize_hidden(model.forward_hidden(b)).reshape(-1, 32) for b in batches]
    handle.remove()
    assert len(inputs) == 3 * len(batches)  # layer 1 runs three times per forward
    hessians, report = collect_hessians(model, batches, modules="all", head=True, progress=False)
    expected_fc = sum(x.T @ x for x in inputs) / len(batches)
    torch.testing.assert_close(hessians["blocks.1.mlp.fc.weight"], expected_fc, rtol=1e-5, atol=1e-5)
    expected_head = sum(z.T @ z for z in normed) / len(batches)
    torch.testing.assert_close(hessians["tok_emb.weight"], expected_head, rtol=1e-5, atol=1e-5)
    assert report.num_batches == 2 and report.num_tokens == 2 * 2 * 24
    assert "normalize_hidden" not in vars(model)  # the wrapper is gone
    large, _ = collect_hessians(model, batches, min_numel=SMALL, progress=False)
    big = ("mlp.fc.weight", "mlp.proj.weight", "c_q.weight", "attn.proj.weight")  # c_k/c_v: 16×32 weights
    assert set(large) == {n for n in hessians if n.endswith(big)}


def test_hessian_damping_at_collection():
    model = tiny_model()
    plain, _ = collect_hessians(model, calib(2), modules="all", progress=False)
    damped, _ = collect_hessians(model, calib(2), modules="all", damping=0.01, progress=False)
    for name, h in plain.items():
        torch.testing.assert_close(damped[name] - h, 0.01 * torch.diag(h).mean() * torch.eye(h.shape[0]))


def test_self_generated_calibration_is_seeded():
    model = tiny_model()
    a = generate_calibration_tokens(model, 64, num_seqs=3, seq_len=10, batch_size=2, seed=5, progress=False)
    b = generate_calibration_tokens(model, 64, num_seqs=3, seq_len=10, batch_size=2, seed=5, progress=False)
    assert a.shape == (3, 10) and torch.equal(a, b) and a.min() >= 0 and a.max() < 64
    assert [t.shape for t in token_batches(a, 1, drop_last_token=True)] == [(1, 9)] * 3


# ---------------------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------------------


def prunable_model_quant():
    g = torch.Generator().manual_seed(0)
    quant = {
        "a.q": torch.randint(-3, 4, (64, 128), generator=g, dtype=torch.int8),
        "a.scale": torch.tensor([0.02, 0.01] * 32).half(),
        "b.q": torch.randint(-3, 4, (32, 256), generator=g, dtype=torch.int8),
        "b.scale": torch.full((32,), 0.01).half(),
    }
    meta = {n: {"kind": "int", "bits": 6, "dtype": "float32", "method": "gptq"} for n in ("a", "b")}
    return quant, meta


def test_prune_order_is_scale_squared_then_position():
    quant, _ = prunable_model_quant()
    cands = find_candidates(quant, ["a.q", "b.q"], ["a.scale", "b.scale"])
    naive = []
    for i, (qk, sk) in enumerate([("a.q", "a.scale"), ("b.q", "b.scale")]):
        q, s = quant[qk], quant[sk]
        for flat in range(q.numel()):
            if abs(int(q.view(-1)[flat])) == 1:
                naive.append((float(s.float()[flat // q.shape[1]] ** 2), i, flat))
    naive.sort(key=lambda c: c[0])  # Python's stable sort, as the scripts do
    assert [(i, f) for _, i, f in naive] == list(zip(cands.tensor_index.tolist(), cands.flat_index.tolist()))


@pytest.mark.parametrize("mode", ["upstream", "search"])
def test_prune_hits_the_budget_changing_only_ones_to_zero(mode):
    quant, meta = prunable_model_quant()

    def total(q) -> int:
        return len(encode_upstream(q, meta, "pr1333", "zlib"))

    unpruned = total(quant)
    budget = unpruned - 300
    pruned, report = selective_prune(quant, ["a.q", "b.q"], ["a.scale", "b.scale"], total, budget, mode)
    assert report.final_bytes == total(pruned) and report.fits
    if mode == "upstream":
        assert report.n_pruned == 8 * 300
    changed = sum(int((pruned[k] != quant[k]).sum()) for k in quant)
    assert changed == report.n_pruned > 0
    for key in ("a.q", "b.q"):
        mask = pruned[key] != quant[key]
        assert (quant[key][mask].abs() == 1).all() and (pruned[key][mask] == 0).all()
    assert torch.equal(pruned["a.scale"], quant["a.scale"])
    # the cheaper rows (scale 0.01) go first
    assert report.last_score == pytest.approx(0.01**2, rel=1e-3)


def test_prune_leaves_a_fitting_artifact_alone_and_reports_an_impossible_budget():
    quant, meta = prunable_model_quant()

    def total(q) -> int:
        return len(encode_upstream(q, meta, "pr1333", "zlib"))

    same, report = selective_prune(quant, ["a.q"], ["a.scale"], total, 10**9, "search")
    assert same is quant and report.n_pruned == 0 and report.fits
    same, report = selective_prune(quant, ["a.q"], ["a.scale"], total, 100, "search")
    assert same is quant and not report.fits and report.n_pruned == 0
    assert torch.equal(prune_first(quant, find_candidates(quant, ["a.q"], ["a.scale"]), 0)["a.q"], quant["a.q"])


# ---------------------------------------------------------------------------------------------------------
# Codecs
# ---------------------------------------------------------------------------------------------------------


def test_byte_shuffle_layout_from_the_spec():
    assert byte_shuffle(bytes(range(7)), 2) == bytes.fromhex("4253484602") + bytes([0, 2, 4, 6, 1, 3, 5])
    assert byte_shuffle(b"\x01", 2) == b"\x01"


def payloads() -> list[bytes]:
    rng = random.Random(0)
    real = io.BytesIO()
    model = tiny_model()
    torch.save(
        quantize_state_dict(model.state_dict(), ExportConfig(keep_float_max_numel=SMALL), roles=model.roles)[0], real
    )
    return [
        b"",
        b"\x00",
        b"BS",
        b"BSHF",
        b"BSHF\x02",
        b"BSHF\x03ab",
        bytes(rng.getrandbits(8) for _ in range(1001)),
        real.getvalue(),
    ]


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_every_codec_round_trips(codec):
    for data in payloads():
        for stride in (0, 2, 3, 4, 8):
            blob = compress(data, codec, stride)
            assert decompress(blob, codec, stride) == data
        if data:
            assert sniff_codec(compress(data, codec)) == ("lzma" if codec.startswith("lzma") else codec)


def test_unshuffle_auto_detects_like_upstream():
    data = os.urandom(333)
    assert byte_unshuffle(byte_shuffle(data, 3)) == data
    assert byte_unshuffle(data) == data


# ---------------------------------------------------------------------------------------------------------
# The native container
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_blob() -> bytes:
    model = tiny_model()
    cfg = ExportConfig(keep_float_max_numel=SMALL)
    hessians = collect_hessians(model, calib(), min_numel=SMALL, progress=False)[0]
    quant, meta = quantize_state_dict(model.state_dict(), cfg, hessians, roles=model.roles)
    return encode_native(quant, meta, model.config.to_dict(), {"note": "test"}, "zlib", 2)


def test_native_round_trip_is_exact(native_blob):
    a = decode_native(native_blob, "mem")
    b = encode_native(a.quant, a.meta, a.config, a.info, a.codec, a.shuffle_stride)
    assert b == native_blob
    assert a.info == {"note": "test"} and GPTConfig.from_dict(a.config) == tiny_config()


@pytest.mark.parametrize("codec", ["brotli", "lzma", "zstd"])
def test_native_tensor_bytes_compress_the_same_whatever_the_metadata(native_blob, codec):
    """The metadata sits after the tensors: a longer export note must not change how they compress. With it in
    front, one export's brotli-11 output ranged over 1 % for notes of 0-3 characters, and this payload's zstd-22
    output by 2 % between notes one character apart."""
    a = decode_native(native_blob, "mem")
    sizes = [len(encode_native(a.quant, a.meta, a.config, {"note": "x" * n}, codec, 2)) for n in range(8)]
    # Not exactly the same: brotli-11 chooses its block splits and context maps over the whole meta-block, so a
    # change at its end still moves a few dozen bytes (0.31 % here, after the config gained fields); metadata in
    # front moved 1-2 %. Half a percent separates the two.
    assert max(sizes) - min(sizes) <= 0.005 * min(sizes), sizes


def test_native_truncations_and_bit_flips_always_raise(native_blob):
    rng = random.Random(1234)
    cuts = sorted({0, 1, 5, 6, 63, 64, 65, len(native_blob) - 1} | {rng.randrange(len(native_blob)) for _ in range(60)})
    for cut in cuts:
        with pytest.raises(ArtifactError, match="mem"):
            decode_native(native_blob[:cut], "mem")
    positions = list(range(64)) + [rng.randrange(64, len(native_blob)) for _ in range(200)]
    for pos in positions:
        damaged = bytearray(native_blob)
        damaged[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(ArtifactError, match="mem"):
            decode_native(bytes(damaged), "mem")
    with pytest.raises(ArtifactError, match="trailing"):
        decode_native(native_blob + b"\0", "mem")


def reseal(header_and_payload: bytes) -> bytes:
    """Recompute the checksum of a deliberately edited file, as a forger would."""
    head, payload = header_and_payload[: art.HEADER_BYTES], header_and_payload[art.HEADER_BYTES :]
    return head[:32] + hashlib.sha256(head[:32] + payload).digest() + payload


def native_with_raw(raw: bytes) -> bytes:
    payload = zlib.compress(raw, 9)
    head = art._HEADER.pack(art.MAGIC, art.FORMAT_VERSION, b"zlib", 0, len(payload), len(raw), b"")
    return reseal(head + payload)


def test_native_rejects_wrong_version_and_forged_contents(native_blob):
    newer = bytearray(native_blob)
    newer[len(art.MAGIC)] = art.FORMAT_VERSION + 1
    with pytest.raises(ArtifactError, match=f"version {art.FORMAT_VERSION + 1} is not supported"):
        decode_native(reseal(bytes(newer)), "mem")
    bad_docs = [
        b"{not json",
        b'{"config": {}, "meta": {}, "info": {}}',
        b'{"config": {}, "meta": {"x": {"kind": "int", "bits": 6, "dtype": "float32"}}, "info": {}, "tensors": []}',
        b'{"config": {}, "meta": {}, "info": {}, "tensors": [["x", "object", [1]]]}',
        b'{"config": {}, "meta": {}, "info": {}, "tensors": [["x", "int8", [-1]]]}',
        b'{"config": {}, "meta": {"x": {"kind": "raw"}}, "info": {}, "tensors": [["x", "int8", [1000]]]}',
    ]
    for doc in bad_docs:
        raw = b"\0" * 4 + doc + len(doc).to_bytes(4, "little")
        with pytest.raises(ArtifactError, match="mem: malformed payload"):
            decode_native(native_with_raw(raw), "mem")


def test_native_rejects_an_invalid_stored_config(tmp_path):
    doc = b'{"config": {"vocab_size": -1}, "meta": {}, "info": {}, "tensors": []}'
    (tmp_path / "a.pgq").write_bytes(native_with_raw(doc + len(doc).to_bytes(4, "little")))
    with pytest.raises(ArtifactError, match="a.pgq: stored model config is invalid"):
        load_artifact(tmp_path / "a.pgq")


class _Trap:
    """Unpickling this would create the marker file: loading must never run it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(_Trap(str(marker)))
    (tmp_path / "evil.pgq").write_bytes(evil)
    with pytest.raises(ArtifactError, match="evil.pgq: does not decompress"):
        load_artifact(tmp_path / "evil.pgq", tiny_config())
    with pytest.raises(ArtifactError, match="bad magic"):
        decode_native(evil, "evil")
    # the same pickle inside a forged native payload, and as an upstream container
    (tmp_path / "forged.pgq").write_bytes(native_with_raw(len(evil).to_bytes(4, "little") + evil))
    with pytest.raises(ArtifactError, match="malformed payload"):
        load_artifact(tmp_path / "forged.pgq")
    buffer = io.BytesIO()
    torch.save({"w": {}, "m": _Trap(str(marker))}, buffer)
    (tmp_path / "evil.ptz").write_bytes(zlib.compress(buffer.getvalue()))
    with pytest.raises(ArtifactError, match="does not load safely"):
        read_upstream_artifact(tmp_path / "evil.ptz")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------------
# Export, load, budget, code size
# ---------------------------------------------------------------------------------------------------------


EXPORTS = [
    ("pgolf", {}),
    ("pgolf", {"mlp": TensorRule(5, "gptq", "percentile_search"), "codec": "lzma9", "shuffle_stride": 0}),
    ("pr1333", {}),
    ("pr1394", {}),
    ("baseline", {}),
    ("pr1263", {"codec": "zstd"}),
    ("pr1321", {}),
]


def export_cfg(name: str, **changes) -> ExportConfig:
    """pgolf's default scheme, or a record config's export settings written in the record's own container."""
    if name == "pgolf":
        return ExportConfig(**changes)
    return dataclasses.replace(record_export_config(name), format="upstream", **changes)


@pytest.mark.parametrize("preset,changes", EXPORTS, ids=[f"{p}-{i}" for i, (p, _) in enumerate(EXPORTS)])
def test_export_then_load_gives_the_dequantized_models_logits(tmp_path, preset, changes):
    model = tiny_model(num_layers=3, recurrence="loop", num_loops=1, loop_start=1, loop_end=1)
    model.set_recurrence(True)
    cfg = export_cfg(preset, keep_float_max_numel=SMALL, **changes)
    report = export_model(model, cfg, tmp_path / "model.bin", calib_batches=calib(), code=no_code(), progress=False)
    assert report.model_bytes == os.path.getsize(tmp_path / "model.bin") == report.total_bytes

    hessians = collect_hessians(
        model,
        calib(),
        modules=cfg.gptq.hessian_modules,
        head=cfg.head_uses_gptq,
        damping=cfg.gptq.hessian_damping,
        min_numel=SMALL,
        progress=False,
    )[0]
    # upstream containers hold the record's live dtypes (bf16 tables), the native one the model's own
    weights = to_upstream_state_dict(model) if cfg.format == "upstream" else model.state_dict()
    quant, meta = quantize_state_dict(weights, cfg, hessians, roles=model.roles)
    reference = GPT(model.config)
    reference.load_state_dict({k: v.float() for k, v in dequantize(quant, meta).items()})
    reference.set_recurrence(True)

    loaded = build_model_from_artifact(tmp_path / "model.bin", config=model.config)
    assert loaded.recurrence_active == (cfg.format == "native")
    loaded.set_recurrence(True)
    x = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(loaded.forward_logits(x), reference.eval().forward_logits(x))
    assert report.num_quantized == sum(e["kind"] == "int" for e in meta.values()) > 0


def test_export_is_deterministic_and_load_checks_the_config(tmp_path):
    model = tiny_model()
    cfg = ExportConfig(keep_float_max_numel=SMALL)
    export_model(model, cfg, tmp_path / "a.bin", calib_batches=calib(), code=no_code(), progress=False)
    export_model(model, cfg, tmp_path / "b.bin", calib_batches=calib(), code=no_code(), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    config, state = load_artifact(tmp_path / "a.bin")
    assert config == model.config and set(state) == set(model.state_dict())
    with pytest.raises(ArtifactError, match="another model config"):
        load_artifact(tmp_path / "a.bin", tiny_config(vocab_size=128))
    upstream = export_cfg("pr1333", keep_float_max_numel=SMALL)
    export_model(model, upstream, tmp_path / "u.ptz", calib_batches=calib(), code=no_code(), progress=False)
    with pytest.raises(ArtifactError, match="holds no model config"):
        load_artifact(tmp_path / "u.ptz")


def test_over_budget_export_is_refused_unless_allowed(tmp_path):
    model = tiny_model()
    cfg = ExportConfig(keep_float_max_numel=SMALL, budget_bytes=1000, prune="none")
    with pytest.raises(ArtifactError, match="exceed the 1,000-byte budget"):
        export_model(model, cfg, tmp_path / "m.bin", calib_batches=calib(), progress=False)
    assert not (tmp_path / "m.bin").exists()
    allowed = dataclasses.replace(cfg, allow_over_budget=True)
    report = export_model(model, allowed, tmp_path / "m.bin", calib_batches=calib(), progress=False)
    assert not report.fits and os.path.getsize(tmp_path / "m.bin") == report.model_bytes
    # the code an artifact of this format and this model's config needs, scored by every registered pass (no
    # test_methods given); the upper bound (no config) also counts the techniques the model leaves off
    assert report.code == measure_code_size(("native",), model=model.config)
    assert report.code.counted_bytes < measure_code_size(("native",)).counted_bytes
    assert report.total_bytes == report.model_bytes + report.code_bytes
    assert "OVER" in report.summary()


def test_export_prunes_into_the_budget(tmp_path):
    model = tiny_model(model_dim=64)
    cfg = ExportConfig(keep_float_max_numel=SMALL, prune="none", allow_over_budget=True)
    free = export_model(model, cfg, tmp_path / "free.bin", calib_batches=calib(), code=no_code(), progress=False)
    tight = dataclasses.replace(cfg, prune="search", budget_bytes=free.model_bytes - 200, allow_over_budget=False)
    report = export_model(model, tight, tmp_path / "tight.bin", calib_batches=calib(), code=no_code(), progress=False)
    assert report.fits and report.prune.n_pruned > 0
    assert os.path.getsize(tmp_path / "tight.bin") == report.model_bytes <= tight.budget_bytes


def test_trace_ranked_int5_int6_mixing():
    model = tiny_model(model_dim=64)
    hessians = collect_hessians(model, calib(), min_numel=SMALL, progress=False)[0]
    cfg = ExportConfig(keep_float_max_numel=SMALL, trace_rank_keep=2, trace_rank_low_bits=5)
    _, meta = quantize_state_dict(model.state_dict(), cfg, hessians, roles=model.roles)
    ranked = sorted(hessians, key=lambda n: -float(torch.trace(hessians[n])))
    assert [meta[n]["bits"] for n in ranked] == [6, 6] + [5] * (len(ranked) - 2)


def test_export_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="export.codec"):
        ExportConfig(codec="rar")
    with pytest.raises(ConfigError, match="export.mlp.scale"):
        ExportConfig(mlp=TensorRule(6, "gptq", "quantile"))
    with pytest.raises(ConfigError, match="export.embed.bits"):
        ExportConfig(embed={"bits": 9, "method": "rtn", "scale": "quantile"})
    with pytest.raises(ConfigError, match="export.upstream_style"):
        ExportConfig(format="upstream", upstream_style="pr9999")
    with pytest.raises(ConfigError, match="export.mlp.method: unknown quantizer"):
        ExportConfig(mlp={"method": "awq"})
    with pytest.raises(ConfigError, match="export: unknown field"):
        ExportConfig.from_dict({"scheme": "pr1394"})
    with pytest.raises(ConfigError, match="export.gptq.fallback"):
        ExportConfig(gptq={"fallback": "maybe"})
    assert record_export_config("pr1394").mlp is not record_export_config("pr1394").mlp


def test_hessians_are_hooked_where_the_export_rules_use_them():
    """The calibration hooks the large matrices of the groups whose rule needs a Hessian (ExportConfig.
    hessian_groups): GPTQ on MLP only hooks no attention matrix; "all" hooks every CastedLinear."""
    from pgolf_lit.quant.hessians import hooked_linears
    from pgolf_lit.quant.quantizers import TensorRule

    model = tiny_model()
    roles = model.roles
    mlp_only = ExportConfig(attn=TensorRule(6, "rtn", "quantile"))
    assert mlp_only.hessian_groups == ("mlp",) and ExportConfig().hessian_groups == ("mlp", "attn")
    hooked = hooked_linears(model, "large", 0, mlp_only.hessian_groups)
    assert hooked and {roles[n].quant for n in hooked} == {"mlp"}
    both = hooked_linears(model, "large", 0, ExportConfig().hessian_groups)
    assert {roles[n].quant for n in both} == {"mlp", "attn"} and set(hooked) < set(both)
    every = hooked_linears(model, "all", 0, mlp_only.hessian_groups)
    assert set(every) == {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, CastedLinear)}
