"""Acceptance test of the model and checkpoint interop: upstream state dicts give the upstream logits.

Fixtures: every directory with an hparams.json under $PGOLF_UPSTREAM_FIXTURES (default
../shared/fixtures/upstream); see that folder's README. Nothing about a case is hard-coded here.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import fixture_cases
from pgolf_lit.model.convert import config_from_upstream, load_upstream_state_dict
from pgolf_lit.model.gpt import GPT

CASES = fixture_cases("PGOLF_UPSTREAM_FIXTURES", "upstream")


def build(case):
    hp = json.loads((case / "hparams.json").read_text())
    changes = {k: v["fixture"] for k, v in hp["changed_from_record"].items()}
    cfg = config_from_upstream(hp["record"], changes)
    model = GPT(cfg)
    sd = torch.load(case / "state_dict.pt", weights_only=True)
    load_upstream_state_dict(model, sd, str(case / "state_dict.pt"))
    if hp["recurrence"]["attribute"]:
        model.set_recurrence(bool(hp["recurrence"]["value"]))
    return hp, model.eval()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_upstream(case):
    hp, model = build(case)
    inputs = torch.load(case / "inputs.pt", weights_only=True)
    ref = torch.load(case / "outputs.pt", weights_only=True)
    atol = hp["atol"]
    with torch.no_grad():
        logits = model.forward_logits(inputs["input_ids"])
        loss = model(inputs["input_ids"], inputs["target_ids"])
        torch.testing.assert_close(logits, ref["logits"], atol=atol, rtol=0)
        torch.testing.assert_close(loss, ref["loss"], atol=atol, rtol=0)
        if "hidden" in ref:
            h = model.forward_hidden(inputs["input_ids"])
            after_norm = "AFTER" in hp["hidden"]["final_norm"]
            ours = model.normalize_hidden(h) if after_norm else h
            torch.testing.assert_close(ours, ref["hidden"], atol=atol, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_fixture_parameter_count(case):
    hp, model = build(case)
    assert model.num_params() == hp["param_count"]
