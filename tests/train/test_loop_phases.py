"""PR #1412's second loop phase (progressive recurrence, LOOP_PHASE2_AT) against its record script: the phase-1
layer indices of ``GPT.__init__``, its forward with them, and the training loop's switch order."""

from __future__ import annotations

import pytest
import torch

from pgolf_lit.callbacks import CompilePriming, RecurrenceActivation
from pgolf_lit.callbacks.recurrence import set_loop_repeats
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.config import GPTConfig
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.layers import rms_norm
from pgolf_lit.module import StepSchedule
from trainer_utils import Recorder, fit, tiny_datamodule, tiny_module, tiny_trainer


def upstream_phase_indices(num_layers, loop_start, loop_end, num_loops, phase):
    """PR #1412 ``GPT.__init__``: phase 2 runs the segment num_loops + 1 times, phase 1 min(num_loops, 1) + 1 times;
    skip_weights has min(len(enc), len(dec)) rows of phase 2."""
    seg = list(range(loop_start, loop_end + 1))
    repeats = num_loops + 1 if phase == 2 else min(num_loops, 1) + 1
    order = list(range(loop_start)) + seg * repeats + list(range(loop_end + 1, num_layers))
    return order[: len(order) // 2], order[len(order) // 2 :]


def upstream_forward(model: GPT, ids, enc, dec, rows):
    """PR #1412 ``forward_logits`` with the given indices (sequential blocks, gated skips, untied MLPs off)."""

    def block(b, x, x0):
        s = b.ln_scale_factor
        x_in = b.resid_mix[0] * x + b.resid_mix[1] * x0
        x_out = x_in + b.attn_scale * b.attn(rms_norm(x_in) * s, rope)[0]
        return x_out + b.mlp_scale * b.mlp(rms_norm(x_out) * s)

    x = x0 = rms_norm(model.tok_emb(ids))
    rope, skips = model.rotary(ids.size(1)), []
    for i in enc:
        x = block(model.blocks[i], x, x0)
        skips.append(x)
    for skip_idx, i in enumerate(dec):
        if skip_idx < rows and skips:
            scaled = model.skip_weights[skip_idx] * skips.pop()
            x = torch.lerp(scaled, x, torch.sigmoid(model.skip_gates[skip_idx]))
        x = block(model.blocks[i], x, x0)
    c = model.config.logit_softcap
    return c * torch.tanh(torch.nn.functional.linear(rms_norm(x), model.tok_emb.weight) / c)


def test_the_first_phase_is_the_records_one_repeat_loop():
    cfg = GPTConfig(
        vocab_size=64, num_layers=7, model_dim=32, num_heads=4, num_kv_heads=2, ln_scale=True, skip_gates=True,
        skip_rows="recurrent", recurrence="loop", num_loops=2, loop_start=2, loop_end=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    enc2, dec2 = upstream_phase_indices(7, 2, 3, 2, phase=2)
    rows = min(len(enc2), len(dec2))
    assert model.skip_weights.size(0) == rows
    ids = torch.randint(0, 64, (2, 12))
    model.set_recurrence(True)
    with torch.no_grad():
        for loops, phase in ((1, 1), (2, 2)):
            set_loop_repeats(model, loops)
            enc, dec = upstream_phase_indices(7, 2, 3, 2, phase)
            assert model.layer_schedule() == enc + dec
            expected = upstream_forward(model, ids, enc, dec, rows)
            torch.testing.assert_close(model.forward_logits(ids), expected, atol=1e-5, rtol=0)


class StepStub:
    """What the callback reads of a GolfModule: the model, the step's schedule, the event log."""

    def __init__(self, model):
        self.model, self.events, self.sched = model, [], None

    def step_schedule(self):
        return self.sched

    def record_event(self, name, text):
        self.events.append(name)


def test_the_switch_follows_the_records_training_loop():
    """PR #1412's loop: ``if not looping and frac >= enable_looping_at: phase 1`` / ``elif looping and in phase 1 and
    frac >= loop_phase2_at: phase 2`` at the top of each step; the last phase stands at the end of training."""
    cfg = GPTConfig(vocab_size=64, num_layers=4, model_dim=32, num_heads=2, num_kv_heads=1, recurrence="loop",
                    num_loops=2, loop_start=1, loop_end=2)  # fmt: skip
    switch, stub = RecurrenceActivation(at_fraction=0.5, phase2_at=0.65), StepStub(GPT(cfg))
    lengths = []
    for step, frac in enumerate([0.3, 0.5, 0.7, 0.71, 0.9]):  # the step at 0.5 starts phase 1; 0.7 the full loop
        stub.sched = StepSchedule(step, 0.0, frac, 1.0, 0.95)
        switch.on_train_batch_start(None, stub, None, step)
        lengths.append(len(stub.model.layer_schedule()) if stub.model.recurrence_active else 4)
    assert lengths == [4, 6, 8, 8, 8] and stub.events == ["recurrence:activated", "recurrence:phase2"]
    # both switches due at once: phase 1 for that step, the full loop from the next (upstream's elif)
    switch, stub = RecurrenceActivation(at_fraction=0.5, phase2_at=0.65), StepStub(GPT(cfg))
    stub.sched = StepSchedule(0, 0.0, 0.8, 1.0, 0.95)
    switch.on_train_batch_start(None, stub, None, 0)
    assert len(stub.model.layer_schedule()) == 6
    switch.on_train_batch_start(None, stub, None, 1)
    assert len(stub.model.layer_schedule()) == 8
    # a run resumed inside phase 1 (recurrence saved on, the plan rebuilt full) returns to phase 1
    stub = StepStub(GPT(cfg))
    stub.model.set_recurrence(True)
    stub.sched = StepSchedule(3, 0.0, 0.6, 1.0, 0.95)
    switch.on_train_batch_start(None, stub, None, 3)
    assert len(stub.model.layer_schedule()) == 6
    switch.on_train_end(None, stub)
    assert len(stub.model.layer_schedule()) == 8


@pytest.mark.slow
def test_the_phases_switch_in_the_records_order_and_training_ends_on_the_full_loop(embedded_data_root, tmp_path):
    """Step-based fraction over 8 steps (frac = step / 8): phase 1 at the first step with frac >= 0.25, the full loop
    at the first later step with frac >= 0.5 (upstream's elif), so the loop grows 4 -> 6 -> 8 layers."""
    module = tiny_module(num_layers=4, recurrence="loop", num_loops=2, loop_start=1, loop_end=2)
    lengths = Recorder(lambda t, m: len(m.model.layer_schedule()) if m.model.recurrence_active else 4)
    switch = RecurrenceActivation(at_fraction=0.25, phase2_at=0.5)
    priming = CompilePriming(steps=1, recurrent_steps=1)
    fit(module, tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 8, [priming, switch, lengths]))
    assert lengths.values == [4, 4, 6, 6, 8, 8, 8, 8]
    assert module.model.layer_schedule() == [0, 1, 2, 1, 2, 1, 2, 3]


def test_bad_phase_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match="phase2_at"):
        RecurrenceActivation(at_fraction=0.5, phase2_at=0.4)
    with pytest.raises(ConfigError, match="phase2_at"):
        RecurrenceActivation(at_fraction=0.5, phase2_at=1.5)
