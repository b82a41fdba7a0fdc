"""The techniques of the early leaderboard rows (PR #39 … #180), each against its record script's own math
(records/track_10min_16mb/<folder>/train_gpt.py, written out here as a few lines of plain torch)."""

from __future__ import annotations

import pytest
import torch

from pgolf_lit.config import GPTConfig
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.gpt import GPT
from pgolf_lit.quant.export import ExportConfig, TensorRule, export_model, load_artifact, quantize_state_dict

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
    settings = {g: TensorRule(**rule) for g in ("mlp", "attn", "embed", "other")}
    settings.update(small_controls_fp32=True, codec="zlib", shuffle_stride=0, prune="none")
    return ExportConfig(**{**settings, **changes})


def record_int8_roundtrip(
    sd: dict, keep: tuple[str, ...], small: int = SMALL, int4_layers: tuple[int, ...] = (), int4_step: int = 16
) -> dict:
    """PR #42/#63 ``quantize_state_dict_int8`` then ``dequantize_state_dict_int8``: small tensors and those whose
    name contains a keep pattern pass through (controls fp32, the rest fp16, cast back), every other matrix is
    int8 per row at the 99.99984 % quantile, scale max(clip/127, 1/127), stored fp16. PR #39 then rounds the codes
    of blocks ``int4_layers`` to multiples of ``int4_step``, clamped to [-127, 127]."""
    out = {}
    for name, t in sd.items():
        if t.numel() <= small or any(p in name for p in keep):
            out[name] = t.float() if any(p in name for p in CONTROLS) else t.to(torch.float16).to(t.dtype)
            continue
        t32 = t.float()
        clip_abs = torch.quantile(t32.abs(), INT8_CLIP_Q, dim=1)
        clipped = torch.maximum(torch.minimum(t32, clip_abs[:, None]), -clip_abs[:, None])
        scale = (clip_abs / 127.0).clamp_min(1.0 / 127.0)
        q = torch.clamp(torch.round(clipped / scale[:, None]), -127, 127).to(torch.int8)
        layer_num = int(name.split("blocks.")[1].split(".")[0]) if "blocks." in name else -1
        if layer_num in int4_layers:
            q = ((q.float() / int4_step).round() * int4_step).clamp(-127, 127).to(torch.int8)
        out[name] = (q.float() * scale.to(torch.float16).float()[:, None]).to(t.dtype)
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


# ---------------------------------------------------------------------------------------------------------
# PR #162/#180's export: int6 (int5 MLP) per row at max|w|, 8,192-element keep threshold, fp16 keep, 3 % pruning
# ---------------------------------------------------------------------------------------------------------


def record_prune(sd: dict, fraction: float = 0.03, min_numel: int = 65536) -> dict:
    """PR #180: ``param.masked_fill_(param.abs() < quantile(|param|, 0.03), 0)`` on 2-D tensors above 65,536."""
    out = dict(sd)
    for name, p in sd.items():
        if p.ndim == 2 and p.numel() > min_numel:
            threshold = torch.quantile(p.abs().float().flatten(), fraction)
            out[name] = p.masked_fill(p.abs() < threshold, 0.0)
    return out


def record_mixed_int6_roundtrip(sd: dict, keep: tuple[str, ...], small: int, mlp_clip: int) -> dict:
    """PR #162/#180 ``mixed_quantize_int6`` then ``dequantize_mixed_int6``: small tensors fp16, kept names fp16,
    mlp/attn/bigram rows at scale fp16(max|w|/clip), codes in [-(clip+1), clip]; other matrices the baseline int8."""
    out = {}
    for name, t in sd.items():
        if t.numel() <= small or any(p in name for p in keep):
            out[name] = t.to(torch.float16).to(t.dtype)
            continue
        if ".mlp." in name or "bigram" in name or ".attn." in name:
            clip = mlp_clip if ".mlp." in name else 31
            t32 = t.float()
            scale = (t32.abs().amax(dim=1) / clip).clamp_min(1e-12).to(torch.float16)
            scale = scale.clamp_min(torch.finfo(torch.float16).tiny)
            q = torch.clamp(torch.round(t32 / scale.float()[:, None]), -(clip + 1), clip)
            out[name] = (q * scale.float()[:, None]).to(t.dtype)
        else:
            out[name] = record_int8_roundtrip({name: t}, (), small=-1)[name]
    return out


def pr180_export(small: int, **changes) -> ExportConfig:
    """configs/leaderboard/2026-03-20_pr180.yaml's export at a tiny keep threshold."""
    int6 = dict(method="rtn", bits=6, scale="row_amax")
    return int8_export(
        mlp=TensorRule(method="rtn", bits=5, scale="row_amax"),
        attn=TensorRule(**int6),
        other=TensorRule(**int6),
        small_controls_fp32=False,
        keep_float_max_numel=small,
        **changes,
    )


def test_pr180_export_is_the_records_pruned_mixed_int5_int6_roundtrip(tmp_path):
    model = tiny_model(bigram_vocab_size=64, bigram_dim=16)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keep = ("tok_emb", "blocks.1.attn.c_k")
    prune = {"fraction": 0.03, "min_numel": 600}  # prunes the 1024+ element matrices, leaves c_k / bigram.proj
    cfg = pr180_export(SMALL, keep_float=list(keep), magnitude_prune=prune)
    export_model(model, cfg, tmp_path / "m.pgolf", code=NoCode(), progress=False)
    _, state = load_artifact(tmp_path / "m.pgolf")
    expected = record_mixed_int6_roundtrip(record_prune(sd, min_numel=600), keep, SMALL, mlp_clip=15)
    for name in expected:
        assert torch.equal(state[name], expected[name]), name
    # the pruning acted: about 3 % zeros in the kept embedding, none in the unpruned layer-1 c_k
    zeros = (state["tok_emb.weight"] == 0).float().mean().item()
    assert 0.02 < zeros < 0.04 and (state["blocks.1.attn.c_k.weight"] != 0).all()


def test_magnitude_prune_quantile_above_torch_quantiles_limit(monkeypatch):
    from pgolf_lit.quant import magnitude_prune as mp

    x = torch.randn(37, 53, generator=torch.Generator().manual_seed(3))
    direct = mp.flat_quantile(x.abs(), 0.03)
    monkeypatch.setattr(mp, "_QUANTILE_MAX_NUMEL", 100)  # force the order-statistics path
    assert torch.allclose(mp.flat_quantile(x.abs(), 0.03), direct, rtol=1e-6, atol=0)
    with pytest.raises(ConfigError, match="export.magnitude_prune.fraction"):
        int8_export(magnitude_prune={"fraction": 1.5})


# ---------------------------------------------------------------------------------------------------------
# PR #162/#180's SWA: SWA_START_FRAC is compared with the LR multiplier, not the training fraction
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~10 s: a real 10-step Lightning run on CPU
def test_swa_start_frac_is_the_records_lr_multiplier_rule(embedded_data_root, tmp_path):
    """The record's loop: after ``step += 1``, ``if scale < swa_start_frac and step % swa_every == 0`` add the
    weights (``scale = lr_mul(step, elapsed_ms)``, the multiplier of the step just taken); the average is loaded at
    the end. pgolf_lit's SWA(lr_scale_below=SWA_START_FRAC) is that rule."""
    import lightning as L

    from pgolf_lit.callbacks import SWA
    from trainer_utils import Recorder, fit, tiny_datamodule, tiny_module, tiny_trainer, weights

    L.seed_everything(0)
    seen = Recorder(lambda t, m: (t.global_step, m.last_schedule.lr_scale, weights(t, m)))
    # PR #162: SWA_START_FRAC=0.5 (PR #180: 0.4), SWA_EVERY=50; here 0.7 and 2 on a 10-step warmdown (1 … 0.2)
    swa = SWA(every=2, lr_scale_below=0.7, apply=True)
    trainer = fit(tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 10, [seen, swa]))
    taken = [(step, w) for step, scale, w in seen.values if scale < 0.7 and step % 2 == 0]
    assert 2 <= len(taken) < len(seen.values) // 2  # the warmdown's late half only
    assert swa.start_step == taken[0][0] and swa.count == len(taken)
    final = trainer.lightning_module.model.state_dict()
    for k in final:
        torch.testing.assert_close(final[k], sum(w[k] for _, w in taken) / len(taken), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# PR #39's per-layer code step (INT4_LAYERS=3,4,5,6 INT4_STEP=4)
# ---------------------------------------------------------------------------------------------------------


def test_code_step_is_the_records_int8_codes_rounded_on_the_listed_layers(tmp_path):
    model = tiny_model(num_layers=4)
    with torch.no_grad():  # rows past |w| = 1, so the quantile scale leaves its 1/127 floor and codes reach ±127
        for block in model.blocks:
            block.mlp.fc.weight.mul_(30.0)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cfg = int8_export(keep_float_max_numel=SMALL, code_step={"layers": [1, 2], "step": 4})
    export_model(model, cfg, tmp_path / "m.pgolf", code=NoCode(), progress=False)
    _, state = load_artifact(tmp_path / "m.pgolf")
    expected = record_int8_roundtrip(sd, (), int4_layers=(1, 2), int4_step=4)
    for name in expected:
        assert torch.equal(state[name], expected[name]), name
    # the listed layers really are coarser: multiples of 4 but for the clamped ±127 ends; the others are not
    quant, meta = quantize_state_dict(sd, cfg, roles=model.roles)
    stepped, plain = quant["blocks.1.mlp.fc.weight.q"], quant["blocks.0.mlp.fc.weight.q"]
    assert (stepped.abs() == 127).any() and ((stepped % 4 == 0) | (stepped.abs() == 127)).all()
    assert (plain % 4 != 0).any() and meta["blocks.1.mlp.fc.weight"]["code_step"] == 4
    with pytest.raises(ConfigError, match=r"export.code_step.layers: the model has no block \[7\]"):
        export_model(model, int8_export(code_step={"layers": [7], "step": 4}), tmp_path / "x", code=NoCode())


# ---------------------------------------------------------------------------------------------------------
# PR #65's embedding front: sum-hash BigramHash without a scale, SmearGate from σ(3) before the norm
# ---------------------------------------------------------------------------------------------------------


def test_pr65_embedding_front_is_the_records_bigram_and_smear():
    model = tiny_model(
        vocab_size=1024,
        bigram_vocab_size=96,
        bigram_dim=16,
        bigram_sum_hash=True,
        smear_gate=True,
        smear_gate_form="prenorm",
    )
    ids = torch.randint(0, 1024, (2, 21), generator=torch.Generator().manual_seed(5))
    seen = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.update(x0=args[1]))
    with torch.no_grad():
        model.forward_hidden(ids)
        # the record's GPT.forward: x = tok_emb + bigram_hash; x = smeargate(x); x = rms_norm(x)
        prev_ids = torch.cat([torch.zeros(2, 1, dtype=ids.dtype), ids[:, :-1]], dim=1)
        h = ((prev_ids.long() * 92821 + ids.long()) % 96).long()
        x = model.tok_emb.weight[ids] + model.bigram.embed.weight[h] @ model.bigram.proj.weight.T
        g = torch.sigmoid(model.smear_prenorm.gate)
        x = g * x + (1.0 - g) * torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        x = torch.nn.functional.rms_norm(x, (x.size(-1),))
    torch.testing.assert_close(seen["x0"], x, atol=1e-6, rtol=1e-5)
    # fresh: the record's inits (gate 3, N(0, 0.01) table, zero projection) and no output scale
    fresh = GPT(model.config)
    assert torch.equal(fresh.smear_prenorm.gate, torch.full((32,), 3.0)) and fresh.smear is None
    assert not fresh.bigram.proj.weight.any() and 0.005 < fresh.bigram.embed.weight.std() < 0.015
    assert not hasattr(fresh.bigram, "scale")
    xor = GPT(GPTConfig(**{**model.config.to_dict(), "bigram_sum_hash": False, "smear_gate_form": "channel"}))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(xor) - count(fresh) == 1  # the scale is the one parameter fewer
    with pytest.raises(ConfigError, match="bigram_trigram"):
        GPT(GPTConfig(**{**model.config.to_dict(), "bigram_trigram": True}))


# ---------------------------------------------------------------------------------------------------------
# PR #60's initialisations: Overtone spectral embedding, phase-transition resid_mix (training-side callbacks)
# ---------------------------------------------------------------------------------------------------------


def test_pr60_inits_are_the_records_init_weights():
    from types import SimpleNamespace

    from pgolf_lit.callbacks import OvertoneInit, PhaseResidMixInit

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2))
    w = model.tok_emb.weight.detach().clone()
    # the record's GPT._init_weights after nn.init.normal_(tok_emb)
    U, S, V = torch.linalg.svd(w, full_matrices=False)
    target_S = S[0] * (1.0 / torch.arange(1, S.shape[0] + 1, dtype=S.dtype)) ** 0.5
    expected_emb = (U * target_S[None, :]) @ V
    expected_mix = []
    for i in range(5):
        phase = torch.sigmoid(torch.tensor(3.0 * (i / max(5 - 1, 1) - 0.5)))
        expected_mix.append(torch.stack([phase * torch.ones(32), (1 - phase) * torch.ones(32)]))

    module = SimpleNamespace(model=model)
    callbacks = (OvertoneInit(), PhaseResidMixInit())
    for callback in callbacks:
        callback.setup(None, module, "validate")  # only fitting initialises
    assert torch.equal(model.tok_emb.weight, w) and torch.equal(model.blocks[0].resid_mix[0], torch.ones(32))
    for callback in callbacks:
        callback.setup(None, module, "fit")
    assert torch.equal(model.tok_emb.weight, expected_emb)
    singular = torch.linalg.svdvals(model.tok_emb.weight)
    torch.testing.assert_close(singular / singular[0], torch.arange(1, 33).float() ** -0.5, rtol=1e-4, atol=1e-5)
    for block, mix in zip(model.blocks, expected_mix):
        assert torch.equal(block.resid_mix, mix)
    assert model.blocks[0].resid_mix[0, 0] < 0.2 < 0.8 < model.blocks[4].resid_mix[0, 0]
    untied = SimpleNamespace(model=GPT(GPTConfig(vocab_size=64, num_layers=1, model_dim=32, tie_embeddings=False)))
    with pytest.raises(ConfigError, match="OvertoneInit: shapes the tied embedding"):
        OvertoneInit().setup(None, untied, "fit")
