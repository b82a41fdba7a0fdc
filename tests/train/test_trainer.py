"""GolfModule + TokenShardDataModule + callbacks under a real Lightning Trainer on CPU (tiny GPT, embedded data)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from pgolf_lit.callbacks import EMA, SWA, CompilePriming, LateQAT, RecurrenceActivation, WallclockBudget
from pgolf_lit.clock import TrainClock
from pgolf_lit.errors import PgolfError
from pgolf_lit.model.layers import CastedLinear, fake_quantize_rows
from trainer_utils import Recorder, fit, tiny_datamodule, tiny_module, tiny_trainer, weights


def test_fit_loss_falls(embedded_data_root, tmp_path):
    L.seed_everything(0)
    losses = Recorder(lambda t, m: float(m.last_train_loss))
    fit(tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 30, [losses]))
    assert len(losses.values) == 30
    first, last = sum(losses.values[:3]) / 3, sum(losses.values[-3:]) / 3
    assert last < first - 0.5, losses.values


def test_one_batch_is_one_optimizer_step_with_grad_accum(embedded_data_root, tmp_path):
    """grad_accum_base 2 on one device: each batch stacks 2 micro-batches and the trainer counts one step."""
    dm = tiny_datamodule(embedded_data_root)
    shapes = Recorder(lambda t, m: t.global_step)
    trainer = fit(tiny_module(), dm, tiny_trainer(tmp_path, 3, [shapes]))
    assert trainer.global_step == 3 and shapes.values == [1, 2, 3]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 16, 64) and torch.equal(x[0, 0, 1:], y[0, 0, :-1])


class FakeTime:
    """A clock that moves only when told: ``Tick`` advances it after every training step."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Tick(Callback):
    def __init__(self, fake: FakeTime, seconds: float):
        self.fake, self.seconds = fake, seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.fake.t += self.seconds


def test_wallclock_budget_stops_at_the_right_step_and_drives_the_schedule(embedded_data_root, tmp_path):
    fake = FakeTime()
    module = tiny_module()
    module.clock = TrainClock(now=fake)
    scales = Recorder(lambda t, m: (m.last_schedule.step, m.last_schedule.frac, m.last_schedule.lr_scale))
    budget = WallclockBudget(max_seconds=6.5, reserve_seconds=1.0)  # effective 5.5 s, 1 s per step
    trainer = fit(
        module, tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 100, [Tick(fake, 1.0), budget, scales])
    )
    # After step 6 the clock reads 6.0 s >= 5.5 s: the run stops there, no extra step.
    assert trainer.global_step == 6 and budget.stopped_at_step == 6
    for step, frac, scale in scales.values:
        expected_frac = step / 5.5
        expected = 1.0 if expected_frac < 0.5 else max((1 - expected_frac) / 0.5, 0.0)
        assert frac == pytest.approx(expected_frac) and scale == pytest.approx(expected)


def test_ema_equals_a_hand_rolled_ema(embedded_data_root, tmp_path):
    L.seed_everything(0)
    raw = Recorder(weights, initial=True)
    decay = 0.8
    trainer = fit(
        tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 6, [raw, EMA(decay=decay)])
    )
    expected = {k: v.clone() for k, v in raw.initial.items()}  # the records start the shadow at the initial weights
    for snapshot in raw.values:
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * snapshot[k]
    final = trainer.lightning_module.model.state_dict()  # EMA applied at the end of training
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, atol=1e-6, rtol=0)
    assert not torch.equal(final["blocks.0.attn.c_q.weight"], raw.values[-1]["blocks.0.attn.c_q.weight"])


def test_ema_does_not_touch_validation_weights_by_default(embedded_data_root, tmp_path):
    seen = []

    class SeeValidationWeights(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            seen.append(pl_module.model.blocks[0].attn.c_q.weight.detach().clone())

    raw = Recorder(weights)
    fit(
        tiny_module(),
        tiny_datamodule(embedded_data_root),
        tiny_trainer(tmp_path, 4, [raw, EMA(decay=0.5), SeeValidationWeights()], val_check_interval=2),
    )
    assert torch.equal(seen[0], raw.values[1]["blocks.0.attn.c_q.weight"])


def test_swa_average_of_the_snapshots(embedded_data_root, tmp_path):
    L.seed_everything(0)
    raw = Recorder(weights)
    swa = SWA(every=2, lr_scale_below=2.0, apply=True)  # threshold above 1: collect from the start
    trainer = fit(tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 6, [raw, swa]))
    snapshots = [raw.values[i] for i in (1, 3, 5)]  # after steps 2, 4, 6
    assert swa.count == 3 and swa.start_step == 2
    final = trainer.lightning_module.model.state_dict()
    for k in final:
        torch.testing.assert_close(final[k], sum(s[k] for s in snapshots) / 3, atol=1e-6, rtol=0)


def test_swa_collects_but_does_not_apply_by_default(embedded_data_root, tmp_path):
    raw = Recorder(weights)
    swa = SWA(every=1, lr_scale_below=2.0)
    trainer = fit(tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 3, [raw, swa]))
    assert swa.count == 3
    for k, v in trainer.lightning_module.model.state_dict().items():
        assert torch.equal(v, raw.values[-1][k])


def test_qat_forward_is_the_fake_quantized_weight_and_gradient_passes_straight_through():
    torch.manual_seed(0)
    layer = CastedLinear(48, 24)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer.qat_bits = 6
    x = torch.randn(5, 48)
    y = layer(x)
    # The records' int6 fake quantizer: per row s = max(|w|max / 31, 1/31), codes clamped to [-32, 31].
    w = layer.weight.detach()
    s = (w.abs().amax(dim=1) / 31).clamp_min(1 / 31)
    wq = (torch.clamp(torch.round(w / s[:, None]), -32, 31) * s[:, None]).requires_grad_()
    assert torch.equal(fake_quantize_rows(w, 6), wq.detach())
    ref = F.linear(x, wq)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    y.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, wq.grad, atol=0, rtol=0)
    layer.eval()
    assert torch.equal(layer(x), F.linear(x, layer.weight))  # eval forwards are never fake-quantized


def test_late_qat_switches_on_below_the_threshold(embedded_data_root, tmp_path):
    qat = LateQAT(lr_scale_below=0.7, apply=True)
    bits = Recorder(lambda t, m: (m.last_schedule.lr_scale, m.model.blocks[0].attn.c_q.qat_bits))
    fit(tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 8, [qat, bits]))
    # step-based fraction over 8 steps, warmdown over the last half: scale < 0.7 from step 6 (frac 0.75)
    assert qat.enabled_at_step == 6
    assert [b for _, b in bits.values] == [0] * 6 + [6, 6]


def test_recurrence_activation_at_a_step(embedded_data_root, tmp_path):
    module = tiny_module(num_layers=4, recurrence="group", recur_layers=[1, 2])
    state = Recorder(lambda t, m: m.model.recurrence_active)
    fit(
        module, tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 5, [RecurrenceActivation(at_step=3), state])
    )
    assert state.values == [False, False, False, True, True]


def test_compile_priming_leaves_weights_and_optimizer_as_a_fresh_start(embedded_data_root, tmp_path):
    def run(callbacks):
        L.seed_everything(0)
        module = tiny_module(num_layers=4, recurrence="loop", num_loops=1, loop_start=1, loop_end=2)
        trainer = fit(module, tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 5, callbacks))
        return module.model.state_dict(), trainer.optimizers[0].state_dict()

    primed_w, primed_opt = run([CompilePriming(steps=3, recurrent_steps=2, mode="step_fn")])
    plain_w, plain_opt = run([])
    for k in plain_w:
        assert torch.equal(primed_w[k], plain_w[k]), k
    assert str(primed_opt) == str(plain_opt)


def test_resume_from_a_mid_run_checkpoint_is_bit_exact(embedded_data_root, tmp_path):
    """Kill-free version of the resume guarantee: weights, EMA and SWA after 8 steps equal an uninterrupted run."""

    def callbacks(ckpt_dir):
        return [
            EMA(decay=0.9),
            SWA(every=2, lr_scale_below=2.0),
            ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1, filename="{step}"),
        ]

    class Crash(Exception):
        pass

    class CrashAfterStep4(Callback):
        """Ends the run after step 4 (and its checkpoint) as a crash would; the schedule still plans 8 steps."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 4:
                raise Crash

    def run(ckpt_dir, ckpt_path=None, extra=()):
        L.seed_everything(0)
        module = tiny_module()
        cbs = callbacks(ckpt_dir)
        raw = Recorder(weights)
        trainer = tiny_trainer(tmp_path, 8, [raw, *extra, *cbs], enable_checkpointing=True)
        fit(module, tiny_datamodule(embedded_data_root), trainer, ckpt_path=ckpt_path)
        return module, raw, cbs

    full, full_raw, (full_ema, full_swa, _) = run(tmp_path / "a")
    with pytest.raises(Crash):
        run(tmp_path / "b", extra=[CrashAfterStep4()])
    resumed, resumed_raw, (_, resumed_swa, _) = run(tmp_path / "c", ckpt_path=str(tmp_path / "b" / "step=4.ckpt"))
    for k, v in full.model.state_dict().items():  # EMA weights, applied at the end
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for k, v in full_raw.values[-1].items():  # the raw weights of the last step
        assert torch.equal(v, resumed_raw.values[-1][k]), k
    assert full_swa.count == resumed_swa.count == 4
    for k, v in full_swa.sums.items():
        assert torch.equal(v, resumed_swa.sums[k]), k
    assert resumed.clock.elapsed_ms() > 0


def test_non_finite_loss_stops_with_the_step_named(embedded_data_root, tmp_path):
    class PoisonWeights(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                with torch.no_grad():
                    pl_module.model.blocks[0].mlp.fc.weight.fill_(math.inf)

    with pytest.raises(
        PgolfError, match=r"training loss is not finite \(nan/inf\) at step 4.*last good checkpoint: none saved"
    ):
        fit(tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 10, [PoisonWeights()]))


def test_an_error_during_training_starts_on_a_line_of_its_own(embedded_data_root, tmp_path, capsys):
    """The budget bar is closed when training raises, so the ``error:`` line that follows is not glued to a bar
    frame; and the bar's first frame already has its own total (no Lightning "0/100000" epoch frame)."""
    from pgolf_lit.callbacks import BudgetProgressBar

    class Fail(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                raise PgolfError("stop here")

    with pytest.raises(PgolfError, match="stop here"):
        fit(
            tiny_module(),
            tiny_datamodule(embedded_data_root),
            tiny_trainer(tmp_path, 10, [BudgetProgressBar(), Fail()], enable_progress_bar=True),
        )
    screen = capsys.readouterr().out
    frames = [f for f in screen.replace("\r", "\n").split("\n") if "it/s" in f or "s/it" in f]
    assert frames and all("/10 [" in f and f.startswith("train (steps)") for f in frames), frames
    assert screen.endswith("\n"), repr(screen[-200:])


def test_late_qat_trains_each_layer_at_its_export_rules_width():
    """Without its own bits, LateQAT reads the run's export rules: MLP int5, attention int6, and a group the export
    keeps float is not fake-quantized; a stated width applies to every exported layer."""
    from pgolf_lit.callbacks.late_qat import set_qat_bits
    from pgolf_lit.quant.export import ExportConfig, TensorRule

    model = tiny_module().model
    block = model.blocks[0]
    export = ExportConfig(mlp=TensorRule(5, "rtn"), attn=TensorRule(6, "rtn"))
    layers = set_qat_bits(model, None, export)
    assert (block.mlp.fc.qat_bits, block.mlp.proj.qat_bits, block.attn.c_q.qat_bits) == (5, 5, 6)
    assert layers == sum(1 for m in model.modules() if isinstance(m, CastedLinear) and m.qat_bits) > 0
    set_qat_bits(model, 0, export)
    assert not any(m.qat_bits for m in model.modules() if isinstance(m, CastedLinear))
    float_attention = ExportConfig(mlp=TensorRule(5, "rtn"), attn=None)
    set_qat_bits(model, 4, float_attention)
    assert (block.mlp.fc.qat_bits, block.attn.c_q.qat_bits) == (4, 0)  # the export keeps attention float


def test_compile_priming_primes_qat_at_the_widths_late_qat_sets(embedded_data_root, tmp_path, monkeypatch):
    """CompilePriming without its own qat_bits primes the QAT graph at LateQAT's stated width (else the export
    rules'), so the graph it compiles is the one LateQAT switches to."""
    import pgolf_lit.callbacks.late_qat as late_qat

    seen = []
    real = late_qat.set_qat_bits
    monkeypatch.setattr(
        late_qat, "set_qat_bits", lambda model, bits, export=None: seen.append(bits) or real(model, bits, export)
    )
    callbacks = [CompilePriming(steps=1, qat_steps=1, mode="step_fn"), LateQAT(lr_scale_below=0.0, bits=4, apply=True)]
    fit(tiny_module(), tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 2, callbacks))
    assert 4 in seen and seen[-1] == 0  # primed at LateQAT's 4 bits, then switched off for the real run
