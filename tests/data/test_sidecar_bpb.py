"""Bits per byte from a val byte sidecar (PR #1855's CaseOps data) in every evaluation path: the eval passes
(``run_method``), the fit-time validation, and the errors when a CaseOps split has no usable sidecar."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf_lit.config import GPTConfig
from pgolf_lit.data.shards import byte_sidecar_name, list_shards, load_shard, load_validation_tokens
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.data.tokenizer import build_byte_luts, load_tokenizer, validation_byte_counts
from pgolf_lit.errors import DataError
from pgolf_lit.eval import EvalSettings, Weights, evaluation_context, run_method
from pgolf_lit.metrics import target_bytes
from pgolf_lit.model.gpt import GPT
from trainer_utils import tiny_datamodule, tiny_module, tiny_trainer


def with_lut_sidecar(data_root: Path, out: Path) -> Path:
    """A copy of the embedded sp1024 dataset whose val shards carry a sidecar holding each token's LUT bytes
    (given its predecessor): the one plain-tokenizer case where both byte counts must agree exactly."""
    src = data_root / "datasets" / "fineweb10B_sp1024"
    dst = out / "datasets" / "fineweb10B_sp1024"
    shutil.copytree(src, dst)
    shutil.copytree(data_root / "tokenizers", out / "tokenizers")
    luts = build_byte_luts(load_tokenizer(out / "tokenizers" / "fineweb_1024_bpe.model", 1024), 1024, warn=False)
    previous = None
    for i, shard in enumerate(list_shards(dst, "val")):
        tokens = torch.from_numpy(np.asarray(load_shard(shard)).astype(np.int64))
        prev = torch.cat([torch.tensor([tokens[0] if previous is None else previous]), tokens[:-1]])
        counts = target_bytes(prev, tokens, luts)
        if previous is None:
            counts[0] = 0  # the stream's first token is never a target
        counts[tokens == 1] = 0  # BOS covers no text
        write_shard(dst / byte_sidecar_name(i), counts.numpy().astype(np.uint16))
        previous = int(tokens[-1])
    return dst


@pytest.fixture(scope="module")
def sidecar_root(tmp_path_factory, embedded_data_root) -> Path:
    root = tmp_path_factory.mktemp("sidecar")
    with_lut_sidecar(embedded_data_root, root)
    return root


def test_sidecar_bpb_equals_lut_bpb_where_both_apply(embedded_data_root, sidecar_root):
    sp = load_tokenizer(embedded_data_root / "tokenizers" / "fineweb_1024_bpe.model", 1024)
    plain_dir = embedded_data_root / "datasets" / "fineweb10B_sp1024"
    side_dir = sidecar_root / "datasets" / "fineweb10B_sp1024"
    tokens = load_validation_tokens(plain_dir, 128)[: 16 * 128 + 1]
    plain = validation_byte_counts(sp, 1024, plain_dir, tokens.numel())
    side = validation_byte_counts(sp, 1024, side_dir, tokens.numel())
    assert plain.source == "lut" and side.source == "sidecar"
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=1024, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1))
    ctx = evaluation_context(
        EvalSettings(seq_len=128, stride=32),
        precision="32-true",
        device=torch.device("cpu"),
        compile=False,
        weights=Weights(quantized=True, tag="int6"),
    )
    for method in ("standard", "sliding"):
        a, b = run_method(method, model, tokens, plain, ctx), run_method(method, model, tokens, side, ctx)
        assert (a.tokens, a.bytes, a.val_loss, a.val_bpb) == (b.tokens, b.bytes, b.val_loss, b.val_bpb)
        assert a.extra["bytes"] == "lut" and b.extra["bytes"] == "sidecar"


def test_a_sidecar_decides_the_bytes(embedded_data_root, sidecar_root, tmp_path):
    """Doubling every sidecar entry halves the BPB: the sidecar, not the LUTs, is what is counted."""
    doubled = tmp_path / "datasets" / "fineweb10B_sp1024"
    shutil.copytree(sidecar_root / "datasets" / "fineweb10B_sp1024", doubled)
    for f in sorted(doubled.glob("fineweb_val_bytes_*.bin")):
        write_shard(f, np.asarray(load_shard(f)).astype(np.uint16) * 2)
    sp = load_tokenizer(embedded_data_root / "tokenizers" / "fineweb_1024_bpe.model", 1024)
    tokens = load_validation_tokens(doubled, 128)[: 8 * 128 + 1]
    model = GPT(GPTConfig(vocab_size=1024, num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1))
    ctx = evaluation_context(EvalSettings(seq_len=128), precision="32-true", device=torch.device("cpu"), compile=False)
    single = run_method(
        "standard",
        model,
        tokens,
        validation_byte_counts(sp, 1024, sidecar_root / "datasets" / "fineweb10B_sp1024", tokens.numel()),
        ctx,
    )
    double = run_method("standard", model, tokens, validation_byte_counts(sp, 1024, doubled, tokens.numel()), ctx)
    assert double.bytes == 2 * single.bytes and double.val_bpb == pytest.approx(single.val_bpb / 2, rel=1e-12)


def test_fit_time_validation_counts_the_sidecar(embedded_data_root, sidecar_root, tmp_path):
    results = {}
    for name, root in (("lut", embedded_data_root), ("sidecar", sidecar_root)):
        torch.manual_seed(0)
        module = tiny_module()
        dm = tiny_datamodule(root)
        trainer = tiny_trainer(tmp_path / name, max_steps=1)
        (out,) = trainer.validate(module, datamodule=dm, verbose=False)
        results[name] = out["val_bpb"], dm.byte_counts.source
    assert results["lut"][1] == "lut" and results["sidecar"][1] == "sidecar"
    assert results["lut"][0] == pytest.approx(results["sidecar"][0], rel=1e-12)


def test_a_caseops_split_without_its_sidecar_is_an_error(tmp_path):
    """Never a silent fall-back to LUT bytes, which count the case operators."""
    from conftest import fixture_root

    root = fixture_root("PGOLF_PR1855_FIXTURES", "pr1855")
    if root is None:
        pytest.skip("no PR #1855 fixtures (PGOLF_PR1855_FIXTURES or ../shared)")
    sp = load_tokenizer(root / "data" / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model")
    data = tmp_path / "caseops"
    data.mkdir()
    shutil.copy(root / "data" / "pr1855_caseops" / "shards" / "fineweb_val_000000.bin", data)
    n = load_validation_tokens(data, 16).numel()
    with pytest.raises(DataError, match="no byte sidecar"):
        validation_byte_counts(sp, sp.vocab_size(), data, n)
    sidecar = root / "data" / "pr1855_caseops" / "shards" / "fineweb_val_bytes_000000.bin"
    write_shard(data / "fineweb_val_bytes_000000.bin", np.asarray(load_shard(sidecar))[:-3])
    with pytest.raises(DataError, match="must align one to one"):
        validation_byte_counts(sp, sp.vocab_size(), data, n)
    shutil.copy(sidecar, data / "fineweb_val_bytes_000000.bin")
    counts = validation_byte_counts(sp, sp.vocab_size(), data, n)
    assert counts.source == "sidecar" and counts.sidecar.numel() == n
