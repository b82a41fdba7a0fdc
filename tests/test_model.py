"""The GPT: exact parameter counts of every record, feature switches, schedules, causality, config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pgolf_lit.config import CONFIG_DIR, GPTConfig, gpt_config_from_yaml, record_config_path
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.convert import load_upstream_state_dict, record_gpt_config, to_upstream_state_dict
from pgolf_lit.model.gpt import GPT, layer_schedule, skip_plan

# The reference parameter counts (spec/model.md §4, the records' logs), by record config.
RECORD_PARAMS = {
    "baseline_sp1024": 17_059_912,
    "pr1263_slot16": 26_993_756,
    "pr1278_slot32_recur": 26_865_254,
    "pr1321_slot48": 26_862_694,
    "pr1421_recur_ema9965": 34_401_372,
    "pr1333_sp4096_causal_slot": 34_401_372,
    "pr1394_sp8192_loop45": 35_943_512,
    "pr1855_sp8192_lqer_sparsegate": 35_945_671,
    "pr1945_awq_asymlogit": 35_945_673,  # + softcap_pos, softcap_neg (spec/frontier.md §0)
    "pr1953_longctx_noqv": 35_945_673,
}


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


@pytest.mark.parametrize("record,count", sorted(RECORD_PARAMS.items()))
def test_record_parameter_counts(record, count):
    cfg = gpt_config_from_yaml(record_config_path(record))
    assert GPT(cfg).num_params() == count


def test_every_record_config_has_a_reference_count_and_a_tiny_variant():
    records = {p.stem for p in (CONFIG_DIR / "records").glob("*.yaml")}
    full = {r for r in records if not r.endswith("_tiny")}
    assert full | {"baseline_sp1024"} == set(RECORD_PARAMS)
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


@pytest.mark.parametrize("record", sorted(RECORD_PARAMS))
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
        shared = {k: v for k, v in on.state_dict().items() if k in off.state_dict() and v.shape == off.state_dict()[k].shape}
        off.load_state_dict(shared, strict=False)
        out_off = off.forward_logits(x)
    assert out_on.shape == out_off.shape
    assert (out_on - out_off).abs().max() > 1e-6  # VE is the weakest signal (~1e-5 here)


@pytest.mark.parametrize("recurrence", ["group", "inplace", "loop"])
def test_recurrence_changes_the_output_only_when_active(recurrence):
    cfg = small(
        num_layers=6, recurrence=recurrence, recur_layers=[2, 3], num_loops=1, loop_start=2, loop_end=3,
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


@pytest.mark.parametrize("record", sorted(RECORD_PARAMS))
def test_upstream_state_dict_round_trip_is_identity(record):
    cfg = record_gpt_config(record).replace(vocab_size=64, model_dim=32, num_heads=4, num_kv_heads=2,
                                            embedding_dim=None, rope_dims=0, bigram_dim=8, ve_dim=8)
    a = perturbed(cfg)
    up = to_upstream_state_dict(a, upstream_dtypes=False)
    b = GPT(cfg)
    load_upstream_state_dict(b, up)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_upstream_dtype_policy_keeps_tables_bf16():
    model = GPT(record_gpt_config("pr1263_slot16").replace(model_dim=32, num_heads=4, num_kv_heads=2,
                                                            rope_dims=4, bigram_dim=8, ve_dim=8))
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
