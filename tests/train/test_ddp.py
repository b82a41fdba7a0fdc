"""DDP through the strategy flag: 2 CPU processes (gloo) train like 1 process with twice the accumulation, and the
wallclock stop is taken by every rank at the same step."""

from __future__ import annotations

import json
import re

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from pgolf_lit.callbacks import WallclockBudget
from pgolf_lit.clock import TrainClock
from trainer_utils import fit, tiny_datamodule, tiny_module, tiny_trainer


class WriteLosses(Callback):
    """Rank 0 appends (step, loss) after every step to a JSON-lines file and saves the final weights."""

    def __init__(self, path):
        self.path = str(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps([trainer.global_step, float(pl_module.last_train_loss)]) + "\n")

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            torch.save(pl_module.model.state_dict(), self.path + ".pt")


def read(path):
    return [json.loads(line) for line in open(path)]


def test_two_gloo_processes_equal_one_process_with_double_accumulation(embedded_data_root, tmp_path):
    steps = 5
    L.seed_everything(0)
    fit(
        tiny_module(),
        tiny_datamodule(embedded_data_root, grad_accum_base=2),
        tiny_trainer(tmp_path / "one", steps, [WriteLosses(tmp_path / "one.jsonl")]),
    )
    L.seed_everything(0)
    fit(
        tiny_module(),
        tiny_datamodule(embedded_data_root, grad_accum_base=2),
        tiny_trainer(tmp_path / "two", steps, [WriteLosses(tmp_path / "two.jsonl")], devices=2, strategy="ddp_spawn"),
    )
    one, two = read(tmp_path / "one.jsonl"), read(tmp_path / "two.jsonl")
    assert [r[0] for r in one] == [r[0] for r in two] == list(range(1, steps + 1))

    # The logged train loss is the mean over ranks (all-reduced at log steps), the one process's mean over its
    # two micro-batches: the train.log lines agree (4 decimals printed).
    def logged(run):
        text = (tmp_path / run / "train.log").read_text()
        return [float(x) for x in re.findall(r"train_loss:(\S+)", text)]

    assert len(logged("one")) == steps and logged("one") == pytest.approx(logged("two"), abs=2e-4)
    # The same global batch and the same averaged gradient give the same update up to summation order.
    w1 = torch.load(tmp_path / "one.jsonl.pt", weights_only=True)
    w2 = torch.load(tmp_path / "two.jsonl.pt", weights_only=True)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=0, msg=k)


class RankSkewedClock(TrainClock):
    """Rank 1's clock runs 3x faster than rank 0's: only rank 1 crosses the budget on its own."""

    def __init__(self):
        super().__init__(now=self._fake_now)
        self.t = 0.0
        self.rate = 1.0

    def _fake_now(self):
        return self.t


class AdvanceClock(Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.clock.rate = 3.0 if trainer.global_rank == 1 else 1.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pl_module.clock.t += pl_module.clock.rate


class RecordStop(Callback):
    def __init__(self, path):
        self.path = str(path)

    def on_train_end(self, trainer, pl_module):
        with open(f"{self.path}.{trainer.global_rank}", "w") as f:
            f.write(str(trainer.global_step))


def test_budget_stop_is_taken_by_all_ranks_together(embedded_data_root, tmp_path):
    module = tiny_module()
    module.clock = RankSkewedClock()
    trainer = tiny_trainer(
        tmp_path,
        100,
        [AdvanceClock(), WallclockBudget(max_seconds=6.5), RecordStop(tmp_path / "stop")],
        devices=2,
        strategy="ddp_spawn",
    )
    fit(module, tiny_datamodule(embedded_data_root, grad_accum_base=2), trainer)
    stops = [int(open(tmp_path / f"stop.{r}").read()) for r in (0, 1)]
    # rank 1 reads 3 s per step: 6.5 s is crossed after step 3, and rank 0 (at 3 s) stops with it
    assert stops == [3, 3]
    assert torch.distributed.is_available()
