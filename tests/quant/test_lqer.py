"""QuantGate (pgolf_lit.quant.gate) and LQER (pgolf_lit.quant.lqer) against PR #1855's fixture, and their math.

Fixture cases: see ``pr1855_case.py``; every setting comes from the case's hparams.json.
"""

from __future__ import annotations

import pytest
import torch

from pgolf_lit.errors import ConfigError
from pgolf_lit.quant.gate import GateSettings, dequantize_gate_rows
from pgolf_lit.quant.gptq import gptq_sdclip
from pgolf_lit.quant.lqer import (
    ASYM,
    SYM,
    LqerFactors,
    LqerSettings,
    lqer_apply,
    lqer_correction,
    lqer_dequant,
    lqer_factor,
    lqer_pack,
    lqer_pack_asym,
    lqer_pack_sym,
    lqer_select,
    quantization_error,
)
from pgolf_lit.quant.pergroup import parse_meta
from pr1855_case import case, is_quant_gate, pergroup_cases, quantize_gate_rows

CASES = pergroup_cases()


def gate_names(c) -> list:
    return [n for n, info in c.qmeta["meta"].items() if info == "gate_int8_row"]


@pytest.mark.parametrize("path", CASES)
def test_gate_int8_rows_match_fixture(path):
    c = case(path)
    weights, expected = c.flat_state_dict(), c.tensors("expected_quant.pt")
    dequant = c.tensors("expected_dequant.pt")
    names = gate_names(c)
    assert names, "the case quantizes at least one gate"
    for name, t in weights.items():
        assert is_quant_gate(name, t) == (name in names and c.hyper["gated_attn_quant_gate"]), name
    for name in names:
        q, s = quantize_gate_rows(weights[name])
        assert q.dtype == torch.int8 and torch.equal(q, expected[name + ".gq"]), name
        assert s.dtype == torch.float16 and torch.equal(s, expected[name + ".gs"]), name
        dtype = getattr(torch, c.qmeta["template_dtypes"][name])
        assert torch.equal(dequantize_gate_rows(q, s, dtype), dequant[name]), name


def lqer_names(c) -> dict:
    return {n: parse_meta(m).lqer for n, m in c.qmeta["meta"].items() if parse_meta(m).lqer}


@pytest.mark.parametrize("path", CASES)
def test_lqer_selection_factors_and_packs_match_fixture(path):
    """From the fixture's GPTQ codes: ‖E‖_F scores, the chosen top-k, the SVD factors (exact: the SVD runs on one
    thread, as the fixture's did), and the packed codes and scales."""
    c = case(path)
    weights, expected = c.flat_state_dict(), c.tensors("expected_quant.pt")
    stored = c.tensors("lqer_factors.pt")
    settings = c.lqer_settings()
    gptq = [n for n, m in c.qmeta["meta"].items() if parse_meta(m).kind == "gptq"]
    scores = {n: float(quantization_error(weights[n], expected[n + ".q"], expected[n + ".scale"]).norm()) for n in gptq}
    candidates = c.qmeta["lqer"]["candidates_E_fro_desc"]
    assert [[n, scores[n]] for n, _ in candidates] == candidates
    assert lqer_select(scores, settings.top_k) == c.qmeta["lqer"]["chosen"] == list(stored)
    kinds = lqer_names(c)
    for name, ref in stored.items():
        error = quantization_error(weights[name], expected[name + ".q"], expected[name + ".scale"])
        a, b = lqer_factor(error, settings.rank, settings.svd_threads)
        assert torch.equal(a, ref["A"]) and torch.equal(b, ref["B"]), f"{name}: SVD factors differ"
        for packed in (lqer_pack(a, b, settings), lqer_pack(ref["A"], ref["B"], settings)):
            assert packed.kind == kinds[name] == {"asym": ASYM, "sym": SYM}[ref["branch"]]
            for key, t in packed.tensors(name).items():
                assert t.dtype == expected[key].dtype and torch.equal(t, expected[key]), key
        packed_error = error - lqer_correction(packed)
        assert float(packed_error.norm()) == pytest.approx(ref["E_fro_after_packed_factors"], rel=1e-6)
    factors = lqer_apply(weights, expected, gptq, settings)
    assert list(factors) == list(stored)


@pytest.mark.parametrize("path", CASES)
def test_lqer_dequant_matches_fixture(path):
    c = case(path)
    expected = c.tensors("expected_quant.pt")
    dequant = c.unbank(c.tensors("expected_dequant.pt"))
    for name, kind in lqer_names(c).items():
        dtype = getattr(torch, c.qmeta["template_dtypes"][name])
        factors = LqerFactors.from_tensors(expected, name, kind)
        w = lqer_dequant(expected[name + ".q"], expected[name + ".scale"], factors, dtype)
        assert w.dtype == dequant[name].dtype and torch.equal(w, dequant[name]), name


def test_asym_pack_ranges_groups_and_reconstruction():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, 3, generator=g), torch.randn(3, 64, generator=g) * torch.logspace(-2, 1, 64)
    f = lqer_pack_asym(a, b, group=32)
    assert f.kind == ASYM and f.sA.ndim == 0 and f.sB.shape == (3 * 64 // 32,)
    assert f.qA.min() >= -2 and f.qA.max() <= 1 and f.qB.min() >= -8 and f.qB.max() <= 7
    assert f.qA.dtype == f.qB.dtype == torch.int8 and f.sA.dtype == f.sB.dtype == torch.float16
    # each group's largest |value| lands on ±7.5 → code 7 or -8 (clamped)
    per_group = f.qB.reshape(-1, 32).abs().amax(dim=1)
    assert bool(((per_group == 7) | (per_group == 8)).all())
    with pytest.raises(ValueError, match="multiple of the group"):
        lqer_pack_asym(a, b[:, :50], group=32)


def test_symmetric_fallback_when_group_does_not_divide():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(30, 4, generator=g), torch.randn(4, 18, generator=g)  # 72 values, group 64
    f = lqer_pack(a, b, LqerSettings(factor_bits=4))
    assert f.kind == SYM and f.sA.shape == (30,) and f.sB.shape == (4,)
    assert f.qA.abs().max() <= 7 and f.qB.abs().max() <= 7
    assert lqer_pack(a, b, LqerSettings(asym=False, asym_group=8)).kind == SYM
    assert lqer_pack(a, b, LqerSettings(asym_group=8)).kind == ASYM
    assert lqer_pack_sym(a, b, 3).qA.abs().max() <= 3


def test_lqer_recovers_low_rank_error():
    """On an error with rank-2 structure, the rank-4 correction removes most of it; the dequant adds it to q·s."""
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-31, 32, (48, 128), generator=g, dtype=torch.int8)
    scale = (torch.rand(48, generator=g) * 0.01 + 0.001).half()
    low_rank = torch.randn(48, 2, generator=g) @ torch.randn(2, 128, generator=g) * 0.01
    w = q.float() * scale.float()[:, None] + low_rank + torch.randn(48, 128, generator=g) * 1e-4
    error = quantization_error(w, q, scale)
    plain = lqer_dequant(q, scale)
    for settings in (LqerSettings(), LqerSettings(asym=False)):
        f = lqer_pack(*lqer_factor(error, 4), settings)
        corrected = lqer_dequant(q, scale, f)
        assert (w - corrected).norm() < 0.75 * (w - plain).norm(), f.kind  # asym: A has 4 levels only
        assert torch.equal(lqer_dequant(q, scale, f, torch.bfloat16), corrected.bfloat16())


def test_lqer_select_is_stable_and_settings_validate():
    assert lqer_select({"a": 1.0, "b": 3.0, "c": 3.0, "d": 2.0}, 3) == ["b", "c", "d"]
    assert lqer_select({"a": 1.0}, 0) == []
    a, b = lqer_factor(torch.randn(5, 3), rank=8)
    assert a.shape == (5, 3) and b.shape == (3, 3)
    for bad in (dict(rank=0), dict(top_k=-1), dict(asym_group=0), dict(factor_bits=9), dict(svd_threads=0)):
        with pytest.raises(ConfigError):
            LqerSettings(**bad)


def test_gate_routing_bounds_and_zero_rows():
    s = GateSettings()
    assert is_quant_gate("blocks.3.attn.attn_gate_w", torch.zeros(8, 12), s)
    assert not is_quant_gate("blocks.3.attn.attn_gate_w", torch.zeros(4, 4), s)  # 16 < 32
    assert not is_quant_gate("blocks.3.attn.attn_gate_w", torch.zeros(96), s)  # not 2-D
    assert not is_quant_gate("blocks.3.attn.gate", torch.zeros(8, 12), s)
    q, scale = quantize_gate_rows(torch.tensor([[0.0, 0.0], [1.0, -0.5]]))
    assert q[1].tolist() == [127, -64]
    # the record's quirk, kept: the 1e-10 floor / 127 underflows fp16 to 0, so a zero row has scale 0 (its codes
    # come from 0/0) and still dequantizes to zeros
    assert scale[0] == 0 and dequantize_gate_rows(q, scale)[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("path", CASES)
def test_bf16_live_weights_give_the_same_codes_and_errors(path):
    """The record's live tok_emb is bf16 (the fixture stores its values as fp32): same GPTQ codes, same ‖E‖_F."""
    c = case(path)
    weights, expected = c.flat_state_dict(), c.tensors("expected_quant.pt")
    hessians = c.tensors(c.hp["hessians"]["file"])
    names = [n for n, d in c.qmeta["template_dtypes"].items() if d == "bfloat16" and n + ".q" in expected]
    for name in names:
        _, bits, sigmas = c.route(name, weights[name])
        live = weights[name].bfloat16()
        assert torch.equal(live.float(), weights[name]), f"{name}: the fixture's values are bf16 values"
        r = gptq_sdclip(live, hessians[name], bits, sigmas)
        assert torch.equal(r.q, expected[name + ".q"]) and torch.equal(r.scale, expected[name + ".scale"]), name
        e = quantization_error(live, expected[name + ".q"], expected[name + ".scale"])
        assert float(e.norm()) == c.qmeta["tensors"][name]["lqer_candidate_E_fro"], name
