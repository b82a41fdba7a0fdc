"""The techniques of the early leaderboard rows (PR #39 … #180), each against its record script's own math
(records/track_10min_16mb/<folder>/train_gpt.py, written out here as a few lines of plain torch)."""

from __future__ import annotations

import pytest
import torch

from pgolf_lit.config import GPTConfig
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.gpt import GPT
from pgolf_lit.quant.export import ExportConfig, TensorRule, export_model, load_artifact

SMALL = 256  # keep-float threshold for the tiny models here, so that all their matrices get quantized
INT8_CLIP_Q = 99.99984 / 100.0
# the baseline's CONTROL_TENSOR_NAME_PATTERNS: kept fp32 (INT8_KEEP_FLOAT_FP32_NAME_PATTERNS)
CONTROLS = ("attn_scale", "mlp_scale", "resid_mix", "q_gain", "skip_weight", "smear", "bigram.scale")


class NoCode:
    counted_bytes = 0


def tiny_model(seed: int = 0, **changes) -> GPT:
    base = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=4.0)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**base, **changes}))
    with torch.no_grad():  # give zero-initialised weights some content
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def int8_export(**changes) -> ExportConfig:
    """The baseline's int8 + zlib export (configs/leaderboard/2026-03-18_baseline.yaml) in the native container."""
    rule = dict(method="rtn", bits=8, scale="quantile")
    groups = {g: TensorRule(**rule) for g in ("mlp", "attn", "embed", "other")}
    return ExportConfig(**groups, small_controls_fp32=True, codec="zlib", shuffle_stride=0, prune="none", **changes)


def record_int8_roundtrip(sd: dict, keep: tuple[str, ...], small: int = SMALL) -> dict:
    """PR #42/#63 ``quantize_state_dict_int8`` then ``dequantize_state_dict_int8``: small tensors and those whose
    name contains a keep pattern pass through (controls fp32, the rest fp16, cast back), every other matrix is
    int8 per row at the 99.99984 % quantile, scale max(clip/127, 1/127), stored fp16."""
    out = {}
    for name, t in sd.items():
        if t.numel() <= small or any(p in name for p in keep):
            out[name] = t.float() if any(p in name for p in CONTROLS) else t.to(torch.float16).to(t.dtype)
            continue
        t32 = t.float()
        clip_abs = torch.quantile(t32.abs(), INT8_CLIP_Q, dim=1)
        clipped = torch.maximum(torch.minimum(t32, clip_abs[:, None]), -clip_abs[:, None])
        scale = (clip_abs / 127.0).clamp_min(1.0 / 127.0)
        q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127)
        out[name] = (q * scale.to(torch.float16).float()[:, None]).to(t.dtype)
    return out


# ---------------------------------------------------------------------------------------------------------
# Float keep of named tensors (PR #42 tok_emb.weight; PR #162/#180 FP16_KEEP_NAME_PATTERNS)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keep",
    [("tok_emb.weight",), ("tok_emb", "blocks.1.attn.c_k")],
    ids=["pr42", "pr162"],
)
def test_kept_tensors_come_back_as_the_records_fp16_passthrough(tmp_path, keep):
    model = tiny_model()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = int8_export(keep_float_max_numel=SMALL, keep_float=list(keep))
    report = export_model(model, cfg, tmp_path / "m.pgolf", code=NoCode(), progress=False)
    _, state = load_artifact(tmp_path / "m.pgolf")
    expected = record_int8_roundtrip(sd, keep)
    assert set(state) == set(expected)
    for name in expected:
        assert state[name].dtype == expected[name].dtype, name
        assert torch.equal(state[name], expected[name]), name
    # the kept matrices are floats, not codes: the keep changed the routing (c_k of layer 0 stays quantized)
    kept = [n for n in sd if any(p in n for p in keep)]
    assert "tok_emb.weight" in kept and "blocks.0.attn.c_k.weight" not in kept
    assert not torch.equal(state["blocks.0.attn.c_k.weight"], sd["blocks.0.attn.c_k.weight"].half().float())
    assert report.num_kept == sum(1 for n, t in sd.items() if t.numel() <= SMALL or n in kept)


def test_a_keep_pattern_that_names_no_tensor_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"export.keep_float: pattern\(s\) \['tok_embed'\] match no tensor"):
        export_model(tiny_model(), int8_export(keep_float=["tok_embed"]), tmp_path / "m", code=NoCode(), progress=False)
    with pytest.raises(ConfigError, match="export.keep_float: expected non-empty"):
        int8_export(keep_float=[""])
