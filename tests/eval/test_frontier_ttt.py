"""PR #1953's TTT deltas without fixtures: the adapter mask (TTT_MASK=no_qv: no q/v adapters; PR #2135's k off) and
the per-document LoRA learning-rate multiplier (TTT_LOCAL_LR_MULT), on a random model. The record's own run is pinned
by tests/fixtures/test_frontier_fixtures.py."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pgolf_lit.config import gpt_config_from_yaml, record_config_path
from pgolf_lit.errors import ConfigError
from pgolf_lit.eval.context import ForwardOptions
from pgolf_lit.eval.phased_ttt import PhasedTTTSettings, _PhasedLearner
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.lora import BatchedTTTLoRA
from test_phased_ttt import TINY, random_model, run, stream


def lora_numel(lora: BatchedTTTLoRA) -> int:
    return sum(p.numel() for p in lora.parameters())


def test_adapter_mask_at_the_record_shape():
    """Per-document LoRA sizes at PR #1855's shape (rank 80, 17 slots with looping on): all adapters 6,963,200;
    no_qv (PR #1953/#2014) 4,526,080; k off (PR #2135) 5,918,720 (spec/frontier.md §3.2)."""
    cfg = gpt_config_from_yaml(record_config_path("pr1855_sp8192_lqer_sparsegate"))
    with torch.device("meta"):
        model = GPT(cfg)
        model.set_recurrence(True)
        full = BatchedTTTLoRA(model, 1, 80)
        no_qv = BatchedTTTLoRA(model, 1, 80, q=False, v=False)
        no_k = BatchedTTTLoRA(model, 1, 80, k=False)
    assert (lora_numel(full), lora_numel(no_qv), lora_numel(no_k)) == (6_963_200, 4_526_080, 5_918_720)
    assert no_qv.q_loras is None and no_qv.v_loras is None and no_qv.slot(16).q is None and no_qv.slot(16).k is not None
    assert not any(k.startswith(("q_loras", "v_loras")) for k in no_qv.state_dict())


def test_masked_adapters_change_nothing_they_do_not_hold():
    """A fresh masked LoRA (B = 0) is the identity like a full one, and a full LoRA's q/v adapters, once trained,
    move the scores: the mask removes adapters that act."""
    model, x = random_model(), torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(5))
    y = torch.roll(x, -1, 1)
    masked = BatchedTTTLoRA(model, 2, 2, q=False, v=False)
    full = BatchedTTTLoRA(model, 2, 2)
    with torch.no_grad():
        for a in list(full.q_loras) + list(full.v_loras):
            a.B.normal_()
        assert torch.equal(model.forward_ttt(x, y, masked), model.forward_ttt(x, y, BatchedTTTLoRA(model, 2, 2)))
        assert not torch.equal(model.forward_ttt(x, y, full), model.forward_ttt(x, y, masked))


def test_mask_and_lr_multiplier_reach_the_phased_run():
    model = random_model()
    learner = _PhasedLearner(
        model, replace(TINY, q_lora=False, v_lora=False, local_lr_mult=0.75), ForwardOptions(), None
    )
    assert learner.reusable.q_loras is None and learner.reusable.v_loras is None
    assert learner.optimizer(learner.reusable).param_groups[0]["lr"] == pytest.approx(TINY.lora_lr * 0.75)

    tokens = stream([0, 30, 95, 120, 180, 200, 251, 300], 320)
    base = run(model, tokens, TINY, 32)
    no_qv = run(model, tokens, replace(TINY, q_lora=False, v_lora=False), 32)
    slower = run(model, tokens, replace(TINY, local_lr_mult=0.75), 32)
    same = run(model, tokens, replace(TINY, local_lr_mult=0.5, lora_lr=TINY.lora_lr * 2), 32)
    assert float(no_qv.loss_sum) != float(base.loss_sum) and float(slower.loss_sum) != float(base.loss_sum)
    assert float(same.loss_sum) == float(base.loss_sum)
    with pytest.raises(ConfigError, match="phased_ttt.local_lr_mult"):
        PhasedTTTSettings(local_lr_mult=-1.0)


def test_score_first_ttt_leaves_the_asym_caps_alone():
    """The legacy score-first TTT trains every exported parameter but constants: AsymLogit's caps stay untrained."""
    from pgolf_lit.config import GPTConfig
    from pgolf_lit.eval.ttt import trainable_parameters

    model = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, asym_logit=True))
    trained = {id(p) for p in trainable_parameters(model, freeze_blocks=0)}
    assert id(model.softcap_pos) not in trained and id(model.softcap_neg) not in trained
    assert id(model.tok_emb.weight) in trained and not model.softcap_pos.requires_grad
