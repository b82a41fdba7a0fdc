"""The GPU path does what the record scripts do and nothing more on the clock (issue: speed parity): varlen attention
gets the packed loader's segment bound as ``max_seqlen`` (not the row length), record configs write no checkpoint
during the timed run and state the world they ran on, the clock ledger accounts for every second around the budget,
and a result line says what its eval_time includes."""

from __future__ import annotations

import glob
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pgolf_lit.cli import make_cli
from pgolf_lit.clock import TrainClock, ledger_line
from pgolf_lit.config import CONFIG_DIR, load_config
from pgolf_lit.model.attention import PackedSegments
from pgolf_lit.records import RecordRun

RECORD_CONFIGS = sorted(
    [Path(p) for p in glob.glob(str(CONFIG_DIR / "records" / "*.yaml")) if not p.endswith("_tiny.yaml")]
    + [CONFIG_DIR / "baseline_sp1024.yaml"]
)
TINY_CONFIGS = sorted(Path(p) for p in glob.glob(str(CONFIG_DIR / "records" / "*_tiny.yaml")))
PR1855_TINY = CONFIG_DIR / "records" / "pr1855_sp8192_lqer_sparsegate_tiny.yaml"


# ---------------------------------------------------------------------------------------------------------
# 1. max_seqlen: the loader's bound, in the training step and in the cu_seqlens priming
# ---------------------------------------------------------------------------------------------------------


def test_packed_training_passes_the_loaders_segment_bound_as_max_seqlen(run_cwd, monkeypatch):
    """A spy on the segments every varlen attention call receives: the packed record's training steps and its bucket
    priming pass the cut length (data.train_seq_len, 128 in the twin), never the packed row length (2048)."""
    seen: list[int] = []
    build = PackedSegments.build.__func__

    def spy(cls, cu_seqlens, max_seqlen, ids):
        seen.append(int(max_seqlen))
        return build(cls, cu_seqlens, max_seqlen, ids)

    monkeypatch.setattr(PackedSegments, "build", classmethod(spy))
    cli = make_cli(
        ["--config", str(PR1855_TINY), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"], run=False
    )
    cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks if type(cb).__name__ != "GPTQExport"]  # not needed
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    row, bound = cli.datamodule.micro_batch_tokens, cli.datamodule.train_seq_len
    assert (row, bound) == (2048, 128)
    assert seen and set(seen) == {bound}, f"max_seqlen seen: {sorted(set(seen))}"

    # The cu_seqlens bucket priming (compiled runs) compiles with the same bound the steps then pass.
    from pgolf_lit.callbacks import CompilePriming
    from pgolf_lit.data.datamodule import TrainSteps

    seen.clear()
    batch = next(iter(TrainSteps(cli.datamodule.make_train_loader(), 1)))
    assert batch[3] == bound
    CompilePriming(cu_buckets=[64])._prime_cu_buckets(cli.model, batch)
    assert seen and set(seen) == {bound}


# ---------------------------------------------------------------------------------------------------------
# 2. Nothing written during the timed run; the record's world
# ---------------------------------------------------------------------------------------------------------


def _callbacks(config: dict) -> list[str]:
    return [str(c.get("class_path", "")) for c in (config.get("trainer") or {}).get("callbacks") or []]


@pytest.mark.parametrize("path", RECORD_CONFIGS, ids=lambda p: p.stem)
def test_record_configs_write_no_checkpoint_and_state_their_world(path):
    config = load_config(path)
    trainer = config["trainer"]
    assert trainer["enable_checkpointing"] is False
    assert not any("Checkpoint" in c for c in _callbacks(config)), "a record checkpoints inside its 600 s"
    assert "--trainer.enable_checkpointing true" in path.read_text(), "the config says how to turn checkpoints on"
    assert trainer["devices"] == config["record"]["world"] == 8
    strategy = trainer["strategy"]
    assert strategy == "ddp" or str(strategy.get("class_path")).endswith("DDPStrategy"), strategy
    hook = strategy.get("init_args", {}).get("ddp_comm_hook") if isinstance(strategy, dict) else None
    if hook is not None:  # an import path jsonargparse resolves to one of PyTorch's compression hooks
        import importlib

        from pgolf_lit.module import grad_compression_dtype

        module, _, name = hook.rpartition(".")
        resolved = getattr(importlib.import_module(module), name)
        assert grad_compression_dtype(SimpleNamespace(_ddp_comm_hook=resolved, _ddp_comm_wrapper=None)) is not None
    if path.stem.startswith("pr1855"):  # spec leaderboard.md §4.3: the record reduces its Muon banks in bf16
        assert hook is not None and hook.endswith("default_hooks.bf16_compress_hook"), strategy


@pytest.mark.parametrize("path", TINY_CONFIGS, ids=lambda p: p.stem)
def test_tiny_twins_stay_on_one_cpu_device(path):
    config = load_config(path)
    assert (config["trainer"]["devices"], config["trainer"]["accelerator"], config["record"]["world"]) == (1, "cpu", 1)


def test_enable_checkpointing_true_attaches_the_step_checkpoint(run_cwd):
    from pgolf_lit.callbacks import Checkpoint

    off = make_cli(["--config", str(CONFIG_DIR / "records" / "pr1394_sp8192_loop45_tiny.yaml")], run=False)
    assert off.trainer.checkpoint_callbacks == []
    on = make_cli(
        [
            "--config",
            str(CONFIG_DIR / "records" / "pr1394_sp8192_loop45_tiny.yaml"),
            "--trainer.enable_checkpointing",
            "true",
        ],
        run=False,
    )
    (checkpoint,) = on.trainer.checkpoint_callbacks
    assert isinstance(checkpoint, Checkpoint) and checkpoint._every_n_train_steps == 1000 and checkpoint.save_last


def test_world_notes_name_what_differs_and_step_matching_scales_the_budget():
    record = RecordRun(world=8)
    assert record.world_notes(8, 8, True, True, 599.5) == []
    (line,) = record.world_notes(1, 8, True, True, 599.5)
    assert line.startswith("record world: this run has 1 device(s), the record ran on 8: ")
    for part in (
        "8 micro-batch(es) per rank per step instead of 1",
        "each rank clips the gradient of 8 micro-batch(es) instead of 1",
        "rank 0's share of a 1-rank stream",
        "--record.step_matched true scales it by 8/1",
    ):
        assert part in line
    assert "clips" not in record.world_notes(2, 8, False, False, 599.5)[0]
    matched = RecordRun(world=8, step_matched=True)
    notes = matched.world_notes(2, 8, False, False, 599.5)
    assert notes[1] == "step_matched: training budget 599.5s x 8/2 = 2398.0s; not a record-valid run"
    assert matched.step_scale(2) == 4.0 and matched.step_scale(8) == 1.0 and record.step_scale(2) == 1.0
    assert matched.summary(2, True) == {
        "record_world": 8,
        "world": 2,
        "step_matched": True,
        "budget_scale": 4.0,
        "record_valid": False,
    }
    assert record.summary(8, False)["record_valid"] is True
    with pytest.raises(Exception, match="record.world: expected a positive GPU count"):
        RecordRun(world=0)


def test_step_matched_fit_scales_the_wallclock_budget_and_is_marked(run_cwd):
    """`pgolf fit` on another world: the CLI hands the module its line and summary entry, and step-matched mode
    stretches the training part of the budget (cap minus the GPTQ reserve), leaving the reserve as it was."""
    from pgolf_lit.callbacks import WallclockBudget

    cli = make_cli(
        [
            "--config",
            str(CONFIG_DIR / "records" / "pr1394_sp8192_loop45_tiny.yaml"),
            "--record.world",
            "8",
            "--record.step_matched",
            "true",
            "--trainer.max_time",
            "00:00:01:00",
        ],
        run=False,
    )
    cli._apply_record_run()
    (budget,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, WallclockBudget)]
    assert (budget.reserve_seconds, budget.max_seconds) == (12, 12 + 48 * 8)
    assert budget.effective_cap_ms == 48 * 8 * 1000
    assert cli.model.run_notes[0].startswith("record world: this run has 1 device(s), the record ran on 8")
    assert cli.model.record_run == {
        "record_world": 8,
        "world": 1,
        "step_matched": True,
        "budget_scale": 8.0,
        "record_valid": False,
    }


# ---------------------------------------------------------------------------------------------------------
# 3. The clock ledger and what eval_time includes
# ---------------------------------------------------------------------------------------------------------


class FakeTime:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_clock_ledger_accounts_for_the_budget_the_exclusions_and_the_reserve():
    now = FakeTime()
    clock = TrainClock(now=now)
    clock.note_off_clock("priming", 40.0)
    clock.start()
    now.t = 300.0
    clock.pause()
    clock.note_off_clock("validation", 2.5)
    clock.start()
    now.t = 599.7
    clock.pause()
    clock.note_after_cap("calibration", 4.8)
    clock.note_after_cap("export", 20.0)
    ledger = clock.ledger(600.0, 0.5)
    assert ledger["train_s"] == pytest.approx(599.7) and ledger["budget_s"] == 599.5
    assert ledger["counted_s"] == pytest.approx(604.5) and ledger["over_cap_s"] == pytest.approx(4.5)
    line = ledger_line(ledger)
    assert line == (
        "clock: train 599.7s of a 599.5s budget (cap 600s - GPTQ reserve 0.5s) | off the clock: priming "
        "40.0s (1x), validation 2.5s (1x) | GPTQ reserve 0.5s, calibration + Hessians used 4.8s: train + "
        "calibration 604.5s, 4.5s over the cap | export 20.0s in all (quantize, compress, write)"
    )
    # A reserve that covers the calibration; a run without a cap.
    inside = TrainClock(now=now)
    inside.note_after_cap("calibration", 3.0)
    assert ledger_line(inside.ledger(600.0, 4.0)).endswith("calibration + Hessians used 3.0s: inside the cap")
    assert (
        ledger_line(TrainClock(now=now).ledger(None, 0.0)) == "clock: train 0.0s (no wallclock cap) | off the "
        "clock: nothing"
    )
    # The ledger survives a checkpoint (a resumed run keeps its priming and validation seconds).
    resumed = TrainClock(now=now)
    resumed.load_state_dict(clock.state_dict())
    assert resumed.off_clock == {"priming": [40.0, 1], "validation": [2.5, 1]}
    resumed.load_state_dict({"elapsed_ms": 5.0})  # a checkpoint from before the ledger
    assert resumed.off_clock == {} and resumed.elapsed_ms() == 5.0


def test_eval_time_says_it_includes_compile(monkeypatch):
    """The runner marks a pass whose forwards were compiled inside it (compile time is in its eval_time)."""
    from dataclasses import dataclass

    from pgolf_lit.config import GPTConfig
    from pgolf_lit.eval import EvalSettings, evaluation_context, run_method
    from pgolf_lit.eval.context import ForwardOptions
    from pgolf_lit.model.gpt import GPT

    @dataclass(frozen=True)
    class CountedCompile(ForwardOptions):  # says it compiles; runs eagerly (CPU inductor would take minutes here)
        def compiled(self, fn):
            return fn

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, num_layers=1, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=1.0))
    tokens = torch.randint(0, 64, (257,))
    luts = (torch.ones(64, dtype=torch.int16), torch.zeros(64, dtype=torch.bool), torch.ones(64, dtype=torch.bool))
    settings = EvalSettings(seq_len=64, stride=32)
    eager = evaluation_context(settings, precision="32-true", device=torch.device("cpu"), compile=False)
    assert run_method("standard", model, tokens, luts, eager).eval_time_includes == ()
    compiled = type(eager)(settings, CountedCompile(compile=True), eager.weights)
    assert run_method("standard", model, tokens, luts, compiled).eval_time_includes == ("compile",)
