"""The CUDA path: these tests skip without a GPU (CI has none); `bench/gpu_check.sh` runs them on the lent machine.

They check what CPU tests cannot: a compiled bf16 training step of a record twin under the records' dtype policy,
the TF32 setting, and that the evaluation of the bf16 path stays near the fp32 one.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pgolf_lit.config import gpt_config_from_yaml
from pgolf_lit.eval import EvalSettings, evaluation_context, run_method
from pgolf_lit.model.gpt import GPT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

TINY = "pr1394_sp8192_loop45_tiny"


def test_compiled_bf16_steps_train_and_match_eager():
    from pgolf_lit.optim import build_optimizers
    from pgolf_lit.records import record_optim_config

    cfg = gpt_config_from_yaml(TINY)
    torch.manual_seed(0)
    model = GPT(cfg).cuda()
    model.set_recurrence(True)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, dynamic=False, fullgraph=True)
    tokens = torch.randint(0, cfg.vocab_size, (4, 129), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    losses = {}
    for name, m, fwd in (("eager", model, model), ("compiled", twin, compiled)):
        opts = build_optimizers(m, record_optim_config(TINY))
        curve = []
        for _ in range(4):
            for o in opts:
                o.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = fwd(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            for o in opts:
                o.step()
            curve.append(float(loss))
        losses[name] = curve
    assert all(torch.isfinite(torch.tensor(c)).all() for c in losses.values())
    assert losses["compiled"][-1] < losses["compiled"][0]
    assert losses["compiled"] == pytest.approx(losses["eager"], abs=0.05)


def test_tf32_is_on_for_the_records():
    from pgolf_lit.module import CompileSettings

    CompileSettings().apply(torch.device("cuda"), compiling=False)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"


def test_bf16_evaluation_stays_near_fp32():
    cfg = gpt_config_from_yaml(TINY)
    torch.manual_seed(0)
    model = GPT(cfg).cuda().eval()
    tokens = torch.randint(0, cfg.vocab_size, (16 * 128 + 1,), device="cuda")
    luts = (
        torch.ones(cfg.vocab_size, dtype=torch.int16),
        torch.zeros(cfg.vocab_size, dtype=torch.bool),
        torch.ones(cfg.vocab_size, dtype=torch.bool),
    )
    settings = EvalSettings(seq_len=128, stride=32)
    out = {}
    for precision in ("32-true", "bf16-mixed"):
        ctx = evaluation_context(settings, precision=precision, device=torch.device("cuda"), compile=True)
        out[precision] = run_method("sliding", model, tokens, luts, ctx).val_loss
    assert out["bf16-mixed"] == pytest.approx(out["32-true"], abs=0.05)
