"""PR #1120's export (SKIP_GPTQ=1): every bank and the token embedding take the naive percentile-search int6, one
clip percentile per whole 3-D bank; checked against the record's own math and through an export → reload."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from pgolf_lit.config import CONFIG_DIR, GPTConfig, load_config
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.gpt import GPT
from pgolf_lit.quant.bank_percentile import bank_members
from pgolf_lit.quant.export import ExportConfig, build_model_from_artifact, export_model, quantize_state_dict
from pgolf_lit.quant.quantized import dequantize
from pgolf_lit.quant.rtn import quantize_percentile_search
from pgolf_lit.records import callback_init_args

ROW = CONFIG_DIR / "leaderboard" / "2026-03-30_pr1120.yaml"
LAYERS = 3
SMALL = 256  # keep-float threshold of the tiny model, so that all its matrices get quantized (the record: 65,536)


@dataclasses.dataclass(frozen=True)
class NoCode:
    """Stands in for the package code size: the test is about model bytes only."""

    counted_bytes: int = 0


def record_int6_per_row(t: Tensor, clip_range: int = 31) -> tuple[Tensor, Tensor]:
    """PR #1120 train_gpt.py ``quantize_int6_per_row`` on a 2-D tensor (the bank as ``reshape(-1, cols)``)."""
    t32 = t.float()
    best_q, best_s, best_err = None, None, float("inf")
    for pct in [0.9990, 0.9995, 0.9999, 0.99999, 1.0]:
        row_clip = torch.quantile(t32.abs(), pct, dim=1) if pct < 1.0 else t32.abs().amax(dim=1)
        s = (row_clip / clip_range).clamp_min(1.0 / clip_range).to(torch.float16)
        q = torch.clamp(torch.round(t32 / s.float()[:, None]), -clip_range, clip_range).to(torch.int8)
        err = (t32 - q.float() * s.float()[:, None]).pow(2).mean().item()
        if err < best_err:
            best_q, best_s, best_err = q, s, err
    return best_q, best_s


def record_banks(sd: dict[str, Tensor], n: int) -> dict[str, list[str]]:
    """The record's bank layout (GPT.__init__ / forward): qo_bank[i] = Q, qo_bank[n+i] = Out, kv_bank[i] = K,
    kv_bank[n+i] = V, mlp_up_bank[i], mlp_down_bank[i]; each bank as the per-block names of its slices."""
    blocks = [f"blocks.{i}." for i in range(n)]
    return {
        "qo_bank": [b + "attn.c_q.weight" for b in blocks] + [b + "attn.proj.weight" for b in blocks],
        "kv_bank": [b + "attn.c_k.weight" for b in blocks] + [b + "attn.c_v.weight" for b in blocks],
        "mlp_up_bank": [b + "mlp.fc.weight" for b in blocks],
        "mlp_down_bank": [b + "mlp.proj.weight" for b in blocks],
    }


def row_export(**changes) -> ExportConfig:
    """The leaderboard row's export settings (its GPTQExport callback), with test-size changes."""
    export = callback_init_args(load_config(ROW), "GPTQExport")["export"]
    return dataclasses.replace(ExportConfig.from_dict(export), **changes)


@pytest.fixture(scope="module")
def model() -> GPT:
    """A tiny GPT whose weights make the percentile search matter: rows beyond the 1/31 scale floor, and outliers
    in the first layer only, so a matrix searched alone can pick another percentile than its bank."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, num_layers=LAYERS, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=4.0)
    model = GPT(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(3.0 * torch.randn(p.shape, generator=g))
            if name.startswith("blocks.0.") and p.ndim == 2:
                spikes = torch.rand(p.shape, generator=g) < 0.01
                p.add_(spikes * 40.0 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_each_bank_gets_the_records_codes_and_scales(model):
    """Codes and fp16 scales equal the record's search on the stacked bank, row by row; tok_emb takes the same
    int6 search alone; and at least one matrix would have chosen differently on its own (the test can fail)."""
    cfg = row_export(keep_float_max_numel=SMALL)
    sd = model.state_dict()
    quant, meta = quantize_state_dict(sd, cfg, roles=model.roles)
    differs = 0
    for bank, names in record_banks(sd, LAYERS).items():
        ref_q, ref_s = record_int6_per_row(torch.stack([sd[n] for n in names]).reshape(-1, sd[names[0]].shape[1]))
        assert torch.equal(torch.cat([quant[f"{n}.q"] for n in names]), ref_q), bank
        assert torch.equal(torch.cat([quant[f"{n}.scale"] for n in names]), ref_s), bank
        assert len({meta[n]["percentile"] for n in names}) == 1 and all(meta[n]["bank"] == bank for n in names)
        differs += sum(quantize_percentile_search(sd[n], 6).percentile != meta[n]["percentile"] for n in names)
    assert differs > 0
    ref_q, ref_s = record_int6_per_row(sd["tok_emb.weight"])
    assert torch.equal(quant["tok_emb.weight.q"], ref_q) and torch.equal(quant["tok_emb.weight.scale"], ref_s)
    assert meta["tok_emb.weight"]["bits"] == 6 and "bank" not in meta["tok_emb.weight"]


def test_matrix_scope_searches_each_matrix_alone(model):
    """The default scope leaves the per-matrix search as it was."""
    sd = model.state_dict()
    quant, meta = quantize_state_dict(sd, row_export(keep_float_max_numel=SMALL, rtn={}), roles=model.roles)
    name = "blocks.1.mlp.fc.weight"
    assert torch.equal(quant[f"{name}.q"], record_int6_per_row(sd[name])[0]) and "bank" not in meta[name]


def test_export_then_reload_gives_the_dequantized_weights(model, tmp_path):
    """The row's export (native container, zstd) reads back to exactly the codes × scales it wrote."""
    cfg = row_export(keep_float_max_numel=SMALL)
    assert cfg.codec == "zstd" and cfg.shuffle_stride == 0 and not cfg.uses_gptq
    path = tmp_path / "final_model.int6.ptz"
    export_model(model, cfg, path, code=NoCode(), progress=False)
    quant, meta = quantize_state_dict(model.state_dict(), cfg, roles=model.roles)
    expected = dequantize(quant, meta)
    loaded = build_model_from_artifact(path).state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k].to(loaded[k].dtype)) for k in expected)
    assert not torch.equal(loaded["blocks.0.mlp.fc.weight"], model.state_dict()["blocks.0.mlp.fc.weight"])


def test_a_bank_mixing_bit_widths_or_an_unknown_scope_is_refused(model):
    bits = {name: 5 if name == "blocks.0.attn.c_q.weight" else 6 for name in model.state_dict()}
    with pytest.raises(ConfigError, match=r"bank qo_bank mixes bit widths \[5, 6\]"):
        bank_members(bits, model.roles)
    with pytest.raises(ConfigError, match="export.rtn.percentile_scope: expected 'matrix' or 'bank'"):
        row_export(rtn={"percentile_scope": "layer"})
