"""The GPT: exact parameter counts of every record, feature switches, schedules, causality, config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf_lit.config import CONFIG_DIR, GPTConfig, gpt_config_from_yaml, load_config, load_yaml, record_config_path
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.attention import Rotary, _round_to_bf16
from pgolf_lit.model.convert import (
    config_from_upstream,
    load_upstream_state_dict,
    record_gpt_config,
    to_upstream_state_dict,
)
from pgolf_lit.model.gpt import GPT, layer_schedule, skip_plan
from pgolf_lit.records import built_param_count, published_record, published_record_configs

# The record configs the package ships (configs/records/*.yaml and the baseline, without the tiny twins).
RECORD_CONFIGS = sorted(
    p.stem
    for p in [*(CONFIG_DIR / "records").glob("*.yaml"), CONFIG_DIR / "baseline_sp1024.yaml"]
    if not p.stem.endswith("_tiny")
)


def small(**changes) -> GPTConfig:
    """A tiny config with every switch available; features are switched on per test."""
    base = dict(vocab_size=64, num_layers=5, model_dim=32, num_heads=4, num_kv_heads=2, mlp_mult=2.0)
    base.update(changes)
    return GPTConfig(**base)


def perturbed(cfg: GPTConfig, seed: int = 0) -> GPT:
    """A model whose zero-initialised tensors are made non-zero, so every feature affects the output."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids(batch=2, T=24, V=64, seed=3):
    return torch.randint(0, V, (batch, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("path", published_record_configs(), ids=lambda p: p.stem)
def test_record_parameter_counts(path):
    """Every published record on disk (its own file states ``record.params``: the count its logs print) builds a
    model of exactly that size, unless it names the technique it lacks (a leaderboard row marked missing); the
    model is built on the meta device, so no weights are made."""
    record = published_record(path)
    assert built_param_count(load_config(path)) == record.params or record.missing


def test_a_new_record_yaml_is_checked_without_a_test_edit(tmp_path):
    """A record YAML added to configs/ is found and checked by the test above: its count is read from the file."""
    parent = record_config_path("pr1394_sp8192_loop45")
    (tmp_path / "records").mkdir()
    new = tmp_path / "records" / "my_record.yaml"
    new.write_text(f"extends: {parent}\nmodel: {{gpt: {{num_layers: 12}}}}\nrecord: {{params: 38_830_176}}\n")
    variant = tmp_path / "records" / "my_variant.yaml"  # states no count of its own: not a published record
    variant.write_text(f"extends: {new}\nmodel: {{gpt: {{qk_gain_init: 5.0}}}}\n")
    assert published_record_configs(tmp_path) == [new]
    # PR #1394's 35,943,512 + one block (2,885,640) + one skip row of weights and gates (1,024)
    assert built_param_count(load_config(new)) == published_record(new).params
    assert published_record(variant).params is None and published_record(variant).world == 8


def test_every_record_config_is_a_published_record_and_has_a_tiny_variant():
    records = {p.stem for p in (CONFIG_DIR / "records").glob("*.yaml")}
    full = {r for r in records if not r.endswith("_tiny")}
    published = {p.resolve() for p in published_record_configs()}
    for name in full:  # the record's file, or the leaderboard row it is a thin alias of, states its facts
        chain = [record_config_path(name).resolve()]
        while "extends" in load_yaml(chain[-1]) and chain[-1] not in published:
            chain.append((chain[-1].parent / load_yaml(chain[-1])["extends"]).resolve())
        assert chain[-1] in published, name
    assert {f"{r}_tiny" for r in full} == records - full


@pytest.mark.parametrize(
    "cfg_changes,expected",
    [
        (dict(num_layers=11, recurrence="group", recur_layers=[4, 5]), [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10]),
        (dict(num_layers=11, recurrence="group", recur_layers=[3, 4, 5]), [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]),
        (dict(num_layers=11, recurrence="inplace", recur_layers=[4, 5]), [0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10]),
        (
            dict(num_layers=11, recurrence="loop", num_loops=2, loop_start=4, loop_end=5),
            [0, 1, 2, 3, 4, 5, 4, 5, 4, 5, 6, 7, 8, 9, 10],
        ),
    ],
)
def test_recurrence_schedules_match_the_spec(cfg_changes, expected):
    cfg = GPTConfig(**cfg_changes)
    assert layer_schedule(cfg, True) == expected
    assert layer_schedule(cfg, False) == list(range(11))


def test_pr1394_encoder_decoder_split_and_skip_rows():
    cfg = record_gpt_config("pr1394_sp8192_loop45")
    schedule = layer_schedule(cfg, True)
    assert schedule[:7] == [0, 1, 2, 3, 4, 5, 4] and schedule[7:] == [5, 4, 5, 6, 7, 8, 9, 10]
    assert GPT(cfg).skip_weights.shape[0] == 7
    assert skip_plan(cfg, schedule) == [0, 1, 2, 3, 4, 5, 6, None]
    assert skip_plan(cfg, layer_schedule(cfg, False)) == [0, 1, 2, 3, 4, None]


@pytest.mark.parametrize("record", RECORD_CONFIGS)
@pytest.mark.parametrize("recurrent", [False, True])
def test_causality_of_every_record_architecture(record, recurrent):
    """Changing token t never changes the logits at positions < t (and does change later ones)."""
    full = record_gpt_config(record)
    cfg = full.replace(
        vocab_size=128,
        model_dim=32,
        embedding_dim=None if full.embedding_dim is None else 32,
        num_heads=4,
        num_kv_heads=2,
        rope_dims=min(full.rope_dims, 4),
        bigram_vocab_size=min(full.bigram_vocab_size, 64),
        bigram_dim=16,
        ve_dim=16,
    )
    model = perturbed(cfg)
    model.set_recurrence(recurrent)
    x = ids(T=40, V=128)
    with torch.no_grad():
        base = model.forward_logits(x)
        for t in (0, 1, 7, 39):
            x2 = x.clone()
            x2[:, t] = (x2[:, t] + 1) % 128
            out = model.forward_logits(x2)
            assert torch.equal(out[:, :t], base[:, :t]), f"position < {t} changed"
            assert not torch.equal(out[:, t:], base[:, t:])


FEATURES = {
    "leaky_relu2": dict(mlp_activation="leaky_relu2"),
    "xsa": dict(xsa_last_n=2),
    "partial_rope": dict(rope_dims=4),
    "rope_rescale": dict(rope_train_seq_len=8),
    "ln_scale": dict(ln_scale=True),
    "skip_gates": dict(skip_gates=True),
    "smear_gate": dict(smear_gate=True),
    "bigram": dict(bigram_vocab_size=32, bigram_dim=8),
    "trigram": dict(bigram_vocab_size=32, bigram_dim=8, bigram_trigram=True),
    "value_embedding": dict(ve_enabled=True, ve_dim=8, ve_layers=[3, 4]),
    "vrl": dict(vrl=True),
    "dtg": dict(dtg=True),
    "parallel_lanes": dict(parallel_start_layer=3),
    "embedding_dim": dict(embedding_dim=16),
    "untied_head": dict(tie_embeddings=False),
}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_each_feature_changes_the_output(name):
    changes = FEATURES[name]
    base_changes = {"trigram": dict(bigram_vocab_size=32, bigram_dim=8)}.get(name, {})
    x = ids()
    on = perturbed(small(**changes))
    off_cfg = small(**base_changes)
    with torch.no_grad():
        out_on = on.forward_logits(x)
        # Same weights where both models have them: the difference comes from the switch alone.
        off = GPT(off_cfg).eval()
        theirs = off.state_dict()
        shared = {k: v for k, v in on.state_dict().items() if k in theirs and v.shape == theirs[k].shape}
        off.load_state_dict(shared, strict=False)
        out_off = off.forward_logits(x)
    assert out_on.shape == out_off.shape
    assert (out_on - out_off).abs().max() > 1e-6  # VE is the weakest signal (~1e-5 here)


@pytest.mark.parametrize("recurrence", ["group", "inplace", "loop"])
def test_recurrence_changes_the_output_only_when_active(recurrence):
    cfg = small(
        num_layers=6,
        recurrence=recurrence,
        recur_layers=[2, 3],
        num_loops=1,
        loop_start=2,
        loop_end=3,
        iter_conditioning=recurrence == "inplace",
    )
    model = perturbed(cfg)
    x = ids()
    with torch.no_grad():
        off = model.forward_logits(x)
        model.set_recurrence(True)
        on = model.forward_logits(x)
    assert (on - off).abs().max() > 1e-3


def test_xsa_on_layer_k_alters_only_layer_k_output():
    """XSA is a per-layer output transform: switching it on for the last layer leaves every earlier block's
    output untouched and changes the last block's."""
    cfg_off = small(num_layers=3)
    model_off = perturbed(cfg_off)
    model_on = GPT(small(num_layers=3, xsa_last_n=1)).eval()
    model_on.load_state_dict(model_off.state_dict())
    outputs = {}
    for tag, m in (("off", model_off), ("on", model_on)):
        outs = []
        hooks = [b.register_forward_hook(lambda mod, inp, out: outs.append(out[0])) for b in m.blocks]
        with torch.no_grad():
            m.forward_logits(ids())
        for h in hooks:
            h.remove()
        outputs[tag] = outs
    assert torch.equal(outputs["off"][0], outputs["on"][0])
    assert torch.equal(outputs["off"][1], outputs["on"][1])
    assert not torch.equal(outputs["off"][2], outputs["on"][2])


def test_bigram_hash_matches_spec_vectors():
    from pgolf_lit.model.layers import bigram_hash

    t = torch.tensor([5, 17, 1023, 0, 999, 1, 1])
    assert bigram_hash(t, 2048).tolist() == [2047, 489, 452, 1757, 1800, 1372, 11]
    assert bigram_hash(t, 1024).tolist() == [1023, 856, 26, 0, 84, 334, 40]


@pytest.mark.parametrize("record", RECORD_CONFIGS)
def test_upstream_state_dict_round_trip_is_identity(record):
    cfg = record_gpt_config(record).replace(
        vocab_size=64,
        model_dim=32,
        num_heads=4,
        num_kv_heads=2,
        embedding_dim=None,
        rope_dims=0,
        bigram_dim=8,
        ve_dim=8,
    )
    a = perturbed(cfg)
    up = to_upstream_state_dict(a, upstream_dtypes=False)
    b = GPT(cfg)
    load_upstream_state_dict(b, up)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_upstream_dtype_policy_keeps_tables_bf16():
    model = GPT(
        record_gpt_config("pr1263_slot16").replace(
            model_dim=32, num_heads=4, num_kv_heads=2, rope_dims=4, bigram_dim=8, ve_dim=8
        )
    )
    sd = to_upstream_state_dict(model)
    assert sd["tok_emb.weight"].dtype == torch.bfloat16 and sd["bigram.embed.weight"].dtype == torch.bfloat16
    assert sd["blocks.0.attn.c_q.weight"].dtype == torch.float32 and sd["bigram.scale"].shape == ()


def test_loading_another_records_state_dict_names_the_mismatch():
    a = GPT(small())
    b = GPT(small(bigram_vocab_size=32, bigram_dim=8))
    with pytest.raises(ConfigError, match="unexpected 3 key"):
        load_upstream_state_dict(a, b.state_dict(), "ckpt.pt")
    c = GPT(small(mlp_mult=3.0))
    with pytest.raises(ConfigError, match="mlp.fc.weight has shape"):
        load_upstream_state_dict(a, c.state_dict(), "ckpt.pt")


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(model_dim=30, num_heads=4), "num_heads"),
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(model_dim=36, num_heads=4, num_kv_heads=2), "num_heads"),  # head dim 9: odd
        (dict(recurrence="group", recur_layers=[7]), "recur_layers"),
        (dict(recurrence="loop", num_loops=1, loop_start=3, loop_end=9), "loop_start"),
        (dict(ve_enabled=True, ve_layers=[5]), "ve_layers"),
        (dict(rope_dims=5), "rope_dims"),
        (dict(parallel_start_layer=5), "parallel_start_layer"),
        (dict(vocab_size=70000), "vocab_size"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=f"gpt.{field}"):
        small(**changes)


def test_unknown_config_field_is_rejected():
    with pytest.raises(ConfigError, match="unknown field"):
        GPTConfig.from_dict({**dataclasses.asdict(GPTConfig()), "xsa_last": 3})


# ---------------------------------------------------------------------------------------------------------
# RoPE table precision: the records' model.bfloat16() also casts the rotary's inv_freq buffer
# ---------------------------------------------------------------------------------------------------------

# Every upstream script casts the model with .bfloat16() (rounding the non-persistent inv_freq buffer, which
# restore_fp32_params leaves alone); the scripts before PR #1855 build their table from arange(T, dtype=
# inv_freq.dtype) (bf16 positions), PR #1855's from inv_freq.float() and fp32 positions.
ROPE_DTYPES = {
    "baseline_sp1024": ("bf16", "bf16"),
    "pr1263_slot16": ("bf16", "bf16"),
    "pr1278_slot32_recur": ("bf16", "bf16"),
    "pr1321_slot48": ("bf16", "bf16"),
    "pr1333_sp4096_causal_slot": ("bf16", "bf16"),
    "pr1394_sp8192_loop45": ("bf16", "bf16"),
    "pr1421_recur_ema9965": ("bf16", "bf16"),
    "pr1855_sp8192_lqer_sparsegate": ("bf16", "fp32"),
}


class ScriptRotary(torch.nn.Module):
    """The records' rotary as the spec describes it (model.md §1.2, §2.4): an fp32 ``inv_freq`` buffer that the
    script's ``model.bfloat16()`` casts; ``table`` without the length rescale."""

    def __init__(self, rope_dims: int, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, rope_dims, 2, dtype=torch.float32) / rope_dims)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def table_pr1855(self, T: int) -> torch.Tensor:  # inv_freq.float(), fp32 positions
        return torch.outer(torch.arange(T, dtype=torch.float32), self.inv_freq.float())

    def table_before_pr1855(self, T: int) -> torch.Tensor:  # positions in the buffer's dtype
        t = torch.arange(T, dtype=self.inv_freq.dtype)
        return torch.outer(t, self.inv_freq)


def test_bf16_inv_freq_is_the_records_cast_buffer():
    script = ScriptRotary(16).bfloat16()
    ours, plain = Rotary(16, inv_freq_dtype="bf16"), Rotary(16)
    assert script.inv_freq.dtype == torch.bfloat16
    assert torch.equal(ours.inv_freq, script.inv_freq.float())
    assert torch.equal(plain.inv_freq, ScriptRotary(16).inv_freq)  # fp32 unchanged
    rel = ((ours.inv_freq - plain.inv_freq).abs() / plain.inv_freq).max().item()
    assert 0.003 < rel < 2.0**-8  # up to 0.37 % (i = 3: 10000^(-3/8))
    # PR #1855's table from it (fp32 positions): equal to the script's; the fp32 table is off by up to 0.36 at T=2048
    T = 2048
    cos, sin = ours(T)
    angles = script.table_pr1855(T)
    assert torch.equal(cos[0, :, 0], angles.cos()) and torch.equal(sin[0, :, 0], angles.sin())
    assert torch.equal(plain(T)[0][0, :, 0], ScriptRotary(16).table_pr1855(T).cos())
    assert (cos - plain(T)[0]).abs().max() > 0.3


def test_bf16_positions_are_the_compiled_tables_of_the_scripts_before_pr1855():
    """The scripts' table as their compiled graphs compute it (inductor on CPU here): bf16 positions times the bf16
    frequencies in fp32, cos/sin stored in bf16. Eager they also round each angle, which is further off."""
    script = ScriptRotary(16).bfloat16()
    T = 2048
    compiled = torch.compile(lambda n: (lambda f: (f.cos(), f.sin()))(script.table_before_pr1855(n)), dynamic=False)
    theirs_cos, theirs_sin = compiled(T)
    cos, sin = Rotary(16, inv_freq_dtype="bf16", positions_dtype="bf16")(T)
    ulp = 2.0**-8  # one bf16 step below 1
    assert (cos[0, :, 0].bfloat16().float() - theirs_cos.float()).abs().max() <= ulp
    assert (sin[0, :, 0].bfloat16().float() - theirs_sin.float()).abs().max() <= ulp
    fp32_positions = Rotary(16, inv_freq_dtype="bf16")(T)[0]
    assert (fp32_positions[0, :, 0] - theirs_cos.float()).abs().max() > 1.0  # positions past 256 are rounded
    assert torch.equal(cos[:, :257], fp32_positions[:, :257])  # exact up to 256
    eager = script.table_before_pr1855(T).cos().float()
    assert (eager - theirs_cos.float()).abs().max() > 1.0


def test_rope_dtypes_leave_the_rescaled_frequencies_fp32():
    """Past ``train_seq_len`` the scripts compute the rescaled frequencies afresh in fp32 (and fp32 positions)."""
    plain = Rotary(16, train_seq_len=1024)
    cast = Rotary(16, train_seq_len=1024, inv_freq_dtype="bf16", positions_dtype="bf16")
    for a, b in zip(plain(2048), cast(2048)):
        assert torch.equal(a, b)
    assert not torch.equal(plain(1024)[0], cast(1024)[0])
    with pytest.raises(ValueError, match="inv_freq_dtype"):
        Rotary(16, inv_freq_dtype="fp16")


@pytest.mark.parametrize("record", sorted(ROPE_DTYPES))
def test_record_configs_use_their_scripts_rope_dtypes(record):
    cfg = record_gpt_config(record)
    assert (cfg.rope_inv_freq_dtype, cfg.rope_positions_dtype) == ROPE_DTYPES[record]
    model = GPT(
        cfg.replace(
            vocab_size=64,
            model_dim=32,
            num_heads=2,
            num_kv_heads=1,
            rope_dims=16,
            embedding_dim=None,
            bigram_dim=8,
            ve_dim=8,
        )
    )
    script = ScriptRotary(16).bfloat16()
    assert torch.equal(model.rotary.inv_freq, script.inv_freq.float())
    # the fixtures ran the scripts' constructors without the harness's cast: fp32 unless asked for the cast
    up = config_from_upstream(record, {})
    assert (up.rope_inv_freq_dtype, up.rope_positions_dtype) == ("fp32", "fp32")
    cast = config_from_upstream(record, {}, harness_cast=True)
    assert (cast.rope_inv_freq_dtype, cast.rope_positions_dtype) == ROPE_DTYPES[record]
    assert GPTConfig().rope_inv_freq_dtype == GPTConfig().rope_positions_dtype == "fp32"  # new runs


def test_rope_dtypes_reach_the_logits():
    """Position 0 has angle 0 under any frequencies; later positions move with bf16 frequencies; bf16 positions
    change nothing below 257 tokens."""
    x = ids(T=24)
    with torch.no_grad():
        fp32 = perturbed(small(rope_dims=8)).forward_logits(x)
        bf16 = perturbed(small(rope_dims=8, rope_inv_freq_dtype="bf16")).forward_logits(x)
        both = perturbed(small(rope_dims=8, rope_inv_freq_dtype="bf16", rope_positions_dtype="bf16")).forward_logits(x)
    assert torch.equal(bf16[:, 0], fp32[:, 0]) and not torch.equal(bf16[:, 1:], fp32[:, 1:])
    assert torch.equal(both, bf16)


def test_bf16_positions_survive_torch_compile():
    """inductor drops a plain fp32 -> bf16 -> fp32 round trip; the rotary rounds with integer bit arithmetic."""
    rotary = Rotary(16, inv_freq_dtype="bf16", positions_dtype="bf16")
    eager, compiled = rotary(2048), torch.compile(rotary.forward, dynamic=False)(2048)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    t = torch.arange(1 << 20, dtype=torch.float32)
    assert torch.equal(_round_to_bf16(t), t.bfloat16().float())


# AsymLogit (PR #1945)
# ---------------------------------------------------------------------------------------------------------


def test_asym_logit_adds_two_untrained_caps_used_on_the_eval_paths_only():
    from pgolf_lit.model.lora import BatchedTTTLoRA
    from pgolf_lit.optim.groups import OptimConfig, route_parameters
    from pgolf_lit.quant.export import ExportConfig, quantize_state_dict

    plain_cfg = small(smear_gate=True, smear_gate_form="token", logit_softcap=3.0)
    plain, asym = perturbed(plain_cfg), GPT(plain_cfg.replace(asym_logit=True)).eval()
    assert asym.num_params() == plain.num_params() + 2
    assert asym.softcap_pos.shape == () and float(asym.softcap_pos) == float(asym.softcap_neg) == 3.0
    asym.load_state_dict({**plain.state_dict(), "softcap_pos": asym.softcap_pos, "softcap_neg": asym.softcap_neg})
    x, y = ids(), ids(seed=4)
    with torch.no_grad():
        # caps at logit_softcap: the symmetric softcap, bit for bit (what the records run)
        assert torch.equal(asym.forward_logits(x), plain.forward_logits(x))
        asym.softcap_pos.fill_(1.5)
        asym.softcap_neg.fill_(2.5)
        raw = asym.head_logits(asym.normalize_hidden(asym.forward_hidden(x)))
        want = torch.where(raw > 0, 1.5 * torch.tanh(raw / 1.5), 2.5 * torch.tanh(raw / 2.5))
        torch.testing.assert_close(asym.forward_logits(x), want, atol=1e-6, rtol=0)
        assert torch.equal(asym(x), asym.forward_logits(x))
        # the loss keeps the symmetric cap
        assert torch.equal(asym(x, y), plain(x, y))
        lora = BatchedTTTLoRA(asym, 2, 2)  # B = 0: the adapters change nothing
        ce = torch.nn.functional.cross_entropy(want.reshape(-1, want.size(-1)), y.reshape(-1), reduction="none")
        torch.testing.assert_close(asym.forward_ttt(x, y, lora), ce.reshape(y.shape), atol=1e-5, rtol=0)
    # no optimizer, no gradient from the training loss, a float in artifacts
    routing = route_parameters(asym, OptimConfig())
    assert [n for n, _ in routing.no_optimizer] == ["softcap_pos", "softcap_neg"]
    assert asym.roles["softcap_pos"].kind == "constant" and not asym.softcap_pos.requires_grad
    asym.train()
    asym(x, y).backward()
    assert asym.softcap_pos.grad is None and asym.softcap_neg.grad is None
    quant, meta = quantize_state_dict(asym.state_dict(), ExportConfig(keep_float_max_numel=0), roles=asym.roles)
    assert meta["softcap_pos"]["kind"] == "float" and quant["softcap_pos"].dtype == torch.float16


def test_proj_init_scale_shrinks_exactly_the_output_projections():
    """PR #1263's ×1/√(2L) applies to the orthogonal output projections (bigram and value-embedding ``proj``, whose
    widths differ from the model's), never to the other orthogonal matrices."""
    base = gpt_config_from_yaml(record_config_path("pr1263_slot16_tiny")).replace(
        init="orthogonal", bigram_dim=64, ve_dim=64, model_dim=128
    )
    torch.manual_seed(0)
    model = GPT(base.replace(proj_init_scale=True))
    factor = 1 / (2 * base.num_layers) ** 0.5
    scaled, plain = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and min(module.weight.shape) >= 64 and not module.zero_init:
            singular = torch.linalg.svdvals(module.weight.detach().double())
            (scaled if module.output_proj else plain).append(name)
            want = factor if module.output_proj else 1.0
            assert torch.allclose(singular, torch.full_like(singular, want), atol=1e-5), name
    assert scaled and plain, (scaled, plain)


def test_multi_token_prediction_adds_the_shifted_heads_loss_in_training_only():
    """MTP (PR #1263 family): head k is scored against the targets k + 1 positions on; its softcapped CE enters the
    training loss with mtp_loss_weight, the evaluation loss never."""
    import torch.nn.functional as F

    cfg = small(mtp_num_heads=2, mtp_loss_weight=0.3)
    model = perturbed(cfg)
    for head in model.mtp_heads:
        torch.nn.init.normal_(head.weight, std=0.1)
    x, y = ids(), ids(seed=4)
    model.eval()
    plain = model(x, y)
    model.train()
    z = model.normalize_hidden(model.forward_hidden(x))
    c = cfg.logit_softcap
    heads = []
    for k, head in enumerate(model.mtp_heads):
        logits = c * torch.tanh(head(z[:, : z.size(1) - k - 1]) / c)
        heads.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y[:, k + 1 :].reshape(-1)))
    expected = plain + 0.3 * torch.stack(heads).mean()
    assert torch.allclose(model(x, y), expected, rtol=1e-6, atol=1e-6) and not torch.allclose(expected, plain)
