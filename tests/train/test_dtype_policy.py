"""The records' dtype policy under a bf16 precision, on CPU: bf16 token tables and residual stream, fp32 matrices
and controls, q/k kept in bf16 by rms_norm (torch >= 2.12 would autocast it to fp32), an fp32 EMA shadow; fp32
precisions (and the fixtures) keep every weight fp32."""

from __future__ import annotations

import torch

from pgolf_lit.callbacks import EMA
from pgolf_lit.config import gpt_config_from_yaml
from pgolf_lit.model.gpt import GPT
from trainer_utils import fit, tiny_datamodule, tiny_module, tiny_trainer


def test_block_outputs_and_qk_are_bf16_under_the_record_precision():
    model = GPT(gpt_config_from_yaml("pr1394_sp8192_loop45_tiny"))
    cast = model.apply_record_dtypes()
    assert cast == ["tok_emb.weight"]
    assert model.blocks[0].attn.c_q.weight.dtype == torch.float32 and model.skip_weights.dtype == torch.float32
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.update(block=o[0].dtype))
    model.blocks[0].attn.register_forward_pre_hook(lambda m, args: seen.update(attn_in=args[0].dtype))
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model.forward_logits(ids)
    assert seen == {"attn_in": torch.bfloat16, "block": torch.bfloat16}
    assert torch.isfinite(logits.float()).all()


def test_fp32_reproduce_mode_keeps_everything_fp32():
    model = GPT(gpt_config_from_yaml("pr1394_sp8192_loop45_tiny"))
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, i, o: seen.update(block=o[0].dtype))
    model.forward_logits(torch.randint(0, model.config.vocab_size, (1, 16)))
    assert seen["block"] == torch.float32 and {p.dtype for p in model.parameters()} == {torch.float32}


def test_a_bf16_mixed_fit_keeps_the_records_dtypes_and_an_fp32_ema(embedded_data_root, tmp_path):
    module = tiny_module()
    ema = EMA(decay=0.5)
    fit(module, tiny_datamodule(embedded_data_root), tiny_trainer(tmp_path, 3, [ema], precision="bf16-mixed"))
    assert module.model.tok_emb.weight.dtype == torch.bfloat16
    assert module.model.blocks[0].attn.c_q.weight.dtype == torch.float32
    shadow = ema.shadow_state_dict()
    assert shadow["model.tok_emb.weight"].dtype == torch.float32
    assert torch.isfinite(module.last_train_loss)
    # the EMA was applied at the end: the model holds the (bf16-rounded) shadow
    torch.testing.assert_close(
        module.model.tok_emb.weight.float(), shadow["model.tok_emb.weight"], atol=1e-2, rtol=1e-2
    )
