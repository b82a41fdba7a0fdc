"""The parallel-residual forms of PR #1412/#1493/#1514 (GPT-J, one stream) and PR #1477 (two lanes, skips after the
fork), each checked against its record script's forward written out below in plain torch.

The references follow ``Block.forward`` and ``GPT.forward_logits`` of the records' train_gpt.py (records/
track_10min_16mb/2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT and 2026-04-08_SP8192_ParallelResid_
ScoreFirstTTT): encoder indices push skips, each decoder position pops one while ``skip_idx < num_skip_weights``,
and the skip is a sigmoid-gated lerp. They reuse the model's own attention and MLP modules, so what they check is
the wiring of the residual stream.
"""

from __future__ import annotations

import pytest
import torch

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.model.gpt import GPT, Block, layer_schedule
from pgolf_lit.model.gptj_residual import GPTJBlock
from pgolf_lit.model.layers import rms_norm


def tiny_config(**changes) -> GPTConfig:
    base = dict(
        vocab_size=64,
        num_layers=7,
        model_dim=32,
        num_heads=4,
        num_kv_heads=2,
        rope_dims=4,
        ln_scale=True,
        skip_gates=True,
        skip_rows="recurrent",
        recurrence="loop",
        num_loops=2,
        loop_start=2,
        loop_end=3,
        parallel_start_layer=4,
    )
    return GPTConfig(**{**base, **changes})


def perturbed(cfg: GPTConfig) -> GPT:
    """A model whose control tensors (scales, mixes, skip weights and gates) are away from their inits."""
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def upstream_block(block: Block, x, x0, rope, parallel: bool):
    """The record's Block.forward: parallel blocks read mlp_norm(x_in), sequential ones mlp_norm(x_out)."""
    s = block.ln_scale_factor
    x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
    attn_out = block.attn(rms_norm(x_in) * s, rope)[0]
    if parallel:
        return x_in + block.attn_scale * attn_out + block.mlp_scale * block.mlp(rms_norm(x_in) * s)
    x_out = x_in + block.attn_scale * attn_out
    return x_out + block.mlp_scale * block.mlp(rms_norm(x_out) * s)


def upstream_skip(model: GPT, x, skip, idx: int):
    scaled = model.skip_weights[idx] * skip
    return torch.lerp(scaled, x, torch.sigmoid(model.skip_gates[idx]))


def upstream_logits(model: GPT, ids, block_fn, decoder_fn):
    """The record's forward_logits around a decoder loop ``decoder_fn(x, x0, skips, decoder_indices, rope)``."""
    schedule = layer_schedule(model.config, model.recurrence_active)
    n_enc = len(schedule) // 2
    x = rms_norm(model.tok_emb(ids))
    x0, rope, skips = x, model.rotary(ids.size(1)), []
    for i in schedule[:n_enc]:
        x = block_fn(model.blocks[i], x, x0, rope, i)
        skips.append(x)
    x = decoder_fn(x, x0, skips, schedule[n_enc:], rope)
    c = model.config.logit_softcap
    return c * torch.tanh(torch.nn.functional.linear(rms_norm(x), model.tok_emb.weight) / c)


@pytest.mark.parametrize("looping", [False, True])
def test_gptj_matches_the_pr1493_forward(looping):
    cfg = tiny_config(parallel_residual="gptj")
    model = perturbed(cfg)
    model.set_recurrence(looping)
    start = cfg.parallel_start_layer
    assert [type(b) is GPTJBlock for b in model.blocks] == [i >= start for i in range(cfg.num_layers)]

    def block_fn(block, x, x0, rope, i):
        return upstream_block(block, x, x0, rope, parallel=i >= start)

    def decoder(x, x0, skips, indices, rope):
        rows = model.skip_weights.size(0)
        for skip_idx, i in enumerate(indices):
            if skip_idx < rows and skips:
                x = upstream_skip(model, x, skips.pop(), skip_idx)
            x = block_fn(model.blocks[i], x, x0, rope, i)
        return x

    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        expected = upstream_logits(model, ids, block_fn, decoder)
        torch.testing.assert_close(model.forward_logits(ids), expected, atol=1e-5, rtol=0)
        # the form matters: the sequential model differs on the same weights
        sequential = GPT(cfg.replace(parallel_start_layer=0))
        sequential.load_state_dict(model.state_dict())
        sequential.set_recurrence(looping)
        assert not torch.allclose(sequential.forward_logits(ids), expected, atol=1e-3)


def test_gptj_adds_no_parameter():
    cfg = tiny_config(parallel_residual="gptj")
    assert GPT(cfg).num_params() == GPT(cfg.replace(parallel_start_layer=0)).num_params()


@pytest.mark.parametrize("looping", [False, True])
def test_skip_after_fork_matches_the_pr1477_forward(looping):
    cfg = tiny_config(parallel_residual="lane_merge", skip_after_fork=True)
    model = perturbed(cfg)
    model.set_recurrence(looping)
    start = cfg.parallel_start_layer

    def block_fn(block, x, x0, rope, i):
        return upstream_block(block, x, x0, rope, parallel=False)

    def forward_attn(block, x, x0, rope):
        x_in = block.resid_mix[0] * x + block.resid_mix[1] * x0
        return x_in + block.attn_scale * block.attn(rms_norm(x_in) * block.ln_scale_factor, rope)[0]

    def forward_mlp(block, x):
        return x + block.mlp_scale * block.mlp(rms_norm(x) * block.ln_scale_factor)

    def decoder(x, x0, skips, indices, rope):
        """PR #1477's decoder loop: the skip, then the fork (both lanes carry it); later skips go to lane0."""
        rows = model.skip_weights.size(0)
        lane0 = lane1 = None
        for skip_idx, i in enumerate(indices):
            block = model.blocks[i]
            if lane0 is None:
                if skip_idx < rows and skips:
                    x = upstream_skip(model, x, skips.pop(), skip_idx)
                if i >= start:
                    lane0, lane1 = forward_attn(block, x, x0, rope), forward_mlp(block, x.clone())
                else:
                    x = block_fn(block, x, x0, rope, i)
            else:
                if skip_idx < rows and skips:
                    lane0 = upstream_skip(model, lane0, skips.pop(), skip_idx)
                lane0, lane1 = forward_attn(block, lane0, x0, rope), forward_mlp(block, lane1)
        return model.lane_merge * lane0 + (1 - model.lane_merge) * lane1

    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        expected = upstream_logits(model, ids, block_fn, decoder)
        torch.testing.assert_close(model.forward_logits(ids), expected, atol=1e-5, rtol=0)
        # without the option the skips after the fork are dropped (PR #1333/#1421): a different function
        dropped = GPT(cfg.replace(skip_after_fork=False))
        dropped.load_state_dict(model.state_dict())
        dropped.set_recurrence(looping)
        assert not torch.allclose(dropped.forward_logits(ids), expected, atol=1e-3)
