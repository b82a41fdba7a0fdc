"""PR #1855's training half against its own script: Polar Express Newton–Schulz and the bf16 banked Muon step
(exact), the optimizer routing, the LR/momentum schedules and the loop switch (``train/pr1855_polar_ns``); the local
gradient clip before the all-reduce; and the tiny twin through ``pgolf fit`` (training → export → roundtrip).

Fixtures: $PGOLF_PR1855_FIXTURES (default ../shared/fixtures/pr1855), ``train/<case>/``; every case value is read
from the case's files; tolerances are the fixture's. Skips cleanly without them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import fixture_root
from pgolf_lit.callbacks import RecurrenceActivation
from pgolf_lit.config import CONFIG_DIR
from pgolf_lit.model.convert import bank_slices, config_from_upstream
from pgolf_lit.model.gpt import GPT
from pgolf_lit.optim import (
    Muon,
    all_reduce_gradients,
    build_optimizers,
    clip_grad_norm,
    effective_cap_ms,
    record_optim_config,
    record_schedule_config,
    zeropower_via_polar_express,
)
from pgolf_lit.optim.muon import shape_scale

ROOT = fixture_root("PGOLF_PR1855_FIXTURES", "pr1855")
RECORD = "pr1855_sp8192_lqer_sparsegate"


def _train_cases() -> list:
    folder = ROOT / "train" if ROOT is not None else None
    if folder is None or not folder.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason="no PR #1855 fixtures: set PGOLF_PR1855_FIXTURES"))]
    return [pytest.param(p, id=p.name) for p in sorted(folder.iterdir()) if (p / "expected.json").is_file()]


CASES = _train_cases()


def _load(path: Path):
    return torch.load(path, weights_only=True)


def _expected(case: Path) -> dict:
    return json.loads((case / "expected.json").read_text())


def _exact_or_documented(ours: torch.Tensor, ref: torch.Tensor, atol: float, what: str) -> None:
    """Bit-exact first; a machine whose bf16 matmuls round otherwise gets the fixture README's tolerance, and says
    so."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, what
    if torch.equal(ours, ref):
        return
    diff = (ours.float() - ref.float()).abs().max().item()
    assert diff <= atol, f"{what}: max diff {diff} beyond the documented tolerance {atol}"
    warnings.warn(f"{what}: not bit-exact on this machine (max diff {diff:.3g}), within the tolerance {atol}")


@pytest.mark.parametrize("case", CASES)
def test_polar_express_newton_schulz_exact(case):
    exp = _expected(case)
    matrices = _load(case / "inputs.pt")["matrices"]
    outputs = _load(case / "outputs.pt")["ns"]
    from pgolf_lit.optim.muon import POLAR_EXPRESS_COEFFICIENTS

    assert [list(c) for c in POLAR_EXPRESS_COEFFICIENTS] == exp["ns_coefficients"]
    assert outputs
    for key, ref in outputs.items():
        matrix, steps = key.split("/")
        out = zeropower_via_polar_express(matrices[matrix], int(steps.removeprefix("steps")))
        _exact_or_documented(out, ref, 0.05, key)  # atol: ../train/README.md, non-exact NS outputs
    for name, same in exp["ns_batched_3d_equals_per_matrix"].items():
        bank = matrices[name]
        per_matrix = torch.stack([zeropower_via_polar_express(m, 5) for m in bank])
        assert torch.equal(zeropower_via_polar_express(bank, 5), per_matrix) == same, name


@pytest.mark.parametrize("case", CASES)
def test_banked_bf16_muon_steps_exact(case):
    """Two steps of every variant on the fixture's banks, with the record preset's Muon switches (Polar Express, bf16
    momentum, parameters without a gradient left alone) and the variant's decay / row normalisation."""
    exp = _expected(case)
    inputs = _load(case / "inputs.pt")["muon"]
    outputs = _load(case / "outputs.pt")["muon_step"]
    preset = record_optim_config(RECORD)
    assert (preset.matrix_lr, preset.muon_momentum, preset.muon_backend_steps, preset.muon_wd) == (
        inputs["lr"],
        inputs["momentum"],
        inputs["backend_steps"],
        inputs["weight_decay"],
    )
    assert outputs
    for variant, steps in outputs.items():
        options = exp["muon_variants"][variant]
        params = {name: nn.Parameter(p.clone()) for name, p in inputs["params"].items()}
        opt = Muon(
            list(params.values()),
            lr=inputs["lr"],
            momentum=inputs["momentum"],
            backend_steps=inputs["backend_steps"],
            nesterov=options["nesterov"],
            weight_decay=options["weight_decay"],
            row_normalize=options["row_normalize"],
            coefficients=preset.muon_ns_coefficients,
            momentum_dtype=preset.muon_momentum_dtype,
            skip_without_grad=preset.muon_skip_params_without_grad,
        )
        for s, ref in enumerate(steps):
            for name, p in params.items():
                g = inputs["grads"][s][name]
                p.grad = None if g is None else g.clone()
            opt.step()
            for name, p in params.items():
                scale = shape_scale(p.size(-2), p.size(-1))
                assert scale == exp["muon_shape_scales"][name], name
                _exact_or_documented(
                    p.detach(),
                    ref["params_after"][name],
                    inputs["lr"] * 0.1 * scale + 1e-7,
                    f"{variant} step {s} {name}",
                )
                want = ref["bufs_after"][name]
                if want.numel():
                    assert torch.equal(opt.state[p]["momentum_buffer"], want), f"{variant} step {s} {name} buffer"
                else:
                    assert "momentum_buffer" not in opt.state[p], f"{variant} {name}: no gradient, so no state"
        for name in inputs["params"]:
            if all(g[name] is None for g in inputs["grads"]):  # untouched: no decay either
                assert torch.equal(params[name].detach(), inputs["params"][name]), name


@pytest.mark.parametrize("case", CASES)
def test_routing_matches_upstream(case):
    """groups.json: optimizer types and order, names per group, every option. Our model keeps the block matrices per
    block; the Muon group must hold exactly the slices of upstream's banks, banks in the script's order."""
    ref = json.loads((case / "groups.json").read_text())
    model = GPT(config_from_upstream(RECORD, ref["env"]))
    optimizers = build_optimizers(model, record_optim_config(RECORD))
    names = {p: n for n, p in model.named_parameters()}
    slices = bank_slices(len(model.blocks))
    assert [type(o).__name__ for o in optimizers] == [g["type"] for g in ref["groups"]]
    routed = []
    for opt, want in zip(optimizers, ref["groups"]):
        group = opt.param_groups[want["group"]]
        ours = [names[p] for p in group["params"]]
        routed += ours
        if isinstance(opt, Muon):
            banks = list(dict.fromkeys(slices[n][0] for n in ours))
            assert banks == want["params"]
            assert sorted(slices[n] for n in ours) == sorted(slices.values())
        else:
            assert ours == want["params"]
        for key, value in want.items():
            if key in ("optimizer", "type", "group", "params", "decoupled_weight_decay"):
                continue
            assert (list(group[key]) if key == "betas" else group[key]) == value, f"{want['optimizer']} {key}"
    assert ref["every_param_in_exactly_one_group"] and sorted(routed) == sorted(names.values())


@pytest.mark.parametrize("case", CASES)
def test_schedules_and_loop_switch_exact(case):
    settings = json.loads((case / "schedules.json").read_text())["settings"]
    assert settings
    for st in settings:
        label = f"{st['script']}/{st['setting']}"
        r = st["resolved"]
        schedule = record_schedule_config(RECORD, r)
        optim = record_optim_config(RECORD, r)
        cap_ms = effective_cap_ms(r["max_wallclock_seconds"], r["gptq_reserve_seconds"])
        assert cap_ms == st["max_wallclock_ms_effective"], label
        loop_switch = RecurrenceActivation(at_fraction=r["enable_looping_at"])
        for row in st["lr_mul"]:
            if "step" in row:
                args = (row["step"], row["elapsed_ms"], cap_ms, r["iterations"])
                assert schedule.training_fraction(*args) == row["frac"], f"{label} {row}"
                assert schedule.lr_multiplier(*args) == row["lr_mul"], f"{label} {row}"
                assert loop_switch.due(row["step"], row["frac"]) == row["looping_switch_on"], f"{label} {row}"
            else:
                assert schedule.multiplier_at_fraction(row["frac"]) == row["lr_mul"], f"{label} {row}"
        for row in st["momentum_warmup"]:
            want = r["muon_momentum"] if row["momentum"] is None else row["momentum"]  # None: the last value stays
            assert optim.muon_momentum_at(row["step"]) == want, f"{label} {row}"


# ---------------------------------------------------------------------------------------------------------
# Gradient clipping on each rank's own gradient, before the all-reduce (PR #1855 step_fn)
# ---------------------------------------------------------------------------------------------------------


def _local_clip_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads = _rank_gradients(rank)  # the bf16 one goes through its own flat buffer
        params = [nn.Parameter(torch.zeros_like(x)) for x in grads]
        for p, x in zip(params, grads):
            p.grad = x
        norm = clip_grad_norm(params, 0.3)
        all_reduce_gradients(params)
        torch.save({"norm": norm, "grads": [p.grad for p in params]}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _rank_gradients(rank: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return [
        torch.randn(5, 3, generator=g) * (rank + 1),
        torch.randn(4, generator=g) * (rank + 1),
        torch.randn(2, 2, generator=g).bfloat16(),
    ]


def test_local_clip_then_all_reduce_averages_the_clipped_gradients(tmp_path):
    """Each rank clips its own gradient with its own coefficient, then the clipped gradients are averaged: every
    rank ends with the mean of the clipped gradients (not the clipped mean, PR #1394's order)."""
    world = 2
    mp.spawn(_local_clip_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    clipped = []
    for rank in range(world):
        params = [nn.Parameter(torch.zeros_like(x)) for x in _rank_gradients(rank)]
        for p, x in zip(params, _rank_gradients(rank)):
            p.grad = x
        assert torch.equal(results[rank]["norm"], torch.nn.utils.clip_grad_norm_(params, 0.3))
        clipped.append([p.grad for p in params])
    for i in range(3):
        mean = sum(c[i] for c in clipped) / world  # in the gradient's dtype, as the all-reduce computes it
        assert torch.equal(results[0]["grads"][i], results[1]["grads"][i])
        torch.testing.assert_close(results[0]["grads"][i], mean, atol=1e-2 if i == 2 else 1e-6, rtol=0)
    assert max(r["norm"].item() for r in results) > 0.3  # the clip acted, with a different coefficient per rank


def test_all_reduce_gradients_is_a_no_op_on_one_process():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    all_reduce_gradients([p])
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))


def test_record_preset_values():
    """The record's optimizer and schedule values (the seed-42 log's Hyperparameters)."""
    cfg = record_optim_config("pr1855")
    assert (cfg.matrix_lr, cfg.muon_momentum, cfg.muon_wd, cfg.beta2, cfg.grad_clip_norm) == (
        0.026,
        0.97,
        0.095,
        0.99,
        0.3,
    )
    assert (cfg.muon_ns_coefficients, cfg.muon_momentum_dtype, cfg.grad_clip_scope) == (
        "polar_express",
        "bf16",
        "local",
    )
    assert cfg.muon_row_normalize and cfg.muon_skip_params_without_grad and cfg.adam_class == "AdamW"
    schedule = record_schedule_config("pr1855")
    assert (schedule.warmdown, schedule.warmdown_frac, schedule.min_lr) == ("frac", 0.85, 0.1)


# ---------------------------------------------------------------------------------------------------------
# The tiny twin through the real CLI
# ---------------------------------------------------------------------------------------------------------


def test_fit_end_method_is_a_registered_pass():
    from pgolf_lit.callbacks import GPTQExport
    from pgolf_lit.errors import ConfigError

    assert GPTQExport(fit_end_method="doc_isolated").fit_end_method == "doc_isolated"
    with pytest.raises(ConfigError, match="GPTQExport.fit_end_method: 'nope' is no eval method; expected one of"):
        GPTQExport(fit_end_method="nope")


@pytest.mark.slow  # 100-200 s on 2 cores (phased TTT on CPU); its parts are tested alone in the default suite
@pytest.mark.skipif(
    shutil.which("lrzip") is None, reason="the record's per-group container needs lrzip (apt-get install lrzip)"
)
def test_tiny_twin_fits_exports_and_round_trips(run_cwd):
    """Packed-document training (cu_seqlens through the step), the loop switch, the record's whole export (QuantGate,
    LQER, the PGRP lrzip container) inside pgolf fit, and the roundtrip score from the reloaded container."""
    from pgolf_lit.run_summary import read_summary

    config = CONFIG_DIR / "records" / f"{RECORD}_tiny.yaml"
    start = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pgolf_lit.cli",
            "fit",
            "--config",
            str(config),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.version",
            "fit",
        ],
        cwd=run_cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = run_cwd / "runs" / f"{RECORD}_tiny" / "fit"
    summary = read_summary(run_dir)
    assert summary["events"]["recurrence:activated"]["step"] == 7  # at_fraction 0.35 of 20 steps
    assert summary["pre_quant"]["extra"]["bytes"] == "sidecar"  # CaseOps data: bytes from the val sidecar
    assert abs(summary["roundtrip"]["val_bpb"] - summary["pre_quant"]["val_bpb"]) < 0.05
    artifact = summary["artifact"]
    assert artifact["fits"] and (run_dir / "final_model.pgolf").stat().st_size == artifact["model_bytes"]
    assert (run_dir / "final_model.pgolf").read_bytes()[:4] == b"PGRP" and artifact["codec"] == "lrzip-zpaq + brotli"
    assert "packed" in (run_dir / "config.yaml").read_text()
    log = (run_dir / "train.log").read_text()
    assert "ema:applying EMA weights decay:0.9" in log
    # The fit-end lines use the record's own diagnostic pass (GPTQExport.fit_end_method), as its log's do.
    assert summary["pre_quant"]["method"] == summary["roundtrip"]["method"] == "doc_isolated"
    assert "diagnostic quantized val_loss:" in log and "final_int6_roundtrip" not in log
    assert re.search(r"^pre-quantization post-ema \S+ val_loss:", log, re.M), log[-2000:]
    # Nothing written during the timed run (the records never checkpoint), and the clock ledger closes the log.
    assert not (run_dir / "checkpoints").exists()
    assert log.rstrip().splitlines()[-1].startswith("clock: train ")
    ledger = summary["clock"]
    assert ledger["off_clock"]["priming"]["count"] == 1 and ledger["after_cap"]["calibration"] > 0
    assert ledger["train_s"] * 1000 == pytest.approx(summary["train"]["train_time_ms"], rel=1e-6)
    assert summary["record_run"] == {
        "record_world": 1,
        "world": 1,
        "step_matched": False,
        "budget_scale": 1.0,
        "record_valid": True,
    }
    # The export counts the code that reads a PGRP file and runs the config's four passes (quant/code_size.py).
    from pgolf_lit.quant.code_size import measure_code_size

    from pgolf_lit.config import load_config
    from pgolf_lit.model.config import GPTConfig

    model = GPTConfig.from_dict(load_config(config)["model"]["gpt"])
    code = measure_code_size(("pergroup",), ["standard", "sliding", "doc_isolated", "phased_ttt"], model=model)
    code = code.counted_bytes
    assert artifact["code_bytes"] == code <= 40_000 and f"code bytes:{code} " in log
    print(f"tiny twin pgolf fit: {seconds:.1f} s, code bytes:{code}")
