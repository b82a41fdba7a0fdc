"""PR #1855's compression steps inside ``export_model``: per-group clip rules, the int8 gate rule, LQER and the
per-group lrzip container, on a real tiny GPT (the fixture-exact pieces are tested in test_lqer.py and
test_pergroup.py)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from pgolf_lit.errors import ArtifactError
from pgolf_lit.quant import ExportConfig, export_model, quantize_state_dict, read_artifact
from pgolf_lit.quant.hessians import collect_hessians
from pgolf_lit.quant.lqer import LqerSettings
from pgolf_lit.quant.quantized import dequantize
from test_quant import SMALL, calib, no_code, tiny_model

needs_lrzip = pytest.mark.skipif(shutil.which("lrzip") is None, reason="lrzip not installed (apt-get install lrzip)")

RECORD_RULES = dict(
    keep_float_max_numel=SMALL,
    attn={"bits": 6, "method": "gptq", "scale": "sdclip", "clip_sigmas": 13.0},
    mlp={"bits": 6, "method": "gptq", "scale": "sdclip", "clip_sigmas": 11.5},
    embed={"bits": 7, "method": "gptq", "scale": "sdclip", "clip_sigmas": 14.0},
    other={"bits": 6, "method": "gptq", "scale": "sdclip", "clip_sigmas": 12.85},
    lqer={"rank": 4, "top_k": 3},
    prune="none",
)


def hessians_of(model):
    return collect_hessians(model, calib(), modules="large", head=True, min_numel=SMALL, progress=False)[0]


def test_lqer_corrects_the_worst_tensors_and_dequantizes_with_the_correction():
    model = tiny_model(model_dim=64)
    hessians = hessians_of(model)
    sd = model.state_dict()
    plain_cfg = ExportConfig(**{**RECORD_RULES, "lqer": None})
    lqer_cfg = ExportConfig(**RECORD_RULES)
    plain_q, plain_m = quantize_state_dict(sd, plain_cfg, hessians, roles=model.roles)
    q, m = quantize_state_dict(sd, lqer_cfg, hessians, roles=model.roles)
    corrected = [n for n, e in m.items() if e.get("lqer")]
    assert len(corrected) == 3 and all(m[n]["method"] == "gptq" for n in corrected)
    assert m["tok_emb.weight"]["bits"] == 7
    plain, fixed = dequantize(plain_q, plain_m), dequantize(q, m)
    for name in corrected:
        assert (fixed[name].float() - sd[name]).norm() < (plain[name].float() - sd[name]).norm(), name
    for name in set(m) - set(corrected):
        assert torch.equal(fixed[name], plain[name]), name
    # the three chosen tensors are the three with the largest plain quantization error
    errors = {n: float((plain[n].float() - sd[n]).norm()) for n, e in plain_m.items() if e.get("method") == "gptq"}
    assert sorted(corrected) == sorted(sorted(errors, key=errors.get)[-3:])


def test_lqer_survives_the_native_container(tmp_path):
    model = tiny_model(model_dim=64)
    cfg = ExportConfig(**RECORD_RULES)
    export_model(model, cfg, tmp_path / "m.pgolf", calib_batches=calib(), code=no_code(), progress=False)
    quant, meta = quantize_state_dict(model.state_dict(), cfg, hessians_of(model), roles=model.roles)
    art = read_artifact(tmp_path / "m.pgolf")
    for name, t in dequantize(quant, meta).items():
        assert torch.equal(art.state_dict[name], t), name
    assert art.weights.tag == "int6"


@needs_lrzip
def test_per_group_container_round_trips_through_export(tmp_path):
    model = tiny_model(model_dim=64)
    cfg = ExportConfig(**{**RECORD_RULES, "format": "pergroup"})
    report = export_model(model, cfg, tmp_path / "m.ptz", calib_batches=calib(), code=no_code(), progress=False)
    data = (tmp_path / "m.ptz").read_bytes()
    assert data[:4] == b"PGRP" and report.model_bytes == len(data)
    with pytest.raises(ArtifactError, match="holds no model config"):
        read_artifact(tmp_path / "m.ptz")
    art = read_artifact(tmp_path / "m.ptz", model.config)
    # the container holds the record's live dtypes (a bf16 token table), as the record's deserialize gives them
    quant, meta = quantize_state_dict(
        {k: v.to(torch.bfloat16) if k == "tok_emb.weight" else v for k, v in model.state_dict().items()},
        cfg,
        hessians_of(model),
        roles=model.roles,
    )
    for name, t in dequantize(quant, meta).items():
        assert torch.equal(art.state_dict[name], t), name
    assert art.format == "pergroup" and art.weights.tag == "int6"


@needs_lrzip
def test_a_damaged_per_group_artifact_is_one_line(tmp_path):
    model = tiny_model(model_dim=64)
    cfg = ExportConfig(**{**RECORD_RULES, "format": "pergroup"})
    export_model(model, cfg, tmp_path / "m.ptz", calib_batches=calib(), code=no_code(), progress=False)
    data = (tmp_path / "m.ptz").read_bytes()
    (tmp_path / "cut.ptz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="cut.ptz"):
        read_artifact(tmp_path / "cut.ptz", model.config)
    over = dataclasses.replace(cfg, budget_bytes=1000)
    with pytest.raises(ArtifactError, match="exceed the 1,000-byte budget"):
        export_model(model, over, tmp_path / "big.ptz", calib_batches=calib(), code=no_code(), progress=False)
    assert not (tmp_path / "big.ptz").exists()


def test_lqer_needs_a_gptq_rule():
    from pgolf_lit.errors import ConfigError

    rtn = {"bits": 6, "method": "rtn", "scale": "sdclip"}
    with pytest.raises(ConfigError, match="export.lqer"):
        ExportConfig(attn=rtn, mlp=rtn, embed=rtn, other=rtn, lqer=LqerSettings())
