"""Hessian-aware SDClip (PR #1412) against its record script's ``gptq_quantize_weight``, written out below."""

from __future__ import annotations

import pytest
import torch

from pgolf_lit.errors import ConfigError
from pgolf_lit.quant.export import ExportConfig
from pgolf_lit.quant.gptq import GPTQSettings, gptq_sdclip, quantize_gptq
from pgolf_lit.quant.quantizers import TensorRule


def upstream_gptq(w, H, clip_sigmas, clip_range, lam, block_size=128):
    """PR #1412 train_gpt_decode.py ``gptq_quantize_weight``, its operations in its order."""
    W_orig = w.float().clone()
    rows, cols = W_orig.shape
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    H.diagonal().add_(0.01 * H.diag().mean())
    perm = torch.argsort(H.diag(), descending=True)
    invperm = torch.argsort(perm)
    W_perm = W_orig[:, perm].clone()
    W_perm[:, dead[perm]] = 0
    H = H[perm][:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    row_std = W_orig.std(dim=1)
    diagH = torch.diag(H[invperm][:, invperm]).clamp_min(1e-8)
    col_importance = diagH / diagH.mean()
    row_importance = (W_orig.abs() * col_importance.unsqueeze(0)).mean(dim=1)
    row_importance = row_importance / row_importance.mean()
    adj = 1.0 + lam * (row_importance - 1.0)
    s = (clip_sigmas * row_std * adj / clip_range).clamp_min(1e-10).to(torch.float16)
    sf = s.float()
    Q = torch.zeros(rows, cols, dtype=torch.int8)
    W_work = W_perm.clone()
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W_block = W_work[:, i1:i2].clone()
        Hinv_block = Hinv[i1:i2, i1:i2]
        Err = torch.zeros(rows, i2 - i1)
        for j in range(i2 - i1):
            w_col = W_block[:, j]
            d = Hinv_block[j, j]
            q_col = torch.clamp(torch.round(w_col / sf), -clip_range, clip_range)
            Q[:, i1 + j] = q_col.to(torch.int8)
            err = (w_col - q_col.float() * sf) / d
            Err[:, j] = err
            W_block[:, j:] -= err.unsqueeze(1) * Hinv_block[j, j:].unsqueeze(0)
        if i2 < cols:
            W_work[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q[:, invperm], s


def case(rows=48, cols=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.linspace(0.5, 2.0, rows)[:, None]
    x = torch.randn(512, cols, generator=g) * torch.linspace(0.1, 3.0, cols)
    h = x.T @ x / 512
    h[:, 7] = h[7, :] = 0  # a dead input
    return w, h


@pytest.mark.parametrize("lam", [0.175, 0.5])
def test_codes_and_scales_match_the_pr1412_script(lam):
    w, h = case()
    q_ref, s_ref = upstream_gptq(w, h, 12.85, 31, lam)
    ours = gptq_sdclip(w, h, 6, 12.85, hessian_clip_lambda=lam)
    assert torch.equal(ours.scale, s_ref)
    assert torch.equal(ours.q, q_ref)
    plain = gptq_sdclip(w, h, 6, 12.85)
    assert not torch.equal(plain.scale, s_ref)  # the modulation really acts
    assert torch.equal(plain.scale, upstream_gptq(w, h, 12.85, 31, 0.0)[1])


def test_the_export_setting_reaches_the_sweep_and_is_validated():
    w, h = case(seed=1)
    rule = TensorRule(bits=6, method="gptq", scale="sdclip", clip_sigmas=12.85)
    q, how = quantize_gptq("blocks.0.mlp.fc.weight", w, rule, 6, h, GPTQSettings(hessian_clip_lambda=0.175))
    assert torch.equal(q.scale, upstream_gptq(w, h, 12.85, 31, 0.175)[1]) and how["hessian_clip_lambda"] == 0.175
    with pytest.raises(ConfigError, match="export.gptq.hessian_clip_lambda"):
        ExportConfig(gptq={"hessian_clip_lambda": -1.0})
    with pytest.raises(ConfigError, match="export.gptq.hessian_clip_lambda"):
        ExportConfig(gptq={"hessian_clip_lambda": 0.175}, awq={})
