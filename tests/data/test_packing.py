"""Document packing (PR #1855): ``build_cu_seqlens`` and ``DocumentPackingLoader`` on constructed shards.

Every token of the shards is its own global position code (position + 2) except the BOS tokens (1), placed at known
document starts, so every packed row read back tells where it came from. Expected spans come from a small
reference written here from the description of PR #1855 train_gpt.py DocumentPackingLoader.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf_lit.data.loaders import LOADERS, DocumentPackingLoader, PackedBatch, make_loader
from pgolf_lit.data.packing import build_cu_seqlens
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.errors import DataError

BOS = 1
T = 16  # seq_len, so documents are cut into pieces of at most 16 tokens
L = 64  # tokens per rank per call
SHARD_LENGTHS = [900, 1300, 700, 1100, 1000]


def naive_segments(row: list[int], max_len: int) -> list[int]:
    """Segment starts of a row, walking it: at 0, at every BOS, and after every max_len tokens of one segment."""
    starts = []
    for pos, token in enumerate(row):
        if pos == 0 or token == BOS or pos - starts[-1] == max_len:
            starts.append(pos)
    return starts


def write_document_shards(folder: Path, lengths=SHARD_LENGTHS, seed=0) -> tuple[Path, list[np.ndarray]]:
    """Shards of documents of 1..60 tokens; shard 0 starts with a BOS, the others mid-document."""
    rng = random.Random(seed)
    shards, offset = [], 0
    for k, n in enumerate(lengths):
        tokens = np.arange(offset + 2, offset + 2 + n)
        position = 0 if k == 0 else rng.randint(1, 40)
        while position < n:
            tokens[position] = BOS
            position += rng.choice([1, 2, 5, 9, 16, 17, 33, 60])
        write_shard(folder / f"fineweb_train_{k:06d}.bin", tokens)
        shards.append(tokens)
        offset += n
    write_shard(folder / "fineweb_val_000000.bin", np.arange(100))
    return folder, shards


@pytest.fixture
def shards(tmp_path):
    return write_document_shards(tmp_path / "ds")


def reference_spans(shards: list[np.ndarray], world: int, calls: int) -> list[tuple[int, int]]:
    """(shard, cursor) of each call: shards in order and wrapping, each from its first BOS, rest skipped."""
    span = L + 1
    shard, cursor = 0, int(np.flatnonzero(shards[0] == BOS)[0])
    out = []
    for _ in range(calls):
        while cursor + world * span > shards[shard].size:
            shard = (shard + 1) % len(shards)
            cursor = int(np.flatnonzero(shards[shard] == BOS)[0])
        out.append((shard, cursor))
        cursor += world * span
    return out


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# ------------------------------------------------------------------------------------------------ build_cu_seqlens


def test_cu_seqlens_hand_cases():
    cu, longest = build_cu_seqlens([], 10)  # no BOS: one segment from position 0
    assert cu.dtype == torch.int32 and cu.tolist() == [0] + [10] * 63 and longest == 10
    cu, longest = build_cu_seqlens([0, 3, 7], 10)
    assert cu[:5].tolist() == [0, 3, 7, 10, 10] and cu.numel() == 64 and longest == 4
    cu, longest = build_cu_seqlens(torch.tensor([4]), 10)  # position 0 starts a segment even mid-document
    assert cu[:3].tolist() == [0, 4, 10] and longest == 6
    cu, longest = build_cu_seqlens(np.array([2]), 40, max_doc_len=16)  # a long document is cut every 16 tokens
    assert cu[:5].tolist() == [0, 2, 18, 34, 40] and longest == 16
    cu, _ = build_cu_seqlens(range(63), 64)  # 63 starts + the end: exactly 64 entries, no padding
    assert cu.tolist() == list(range(63)) + [64]
    cu, _ = build_cu_seqlens(range(64), 65)  # 65 entries: padded to 128
    assert cu.numel() == 128 and cu[65:].eq(65).all()
    cu, _ = build_cu_seqlens([0, 5], 9, bucket=4)
    assert cu.tolist() == [0, 5, 9, 9]
    for bad in ([3, 3], [5, 2], [10], [-1]):
        with pytest.raises(ValueError, match="bos_positions must be increasing positions in \\[0, 10\\)"):
            build_cu_seqlens(bad, 10)


def test_cu_seqlens_match_a_walk_over_random_rows():
    rng = random.Random(5)
    for _ in range(500):
        n = rng.randint(1, 400)
        row = [BOS if rng.random() < 0.05 else 7 for _ in range(n)]
        max_len = rng.choice([None, 1, 3, 16, 64])
        cu, longest = build_cu_seqlens([i for i, t in enumerate(row) if t == BOS], n, max_len)
        starts = naive_segments(row, max_len or n + 1)
        boundaries = starts + [n]
        assert cu.numel() % 64 == 0 and cu.numel() - 64 < len(boundaries) <= cu.numel()
        assert cu.tolist() == boundaries + [n] * (cu.numel() - len(boundaries))
        assert longest == max(b - a for a, b in zip(boundaries, boundaries[1:]))


# ------------------------------------------------------------------------------------------------ the loader


def test_packed_rows_cu_seqlens_and_coverage(shards):
    folder, tokens = shards
    world, calls = 3, 60  # 60 calls x 3 x 65 tokens: more than one pass over the 5000 tokens, so it wraps
    loaders = [DocumentPackingLoader(folder, r, world, T, L) for r in range(world)]
    expected = reference_spans(tokens, world, calls)
    # the first call back at shard 0: the walk wrapped around
    one_pass = next(k for k in range(1, calls) if expected[k][0] < expected[k - 1][0])
    assert expected[one_pass - 1][0] == len(tokens) - 1
    covered: dict[int, set] = {}
    for call, (shard, cursor) in enumerate(expected):
        for r, loader in enumerate(loaders):
            batch = loader.next_batch()
            assert isinstance(batch, PackedBatch)
            x, y, cu, longest = batch
            start = cursor + r * (L + 1)
            span = tokens[shard][start : start + L + 1]
            assert x.shape == y.shape == (1, L) and x.dtype == y.dtype == torch.int64
            assert x[0].tolist() == span[:-1].tolist() and y[0].tolist() == span[1:].tolist()
            boundaries = naive_segments(x[0].tolist(), T) + [L]
            assert cu.dtype == torch.int32 and cu.numel() % 64 == 0
            assert cu.tolist() == boundaries + [L] * (cu.numel() - len(boundaries))
            assert longest == max(b - a for a, b in zip(boundaries, boundaries[1:])) <= T
            if call < one_pass:
                positions = set(range(start, start + L))
                assert not positions & covered.setdefault(shard, set()), "a token is an input twice"
                covered[shard] |= positions
    for shard, positions in covered.items():
        first_bos = int(np.flatnonzero(tokens[shard] == BOS)[0])
        calls_here = sum(1 for s, _ in expected[:one_pass] if s == shard)
        used = set(range(first_bos, first_bos + calls_here * world * (L + 1)))
        span_ends = {first_bos + k * (L + 1) + L for k in range(calls_here * world)}  # only ever targets
        assert positions == used - span_ends
    assert sorted(covered) == list(range(len(tokens)))


@pytest.mark.parametrize("world", [1, 2])
def test_packed_resume_is_exact(shards, world):
    folder, _ = shards
    done, more = 25, 30
    uninterrupted = []
    for r in range(world):
        loader = make_loader("packed", folder, r, world, T, L, 65536)
        uninterrupted.append([loader.next_batch() for _ in range(done + more)])

    def same(a, b):
        assert len(a) == len(b)
        for p, q in zip(a, b):
            assert all(torch.equal(u, v) for u, v in zip(p[:3], q[:3])) and p.max_seqlen == q.max_seqlen

    rank0 = make_loader("packed", folder, 0, world, T, L)
    for _ in range(done):
        rank0.next_batch()
    saved = roundtrip(rank0.state_dict())
    for r in range(world):  # rank 0's state restores every rank
        resumed = make_loader("packed", folder, r, world, T, L)
        resumed.load_state_dict(saved)
        assert resumed.calls == done
        same([resumed.next_batch() for _ in range(more)], uninterrupted[r][done:])
        skipped = make_loader("packed", folder, r, world, T, L)
        skipped.skip(done)
        same([next(skipped) for _ in range(more)], uninterrupted[r][done:])


def test_packed_state_from_another_setup_is_refused(shards):
    folder, _ = shards
    loader = make_loader("packed", folder, 0, 2, T, L)
    loader.next_batch()
    with pytest.raises(DataError, match="different world_size"):
        make_loader("packed", folder, 0, 1, T, L).load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match="state is for a 'packed' loader, not 'sequential'"):
        make_loader("sequential", folder, 0, 2, T, L).load_state_dict(loader.state_dict())


def test_packed_is_a_registered_loader(shards):
    assert LOADERS["packed"] is DocumentPackingLoader
    batch = make_loader("packed", shards[0], 0, 1, T, L).next_batch()
    assert batch.inputs[0, 0] == BOS  # shard 0 starts with a document


def test_packed_max_doc_len_is_its_own_knob(shards):
    folder, tokens = shards
    loader = DocumentPackingLoader(folder, 0, 1, T, L, max_doc_len=0)  # no cut: one segment per document
    x, _, cu, _ = loader.next_batch()
    assert cu[cu < L].tolist() == naive_segments(x[0].tolist(), L + 1)


def test_shard_without_bos_is_named(tmp_path):
    folder = tmp_path / "ds"
    write_shard(folder / "fineweb_train_000000.bin", np.r_[1, np.arange(2, 400)])
    write_shard(folder / "fineweb_train_000001.bin", np.arange(2, 400))
    loader = DocumentPackingLoader(folder, 0, 1, T, L)
    with pytest.raises(DataError, match="fineweb_train_000001.bin: no BOS token \\(id 1\\)") as info:
        for _ in range(10):
            loader.next_batch()
    assert "\n" not in str(info.value)


def test_shards_too_short_for_one_call(tmp_path):
    folder = tmp_path / "ds"
    write_shard(folder / "fineweb_train_000000.bin", np.r_[1, np.arange(2, 100)])
    with pytest.raises(DataError, match="no train shard holds one call: the longest has 99 tokens"):
        DocumentPackingLoader(folder, 0, 2, T, L)
    write_shard(folder / "fineweb_train_000000.bin", np.r_[np.arange(2, 150), 1, np.arange(2, 40)])
    loader = DocumentPackingLoader(folder, 0, 1, T, L)  # 187 tokens, but only 39 after the first BOS
    with pytest.raises(DataError, match="no train shard holds one call \\(65 tokens\\) after its first BOS"):
        loader.next_batch()
