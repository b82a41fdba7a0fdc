"""PR #1204's model techniques against the record script's own math (records/track_10min_16mb/
2026-03-31_ParallelResiduals_MiniDepthRecurrence/train_gpt.py): the per-virtual-layer block controls
(block_controls: position), the untied MLPs of the repeated layers, layer 0's attention off and the sublayer
lanes from parallel_start_layer. The reference below re-derives ``GPT._backbone`` / ``_parallel_block`` in plain
torch on our model's tensors, read as the script lays them out (controls by virtual index, matrices by physical)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from pgolf_lit.model.gpt import GPT, layer_schedule
from pgolf_lit.model.repeat_mlp import copy_base_mlps
from pgolf_lit.model.sublayer_lanes import sublayer_step
from pgolf_lit.errors import ConfigError
from pr1204_case import randomized, tiny_cfg


def ref_attention(x, wq, wk, wv, wo, q_gain, rope, xsa, ve, heads, kv_heads, rope_dims):
    """Upstream ``CausalSelfAttention.forward`` (SDPA for FA3)."""
    B, T, D = x.shape
    hd = D // heads
    q = F.linear(x, wq).reshape(B, T, heads, hd)
    k = F.linear(x, wk).reshape(B, T, kv_heads, hd)
    v = F.linear(x, wv)
    v = (v if ve is None else v + ve).reshape(B, T, kv_heads, hd)
    q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
    cos, sin = rope

    def rot(t):
        r, rest = t[..., :rope_dims], t[..., rope_dims:]
        h = rope_dims // 2
        a, b = r[..., :h], r[..., h:]
        return torch.cat((a * cos + b * sin, a * -sin + b * cos, rest), dim=-1)

    q = rot(q) * q_gain[None, None, :, None]
    k = rot(k)
    g = heads // kv_heads
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.repeat_interleave(g, 2).transpose(1, 2), v.repeat_interleave(g, 2).transpose(1, 2),
        is_causal=True,
    ).transpose(1, 2)  # fmt: skip
    if xsa:
        yg = y.reshape(B, T, kv_heads, g, hd)
        vn = F.normalize(v, dim=-1).unsqueeze(-2)
        y = (yg - (yg * vn).sum(-1, keepdim=True) * vn).reshape(B, T, heads, hd)
    return F.linear(y.reshape(B, T, D), wo)


def ref_backbone(model: GPT, ids: torch.Tensor, recurrent: bool) -> torch.Tensor:
    """Upstream ``GPT._backbone`` with ``_parallel_block`` and ``_final_parallel_hidden`` (lanes' mean)."""
    cfg, n = model.config, model.config.num_layers
    v2p = layer_schedule(cfg, recurrent)
    n_virtual = len(layer_schedule(cfg, True))
    n_enc, enc_recur = len(v2p) // 2, n_virtual // 2

    def ctl(i):  # upstream blocks[i]: position i's controls
        if i < n:
            b = model.blocks[i]
            return b.attn_scale, b.mlp_scale, b.resid_mix, b.attn.q_gain
        c = model.position_controls[i - n]
        return c.attn_scale, c.mlp_scale, c.resid_mix, c.q_gain

    def weights(i):  # upstream _get_block_weights(i)
        p = v2p[i]
        a, m = model.blocks[p].attn, model.blocks[p].mlp
        up, down = m.fc.weight, m.proj.weight
        if recurrent and enc_recur <= i < enc_recur + len(cfg.recur_layers):
            r = model.repeat_mlp[str(cfg.recur_layers[i - enc_recur])]
            up, down = r.fc.weight, r.proj.weight
        return a.c_q.weight, a.c_k.weight, a.c_v.weight, a.proj.weight, up, down

    T = ids.size(1)
    inv = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.rope_dims, 2).float() / cfg.rope_dims))
    freqs = torch.outer(torch.arange(T).float(), inv)
    rope = (freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :])
    x = model.tok_emb(ids) + model.bigram(ids)
    x = model.smear(F.rms_norm(x, (x.size(-1),)))
    x0 = x
    ve_base = model.ve_shared(ids)

    def sublayers(i):
        attn_scale, mlp_scale, mix, q_gain = ctl(i)
        wq, wk, wv, wo, up, down = weights(i)
        s = 1 / math.sqrt(i + 1)
        ve = ve_base * model.ve_layer_scales[cfg.ve_layers.index(i)] if i in cfg.ve_layers else None

        def mixed(h):
            return mix[0] * h + mix[1] * x0

        def attn(h):
            xsa = i >= n_virtual - cfg.xsa_last_n
            y = ref_attention(
                F.rms_norm(h, (h.size(-1),)) * s, wq, wk, wv, wo, q_gain, rope, xsa, ve,
                cfg.num_heads, cfg.num_kv_heads, cfg.rope_dims,
            )  # fmt: skip
            return attn_scale * y

        def mlp(h):
            hidden = F.leaky_relu(F.linear(F.rms_norm(h, (h.size(-1),)) * s, up), 0.5)
            return mlp_scale * F.linear(hidden.square(), down)

        return mixed, (None if i == 0 else attn), mlp

    def skip_into(h, skip, j):
        g = torch.sigmoid(model.skip_gates[j])
        return torch.lerp(model.skip_weights[j] * skip, h, g)

    skips, lane0, lane1 = [], None, None
    for i in range(len(v2p)):
        mixed, attn, mlp = sublayers(i)
        parallel = v2p[i] >= cfg.parallel_start_layer
        if i >= n_enc and parallel:
            if lane0 is None:
                lane0 = lane1 = x
            if skips:
                skip = skips.pop()
                lane0, lane1 = skip_into(lane0, skip, i - n_enc), skip_into(lane1, skip, i - n_enc)
            post, resid = model.parallel_post_lambdas[v2p[i]], model.parallel_resid_lambdas[v2p[i]]
            if attn is not None:
                a = attn(mixed(lane0))
                lane0, lane1 = resid[0] * lane0 + post[0, 0] * a, resid[0] * lane1 + post[0, 1] * a
            m = mlp(mixed(lane1))
            lane0, lane1 = resid[1] * lane0 + post[1, 0] * m, resid[1] * lane1 + post[1, 1] * m
            continue
        if i >= n_enc and skips:
            x = skip_into(x, skips.pop(), i - n_enc)
        x_in = mixed(x)
        x = x_in if attn is None else x_in + attn(x_in)
        x = x + mlp(x)
        if i < n_enc:
            skips.append(x)
    return x if lane0 is None else (lane0 + lane1) * 0.5


@pytest.mark.parametrize("recurrent", [False, True])
def test_position_controlled_forward_is_the_record_backbone(recurrent):
    model = randomized(tiny_cfg())
    model.set_recurrence(recurrent)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, ref = model.forward_hidden(ids), ref_backbone(model, ids, recurrent)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_the_record_shapes_its_tensors_so():
    cfg = tiny_cfg()
    model = GPT(cfg)
    # 7 virtual layers: two control sets past the 5 physical blocks, 3 skip rows, lambdas per physical layer
    assert len(model.position_controls) == 2 and model.skip_weights.shape == (3, 32)
    assert model.parallel_post_lambdas.shape == (5, 2, 2)
    torch.testing.assert_close(model.parallel_resid_lambdas, torch.full((5, 2), 1.1**0.5))  # upstream 1.1**.5
    assert sorted(model.repeat_mlp) == ["1", "2"] and model.roles["repeat_mlp.1.fc.weight"].layer == 1
    # layer 0's attention: in the model (the record counts it), never trained or exported
    for name in ("c_q", "c_k", "c_v", "proj"):
        role = model.roles[f"blocks.0.attn.{name}.weight"]
        assert role.kind == "unused" and not role.exported
    assert model.roles["blocks.1.attn.c_q.weight"].exported


def test_layer0_attention_is_never_read_and_the_repeat_mlp_only_when_recurrent():
    model = randomized(tiny_cfg())
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = {r: model.set_recurrence(r) or model.forward_hidden(ids) for r in (False, True)}
        for name in ("c_q", "c_k", "c_v", "proj"):
            getattr(model.blocks[0].attn, name).weight.normal_()
        model.repeat_mlp["2"].fc.weight.normal_()
        after = {r: model.set_recurrence(r) or model.forward_hidden(ids) for r in (False, True)}
    torch.testing.assert_close(after[False], before[False], rtol=0, atol=0)
    assert not torch.allclose(after[True], before[True])


def test_recurrence_switching_on_copies_the_layer_mlps_into_the_repeated_passes():
    model = randomized(tiny_cfg())
    copy_base_mlps(model)
    for layer in (1, 2):
        assert torch.equal(model.repeat_mlp[str(layer)].fc.weight, model.blocks[layer].mlp.fc.weight)
        assert torch.equal(model.repeat_mlp[str(layer)].proj.weight, model.blocks[layer].mlp.proj.weight)


def test_sublayer_step_writes_both_lanes_in_turn():
    g = torch.Generator().manual_seed(3)
    lane0, lane1 = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    post, resid = torch.randn(2, 2, generator=g), torch.randn(2, generator=g)
    wa, wm = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    attn, mlp = (lambda h: h @ wa), (lambda h: torch.tanh(h @ wm))
    out0, out1 = sublayer_step((lane0, lane1), post, resid, attn, mlp)
    # upstream _parallel_block: attention reads lane0, writes both; the MLP reads the new lane1, writes both
    a = attn(lane0)
    l0, l1 = resid[0] * lane0 + post[0, 0] * a, resid[0] * lane1 + post[0, 1] * a
    m = mlp(l1)
    torch.testing.assert_close(out0, resid[1] * l0 + post[1, 0] * m)
    torch.testing.assert_close(out1, resid[1] * l1 + post[1, 1] * m)
    # without attention (upstream ``disable_attn``) only the MLP sublayer acts
    n0, n1 = sublayer_step((lane0, lane1), post, resid, None, mlp)
    m = mlp(lane1)
    torch.testing.assert_close(n0, resid[1] * lane0 + post[1, 0] * m)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(block_controls="physical"), "block_controls"),
        (dict(parallel_start_layer=0, block_controls="physical", repeat_untie_mlp="none"), "block_controls"),
        (dict(parallel_residual="lambdas"), "parallel_residual"),
        (dict(recur_layers=[0, 1]), "recur_layers"),
        (dict(repeat_untie_mlp_layers=[3]), "repeat_untie_mlp_layers"),
        (dict(vrl=True), "block_controls"),
    ],
)
def test_bad_combinations_are_one_line_errors(changes, field):
    with pytest.raises(ConfigError, match=field):
        GPT(tiny_cfg(**changes))


def test_the_recurrence_switch_copies_the_layer_mlps_into_the_repeated_passes():
    from types import SimpleNamespace

    from pgolf_lit.callbacks import RecurrenceActivation

    model = randomized(tiny_cfg())
    events = []
    module = SimpleNamespace(
        model=model,
        step_schedule=lambda: SimpleNamespace(step=model.steps, frac=0.5, lr_scale=1.0),
        record_event=lambda *a: events.append(a),
    )
    switch = RecurrenceActivation(at_step=3)
    for model.steps in (2, 3):
        switch.on_train_batch_start(None, module, None, 0)
        same = [torch.equal(model.repeat_mlp[k].fc.weight, model.blocks[int(k)].mlp.fc.weight) for k in "12"]
        assert model.recurrence_active == (model.steps == 3) and all(same) == (model.steps == 3)
    assert len(events) == 1


def test_split_lr_scales_the_bank_gradients_as_the_record_and_muon_normalises_it_away():
    """PR #1179/#1204 train_gpt.py, after the clip: ``bank.grad[:5].mul_(es); bank.grad[5:n].mul_(ls)`` (rows i and
    n+i of qo/kv are layer i), then the bf16 Muon step. Our block matrices below bank_split form a Muon group with
    grad_scale es; the repeat MLPs are not in a bank and stay unscaled."""
    from pgolf_lit.optim.groups import OptimConfig, build_optimizers

    cfg = tiny_cfg(num_layers=5)
    split = OptimConfig(matrix_lr=0.03, matrix_lr_early=0.025, matrix_lr_late=0.03, bank_split=2)
    model = randomized(cfg)
    muon = next(o for o in build_optimizers(model, split) if type(o).__name__ == "Muon")
    ids = {id(p): n for n, p in model.named_parameters()}
    scaled = {ids[id(p)] for g in muon.param_groups if g.get("grad_scale", 1.0) != 1.0 for p in g["params"]}
    assert muon.param_groups[0]["grad_scale"] == pytest.approx(0.025 / 0.03)
    assert scaled == {
        f"blocks.{i}.{m}.weight" for i in (1,) for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.proj")
    } | {f"blocks.{i}.mlp.{m}.weight" for i in (0, 1) for m in ("fc", "proj")}  # layer 0's attention: unused
    # the step equals the record's: scale the gradient rows in place, then the unsplit step
    plain = OptimConfig(matrix_lr=0.03, muon_momentum_dtype="bf16")
    split = dataclasses.replace(split, muon_momentum_dtype="bf16")
    results = []
    for optim_cfg, prescale in ((split, False), (plain, True), (plain, False)):
        model = randomized(cfg)
        ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(4))
        model(ids, torch.zeros_like(ids)).backward()
        if prescale:  # the record's in-place scaling of the bank rows
            for name in scaled:
                model.get_parameter(name).grad.mul_(0.025 / 0.03)
        opt = next(o for o in build_optimizers(model, optim_cfg) if type(o).__name__ == "Muon")
        opt.step()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    ours, record, unsplit = results
    for name in ours:
        torch.testing.assert_close(ours[name], record[name], rtol=0, atol=0)
    # Newton-Schulz normalises each matrix's update: the split does not shrink the step as an lr of 0.025 would
    # (norm ratio 0.833); what it changes is the bf16 rounding of the gradient, which the iteration amplifies along
    # the gradient's weakest directions (here ~16 % of the update: a 24-token batch gives near rank-deficient grads)
    start = {n: p.detach() for n, p in randomized(cfg).named_parameters()}
    for name in scaled:
        step, base = ours[name] - start[name], unsplit[name] - start[name]
        assert abs(float(step.norm() / base.norm()) - 1) < 0.02, name
