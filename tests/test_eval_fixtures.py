"""Acceptance test of pgolf_lit/eval: the upstream record scripts' own evaluation numbers, reproduced.

Fixtures: every directory with an hparams.json under $PGOLF_EVAL_FIXTURES (default ../shared/fixtures/eval),
one test per case and one per entry of its ``variants``; see that folder's README. Everything (model, stream,
LUTs, method settings) is built from the files; nothing about a case is hard-coded here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from conftest import fixture_root, shared_tokenizer
from pgolf_lit.data.shards import load_validation_tokens
from pgolf_lit.data.tokenizer import build_byte_luts, load_tokenizer
from pgolf_lit.eval import (
    PassSetup,
    SlidingSettings,
    SlotSettings,
    StandardSettings,
    TTTSettings,
    evaluate_sliding,
    evaluate_slot,
    evaluate_standard,
    evaluate_ttt,
)
from pgolf_lit.eval.audit import record_slot
from pgolf_lit.metrics import BitsPerByte
from pgolf_lit.model.convert import config_from_upstream, load_upstream_state_dict
from pgolf_lit.model.gpt import GPT

ENV_VAR = "PGOLF_EVAL_FIXTURES"
# Upstream method codes (README "How a project test should use them") and the SLOT preset each reproduces.
SLOT_PRESET_OF_METHOD = {"slot_1263": "pr1263", "slot_1321": "pr1321", "causal_slot_1333": "pr1333"}
DIAGNOSTIC_METHODS = {"causal_slot_1333_bf16"}
PER_WINDOW_REFERENCE = "per_window_causal_slot_reference"  # not upstream: the generator's own spec §5.3 code


@pytest.fixture(autouse=True)
def one_thread():
    """The fixtures were produced on one thread; the tiny models also run fastest that way."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _cases() -> list[Path]:
    root = fixture_root(ENV_VAR, "eval")
    return [] if root is None else sorted(p for p in root.iterdir() if (p / "hparams.json").is_file())


def _params(runs: list) -> list:
    if fixture_root(ENV_VAR, "eval") is None:
        return [
            pytest.param(None, None, marks=pytest.mark.skip(reason=f"no fixtures: set {ENV_VAR} or provide ../shared"))
        ]
    return runs


def _expected(case: Path) -> dict:
    return json.loads((case / "expected.json").read_text())


def _upstream_runs() -> list:
    """(case, variant name or None) for every case and every variant."""
    runs = []
    for case in _cases():
        runs.append(pytest.param(case, None, id=case.name))
        for variant in _expected(case).get("variants", []):
            runs.append(pytest.param(case, variant["name"], id=f"{case.name}/{variant['name']}"))
    return _params(runs)


def _reference_runs() -> list:
    """(case, window rule) for every per-window causal SLOT reference the cases carry."""
    runs = []
    for case in _cases():
        for key in _expected(case).get(PER_WINDOW_REFERENCE, {}):
            if key.endswith("_windows"):
                rule = key.removesuffix("_windows")
                runs.append(pytest.param(case, rule, id=f"{case.name}/{rule}"))
    return _params(runs)


def _with_env(hyperparameters: dict, env_overrides: dict) -> dict:
    """The script's Hyperparameters after env overrides (upper-case env names, string values)."""
    h = dict(hyperparameters)
    for name, value in env_overrides.items():
        key = name.lower()
        old = h.get(key)
        if isinstance(old, bool):
            h[key] = bool(int(value))
        elif isinstance(old, int):
            h[key] = int(value)
        elif isinstance(old, float):
            h[key] = float(value)
        else:
            h[key] = value
    return h


@dataclass
class Setup:
    h: dict  # resolved hyperparameters
    settings: dict  # hparams.json "settings"
    seq_len: int
    tokens: torch.Tensor
    luts: tuple
    model: GPT


def _setup(case: Path, env_overrides: dict) -> Setup:
    """Model (preset + the script's hyperparameters, strict state dict, recurrence), trimmed stream, byte LUTs."""
    hp = json.loads((case / "hparams.json").read_text())
    tokenizer = shared_tokenizer(hp["tokenizer"])
    h = _with_env(hp["hyperparameters"], env_overrides)
    seq_len = h.get("eval_seq_len") or h["train_seq_len"]
    tokens = load_validation_tokens(case.parent / hp["val_data"]["dir"], seq_len)
    assert tokens.numel() - 1 == _expected(case)["T"]
    luts = build_byte_luts(load_tokenizer(tokenizer), h["vocab_size"], warn=False)
    model = GPT(config_from_upstream(hp["record"], hp["hyperparameters"]))
    load_upstream_state_dict(model, torch.load(case / "state_dict.pt", weights_only=True), str(case / "state_dict.pt"))
    if hp["recurrence"]["attribute"]:
        model.set_recurrence(bool(hp["recurrence"]["value"]))
    return Setup(h, hp["settings"], seq_len, tokens, luts, model.float())


def _run_method(code: str, window_rule, s: Setup, metric: BitsPerByte) -> None:
    h = s.h
    if code.startswith("eval_val"):
        per_rank = (h.get("val_batch_size") or h["val_batch_tokens"]) // (
            s.settings["world_size"] * s.settings["grad_accum_steps"]
        )
        cfg = StandardSettings(per_rank // s.seq_len)
        evaluate_standard(s.model, s.tokens, metric, cfg, PassSetup(s.seq_len, s.seq_len))
    elif code.startswith("sliding"):
        # Rows are independent, so the windows per batch cannot change the result; any fixture batch size will do.
        batch = s.settings["windows_per_batch"] or s.settings["local_batch_sequences"]
        cfg = SlidingSettings(window_rule, batch)
        evaluate_sliding(s.model, s.tokens, metric, cfg, PassSetup(s.seq_len, h["eval_stride"]))
    elif code in SLOT_PRESET_OF_METHOD:
        # the record config's own SLOT procedure, with the case's settings
        cfg = replace(
            record_slot(SLOT_PRESET_OF_METHOD[code], "slot"),
            window_rule=window_rule,
            batch_windows=h.get("slot_batch_seqs") or s.settings["windows_per_batch"],
            steps=h["slot_steps"],
            lr=h["slot_lr"],
        )
        if cfg.lr_min is not None:
            cfg = replace(cfg, lr_min=h["slot_lr_min"])
        evaluate_slot(s.model, s.tokens, metric, cfg, PassSetup(s.seq_len, h["eval_stride"]))
    elif code.startswith("ttt"):
        cfg = TTTSettings(
            window_rule=window_rule,
            chunk_tokens=h["ttt_chunk_tokens"],
            lr=h["ttt_lr"],
            momentum=h["ttt_momentum"],
            epochs=h["ttt_epochs"],
            batch_seqs=h["ttt_batch_seqs"],
            freeze_blocks=h["ttt_freeze_blocks"],
            grad_clip=h["ttt_grad_clip"],
        )
        evaluate_ttt(s.model, s.tokens, metric, cfg, PassSetup(s.seq_len, h["eval_stride"]))
    else:
        raise AssertionError(f"unknown upstream method code {code!r}")


def _assert_matches(metric: BitsPerByte, expected: dict, tolerance: dict) -> None:
    values = metric.compute()
    assert int(metric.token_count) == expected["token_count"]
    assert int(metric.byte_count) == expected["byte_count"]
    assert float(values["loss"]) == pytest.approx(expected["val_loss"], abs=tolerance["atol_val_loss"], rel=0)
    assert float(values["bpb"]) == pytest.approx(expected["val_bpb"], abs=tolerance["atol_val_bpb"], rel=0)


@pytest.mark.parametrize("case, variant", _upstream_runs())
def test_eval_matches_upstream(case: Path, variant):
    hp = json.loads((case / "hparams.json").read_text())
    primary = _expected(case)
    expected, code, window_rule, overrides = primary, hp["method"]["name"], hp["method"]["window_rule"], {}
    if variant is not None:
        expected = next(v for v in primary["variants"] if v["name"] == variant)
        code, window_rule, overrides = expected["method"], expected["window_rule"], expected["env_overrides"]
    if code in DIAGNOSTIC_METHODS:
        pytest.skip(f"{code} is a diagnostic, not a target (fixture README)")
    s = _setup(case, overrides)
    metric = BitsPerByte(s.luts)
    _run_method(code, window_rule, s, metric)
    _assert_matches(metric, expected, primary["tolerance"])


@pytest.mark.parametrize("case, rule", _reference_runs())
def test_per_window_causal_slot_matches_independent_reference(case: Path, rule):
    """Cross-check of pgolf_lit's compliant SLOT against the fixture generator's own implementation of spec §5.3
    (an independent port, not an upstream figure): same optimiser as the case's causal SLOT, one delta per window."""
    primary = _expected(case)
    s = _setup(case, {})
    cfg = SlotSettings(
        window_rule=rule,
        batch_windows=s.settings["windows_per_batch"],
        steps=s.h["slot_steps"],
        lr=s.h["slot_lr"],
    )
    metric = BitsPerByte(s.luts)
    evaluate_slot(s.model, s.tokens, metric, cfg, PassSetup(s.seq_len, s.h["eval_stride"]))
    _assert_matches(metric, primary[PER_WINDOW_REFERENCE][f"{rule}_windows"], primary["tolerance"])
