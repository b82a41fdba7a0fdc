"""Acceptance test of pgolf_lit.optim against the upstream training fixtures (reproduce mode).

Fixtures: $PGOLF_TRAIN_FIXTURES (default ../shared/fixtures/train), laid out and used as that folder's README
says: every ``*_steps/`` case (routing, schedule and a 3-step run of a tiny upstream model), ``muon_ns5/``
(exact Newton–Schulz and Muon steps) and ``schedules/`` (exact LR multipliers and momentum warmup). Every
case value is read from the files; the tolerances are the README's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import fixture_root
from pgolf_lit.model.convert import config_from_upstream, load_upstream_state_dict
from pgolf_lit.model.gpt import GPT
from pgolf_lit.optim import (
    Muon,
    OptimizerChain,
    apply_schedule,
    build_optimizers,
    clip_grad_norm,
    effective_cap_ms,
    record_optim_config,
    record_schedule_config,
    zeropower_via_newtonschulz5,
)

ROOT = fixture_root("PGOLF_TRAIN_FIXTURES", "train")
NO_FIXTURES = pytest.mark.skip(reason="no training fixtures: set PGOLF_TRAIN_FIXTURES or provide ../shared")


def _cases(pattern: str, marker: str) -> list:
    if ROOT is None:
        return [pytest.param(None, marks=NO_FIXTURES)]
    found = sorted(p for p in ROOT.glob(pattern) if (p / marker).is_file())
    return [pytest.param(p, id=p.name) for p in found] or [pytest.param(None, marks=NO_FIXTURES)]


STEP_CASES = _cases("*_steps", "expected.json")
NS5_CASES = _cases("muon_ns5", "outputs.pt")
SCHEDULE_CASES = _cases("schedules", "schedules.json")

# Group options compared with groups.json whenever the fixture lists them.
GROUP_KEYS = (
    "lr", "base_lr", "betas", "eps", "weight_decay", "momentum", "nesterov", "backend_steps", "row_normalize", "fused",
)  # fmt: skip


def _load(path: Path):
    return torch.load(path, weights_only=True)


def _reserve_seconds(hp: dict) -> float:
    """The GPTQ reserve a script subtracts from its cap: PR 1334 only when GPTQ is enabled, PR 1394 always,
    Family A never (it has no reserve knob)."""
    return hp.get("gptq_reserve_seconds", 0.0) if hp.get("gptq_enabled", True) else 0.0


def _upstream_settings(exp: dict) -> dict:
    """Env (as strings) overlaid by what the script read: the names our record presets accept."""
    return {**{k.lower(): v for k, v in exp["env"].items()}, **exp["hyperparameters"]}


def _ema_decay(exp: dict):
    """EMA decay of the case: ``ema_decay`` when the script reads one, else the value its step order states."""
    stated = [float(m) for line in exp["step_order"] for m in re.findall(r"\bd = ([0-9.]+)", line)]
    decay = exp["hyperparameters"].get("ema_decay", stated[0] if stated else None)
    assert all(d == decay for d in stated), f"EMA decay {decay} disagrees with the step order {stated}"
    return decay


def _build(case: Path):
    exp = json.loads((case / "expected.json").read_text())
    hp = exp["hyperparameters"]
    model = GPT(config_from_upstream(exp["record"], hp))
    assert model.num_params() == exp["param_count"]
    init = _load(case / "state_dict_init.pt")
    load_upstream_state_dict(model, init, str(case / "state_dict_init.pt"))
    optim_cfg = record_optim_config(exp["record"], _upstream_settings(exp))
    optimizers = build_optimizers(model, optim_cfg)
    return exp, model, init, optim_cfg, optimizers


@pytest.mark.parametrize("case", STEP_CASES)
def test_routing_matches_upstream(case):
    _, model, _, _, optimizers = _build(case)
    groups_ref = json.loads((case / "groups.json").read_text())["optimizers_in_step_order"]
    names = {p: n for n, p in model.named_parameters()}

    assert [type(o).__name__ for o in optimizers] == [r["optimizer"] for r in groups_ref]
    routed = []
    for opt, ref in zip(optimizers, groups_ref):
        assert len(opt.param_groups) == len(ref["groups"]), ref["optimizer"]
        for group, ref_group in zip(opt.param_groups, ref["groups"]):
            group_names = [names[p] for p in group["params"]]
            assert group_names == ref_group["params"]
            assert sum(p.numel() for p in group["params"]) == ref_group["numel"]
            for key in GROUP_KEYS:
                if key in ref_group:
                    ours = list(group[key]) if key == "betas" else group[key]
                    assert ours == ref_group[key], f"{ref['optimizer']} group option {key}"
            if isinstance(opt, Muon) and "weight_decay" not in ref_group:
                assert group["weight_decay"] == 0  # scripts without Muon weight decay
            routed += group_names
    assert sorted(routed) == sorted(names.values()) and len(set(routed)) == len(routed)


@pytest.mark.parametrize("case", STEP_CASES)
def test_three_steps_match_upstream(case):
    exp, model, init, optim_cfg, optimizers = _build(case)
    hp = exp["hyperparameters"]
    schedule = record_schedule_config(exp["record"], _upstream_settings(exp))
    cap_ms = effective_cap_ms(hp["max_wallclock_seconds"], _reserve_seconds(hp))
    assert cap_ms == exp["schedule"]["max_wallclock_ms_effective"]
    batches = _load(case / "batches.pt")
    decay = _ema_decay(exp)
    ema = {k: v.detach().float().clone() for k, v in init.items()}
    chain = OptimizerChain(optimizers)
    model.train()

    losses, norms = [], []
    for s, row in enumerate(exp["steps"]):
        assert row["step"] == s and not row.get("late_qat_switch", False), "late QAT is not part of this test"
        elapsed = exp["schedule"]["elapsed_ms_before_step"][s]
        mult = schedule.lr_multiplier(s, elapsed, cap_ms, hp["iterations"])
        momentum = optim_cfg.muon_momentum_at(s)
        assert mult == row["lr_mul"] and momentum == row["momentum"]
        if "frac" in row:
            assert schedule.training_fraction(s, elapsed, cap_ms, hp["iterations"]) == row["frac"]
        model.set_recurrence(bool(row.get("recurrence_active", row.get("looping_active", False))))

        chain.zero_grad(set_to_none=True)
        loss = model(batches[s][:, :-1], batches[s][:, 1:])
        loss.backward()
        assert [n for n, p in model.named_parameters() if p.grad is None] == row["params_without_grad"]
        apply_schedule(chain, mult, momentum)
        assert [[g["lr"] for g in o.param_groups] for o in optimizers] == row["lrs"]
        norm = clip_grad_norm(model.parameters(), optim_cfg.grad_clip_norm)
        chain.step()
        chain.zero_grad(set_to_none=True)
        if decay is not None:  # the EMA callback's update, by hand (it is not part of pgolf_lit.optim)
            for k, v in model.state_dict().items():
                ema[k].mul_(decay).add_(v.detach().float(), alpha=1.0 - decay)
        losses.append(loss.item())
        norms.append(norm.item())

    ref_losses = [r["loss"] for r in exp["steps"]]
    ref_norms = [r["grad_norm_before_clip"] for r in exp["steps"]]
    assert losses[0] == pytest.approx(ref_losses[0], abs=1e-5, rel=0)
    assert norms[0] == pytest.approx(ref_norms[0], rel=1e-4)
    assert losses[1:] == pytest.approx(ref_losses[1:], abs=5e-4, rel=0)
    assert norms[1:] == pytest.approx(ref_norms[1:], rel=1e-3)

    after = _load(case / "state_dict_after.pt")
    ours = model.state_dict()
    err_sq = upd_sq = 0.0
    for k, ref in after.items():
        diff = (ours[k].float() - ref.float()).norm().item()
        update = (ref.float() - init[k].float()).norm().item()
        assert (ours[k].float() - ref.float()).abs().max().item() <= 1e-2, k
        assert diff <= 0.15 * update, f"{k}: relative update error {diff / update:.3g}"
        err_sq, upd_sq = err_sq + diff**2, upd_sq + update**2
    assert err_sq**0.5 <= 0.03 * upd_sq**0.5

    if (case / "ema_after.pt").is_file():
        ema_ref = _load(case / "ema_after.pt")
        for k, ref in ema_ref.items():
            torch.testing.assert_close(ema[k], ref.float(), atol=1e-4, rtol=0, msg=k)

    model.eval()
    with torch.no_grad():
        eval_loss = model(batches[0][:, :-1], batches[0][:, 1:]).item()
    assert eval_loss == pytest.approx(exp["loss_batch0_after_eval"], abs=5e-4, rel=0)


@pytest.mark.parametrize("case", NS5_CASES)
def test_newton_schulz_exact(case):
    matrices = _load(case / "inputs.pt")["matrices"]
    outputs = _load(case / "outputs.pt")["ns5"]
    assert outputs
    for key, ref in outputs.items():
        matrix, steps = key.split("/")
        out = zeropower_via_newtonschulz5(matrices[matrix], int(steps.removeprefix("steps")))
        assert out.dtype == ref.dtype and torch.equal(out, ref), key


@pytest.mark.parametrize("case", NS5_CASES)
def test_muon_step_exact(case):
    """One Muon step per script variant. A variant is named ``<record>`` or ``<record>_rownorm|_plain``; its
    row normalisation and whether it decays come from our record preset, so the presets are checked too."""
    inputs = _load(case / "inputs.pt")["muon"]
    variants = _load(case / "outputs.pt")["muon_step"]
    assert variants
    for variant, ref in variants.items():
        record, _, mode = variant.partition("_")
        preset = record_optim_config(record, {"muon_row_normalize": mode == "rownorm"} if mode else {})
        params = [torch.nn.Parameter(p.clone()) for p in inputs["params"]]
        for p, g in zip(params, inputs["grads"]):
            p.grad = None if g is None else g.clone()
        opt = Muon(
            params,
            lr=inputs["lr"],
            momentum=inputs["momentum"],
            backend_steps=inputs["backend_steps"],
            weight_decay=inputs["wd"] if preset.muon_wd > 0 else 0.0,
            row_normalize=preset.muon_row_normalize,
        )
        for p, buf in zip(params, inputs["bufs"]):
            if buf.numel():
                opt.state[p]["momentum_buffer"] = buf.clone()
        opt.step()
        for i, (p, want_p, want_buf) in enumerate(zip(params, ref["params_after"], ref["bufs_after"])):
            assert torch.equal(p.detach(), want_p), f"{variant} param {i}"
            if want_buf.numel():
                assert torch.equal(opt.state[p]["momentum_buffer"], want_buf), f"{variant} buffer {i}"
            else:
                assert "momentum_buffer" not in opt.state[p], f"{variant} param {i} has no grad, so no state"


@pytest.mark.parametrize("case", SCHEDULE_CASES)
def test_schedules_exact(case):
    settings = json.loads((case / "schedules.json").read_text())["settings"]
    assert settings
    for st in settings:
        label = f"{st['script']}/{st['setting']}"
        r = st["resolved"]
        schedule = record_schedule_config(st["script"], r)
        assert schedule.warmdown == {"A": "iters", "B": "frac"}[st["family"]], label
        optim_cfg = record_optim_config(st["script"], r)
        cap_ms = effective_cap_ms(r["max_wallclock_seconds"], _reserve_seconds(r))
        assert cap_ms == st["max_wallclock_ms_effective"], label
        for row in st["lr_mul"]:
            args = (row["step"], row["elapsed_ms"], cap_ms, r["iterations"])
            assert schedule.lr_multiplier(*args) == row["lr_mul"], f"{label} {row}"
            if "frac" in row:
                assert schedule.training_fraction(*args) == row["frac"], f"{label} {row}"
        for row in st["momentum_warmup"]:
            assert optim_cfg.muon_momentum_at(row["step"]) == row["momentum"], f"{label} {row}"
