"""PR #1855's model (the leaderboard top, 1.0611) against its own script: the upstream fixtures (looping on and off:
dense logits, loss, hidden, packed varlen logits, the LoRA per-token loss), the bank converter, causality, the
SmearGate BOS fix, packed rows against separately run documents, and the new blocks against their formulas.

Fixtures: $PGOLF_PR1855_FIXTURES (default ../shared/fixtures/pr1855), ``upstream/<case>/``; every case value is read
from the case's files (held-out twins with other seeds and shapes exist). Skips cleanly without them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import fixture_root
from pgolf_lit.config import CONFIG_DIR, GPTConfig
from pgolf_lit.data.packing import build_cu_seqlens
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.attention import CausalSelfAttention, Rotary
from pgolf_lit.model.convert import config_from_upstream, load_upstream_state_dict, to_upstream_state_dict
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.layers import rms_norm, smear_previous_token
from pgolf_lit.model.lora import BatchedTTTLoRA
from pgolf_lit.tools.convert_cmd import main as convert

ROOT = fixture_root("PGOLF_PR1855_FIXTURES", "pr1855")
RECORD = CONFIG_DIR / "records" / "pr1855_sp8192_lqer_sparsegate.yaml"


def _upstream_cases() -> list:
    folder = ROOT / "upstream" if ROOT is not None else None
    if folder is None or not folder.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason="no PR #1855 fixtures: set PGOLF_PR1855_FIXTURES"))]
    return [pytest.param(p, id=p.name) for p in sorted(folder.iterdir()) if (p / "hparams.json").is_file()]


CASES = _upstream_cases()


def _load(path: Path):
    return torch.load(path, weights_only=True)


def build(case: Path, **changes) -> tuple[dict, GPT]:
    """Our GPT for a fixture case: the record config with the case's size changes, the upstream (banked) weights,
    the case's recurrence state, eval mode."""
    hp = json.loads((case / "hparams.json").read_text())
    cfg = config_from_upstream(hp["record"], {k: v["fixture"] for k, v in hp["changed_from_record"].items()})
    model = GPT(cfg.replace(**changes) if changes else cfg)
    load_upstream_state_dict(model, _load(case / "state_dict.pt"), str(case / "state_dict.pt"))
    model.set_recurrence(bool(hp["recurrence"]["value"]))
    return hp, model.eval()


def fixture_lora(case: Path, model: GPT) -> BatchedTTTLoRA:
    saved = _load(case / "ttt_lora.pt")
    lora = BatchedTTTLoRA(model, saved["bsz"], saved["rank"], saved["alpha"])
    lora.load_state_dict(saved["lora_state_dict"])
    return lora


def segments_of(cu: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu.tolist()
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# ---------------------------------------------------------------------------------------------------------
# The upstream fixtures
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_outputs_match_upstream(case):
    hp, model = build(case)
    inputs, ref = _load(case / "inputs.pt"), _load(case / "outputs.pt")
    ids, targets = inputs["input_ids"], inputs["target_ids"]
    atol = hp["atol"]
    assert model.num_params() == hp["param_count"]
    derived = hp["derived"]
    schedule = model.layer_schedule()
    assert schedule == derived["encoder_indices"] + derived["decoder_indices"]
    assert model.skip_weights.size(0) == derived["num_skip_weights"]

    def close(ours, theirs, what):
        torch.testing.assert_close(ours, theirs, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")

    with torch.no_grad():
        close(model.forward_logits(ids), ref["logits"], "logits")
        close(model(ids, targets), ref["loss"], "loss")
        close(model.normalize_hidden(model.forward_hidden(ids)), ref["hidden"], "hidden (final_norm output)")
        packed_ids, packed_targets = ids.reshape(1, -1), targets.reshape(1, -1)
        cu, max_seqlen = ref["cu_seqlens"], int(ref["max_seqlen"])
        close(model.forward_logits(packed_ids, cu, max_seqlen), ref["logits_varlen"], "logits_varlen")
        if "loss_varlen" in ref:
            close(model(packed_ids, packed_targets, cu, max_seqlen), ref["loss_varlen"], "loss_varlen")
        lora = fixture_lora(case, model)
        assert lora.num_slots == derived["ttt_lora_slots"]
        close(model.forward_ttt(ids, targets, lora), ref["ttt_per_token_loss"], "ttt_per_token_loss")


def _rows(spec: str) -> tuple[str, slice]:
    """'parallel_post_lambdas[0:8]' -> (name, slice(0, 8)); a bare name -> the whole tensor."""
    m = re.fullmatch(r"([\w.]+)(?:\[(\d+):(\d+)\])?", spec)
    assert m, spec
    return m.group(1), slice(int(m.group(2)), int(m.group(3))) if m.group(2) else slice(None)


@pytest.mark.parametrize("case", CASES)
def test_gradients_reach_exactly_the_parameters_upstream_uses(case):
    """The wiring check of the fixture: the listed rows (parallel lambdas below the parallel start, the skip rows a
    looping-off run never pops) get an exactly zero gradient, everything else a non-zero one."""
    hp, model = build(case)
    inputs = _load(case / "inputs.pt")
    model(inputs["input_ids"], inputs["target_ids"]).backward()
    unused: dict[str, list[slice]] = {}
    for spec in hp["params_without_effect"]:
        name, rows = _rows(spec)
        unused.setdefault(name, []).append(rows)
    for name, p in model.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        mask = torch.ones(p.shape[0] if p.dim() else 1, dtype=torch.bool)
        for rows in unused.get(name, []):
            assert torch.count_nonzero(grad[rows]) == 0, f"{name}[{rows}] should get no gradient"
            mask[rows] = False
        if mask.any():
            assert torch.count_nonzero(grad.reshape(mask.numel(), -1)[mask]) > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("case", CASES)
def test_bank_conversion_round_trips_exactly(case):
    _, model = build(case)
    upstream = _load(case / "state_dict.pt")
    ours = to_upstream_state_dict(model, upstream_dtypes=False)
    assert sorted(ours) == sorted(upstream)
    for name, t in upstream.items():
        assert torch.equal(ours[name], t), name
    policy = to_upstream_state_dict(model)  # the record's dtypes: only the token table is bf16
    assert sorted(n for n, t in policy.items() if t.dtype != torch.float32) == ["tok_emb.weight"]


@pytest.mark.parametrize("case", CASES)
def test_convert_cli_round_trips_the_fixture(case, tmp_path):
    hp = json.loads((case / "hparams.json").read_text())
    sizes = {k: v["fixture"] for k, v in hp["changed_from_record"].items() if k in GPTConfig.__dataclass_fields__}
    config = tmp_path / "fixture.yaml"
    config.write_text(f"extends: {RECORD}\nmodel:\n  gpt: {json.dumps(sizes)}\n")
    ckpt, back = tmp_path / "model.ckpt", tmp_path / "final_model.pt"
    convert(["--from-upstream", str(case / "state_dict.pt"), "--out", str(ckpt), "--config", str(config)])
    convert(["--to-upstream", str(ckpt), "--out", str(back), "--config", str(config)])
    upstream, converted = _load(case / "state_dict.pt"), _load(back)
    assert sorted(converted) == sorted(upstream)
    for name, t in upstream.items():
        assert torch.equal(converted[name].float(), t.to(converted[name].dtype).float()), name


# ---------------------------------------------------------------------------------------------------------
# Causality, the BOS fix, packed rows
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_causality_dense_and_packed(case):
    """Changing token t leaves every earlier position's logits unchanged, bit for bit (dense rows and the packed
    row)."""
    hp, model = build(case)
    ids = _load(case / "inputs.pt")["input_ids"]
    cu = _load(case / "outputs.pt")["cu_seqlens"]
    packed = ids.reshape(1, -1)
    V, T = model.config.vocab_size, ids.size(1)
    with torch.no_grad():
        base, base_packed = model.forward_logits(ids), model.forward_logits(packed, cu, 0)
        for t in hp["checks"]["causality"]["positions"]:
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 7) % V
            out = model.forward_logits(changed)
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert (out[:, t:] - base[:, t:]).abs().max() > 1e-4, t
            for p in (t, T + t):  # the position in the first and in the second half of the packed row
                row = packed.clone()
                row[0, p] = (row[0, p] + 7) % V
                out_packed = model.forward_logits(row, cu, 0)
                assert torch.equal(out_packed[:, :p], base_packed[:, :p]), p
                end = next(b for a, b in segments_of(cu) if a <= p < b)  # later documents do not see it either
                assert torch.equal(out_packed[:, end:], base_packed[:, end:]), p


@pytest.mark.parametrize("case", CASES)
def test_bos_mask_isolates_documents_of_a_packed_row(case):
    """Changing the last token of a document changes nothing in the next one; without the mask (bos_id -1, PR #1797)
    the next document's BOS is smeared with it."""
    _, model = build(case)
    _, leaky = build(case, bos_id=-1)
    ids = _load(case / "inputs.pt")["input_ids"].reshape(1, -1)
    cu = _load(case / "outputs.pt")["cu_seqlens"]
    segments = segments_of(cu)
    bos = model.config.bos_id
    with torch.no_grad():
        for (a, b), (c, d) in zip(segments, segments[1:]):
            if ids[0, c] != bos:
                continue  # a cut of a long document, not a document start
            changed = ids.clone()
            changed[0, b - 1] = (changed[0, b - 1] + 5) % model.config.vocab_size
            if changed[0, b - 1] == bos:
                changed[0, b - 1] = (changed[0, b - 1] + 1) % model.config.vocab_size
            for m, isolated in ((model, True), (leaky, False)):
                before, after = m.forward_logits(ids, cu, 0), m.forward_logits(changed, cu, 0)
                diff = (after[:, c:] - before[:, c:]).abs().max().item()
                assert (diff == 0.0) if isolated else (diff > 1e-4), (m.config.bos_id, (c, d), diff)


@pytest.mark.parametrize("case", CASES)
def test_packed_row_equals_documents_run_alone(case):
    """Varlen attention isolates the segments of a packed row, within fp32 rounding (the matmuls see other row counts,
    and RoPE positions differ by the segment's offset). A segment that starts a document (BOS, or the row's start)
    gives what it gives alone. A segment that continues a document cut at the loader's ``max_doc_len`` also reads the
    token before the cut through the token SmearGate (masked at BOS only, as upstream): it gives what that token and
    the segment give as a row of two segments. Both kinds are made on the fixture's tokens (documents written in with
    BOS, each cut in two), so neither depends on what the fixture's own row happens to hold."""
    hp, model = build(case)
    with torch.no_grad():
        model.smear_lambda.fill_(0.5)  # a smear that moves the logits, whatever the fixture's weights hold
    ids = _load(case / "inputs.pt")["input_ids"].reshape(1, -1).clone()
    n, bos = ids.size(1), model.config.bos_id
    assert n >= 16, "the fixture row is too short to hold three documents cut in two"
    ids[ids == bos] = (bos + 1) % model.config.vocab_size
    doc_starts = [0, n // 3, 2 * n // 3]
    ids[0, doc_starts] = bos
    cu, _ = build_cu_seqlens(doc_starts, n, max_doc_len=-(-(n - 2 * n // 3) // 2))
    starts_doc = continues = 0
    with torch.no_grad():
        packed = model.forward_logits(ids, cu, 0)
        for a, b in segments_of(cu):
            alone = model.forward_logits(ids[:, a:b])
            if a == 0 or ids[0, a] == bos:
                starts_doc += 1
                torch.testing.assert_close(packed[:, a:b], alone, atol=hp["atol"], rtol=0)
                continue
            continues += 1
            pair = torch.tensor([0, 1, b - a + 1], dtype=torch.int32)
            across = model.forward_logits(ids[:, a - 1 : b], pair, 0)[:, 1:]
            torch.testing.assert_close(packed[:, a:b], across, atol=hp["atol"], rtol=0)
            assert (packed[:, a:b] - alone).abs().max() > 10 * hp["atol"], "the cut is read across"
    assert starts_doc == 3 and continues == 3


def test_packed_layout_errors_are_one_line():
    model = GPT(GPTConfig(vocab_size=32, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1))
    ids = torch.randint(0, 32, (2, 8))
    cu = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"one packed row of shape \[1, N\]"):
        model.forward_logits(ids, cu, 4)
    with pytest.raises(ValueError, match="int32"):
        model.forward_logits(ids[:1], cu.long(), 4)
    with pytest.raises(ValueError, match="rise from 0 to the row length 8"):
        model.forward_logits(ids[:1], torch.tensor([0, 4, 6], dtype=torch.int32), 4)


# ---------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_forward_ttt_with_fresh_adapters_is_the_plain_model(case):
    _, model = build(case)
    inputs = _load(case / "inputs.pt")
    ids, targets = inputs["input_ids"], inputs["target_ids"]
    lora = fixture_lora(case, model)
    with torch.no_grad():
        lora.reset(warm_start_a=True)
        assert all(torch.count_nonzero(a.B) == 0 for a in lora.adapters())
        per_token = model.forward_ttt(ids, targets, lora)
        logits = model.forward_logits(ids)
        plain = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none")
        assert torch.equal(per_token, plain.reshape(per_token.shape))


def test_lora_slots_follow_the_schedule_and_reset_keeps_or_redraws_a():
    cfg = GPTConfig(
        vocab_size=32,
        num_layers=4,
        model_dim=16,
        num_heads=2,
        num_kv_heads=1,
        recurrence="loop",
        num_loops=1,
        loop_start=1,
        loop_end=2,
    )
    model = GPT(cfg).eval()
    lora = BatchedTTTLoRA(model, bsz=2, rank=3, generator=torch.Generator().manual_seed(0))
    assert lora.num_slots == 4 and len(lora.q_loras) == 4 and lora.lm_head_lora.scale == 144.0 / 3
    ids = torch.randint(0, 32, (2, 6))
    model.set_recurrence(True)
    with pytest.raises(ValueError, match="4 layer slots, the model runs 6 layers"):
        model.forward_ttt(ids, ids, lora)
    looped = BatchedTTTLoRA(model, bsz=2, rank=3, k=False, o=False, mlp=False)
    assert looped.num_slots == 6 and looped.slot(5).k is None and looped.slot(5).mlp is None
    assert model.forward_ttt(ids, ids, looped).shape == (2, 6)
    with torch.no_grad():
        for a in lora.adapters():
            a.B.normal_()
    a_before = [a.A.clone() for a in lora.adapters()]
    lora.reset(warm_start_a=True)
    assert all(torch.equal(a.A, b) and not a.B.any() for a, b in zip(lora.adapters(), a_before))
    lora.reset(warm_start_a=False)
    assert not any(torch.equal(a.A, b) for a, b in zip(lora.adapters(), a_before))
    bound = 1 / 16**0.5
    assert all(a.A.abs().max() <= a.bound for a in lora.adapters()) and lora.q_loras[0].bound == bound


# ---------------------------------------------------------------------------------------------------------
# The new blocks against their formulas (PR #1855 train_gpt.py)
# ---------------------------------------------------------------------------------------------------------


def test_token_smear_formula_and_bos_mask():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 9, 20, generator=g)
    ids = torch.randint(2, 30, (2, 9), generator=g)
    ids[0, 4] = ids[1, 0] = ids[1, 6] = 1
    w, lam = torch.randn(1, 12, generator=g), torch.tensor([0.7])
    out = smear_previous_token(x, ids, w, lam, bos_id=1)
    want = x.clone()
    for b in range(2):
        for t in range(1, 9):
            if ids[b, t] != 1:
                want[b, t] = x[b, t] + lam * torch.sigmoid(x[b, t, :12] @ w[0]) * x[b, t - 1]
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    assert torch.equal(out[0, 4], x[0, 4]) and torch.equal(out[:, 0], x[:, 0])
    assert torch.equal(smear_previous_token(x, ids, w, torch.zeros(1), 1), x)  # λ = 0: the identity at init


def test_sparse_gate_multiplies_each_head_after_xsa():
    """y_h ← σ(scale · W_h · x[:12]) · y_h before the output projection: with an identity projection the gated
    output is the ungated one times the gate, head by head; zeros at init give exactly one half."""
    torch.manual_seed(0)
    gated = CausalSelfAttention(
        32, 4, 2, rope_dims=8, qk_gain_init=5.0, xsa=True, sparse_gate_window=12, sparse_gate_scale=0.5
    )
    plain = CausalSelfAttention(32, 4, 2, rope_dims=8, qk_gain_init=5.0, xsa=True)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "attn_gate_w"})
    with torch.no_grad():
        for layer in (gated, plain):
            layer.proj.weight.copy_(torch.eye(32))
    x = torch.randn(2, 10, 32)
    rope = Rotary(8)(10)
    with torch.no_grad():
        ungated = plain(x, rope)[0].reshape(2, 10, 4, 8)
        assert torch.equal(gated(x, rope)[0].reshape(2, 10, 4, 8), 0.5 * ungated)
        gated.attn_gate_w.normal_()
        gate = torch.sigmoid(0.5 * F.linear(x[..., :12], gated.attn_gate_w))
        torch.testing.assert_close(gated(x, rope)[0].reshape(2, 10, 4, 8), gate[..., None] * ungated, atol=1e-6, rtol=0)
    assert gated.param_roles["attn_gate_w"].quant == "gate" and gated.param_roles["attn_gate_w"].is_control


def _pr1667_gated(y, x, w):
    """PR #1667 train_gpt.py ``CausalSelfAttention.forward`` (GATE_ATTN_SRC=proj): y * 2·σ(W · x[..., :12])."""
    g = 2.0 * torch.sigmoid(F.linear(x[..., : w.size(1)].contiguous(), w.to(x.dtype)))
    return y * g[..., None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_output_gate_of_pr1667_is_the_sparse_gate_with_gain_2(dtype):
    """The 2σ gate: identical to the record's formula (bit for bit, in bf16 too) and transparent at zero init."""
    torch.manual_seed(0)
    gated = CausalSelfAttention(32, 4, 2, rope_dims=8, qk_gain_init=5.25, sparse_gate_window=12, sparse_gate_gain=2.0)
    plain = CausalSelfAttention(32, 4, 2, rope_dims=8, qk_gain_init=5.25)
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if k != "attn_gate_w"})
    with torch.no_grad():
        for layer in (gated, plain):
            layer.proj.weight.copy_(torch.eye(32))
    x = torch.randn(2, 10, 32).to(dtype)
    rope = Rotary(8)(10)
    gated, plain = gated.to(dtype), plain.to(dtype)
    with torch.no_grad():
        ungated = plain(x, rope)[0].reshape(2, 10, 4, 8)
        assert torch.equal(gated(x, rope)[0].reshape(2, 10, 4, 8), ungated)  # 2·σ(0) = 1
        gated.attn_gate_w.normal_()
        want = _pr1667_gated(ungated, x, gated.attn_gate_w)
        assert torch.equal(gated(x, rope)[0].reshape(2, 10, 4, 8), want)
        assert not torch.equal(want, ungated)


def test_two_lane_block_formula():
    cfg = GPTConfig(
        vocab_size=32,
        num_layers=3,
        model_dim=16,
        num_heads=2,
        num_kv_heads=1,
        parallel_start_layer=1,
        parallel_residual="lambdas",
        ln_scale=True,
    )
    torch.manual_seed(1)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    block = model.blocks[2]
    lane0, lane1, x0 = (torch.randn(2, 5, 16) for _ in range(3))
    rope = model.rotary(5)
    post, resid = model.parallel_post_lambdas[2], model.parallel_resid_lambdas[2]
    new0, new1 = block.forward_lambdas(lane0, lane1, x0, rope, post, resid)
    s = 1 / 3**0.5
    a_in = block.resid_mix[0] * lane0 + block.resid_mix[1] * x0
    attn = block.attn_scale * block.attn(rms_norm(a_in) * s, rope)[0]
    mlp = block.mlp_scale * block.mlp(rms_norm(lane1) * s)
    torch.testing.assert_close(new0, resid[0] * lane0 + post[0, 0] * attn + post[1, 0] * mlp, atol=1e-6, rtol=0)
    torch.testing.assert_close(new1, resid[1] * lane1 + post[0, 1] * attn + post[1, 1] * mlp, atol=1e-6, rtol=0)
    assert model.lane_merge is None and tuple(model.parallel_post_lambdas.shape) == (3, 2, 2)
    for final, expected in (("attn", new0), ("mlp", new1), ("mean", 0.5 * (new0 + new1))):
        other = GPT(cfg.replace(parallel_final_lane=final))
        assert torch.equal(other._merge_lanes(new0, new1), expected)


# ---------------------------------------------------------------------------------------------------------
# The record config
# ---------------------------------------------------------------------------------------------------------


def test_summary_of_the_record_prints_the_exact_total(capsys):
    from pgolf_lit.tools.summary import main

    main(["--config", str(RECORD)])
    out = capsys.readouterr().out
    assert "total_params: 35945671" in out.splitlines()
    assert "[0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]" in out
    assert "attn 13σ/int6, mlp 11.5σ/int6" in out and "embed 14σ/int7" in out


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(sparse_attn_gate=True, gate_window=40), "gpt.gate_window"),
        (dict(smear_gate=True, smear_gate_form="token", gate_window=0), "gpt.gate_window"),
        (dict(smear_gate_form="tokens"), "gpt.smear_gate_form"),
        (dict(parallel_residual="two_lane"), "gpt.parallel_residual"),
        (dict(parallel_final_lane="sum"), "gpt.parallel_final_lane"),
        (dict(bos_id=64), "gpt.bos_id"),
        (dict(state_dict_layout="bank"), "gpt.state_dict_layout"),
        (dict(sparse_attn_gate_init_std=-1.0), "gpt.sparse_attn_gate_init_std"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=re.escape(field)):
        GPTConfig(vocab_size=64, num_layers=3, model_dim=32, num_heads=2, num_kv_heads=1, **changes)
