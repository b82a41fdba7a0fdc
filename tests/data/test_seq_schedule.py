"""Progressive context growth (PR #2014 ``TRAIN_SEQ_SCHEDULE``; ``pgolf_lit/data/seq_schedule.py``) against the
record's own functions and run: the frontier fixture ``train/pr2014_progressive_seq``.

- ``schedule.json``: parsing (and what it refuses), the stage at every listed wallclock / step progress, the
  micro-batch compatibility, the record's batch layout per stage;
- ``run.json``: the record's ``train_model`` as rank 0 of 8 on a fake clock (16 s per step): every step's length, LR
  scale (warmdown × re-warmup), Muon momentum, looping, batch position and ``cu_seqlens``, the two prefetched calls
  skipped at each change, the stop step; replayed on our schedule + loader (fast), and through ``pgolf fit`` itself
  (the real Trainer loop, slow);
- compile priming: every (length, looping) shape compiles before the clock starts, none while it runs.

Fixtures: $PGOLF_FRONTIER_FIXTURES (default ../shared/fixtures/frontier); every value is read from the case's files (a
held-out twin with other seeds and shapes exists), and everything skips cleanly without them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import fixture_root
from pgolf_lit.callbacks import RecurrenceActivation
from pgolf_lit.config import CONFIG_DIR, GPTConfig, load_config
from pgolf_lit.data.datamodule import PendingStep, TrainSteps
from pgolf_lit.data.loaders import DocumentPackingLoader
from pgolf_lit.data.seq_schedule import SeqSchedule, SeqStage
from pgolf_lit.errors import ConfigError
from pgolf_lit.optim import effective_cap_ms, record_optim_config, record_schedule_config

ENV = "PGOLF_FRONTIER_FIXTURES"
ROOT = fixture_root(ENV, "frontier")
RECORD = "pr2014_progressive_shortdoc"


def _cases() -> list:
    folder = ROOT / "train" if ROOT is not None else None
    if folder is None or not folder.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no frontier train fixtures: set {ENV}"))]
    cases = [p for p in sorted(folder.iterdir()) if (p / "schedule.json").is_file()]
    return [pytest.param(p, id=p.name) for p in cases] or [pytest.param(None, marks=pytest.mark.skip(reason="none"))]


CASES = _cases()


def _json(case: Path, name: str) -> dict:
    return json.loads((case / name).read_text())


def _unquote(key: str) -> str:
    """The fixture's keys are Python reprs of the schedule text (``'1024@0.1'``)."""
    assert key[0] == key[-1] == "'", key
    return key[1:-1]


# ---------------------------------------------------------------------------------------------------------
# schedule.json: the record's schedule functions
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_parse_matches_the_record(case):
    ref = _json(case, "schedule.json")
    assert ref["parse_train_seq_schedule"]
    for key, want in ref["parse_train_seq_schedule"].items():
        plan = SeqSchedule.parse(_unquote(key), want["default_seq_len"])
        assert [list(stage) for stage in plan.stages] == want["plan"], key
        assert max(want["default_seq_len"], plan.max_seq_len) == want["max_train_seq_len"], key
    assert ref["parse_errors"]
    for key in ref["parse_errors"]:
        with pytest.raises(ConfigError, match=r"^data\.seq_schedule: "):
            SeqSchedule.parse(_unquote(key), 4096)
    with pytest.raises(ConfigError, match="exceeds data.train_seq_len 1024"):
        SeqSchedule.parse("512@0.5,2048@1.0", 1024)


@pytest.mark.parametrize("case", CASES)
def test_stage_at_each_progress_matches_the_record(case):
    """The stage follows the training fraction the LR schedule reads: wallclock over the cap after the reserve, or
    steps over the budget without a cap (the record's step mode)."""
    ref = _json(case, "schedule.json")
    wall = ref["wallclock_mode"]
    plan = SeqSchedule(tuple(tuple(s) for s in wall["plan"]))
    h = _json(case, "hparams.json")["record_env"]
    cap = effective_cap_ms(float(h["MAX_WALLCLOCK_SECONDS"]), float(h["GPTQ_RESERVE_SECONDS"]))
    assert cap == wall["max_wallclock_ms"]
    schedule = record_schedule_config(RECORD)
    for point in wall["points"]:
        frac = schedule.training_fraction(0, point["elapsed_ms"], cap, 20000)
        assert min(frac, 1.0) == pytest.approx(point["progress"], abs=1e-12), point
        assert plan.seq_len_at(frac) == point["seq_len"], point
    steps = ref["step_mode"]
    for point in steps["points"]:
        frac = schedule.training_fraction(point["step"], 0.0, None, steps["iterations"])
        assert plan.seq_len_at(frac) == point["seq_len"], point


@pytest.mark.parametrize("case", CASES)
def test_micro_batch_compatibility_and_layout(case):
    ref = _json(case, "schedule.json")
    plan = SeqSchedule(tuple(tuple(s) for s in ref["wallclock_mode"]["plan"]))
    for key, local in ref["validate_train_seq_plan_compatibility"].items():
        if "(error)" in key:
            bad = SeqSchedule.parse(key.split(" ")[0], plan.max_seq_len)
            with pytest.raises(ConfigError, match=r"do not divide the micro-batch of \d+ tokens"):
                bad.check_micro_batch(int(local.split("local_tokens=")[1].split(",")[0]))
            continue
        parts = dict(p.split("=") for p in key.split(","))
        tokens = int(parts["global"]) // (int(parts["world"]) * int(parts["accum"]))
        assert tokens == local
        plan.check_micro_batch(tokens)
    for row in ref["record_batch_layout"]:
        assert plan.seq_len_at(row["stage_end_progress"]) == row["seq_len"] == row["max_seqlen_passed_to_model"]
        assert row["local_tokens_per_rank_per_step"] // row["seq_len"] == row["full_windows_per_row"]


@pytest.mark.parametrize("case", CASES)
def test_record_config_states_the_records_schedule(case):
    """Our record config against the record's own env: the schedule, its training length, the re-warmup."""
    from pgolf_lit.data.datamodule import TokenShardDataModule

    env = _json(case, "hparams.json")["record_env"]
    data = TokenShardDataModule(**load_config(CONFIG_DIR / "records" / f"{RECORD}.yaml")["data"])  # checks sizes
    assert data.train_seq_len == int(env["TRAIN_SEQ_LEN"])
    assert data.seq_plan == SeqSchedule.parse(env["TRAIN_SEQ_SCHEDULE"], int(env["TRAIN_SEQ_LEN"]))
    assert env["TRAIN_SEQ_SCHEDULE_MODE"] == "wallclock"  # our stages follow the LR schedule's fraction
    assert record_schedule_config(RECORD).seq_change_warmup_steps == int(env["SEQ_CHANGE_WARMUP_STEPS"])
    ref = _json(case, "schedule.json")["record_batch_layout"]
    assert {row["local_tokens_per_rank_per_step"] for row in ref} == {data.micro_batch_tokens}


def test_compile_shapes_follow_the_loop_switch():
    plan = SeqSchedule.parse("1024@0.1,2048@0.7,3072@1.0", 3072)
    shapes = [(1024, False), (2048, False), (2048, True), (3072, True)]  # the record's log: compile_shape_warmup:start
    assert plan.compile_shapes(0.35, loops=True) == shapes
    assert plan.compile_shapes(float("inf"), loops=True) == [(1024, False), (2048, False), (3072, False)]
    assert plan.compile_shapes(None, loops=True) == [(n, m) for n in (1024, 2048, 3072) for m in (False, True)]
    assert plan.compile_shapes(0.35, loops=False) == [(1024, False), (2048, False), (3072, False)]


def test_rewarmup_restarts_at_each_change_after_step_zero():
    stage = SeqStage(SeqSchedule.parse("32@0.5,64@1.0", 64), rewarmup_steps=4)
    assert not stage.advance(0, 0.0) and stage.lr_factor(0) == 1.0
    assert stage.advance(7, 0.6) and stage.seq_len == 64
    assert [stage.lr_factor(s) for s in range(7, 12)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    late = SeqStage(SeqSchedule.parse("32@0.5,64@1.0", 64), rewarmup_steps=4)
    assert late.advance(0, 0.9) and late.lr_factor(0) == 1.0  # a change at step 0 does not re-warm


# ---------------------------------------------------------------------------------------------------------
# run.json: the record's training run, step by step
# ---------------------------------------------------------------------------------------------------------


def _case_setup(case: Path) -> dict:
    hp = _json(case, "hparams.json")
    h = hp["hyperparameters"]
    data = case / hp["env_paths"]["DATA_PATH"].split(" ")[0]
    world = int(hp["env"]["WORLD_SIZE"])
    return {
        "h": h,
        "data": data,
        "world": world,
        "tokens_per_rank": h["train_batch_tokens"] // (world * h["grad_accum_steps"]),
        "plan": SeqSchedule.parse(h["train_seq_schedule"], h["train_seq_len"]),
        "cap": effective_cap_ms(h["max_wallclock_seconds"], h["gptq_reserve_seconds"]),
    }


def _check_batch(shard: np.ndarray, batch: tuple, want: dict, label: str) -> None:
    """Our packed step against the record's: the rank's span position (by its tokens), the boundaries (padded to
    the record's bucket), the bound passed to attention and the longest segment."""
    x, y, cu, bound = batch
    start, n = want["local_start"], want["n_tokens"]
    assert torch.equal(x[0, 0], torch.from_numpy(shard[start : start + n].astype(np.int64))), label
    assert torch.equal(y[0, 0], torch.from_numpy(shard[start + 1 : start + n + 1].astype(np.int64))), label
    boundaries = want["cu_seqlens"]
    assert cu.shape[-1] == want["cu_padded_len"], label
    assert cu[0, : len(boundaries)].tolist() == boundaries and set(cu[0, len(boundaries) :].tolist()) <= {n}, label
    assert bound == want["max_seq_len_arg"], label
    assert max(b - a for a, b in zip(boundaries, boundaries[1:])) == want["builder_max_seqlen"], label


@pytest.mark.parametrize("case", CASES)
def test_record_run_replayed_on_the_schedule_and_loader(case):
    """Our schedule (stage, warmdown × re-warmup, momentum, loop switch) and packing loader, fed the record's clock:
    every step of run.json, the skipped prefetches and the stop step, exactly."""
    run, s = _json(case, "run.json"), _case_setup(case)
    h, plan, cap = s["h"], s["plan"], s["cap"]
    schedule = record_schedule_config(RECORD, h)
    optim = record_optim_config(RECORD, h)
    switch = RecurrenceActivation(at_fraction=h["enable_looping_at"])
    loader = DocumentPackingLoader(s["data"], 0, s["world"], h["train_seq_len"], s["tokens_per_rank"], h["vocab_size"])
    steps = TrainSteps(loader, h["grad_accum_steps"], deferred=True)
    pending = next(iter(steps))
    assert isinstance(pending, PendingStep) and loader.calls == 0  # nothing read until the step takes it
    shard = np.fromfile(next(s["data"].glob("fineweb_train_*.bin")), dtype="<u2", offset=1024)
    stage = SeqStage(plan, schedule.seq_change_warmup_steps)
    step_ms = float(run["clock"].split("advances ")[1].split(" s")[0]) * 1000
    step, looping = 0, False
    for want in run["steps"]:
        elapsed = step * step_ms
        assert elapsed == want["elapsed_ms"]
        frac = schedule.training_fraction(step, elapsed, cap, h["iterations"])
        stage.advance(step, frac)
        lr_scale = schedule.lr_multiplier(step, elapsed, cap, h["iterations"]) * stage.lr_factor(step)
        looping = looping or switch.due(step, frac)
        label = f"step {step}"
        assert (stage.seq_len, looping) == (want["seq_len"], want["looping_active"]), label
        # 1e-15: the record's fake clock adds 16.0 to a float base, so its elapsed time is 1 ulp off s * 16000 at a
        # few steps (its lr_scale at steps 23/26/29 is 1 ulp from lr_mul of its own listed frac)
        assert lr_scale == pytest.approx(want["lr_scale"], rel=1e-15, abs=0), label
        assert want["lr_scale_all_groups"] == pytest.approx([lr_scale] * 3, rel=1e-12)  # group lr / base lr
        assert optim.muon_momentum_at(step) == want["muon_momentum"], label
        _check_batch(shard, pending.take(stage.seq_len), want["batch"], label)
        step += 1
        if step * step_ms >= cap:  # the wallclock check after each step (WallclockBudget)
            break
    assert step == run["n_steps"] == len(run["steps"])
    n = s["tokens_per_rank"]
    skipped = [{"local_start": a, "max_seq_len_arg": cut, "n_tokens": n} for a, cut in loader.discarded]
    assert skipped == run["prefetched_batches_discarded"]
    assert steps.skipped_calls == len(skipped)


# Upstream names the case changes from the record, and where our config holds each (the rest: world_size is the
# datamodule's rank/world below, warmup_steps the priming's step counts, the seed is moot with the case's weights).
CASE_OVERRIDES = {
    "train_batch_tokens": "data.train_batch_tokens",
    "train_seq_len": "data.train_seq_len",
    "train_seq_schedule": "data.seq_schedule",
    "val_batch_tokens": "data.val_batch_tokens",
    "eval_seq_len": "model.evaluation.seq_len",
    "seq_change_warmup_steps": "model.schedule.seq_change_warmup_steps",
    "fused_ce_enabled": "model.fused_kernels",
}
MOOT = {"seed", "warmup_steps", "rope_train_seq_len"}  # rope_train_seq_len: YaRN off, no effect (spec §4.1)


class Observer:
    """Every training step as the module ran it: its schedule, looping state, batch and loss."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        self.steps: list[dict] = []
        observer = self

        class _Hook(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                observer.steps.append(
                    {
                        "schedule": pl_module.step_schedule(),
                        "looping": pl_module.model.recurrence_active,
                        "batch": tuple(t.cpu() if torch.is_tensor(t) else t for t in batch),
                    }
                )

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                observer.steps[-1]["loss"] = float(pl_module.last_train_loss)

        self.callback = _Hook()


@pytest.mark.slow  # ~40 steps of the 11-layer record model at d=32 through the Trainer
@pytest.mark.parametrize("case", CASES)
def test_record_run_through_pgolf_fit(case, tmp_path, monkeypatch):
    """The record config under the case's sizes, through the real Trainer loop (priming, wallclock budget, loop
    switch, deferred packed steps), on the record's clock (16 s per optimizer step) as rank 0 of its 8: every step's
    length, LR scale, momentum, looping and batch, the stop step, and the losses (rtol of the case)."""
    from pgolf_lit.callbacks import CompilePriming, GPTQExport
    from pgolf_lit.cli import make_cli
    from pgolf_lit.clock import TrainClock
    from pgolf_lit.model.convert import load_upstream_state_dict

    run, s, hp = _json(case, "run.json"), _case_setup(case), _json(case, "hparams.json")
    h = s["h"]
    monkeypatch.chdir(tmp_path)
    args = ["--config", str(CONFIG_DIR / "records" / f"{RECORD}.yaml")]
    gpt_fields = {f.name for f in dataclasses.fields(GPTConfig)}
    for name, change in hp["changed_from_record"].items():
        key = CASE_OVERRIDES.get(name, f"model.gpt.{name}" if name in gpt_fields else None)
        assert key or name in MOOT, f"the case changes {name}, which this test does not map"
        if key:
            args += [
                f"--{key}",
                str(change["fixture"]).lower() if isinstance(change["fixture"], bool) else str(change["fixture"]),
            ]
    tokenizer = ROOT / "data" / "tokenizers" / hp["env_paths"]["TOKENIZER_PATH"].split(" ")[0]
    args += ["--data.data_dir", str(s["data"]), "--data.tokenizer_path", str(tokenizer)]
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto"]
    args += ["--trainer.enable_progress_bar", "false", "--model.compile", "false", "--record.world", "1"]
    cli = make_cli(args, run=False)
    module, dm = cli.model, cli.datamodule
    assert (dm.train_seq_len, dm.seq_plan, module.schedule_config.seq_change_warmup_steps) == (
        h["train_seq_len"],
        s["plan"],
        h["seq_change_warmup_steps"],
    )
    setup = dm.setup

    def as_rank_zero_of_the_record(stage=None):  # the case ran as rank 0 of WORLD_SIZE, grad_accum 1
        setup(stage)
        dm.rank, dm.world_size = 0, s["world"]
        assert dm.grad_accum == h["grad_accum_steps"] and dm.micro_batch_tokens == s["tokens_per_rank"]

    monkeypatch.setattr(dm, "setup", as_rank_zero_of_the_record)
    load_upstream_state_dict(module.model, torch.load(case / "init_state_dict.pt", weights_only=True))
    step_s = float(run["clock"].split("advances ")[1].split(" s")[0])
    module.clock = TrainClock(now=lambda: step_s * module.global_step)
    observer = Observer()
    for cb in cli.trainer.callbacks:
        if isinstance(cb, CompilePriming):
            cb.steps = cb.recurrent_steps = h["warmup_steps"]
    cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks if not isinstance(cb, GPTQExport)]
    cli.trainer.callbacks.append(observer.callback)
    torch.set_num_threads(1)
    cli.trainer.fit(module, datamodule=dm)

    shard = np.fromfile(next(s["data"].glob("fineweb_train_*.bin")), dtype="<u2", offset=1024)
    assert len(observer.steps) == run["n_steps"] == len(run["steps"])
    tol = float(hp["what_to_reproduce"][2].split("rtol ")[1].split(" ")[0])
    for ours, want in zip(observer.steps, run["steps"]):
        sched, label = ours["schedule"], f"step {want['step']}"
        assert (sched.step, sched.seq_len, ours["looping"]) == (want["step"], want["seq_len"], want["looping_active"])
        assert sched.lr_scale == pytest.approx(want["lr_scale"], rel=1e-15, abs=0), label
        assert sched.momentum == want["muon_momentum"], label
        _check_batch(shard, ours["batch"], want["batch"], label)
        assert ours["loss"] == pytest.approx(want["train_loss"], rel=tol), label
    assert dm.train_calls_skipped == len(run["prefetched_batches_discarded"])


# ---------------------------------------------------------------------------------------------------------
# Compile priming: every stage shape compiles before the clock starts, none while it runs
# ---------------------------------------------------------------------------------------------------------

TINY = CONFIG_DIR / "records" / f"{RECORD}_tiny.yaml"


def _varlen_stand_in_op():
    """FA3's varlen kernel as an opaque op (per-segment SDPA inside), so the packed model traces fullgraph on CPU as
    it does with FA3 on CUDA: max_seqlen is a Python int the graph specializes on, as there."""

    def reference(q, k, v, cu):
        groups = q.size(-2) // k.size(-2)
        k, v = k.repeat_interleave(groups, dim=-2), v.repeat_interleave(groups, dim=-2)
        bounds = cu.tolist()
        pieces = [
            F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True
            ).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])
            if b > a
        ]
        return torch.cat(pieces, dim=0)

    name = "pgolf_test::varlen_attention"
    if not hasattr(torch.ops.pgolf_test, "varlen_attention"):

        @torch.library.custom_op(name, mutates_args=())
        def varlen(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_seqlen: int) -> Tensor:
            return reference(q, k, v, cu)

        @varlen.register_fake
        def _(q, k, v, cu, max_seqlen):
            return torch.empty_like(q)

        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(*inputs[:4])

        def backward(ctx, grad):
            q, k, v, cu = ctx.saved_tensors
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                grads = torch.autograd.grad(reference(*leaves, cu), leaves, grad)
            return (*grads, None, None)

        varlen.register_autograd(backward, setup_context=setup_context)

    def stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True):
        return torch.ops.pgolf_test.varlen_attention(q, k, v, cu_seqlens_q, max_seqlen_q)

    return stand_in


@pytest.mark.slow  # dynamo traces the 17-layer twin once per shape (~15 graphs)
def test_every_stage_shape_compiles_before_the_clock(tmp_path, monkeypatch, embedded_data_root):
    """The tiny twin compiled (fullgraph, static shapes; an eager backend that counts dynamo's compiles) through all
    three stages: every (max_seqlen, looping, cu_seqlens width) a training step runs was compiled once during the
    priming, and nothing compiles while the training clock runs."""
    import functools

    from lightning.pytorch.callbacks import Callback

    from pgolf_lit.callbacks import GPTQExport
    from pgolf_lit.cli import make_cli
    from pgolf_lit.model import attention

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "demo").symlink_to(embedded_data_root, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(attention, "FLASH_ATTN_VARLEN", _varlen_stand_in_op())
    monkeypatch.setattr(
        attention,
        "FLASH_ATTN",
        lambda q, k, v, causal=True: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
        ).transpose(1, 2),
    )
    compiles: list[dict] = []
    calls: list[dict] = []
    current: dict = {}

    def counting_backend(gm, example_inputs):
        compiles.append(dict(current))
        return gm.forward

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counting_backend))

    class Track(Callback):
        def on_fit_start(self, trainer, pl_module):
            compiled = pl_module._forward

            def forward(*args, **kwargs):
                cu = kwargs.get("cu_seqlens")
                current.update(
                    max_seqlen=kwargs.get("max_seqlen"),
                    looping=pl_module.model.recurrence_active,
                    cu_width=None if cu is None else cu.numel(),
                    clock=pl_module.clock.running,
                    grad=torch.is_grad_enabled(),
                )
                calls.append(dict(current))
                return compiled(*args, **kwargs)

            object.__setattr__(pl_module, "_forward", forward)

    torch._dynamo.reset()
    steps = 7  # stages at steps 1 (1/7 > 0.1) and 5 (5/7 > 0.7), the loop switch at step 3 (3/7 >= 0.35)
    args = ["--config", str(TINY), "--model.compile", "true", "--model.attention_backend", "fa3"]
    args += ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
    args += ["--trainer.enable_progress_bar", "false"]
    cli = make_cli(args, run=False)
    cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks if not isinstance(cb, GPTQExport)] + [Track()]
    torch.set_num_threads(1)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        torch._dynamo.reset()

    def shape(c):
        return (c["max_seqlen"], c["looping"], c["cu_width"])

    trained = [c for c in calls if c["clock"] and c["grad"]]
    primed = [shape(c) for c in compiles if not c["clock"] and c["grad"]]
    assert {c["max_seqlen"] for c in trained} == {32, 64, 96}, "the run did not train every stage"
    assert {(c["max_seqlen"], c["looping"]) for c in trained} == {(32, False), (64, False), (64, True), (96, True)}
    assert [c for c in compiles if c["clock"]] == [], "a graph compiled on the training clock"
    assert {shape(c) for c in trained} <= set(primed)
    assert len(primed) == len(set(primed)), "a shape compiled twice"


# ---------------------------------------------------------------------------------------------------------
# The datamodule: bad schedules are one line; a resumed run continues past the skipped calls
# ---------------------------------------------------------------------------------------------------------


def test_a_bad_schedule_is_one_line_naming_the_field():
    from pgolf_lit.data.datamodule import TokenShardDataModule

    sizes = dict(train_batch_tokens=3072, train_seq_len=96, grad_accum_base=1, val_batch_tokens=4096)
    with pytest.raises(ConfigError, match=r"^data\.seq_schedule: needs loader 'packed'"):
        TokenShardDataModule(**sizes, loader="sequential", seq_schedule="32@0.5,96@1.0")
    with pytest.raises(ConfigError, match=r"^data\.seq_schedule: length\(s\) \[80\] do not divide the micro-batch"):
        TokenShardDataModule(**sizes, loader="packed", seq_schedule="80@0.5,96@1.0")
    with pytest.raises(ConfigError, match=r"^data\.seq_schedule: length 128 exceeds data\.train_seq_len 96"):
        TokenShardDataModule(**sizes, loader="packed", seq_schedule="32@0.5,128@1.0")
    assert TokenShardDataModule(**sizes, loader="packed", seq_schedule="").seq_plan is None


@pytest.mark.parametrize("case", CASES)
def test_a_resumed_datamodule_continues_after_the_skipped_calls(case):
    """A checkpoint after stage changes: the datamodule's state brings the skipped calls, so the resumed stream gives
    the batch the uninterrupted one gives next."""
    from types import SimpleNamespace

    from pgolf_lit.data.datamodule import TokenShardDataModule

    s = _case_setup(case)
    h = s["h"]

    def datamodule(step: int) -> TokenShardDataModule:
        dm = TokenShardDataModule(
            data_dir=str(s["data"]),
            vocab_size=h["vocab_size"],
            train_batch_tokens=h["train_batch_tokens"],
            train_seq_len=h["train_seq_len"],
            loader="packed",
            seq_schedule=h["train_seq_schedule"],
        )
        dm.rank, dm.world_size = 0, s["world"]
        module = SimpleNamespace(step_schedule=lambda: SimpleNamespace(seq_len=plan[dm.trainer.global_step]))
        dm.trainer = SimpleNamespace(global_step=step, lightning_module=module)
        return dm

    lengths = s["plan"].lengths
    plan = [lengths[0]] * 3 + [lengths[1]] * 4 + [lengths[2]] * 3  # two changes after step 0
    first = datamodule(0)
    stream = iter(first.train_dataloader())
    batches = []
    for step in range(len(plan)):
        first.trainer.global_step = step
        batches.append(first.on_before_batch_transfer(next(stream), 0))  # the step reads its batch
        if step == 5:
            state = first.state_dict()  # a checkpoint after step 5
    assert state == {"train_calls_skipped": 2} and first.train_calls_skipped == 4  # two calls per change
    resumed = datamodule(6)
    resumed.load_state_dict(state)
    stream = iter(resumed.train_dataloader())
    for step in range(6, len(plan)):
        resumed.trainer.global_step = step
        got, want = resumed.on_before_batch_transfer(next(stream), 0), batches[step]
        assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3])) and got[3] == want[3] == plan[step]
    assert resumed.train_calls_skipped == 4


# ---------------------------------------------------------------------------------------------------------
# The tiny twin end to end: pgolf fit (stages, re-warmup, export) then pgolf test of its artifact
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # ~80 s of fit and export, ~40 s of the four passes (one thread)
@pytest.mark.skipif(__import__("shutil").which("lrzip") is None, reason="the record's per-group container needs lrzip")
def test_tiny_twin_fits_and_tests_end_to_end(run_cwd, monkeypatch):
    """``pgolf fit`` of the tiny twin: the stages change where the schedule says (step-counted fraction), every
    varlen attention call of a training step gets its stage's length as ``max_seqlen``, the LR ramps again after each
    change, the artifact exports and round-trips; ``pgolf test`` of the artifact runs the record's four passes (phased
    TTT with the short-document chunks), each scoring every target."""
    from pgolf_lit.cli import main, make_cli
    from pgolf_lit.model.attention import PackedSegments
    from pgolf_lit.run_summary import read_summary

    torch.set_num_threads(1)
    seen: list[tuple[int, int]] = []
    build = PackedSegments.build.__func__

    def spy(cls, cu_seqlens, max_seqlen, ids):
        if cli.model.clock.running:  # a training step (priming and evaluation run off the clock)
            seen.append((cli.model.global_step, int(max_seqlen)))
        return build(cls, cu_seqlens, max_seqlen, ids)

    monkeypatch.setattr(PackedSegments, "build", classmethod(spy))
    cli = make_cli(["--config", str(TINY), "--trainer.enable_progress_bar", "false"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    steps, plan = cli.trainer.max_steps, cli.datamodule.seq_plan
    stage_of = {s: plan.seq_len_at(s / steps) for s in range(steps)}  # no cap: the fraction counts steps
    assert seen and {step for step, _ in seen} == set(range(steps))
    assert all(bound == stage_of[step] for step, bound in seen), sorted(set(seen))
    run_dir = Path(cli.trainer.log_dir)
    summary = read_summary(run_dir)
    changes = [s for s in range(1, steps) if stage_of[s] != stage_of[s - 1]]
    assert len(changes) == len(plan.stages) - 1
    assert [summary["events"][f"growth_stage:{stage_of[s]}"]["step"] for s in changes] == changes
    log = (run_dir / "train.log").read_text()
    ramp = cli.model.schedule_config.seq_change_warmup_steps
    assert all(f"growth_stage_rewarmup:start step:{s} steps:{ramp}" in log for s in changes)
    assert summary["artifact"]["fits"] and abs(summary["roundtrip"]["val_bpb"] - summary["pre_quant"]["val_bpb"]) < 0.05

    main(
        ["test", "--config", str(TINY), "--artifact", str(run_dir / "final_model.pgolf")]
        + ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.version", "t"]
    )
    tested = read_summary(run_cwd / "runs" / TINY.stem / "t")["test"]
    assert set(tested) == set(cli.model.test_methods)
    targets = cli.datamodule.val_tokens.numel() - 1  # val_max_tokens keeps whole sequences: no tail in the twin
    assert {tested[m]["tokens"] for m in ("phased_ttt", "doc_isolated", "standard")} == {targets}
    assert "quantized_ttt_phased val_loss:" in (run_cwd / "runs" / TINY.stem / "t" / "train.log").read_text()
