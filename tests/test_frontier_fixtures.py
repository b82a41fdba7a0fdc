"""The records above PR #1855 (PR #1945, #1953) against their own scripts: the frontier fixtures.

Fixtures: $PGOLF_FRONTIER_FIXTURES (default ../shared/fixtures/frontier); every value is read from a case's files (a
held-out twin with other seeds and shapes exists), and everything skips cleanly without them.

- ``model/<case>``: the model of #1945/#1953/#2014 (AsymLogit with distinct caps on the evaluation logits, the
  symmetric softcap in the loss, packed varlen rows, the no-Q/V TTT LoRA), atol from the case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import fixture_root
from pgolf_lit.config import load_config, record_config_path
from pgolf_lit.eval.phased_ttt import PhasedTTTSettings
from pgolf_lit.model.convert import RECORD_ALIASES, config_from_upstream, load_upstream_state_dict, record_gpt_config
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.lora import BatchedTTTLoRA
from pgolf_lit.optim.groups import OptimConfig, route_parameters

ENV = "PGOLF_FRONTIER_FIXTURES"
ROOT = fixture_root(ENV, "frontier")
# The fixtures' record names whose model a config here builds. PR #2014 changes training and TTT only: its model is
# PR #1953's (the model case says so: "= the model of #1945/#1953/#2014").
MODEL_OF = {"pr1945": "pr1945", "pr1953": "pr1953", "pr2014": "pr1953"}


def _cases(kind: str) -> list:
    folder = ROOT / kind if ROOT is not None else None
    if folder is None or not folder.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no frontier {kind} fixtures: set {ENV}"))]
    params = []
    for p in sorted(q for q in folder.iterdir() if (q / "hparams.json").is_file()):
        record = json.loads((p / "hparams.json").read_text())["record"]
        marks = [] if record in MODEL_OF else [pytest.mark.skip(reason=f"{record}'s model is not ported here")]
        params.append(pytest.param(p, id=p.name, marks=marks))
    return params


MODEL_CASES = _cases("model")


def _load(path: Path):
    return torch.load(path, weights_only=True)


def build_model(case: Path) -> tuple[dict, GPT]:
    """Our GPT for a model case: the record config under the case's resolved upstream hyperparameters (sizes
    shrunk), the case's upstream weights, looping on (the case's outputs are taken with looping_active=True)."""
    hp = json.loads((case / "hparams.json").read_text())
    record = MODEL_OF[hp["record"]]
    cfg = config_from_upstream(record, hp["hyperparameters"])
    shrunk = config_from_upstream(record, {k: v["fixture"] for k, v in hp["changed_from_record"].items()})
    assert cfg == shrunk, "the record config differs from the record's own hyperparameters beyond the shrink"
    model = GPT(cfg)
    load_upstream_state_dict(model, _load(case / "state_dict.pt"), str(case / "state_dict.pt"))
    assert "looping_active=True" in hp["outputs"]["logits"]
    model.set_recurrence(True)
    return hp, model.eval()


def fixture_lora(case: Path, hp: dict, model: GPT) -> BatchedTTTLoRA:
    """The case's LoRA; which adapters exist is read from its keys (the record's TTT mask)."""
    saved = _load(case / hp["ttt_lora"]["file"])
    present = {kind: any(k.startswith(f"{kind}_loras.") for k in saved) for kind in ("q", "k", "v", "o", "mlp")}
    spec = hp["ttt_lora"]
    lora = BatchedTTTLoRA(model, spec["bsz"], spec["rank"], spec["alpha"], **present)
    lora.load_state_dict(saved, strict=True)
    return lora


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_outputs_match_the_record(case):
    hp, model = build_model(case)
    inputs, ref = _load(case / "inputs.pt"), _load(case / "outputs.pt")
    ids, targets = inputs["input_ids"], inputs["target_ids"]
    assert model.num_params() == hp["param_count"]
    assert float(model.softcap_pos) != float(model.softcap_neg)  # the case pins the asymmetric branch

    def close(ours, theirs, what):
        torch.testing.assert_close(ours, theirs, atol=hp["atol"], rtol=0, msg=lambda m: f"{what}: {m}")

    with torch.no_grad():
        close(model.forward_logits(ids), ref["logits"], "logits (asymmetric softcap)")
        close(model(ids, targets), ref["loss"], "loss (symmetric softcap)")
        close(model.normalize_hidden(model.forward_hidden(ids)), ref["hidden"], "hidden (final_norm output)")
        packed_ids, packed_targets = ids.reshape(1, -1), targets.reshape(1, -1)
        cu, max_seqlen = ref["cu_seqlens"], int(ref["max_seqlen"])
        close(model.forward_logits(packed_ids, cu, max_seqlen), ref["logits_varlen"], "logits_varlen")
        close(model(packed_ids, packed_targets, cu, max_seqlen), ref["loss_varlen"], "loss_varlen")
        lora = fixture_lora(case, hp, model)
        close(model.forward_ttt(ids, targets, lora), ref["ttt_per_token_loss"], "ttt_per_token_loss")


@pytest.mark.parametrize("case", MODEL_CASES)
def test_ttt_mask_of_the_case_is_the_record_configs(case):
    """The adapters the case's LoRA holds are the ones the record config's phased TTT builds."""
    hp, model = build_model(case)
    saved = _load(case / hp["ttt_lora"]["file"])
    record = RECORD_ALIASES[MODEL_OF[hp["record"]]]
    section = (load_config(record_config_path(record))["model"].get("evaluation") or {}).get("phased_ttt") or {}
    settings = PhasedTTTSettings(**section)
    for kind in ("q", "k", "v", "o", "mlp"):
        assert any(k.startswith(f"{kind}_loras.") for k in saved) == getattr(settings, f"{kind}_lora"), kind


@pytest.mark.parametrize("case", MODEL_CASES)
def test_asym_caps_are_untrained_as_in_the_record(case):
    """``checks``: the caps are in no optimizer group and get no gradient from GPT.forward."""
    hp, model = build_model(case)
    checks = hp["checks"]
    routing = route_parameters(model, OptimConfig())
    assert sorted(n for n, _ in routing.no_optimizer) == sorted(checks["params_in_no_optimizer_group"])
    inputs = _load(case / "inputs.pt")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)  # as upstream, where they require grad: still no gradient reaches them
    model(inputs["input_ids"], inputs["target_ids"]).backward()
    without = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert without == sorted(checks["params_without_grad_from_GPT.forward"])


@pytest.mark.parametrize("case", MODEL_CASES)
def test_record_parameter_counts_of_the_case(case):
    hp = json.loads((case / "hparams.json").read_text())
    counted = 0
    for record, count in hp["record_param_count"].items():
        if not isinstance(count, int) or (record not in MODEL_OF and record not in RECORD_ALIASES):
            continue
        with torch.device("meta"):
            model = GPT(record_gpt_config(RECORD_ALIASES.get(MODEL_OF.get(record, record), record)))
        assert model.num_params() == count, record
        counted += 1
    assert counted >= 2
