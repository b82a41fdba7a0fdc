"""AWQ-lite (PR #1945's ``export.awq``) inside ``export_model`` on a tiny GPT: the calibration pass's activation
statistics choose the groups, the protected columns use the finer grid, the artifact (native and PGRP) reads back to
the same weights, and the settings refuse what cannot work. The record's numbers are pinned by
tests/fixtures/test_frontier_fixtures.py (quant/pr1945_awq_lite_gptq)."""

from __future__ import annotations

import shutil

import pytest
import torch

from pgolf_lit.errors import ConfigError
from pgolf_lit.quant import ExportConfig, export_model, quantize_state_dict, read_artifact
from pgolf_lit.quant.awq import group_scores
from pgolf_lit.quant.hessians import collect_hessians
from pgolf_lit.quant.quantized import dequantize
from test_export_pr1855 import RECORD_RULES
from test_quant import SMALL, calib, no_code, tiny_model

needs_lrzip = pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip not installed (apt-get install lrzip)")
AWQ = {"bits": 8, "top_k": 2, "group_size": 16}


def calibrated(model):
    return collect_hessians(model, calib(), modules="large", head=True, min_numel=SMALL, progress=False)


def test_awq_protects_the_top_groups_on_the_finer_grid():
    model = tiny_model(model_dim=64)
    hessians, report = calibrated(model)
    assert sorted(report.act_rms) == sorted(hessians)
    cfg = ExportConfig(**RECORD_RULES, awq=AWQ)
    plain_q, plain_m = quantize_state_dict(
        model.state_dict(), ExportConfig(**RECORD_RULES), hessians, roles=model.roles
    )
    quant, meta = quantize_state_dict(model.state_dict(), cfg, hessians, roles=model.roles, act_rms=report.act_rms)
    protected = [n for n, e in meta.items() if e.get("awq")]
    # the chosen groups are the two best of every GPTQ tensor's groups, by activation RMS × mean |W|
    sd = model.state_dict()
    scored = sorted(
        (
            (score, n, s)
            for n, e in plain_m.items()
            if e.get("method") == "gptq" and sd[n].ndim == 2
            for score, s, _ in group_scores(sd[n], report.act_rms[n], AWQ["group_size"])
        ),
        reverse=True,
    )
    chosen = {(n, s) for _, n, s in scored[: AWQ["top_k"]]}
    got = {(n, s) for n in protected for s in quant[n + ".awqg_start"].tolist()}
    assert got == chosen and 1 <= len(protected) <= 2
    for name in protected:
        bits, size = meta[name]["bits"], int(quant[name + ".awqg_size"])
        cols = torch.zeros(quant[name + ".q"].shape[1], dtype=torch.bool)
        for start in quant[name + ".awqg_start"].tolist():
            cols[start : start + size] = True
        q, plain = quant[name + ".q"], plain_q[name + ".q"]
        assert q[:, ~cols].abs().max() <= 2 ** (bits - 1) - 1 and q[:, cols].abs().max() <= 127
        # the same columns on a grid (2^7 - 1) / (2^(bits-1) - 1) times finer: codes that much larger
        ratio = q[:, cols].abs().float().mean() / plain[:, cols].abs().float().mean()
        assert 0.8 * 127 / (2 ** (bits - 1) - 1) < ratio < 1.2 * 127 / (2 ** (bits - 1) - 1)
        s_hi, s = quant[name + ".awqg_s_hi"].float(), quant[name + ".scale"].float()
        torch.testing.assert_close(s_hi * 127, s * (2 ** (bits - 1) - 1), rtol=2e-3, atol=0)  # same clip, finer step
        # the protected columns reconstruct closer to the weight than the plain export's
        w = sd[name].float()
        err = (dequantize(quant, meta)[name].float() - w)[:, cols].norm()
        plain_err = (dequantize(plain_q, plain_m)[name].float() - w)[:, cols].norm()
        assert err < plain_err
    for name in set(meta) - set(protected):
        if meta[name]["kind"] == "int" and not meta[name].get("lqer"):
            assert torch.equal(quant[name + ".q"], plain_q[name + ".q"]) or name in {n for n, _ in chosen}


def test_awq_survives_the_native_container(tmp_path):
    model = tiny_model(model_dim=64)
    cfg = ExportConfig(**RECORD_RULES, awq=AWQ)
    export_model(model, cfg, tmp_path / "m.pgolf", calib_batches=calib(), code=no_code(), progress=False)
    hessians, report = calibrated(model)
    quant, meta = quantize_state_dict(model.state_dict(), cfg, hessians, roles=model.roles, act_rms=report.act_rms)
    assert any(e.get("awq") == 8 for e in meta.values())
    art = read_artifact(tmp_path / "m.pgolf")
    for name, t in dequantize(quant, meta).items():
        assert torch.equal(art.state_dict[name], t), name


@needs_lrzip
def test_awq_survives_the_per_group_container(tmp_path):
    from pgolf_lit.quant.pergroup import read_pergroup

    model = tiny_model(model_dim=64)
    cfg = ExportConfig(**{**RECORD_RULES, "format": "pergroup"}, awq=AWQ)
    export_model(model, cfg, tmp_path / "m.ptz", calib_batches=calib(), code=no_code(), progress=False)
    _, strings = read_pergroup(tmp_path / "m.ptz")
    assert any(s.startswith("gptq (int") and "+awqgrpint8" in s for s in strings.values())
    art = read_artifact(tmp_path / "m.ptz", model.config)
    hessians, report = calibrated(model)
    sd = {k: v.to(torch.bfloat16) if k == "tok_emb.weight" else v for k, v in model.state_dict().items()}
    quant, meta = quantize_state_dict(sd, cfg, hessians, roles=model.roles, act_rms=report.act_rms)
    for name, t in dequantize(quant, meta).items():
        assert torch.equal(art.state_dict[name], t), name


def test_awq_settings_refuse_what_cannot_work():
    model = tiny_model(model_dim=64)
    hessians, _ = calibrated(model)
    with pytest.raises(ConfigError, match="act_rms"):
        quantize_state_dict(model.state_dict(), ExportConfig(**RECORD_RULES, awq=AWQ), hessians, roles=model.roles)
    rtn = {"bits": 6, "method": "rtn", "scale": "sdclip"}
    with pytest.raises(ConfigError, match="export.awq"):
        ExportConfig(attn=rtn, mlp=rtn, embed=rtn, other=rtn, awq=AWQ)
    with pytest.raises(ConfigError, match="export.awq"):
        ExportConfig(**RECORD_RULES, awq={**AWQ, "bits": 9})
    with pytest.raises(ConfigError, match="export.awq"):
        ExportConfig(**{**RECORD_RULES, "format": "upstream"}, awq=AWQ)
