"""One attention function on every backend: ``sdpa`` and ``math`` agree on CPU, and the FA3 path (dense and
varlen) gives the same output when FA3 is the stand-in the fixtures were made with (SDPA causal on K/V repeated
per query head; per-segment SDPA for the varlen call)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pgolf_lit.config import gpt_config_from_yaml
from pgolf_lit.data.packing import build_cu_seqlens
from pgolf_lit.errors import ConfigError
from pgolf_lit.model import attention
from pgolf_lit.model.gpt import GPT


def fa3_stand_in(q, k, v, causal=True):
    """FA3's dense call as the fixture harness stands it in: [B, T, H, D] in and out, native GQA."""
    groups = q.size(-2) // k.size(-2)
    k, v = k.repeat_interleave(groups, dim=-2), v.repeat_interleave(groups, dim=-2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2), None  # FA3 returns (out, lse)


def fa3_varlen_stand_in(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True):
    cu = cu_seqlens_q.tolist()
    pieces = [fa3_stand_in(q[None, a:b], k[None, a:b], v[None, a:b])[0][0] for a, b in zip(cu, cu[1:]) if b > a]
    return torch.cat(pieces, dim=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(gpt_config_from_yaml("pr1394_sp8192_loop45_tiny")).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def logits(model, backend, ids, **kw):
    model.set_attention_backend(backend)
    with torch.no_grad():
        return model.forward_logits(ids, **kw)


def test_sdpa_and_math_compute_the_same_attention(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, "math", ids), logits(model, "sdpa", ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(model, "auto", ids), logits(model, "sdpa", ids), atol=0, rtol=0)  # CPU: SDPA


def test_the_fa3_path_matches_sdpa_dense_and_packed(model, monkeypatch):
    monkeypatch.setattr(attention, "FLASH_ATTN", fa3_stand_in)
    monkeypatch.setattr(attention, "FLASH_ATTN_VARLEN", fa3_varlen_stand_in)
    ids = torch.randint(2, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(model, "fa3", ids), logits(model, "sdpa", ids), atol=1e-5, rtol=0)
    row = ids.reshape(1, -1).clone()
    row[0, [0, 40, 90]] = 1  # three documents
    cu, longest = build_cu_seqlens(torch.nonzero(row[0] == 1).flatten(), row.size(1), 64)
    packed = dict(cu_seqlens=cu, max_seqlen=longest)
    torch.testing.assert_close(
        logits(model, "fa3", row, **packed), logits(model, "sdpa", row, **packed), atol=1e-5, rtol=0
    )


def test_a_missing_or_unknown_backend_is_one_line(model, monkeypatch):
    monkeypatch.setattr(attention, "FLASH_ATTN", None)
    model.set_attention_backend("fa3")
    with pytest.raises(RuntimeError, match="attention_backend fa3: flash_attn_interface"):
        model.forward_logits(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ConfigError, match="attention_backend: expected one of"):
        model.set_attention_backend("flash")
    model.set_attention_backend("auto")
