"""Trace-ranked int5/int6 mixing against the record scripts' own selection: PR #1204's (records/track_10min_16mb/
2026-03-31_ParallelResiduals_MiniDepthRecurrence/train_gpt.py, after the GPTQ calibration: the recurrent layers'
tensors first, then the rest by trace, up to N_INT6_LAYERS) and PR #1105's (the same without the recurrent layers).
The reference is written on the record's own names, in its unbanked state-dict order, on a tiny PR #1204 model with
random Hessians where c_q, c_k and c_v of a layer share one (as the record accumulates them), so the ties between
them are exercised, and bigram.proj has none (trace 0, as in the record)."""

from __future__ import annotations


import pytest
import torch

from pgolf_lit.errors import ConfigError
from pgolf_lit.quant.export import ExportConfig, _trace_ranked_low_bits, quantize_state_dict
from pgolf_lit.quant.hessians import hooked_linears
from pgolf_lit.quant.quantizers import clip_range, quantizers
from pgolf_lit.quant.trace_rank import recurrent_layers
from pr1204_case import randomized, tiny_cfg

KEEP_FLOAT = 128  # the tiny model's bigram.proj (8×32) and every block matrix are quantized, as at full size
GPTQ = dict(method="gptq", bits=6, scale="percentile_search")


def record_classify(name: str) -> str:
    """Upstream ``_classify_param`` (the canon branches aside)."""
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name or name.startswith("repeat_mlp."):
        return "mlp"
    if ".attn." in name or (".proj." in name and ".mlp." not in name):
        return "attn"
    return "other"


def record_unbanked_names(num_layers: int, recur_layers: list[int]) -> list[str]:
    """The record's unbanked state-dict order of its matrices: bigram.proj, then qo_bank (c_q_i, proj_i), kv_bank
    (c_k_i, c_v_i), the MLP banks, and repeat_mlp.<k> (k indexes RECUR_LAYERS); layer 0's attention dropped."""
    names = ["bigram.proj.weight"]
    for i in range(num_layers):
        names += [f"blocks.{i}.attn.c_q.weight", f"blocks.{i}.attn.proj.weight"]
    for i in range(num_layers):
        names += [f"blocks.{i}.attn.c_k.weight", f"blocks.{i}.attn.c_v.weight"]
    names += [f"blocks.{i}.mlp.fc.weight" for i in range(num_layers)]
    names += [f"blocks.{i}.mlp.proj.weight" for i in range(num_layers)]
    for k in range(len(recur_layers)):
        names += [f"repeat_mlp.{k}.fc.weight", f"repeat_mlp.{k}.proj.weight"]
    return [n for n in names if not n.startswith("blocks.0.attn.")]  # DISABLE_LAYER0_ATTN


def record_clip_ranges(sd, hessians, recur_layers, n_int6, min_numel):
    """Upstream, after ``gptq:done`` (MIXED_QUANT=1): name → clip range, 31 (int6) or 15 (int5)."""

    def physical_layer(name):  # _get_physical_layer_idx_from_name
        parts = name.split(".")
        if parts[0] == "blocks":
            return int(parts[1])
        if parts[0] == "repeat_mlp" and int(parts[1]) < len(recur_layers):
            return recur_layers[int(parts[1])]
        return None

    quant_names = [
        n for n in sd if record_classify(n) in {"mlp", "attn"} and sd[n].ndim >= 1 and sd[n].numel() > min_numel
    ]
    sens = {n: hessians[n].diag().sum().item() if n in hessians else 0.0 for n in quant_names}
    ranked = sorted(sens.items(), key=lambda x: -x[1])
    clip_ranges = {n: 15 for n in quant_names}
    recur_quant_names = [n for n in quant_names if physical_layer(n) in set(recur_layers)]
    recur_ranked = sorted(recur_quant_names, key=lambda n: -sens[n])
    selected = recur_ranked[: min(n_int6, len(recur_ranked))]
    for name, _ in ranked:
        if len(selected) >= n_int6:
            break
        if name not in selected:
            selected.append(name)
    for name in selected:
        clip_ranges[name] = 31
    return clip_ranges


@pytest.fixture(scope="module")
def case():
    """A tiny PR #1204 model (layers 1-2 recurrent, untied MLPs, layer 0's attention off), its random Hessians and
    the same tensors under the record's names and order."""
    cfg = tiny_cfg()
    model = randomized(cfg)
    g = torch.Generator().manual_seed(3)
    hessians, shared = {}, {}
    for name, module in hooked_linears(model, "layers").items():
        key = name.replace("c_k", "c_q").replace("c_v", "c_q")  # q, k and v read one input: one Hessian
        if key not in shared:
            a = torch.randn(module.weight.shape[1], 3 * module.weight.shape[1], generator=g)
            scale = 0.3 if model.roles[name].layer in recurrent_layers(cfg) else 1.0  # rank them low by trace
            shared[key] = scale * torch.rand((), generator=g) * (a @ a.T) / a.shape[1]
        hessians[name] = shared[key]
    assert "bigram.proj.weight" not in hessians  # PR #1204's _init_hessians: blocks and repeat_mlp only
    sd = model.state_dict()
    ours_of_record = {n: n for n in record_unbanked_names(cfg.num_layers, cfg.recur_layers)}
    for k, layer in enumerate(cfg.recur_layers):
        for m in ("fc", "proj"):
            ours_of_record[f"repeat_mlp.{k}.{m}.weight"] = f"repeat_mlp.{layer}.{m}.weight"
    record_sd = {r: sd[o] for r, o in ours_of_record.items()}
    record_h = {r: hessians[o] for r, o in ours_of_record.items() if o in hessians}
    return cfg, model, hessians, ours_of_record, record_sd, record_h


def export_config(keep: int, recurrent_first: bool) -> ExportConfig:
    return ExportConfig(
        keep_float_max_numel=KEEP_FLOAT,
        mlp=GPTQ,
        attn=GPTQ,
        trace_rank_keep=keep,
        trace_rank_recurrent_first=recurrent_first,
    )


@pytest.mark.parametrize("recurrent_first", [True, False], ids=["pr1204", "pr1105"])
def test_the_chosen_int6_set_is_the_records_for_every_n(case, recurrent_first):
    cfg, model, hessians, ours_of_record, record_sd, record_h = case
    recur = cfg.recur_layers if recurrent_first else []
    n = len(ours_of_record)
    sd, layers = model.state_dict(), recurrent_layers(cfg)
    for keep in range(n + 2):  # the selection alone (quantize_state_dict applies it: see the codes test below)
        expected = record_clip_ranges(record_sd, record_h, recur, keep, KEEP_FLOAT)
        low = _trace_ranked_low_bits(sd, export_config(keep, recurrent_first), hessians, model.roles, layers)
        got = {r: clip_range(low.get(o, 6)) for r, o in ours_of_record.items()}
        assert got == expected, keep
    # the forcing matters here: with the recurrent layers ranked low, PR #1204's pick differs from PR #1105's
    assert record_clip_ranges(record_sd, record_h, cfg.recur_layers, 8, KEEP_FLOAT) != record_clip_ranges(
        record_sd, record_h, [], 8, KEEP_FLOAT
    )


def test_codes_follow_the_record_clip_ranges(case):
    """Each tensor's codes are its quantizer's at the record's clip range (GPTQ, or RTN for bigram.proj without a
    Hessian, as the record's quantize_int6_per_row), so the int5 tensors stay within ±15."""
    cfg, model, hessians, ours_of_record, record_sd, record_h = case
    keep = 11  # cuts through layer 2's c_q/c_k/c_v tie: the record's state-dict order decides
    export = export_config(keep, True)
    quant, meta = quantize_state_dict(
        model.state_dict(), export, hessians, roles=model.roles, recurrent_layers=recurrent_layers(cfg)
    )
    expected = record_clip_ranges(record_sd, record_h, cfg.recur_layers, keep, KEEP_FLOAT)
    assert sorted(expected.values()).count(31) == keep
    assert [expected[f"blocks.2.attn.{m}.weight"] for m in ("c_q", "c_k", "c_v")] == [31, 15, 15]
    gptq = quantizers()["gptq"]
    for record_name, name in ours_of_record.items():
        bits = {31: 6, 15: 5}[expected[record_name]]
        q, _ = gptq.quantize(
            name, record_sd[record_name], export.rule(model.roles[name]), bits, hessians.get(name), export.gptq
        )
        assert torch.equal(quant[f"{name}.q"], q.q) and torch.equal(quant[f"{name}.scale"], q.scale), name
        assert quant[f"{name}.q"].abs().max() <= expected[record_name]
        assert meta[name]["bits"] == bits


def test_recurrent_layers_come_from_the_layer_schedule():
    assert recurrent_layers(tiny_cfg()) == {1, 2}
    assert recurrent_layers(tiny_cfg(recurrence="none", recur_layers=[], repeat_untie_mlp="none")) == set()


def test_recurrent_first_needs_a_rank_and_the_models_layers(case):
    with pytest.raises(ConfigError, match="export.trace_rank_recurrent_first"):
        ExportConfig(trace_rank_recurrent_first=True)
    _, model, hessians, *_ = case
    export = ExportConfig(keep_float_max_numel=KEEP_FLOAT, trace_rank_keep=4, trace_rank_recurrent_first=True)
    with pytest.raises(ConfigError, match="recurrent layers"):
        quantize_state_dict(model.state_dict(), export, hessians, roles=model.roles)


def test_layers_hessians_hook_the_block_and_repeated_mlp_matrices_only():
    """PR #1204's _init_hessians: every attn/mlp matrix of the blocks (layer 0's attention is off) and of the untied
    repeated MLPs, at any size, and nothing else (bigram.proj, the value embedding's projection)."""
    cfg = tiny_cfg()
    model = randomized(cfg)
    names = set(hooked_linears(model, "layers", min_numel=10**9))
    expected = {f"blocks.{i}.mlp.{m}.weight" for i in range(cfg.num_layers) for m in ("fc", "proj")}
    expected |= {f"blocks.{i}.attn.{m}.weight" for i in range(1, cfg.num_layers) for m in ("c_q", "c_k", "c_v", "proj")}
    expected |= {f"repeat_mlp.{layer}.{m}.weight" for layer in cfg.recur_layers for m in ("fc", "proj")}
    assert names == expected
