"""Training loaders on real shards: exact windows, rank split, global-batch invariance, upstream RNG order, resume.

The shards hold their own global stream positions as tokens (shard k = positions offset_k..), so every window
read back tells where it came from. The random loaders are checked against small reference implementations
written here straight from spec/data.md §9.3-9.4 (numpy PCG64, the same draws in the same order).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf_lit.data.loaders import (
    CoprimeStrideLoader,
    SequentialLoader,
    ShardHoldLoader,
    ShuffledSequenceLoader,
    choose_coprime_stride,
    make_loader,
)
from pgolf_lit.data.shards_write import write_shard
from pgolf_lit.errors import ConfigError, DataError

SHARD_LENGTHS = [900, 1300, 700, 1100, 1000]
T = 16
L = 64  # tokens per rank per call: 4 rows


def write_position_shards(folder: Path, lengths=SHARD_LENGTHS) -> Path:
    offset = 0
    for i, n in enumerate(lengths):
        write_shard(folder / f"fineweb_train_{i:06d}.bin", np.arange(offset, offset + n))
        offset += n
    write_shard(folder / "fineweb_val_000000.bin", np.arange(100))  # never read by a training loader
    return folder


@pytest.fixture
def data_dir(tmp_path):
    return write_position_shards(tmp_path / "ds")


def starts_of(lengths=SHARD_LENGTHS) -> list[int]:
    return np.concatenate([[0], np.cumsum(lengths)[:-1]]).tolist()


def batches(loader, calls):
    return [loader.next_batch() for _ in range(calls)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def window_origins(batch, lengths=SHARD_LENGTHS) -> list[tuple[int, int]]:
    """(shard, start in shard) of every row, checking the row is T+1 consecutive tokens of one shard."""
    x, y = batch
    shard_starts = starts_of(lengths)
    origins = []
    for xr, yr in zip(x.tolist(), y.tolist()):
        window = xr + yr[-1:]
        assert window == list(range(window[0], window[0] + T + 1)) and yr == window[1:]
        shard = max(k for k, s in enumerate(shard_starts) if s <= window[0])
        assert window[-1] < shard_starts[shard] + lengths[shard], "window crosses a shard end"
        origins.append((shard, window[0] - shard_starts[shard]))
    return origins


# ------------------------------------------------------------------------------------------------ sequential


def test_sequential_is_the_rank_slice_of_the_cyclic_stream(data_dir):
    stream = np.arange(sum(SHARD_LENGTHS))
    world, span = 3, L + 1
    loaders = [SequentialLoader(data_dir, r, world, T, L) for r in range(world)]
    calls = 30  # 30 * 3 * 65 tokens: wraps around the 5000-token stream
    for call in range(calls):
        seen = []
        for r, loader in enumerate(loaders):
            x, y = loader.next_batch()
            first = call * world * span + r * span
            expected = np.take(stream, range(first, first + span), mode="wrap")
            assert x.shape == y.shape == (L // T, T) and x.dtype == y.dtype == torch.int64
            assert x.flatten().tolist() == expected[:-1].tolist() and y.flatten().tolist() == expected[1:].tolist()
            seen.append(set(expected.tolist()))
        assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])
    assert calls * world * span > len(stream)


def test_sequential_global_batch_invariance(data_dir):
    """world 2 x accumulation 1 and world 1 x accumulation 2 see the same windows in every optimizer step."""
    two_ranks = [SequentialLoader(data_dir, r, 2, T, L) for r in range(2)]
    one_rank = SequentialLoader(data_dir, 0, 1, T, L)
    for _ in range(50):
        assert_same([loader.next_batch() for loader in two_ranks], batches(one_rank, 2))


def test_sequential_resume_and_skip(data_dir):
    reference = batches(SequentialLoader(data_dir, 1, 2, T, L), 40)
    loader = SequentialLoader(data_dir, 1, 2, T, L)
    batches(loader, 17)
    state = roundtrip(loader.state_dict())
    resumed = SequentialLoader(data_dir, 1, 2, T, L)
    resumed.load_state_dict(state)
    assert resumed.calls == 17
    assert_same(batches(resumed, 23), reference[17:])
    skipped = SequentialLoader(data_dir, 1, 2, T, L)
    skipped.skip(17)
    assert_same(batches(skipped, 23), reference[17:])


def test_sequential_state_resumes_another_world_size(data_dir):
    """The stream offset is rank-independent: rank 0 of 2's checkpoint restarts a 1-rank run with 2x accumulation."""
    two_ranks = [SequentialLoader(data_dir, r, 2, T, L) for r in range(2)]
    for loader in two_ranks:
        batches(loader, 9)
    one_rank = SequentialLoader(data_dir, 0, 1, T, L)
    one_rank.load_state_dict(two_ranks[0].state_dict())
    for _ in range(5):
        assert_same([loader.next_batch() for loader in two_ranks], batches(one_rank, 2))


# ------------------------------------------------------------------------------------------------ shuffled


def reference_shuffled(rank, world, lengths, rows, calls):
    """spec/data.md §9.4, written out plainly: returns (shard, start) per row."""
    owned = list(range(len(lengths)))[rank::world]
    rng = np.random.Generator(np.random.PCG64(rank))
    starts = {}

    def reset(shard):
        nt = lengths[shard]
        max_phase = min(T - 1, max(0, nt - T - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        starts[shard] = [phase + int(k) * T for k in rng.permutation((nt - 1 - phase) // T)]

    for shard in owned:
        reset(shard)
    picks = []
    for _ in range(calls * rows):
        if not any(starts[s] for s in owned):
            for shard in owned:
                reset(shard)
        left = np.array([len(starts[s]) for s in owned], dtype=np.float64)
        shard = owned[int(rng.choice(len(owned), p=left / left.sum()))]
        picks.append((shard, starts[shard].pop()))
    return picks


@pytest.mark.parametrize("rank, world", [(0, 1), (0, 2), (1, 2)])
def test_shuffled_matches_the_spec_algorithm(data_dir, rank, world):
    calls = 150  # several passes over each rank's windows, so the reshuffle is exercised too
    loader = ShuffledSequenceLoader(data_dir, rank, world, T, L)
    got = [origin for batch in batches(loader, calls) for origin in window_origins(batch)]
    assert got == reference_shuffled(rank, world, SHARD_LENGTHS, L // T, calls)
    assert {shard for shard, _ in got} == set(range(len(SHARD_LENGTHS))[rank::world])


def test_shuffled_pass_covers_each_window_once(data_dir):
    loader = ShuffledSequenceLoader(data_dir, 0, 1, T, L)
    windows_per_pass = sum(loader.remaining)
    origins = [o for batch in batches(loader, windows_per_pass // (L // T)) for o in window_origins(batch)]
    assert len(set(origins)) == len(origins)


# ------------------------------------------------------------------------------------------------ coprime


def reference_coprime(files, world, lengths, rows, calls):
    """spec/data.md §9.3, written out plainly: the global window list (shard, start) of each call."""
    seed = 0
    for f in files:
        for b in str(f).encode():
            seed = ((seed ^ b) * 1099511628211) % 2**64
    rng = np.random.Generator(np.random.PCG64(seed))
    cursor = {}  # shard -> [phase, blocks, next, start, stride]

    def reset(shard):
        nt = lengths[shard]
        max_phase = min(T - 1, max(0, nt - T - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        blocks = (nt - 1 - phase) // T
        start = int(rng.integers(blocks)) if blocks > 1 else 0
        stride = 1
        if blocks > 1:
            stride = int(rng.integers(1, blocks))
            while math.gcd(stride, blocks) != 1:
                stride = int(rng.integers(1, blocks))
        cursor[shard] = [phase, blocks, 0, start, stride]

    eligible = [s for s, n in enumerate(lengths) if (n - 1) // T > 0]
    gns = rows * world
    out = []
    for call in range(calls):
        progress = min(call / 1800, 1.0)
        remaining = [max(cursor[s][1] - cursor[s][2], 1) if s in cursor else (lengths[s] - 1) // T for s in eligible]
        weights = np.power(np.array(remaining, dtype=np.float64), 0.90 - 0.40 * progress)
        p = weights / float(weights.sum())
        ec = len(eligible)
        low, high = min(max(8, world), ec, gns), min(max(32, 8 * world), ec, gns)
        mix = max(1, min(round(low + progress * (high - low)), ec, gns))
        chosen = rng.choice(ec, size=mix, replace=False, p=p)
        chosen_p = p[chosen] / p[chosen].sum()
        counts = np.ones(mix, dtype=np.int64)
        if gns > mix:
            counts += rng.multinomial(gns - mix, chosen_p)
        order = rng.permutation(mix)
        buckets = []
        for shard, count in zip(np.array(eligible)[chosen][order].tolist(), counts[order].tolist()):
            bucket = []
            while len(bucket) < count:
                if shard not in cursor or cursor[shard][2] >= cursor[shard][1]:
                    reset(shard)
                phase, blocks, nxt, start, stride = cursor[shard]
                bucket.append((shard, phase + ((start + nxt * stride) % blocks) * T))
                cursor[shard][2] += 1
            if len(bucket) > 1:
                bucket = [bucket[k] for k in rng.permutation(len(bucket))]
            buckets.append(bucket)
        windows = []
        while buckets:
            visiting = [buckets[k] for k in rng.permutation(len(buckets))]
            windows += [b.pop() for b in visiting]
            buckets = [b for b in visiting if b]
        out.append(windows)
    return out


@pytest.mark.parametrize("world", [1, 2, 3])
def test_coprime_matches_the_spec_algorithm(data_dir, world):
    calls = 60
    loaders = [CoprimeStrideLoader(data_dir, r, world, T, L) for r in range(world)]
    files = sorted(data_dir.glob("fineweb_train_*.bin"))
    expected = reference_coprime(files, world, SHARD_LENGTHS, L // T, calls)
    for call in range(calls):
        for r, loader in enumerate(loaders):
            assert window_origins(loader.next_batch()) == expected[call][r::world]


@pytest.mark.parametrize("blocks", [2, 9, 12, 30])
def test_coprime_cursor_visits_every_block_once_per_pass(tmp_path, blocks):
    """One shard, one window per call: a pass visits each block of its phase grid exactly once."""
    folder = write_position_shards(tmp_path / "ds", [blocks * T + 1])
    loader = CoprimeStrideLoader(folder, 0, 1, T, T)
    first = window_origins(loader.next_batch())[0][1]
    phase = first % T
    pass_length = (blocks * T - phase) // T  # blocks, or one fewer when the phase is not 0
    starts = [first] + [window_origins(loader.next_batch())[0][1] for _ in range(pass_length - 1)]
    assert sorted(starts) == [phase + k * T for k in range(pass_length)]


def test_coprime_seed_is_the_fnv_hash_of_the_path_strings():
    prime = 1099511628211
    expected = ((((0 ^ ord("a")) * prime) % 2**64 ^ ord("b")) * prime) % 2**64
    assert CoprimeStrideLoader.path_hash([Path("a"), Path("b")]) == expected
    assert CoprimeStrideLoader.path_hash([Path("./data/x.bin")]) == CoprimeStrideLoader.path_hash([Path("data/x.bin")])


# ------------------------------------------------------------------------------------------------ all loaders


def reference_shard_hold(shard_tokens, rank, world, rows, calls, seed, hold, per_batch):
    """PR #1120 train_gpt.py ``choose_coprime_stride`` + ``CoprimeDistributedTokenLoader``, transcribed."""

    def stride_for(modulus, salt):
        if modulus <= 1:
            return 1
        c = abs(salt) % modulus
        c = 1 if c == 0 else c
        while math.gcd(c, modulus) != 1:
            c += 1
            if c >= modulus:
                c = 1
        return c

    shards = []
    for k, tokens in enumerate(shard_tokens):
        nb = (len(tokens) - 1) // T
        if nb > 0:
            shards.append((tokens, nb, (seed * 131 + k * 17) % nb, stride_for(nb, seed * 29 + k * 7 + 1)))
    n = len(shards)
    per_batch = max(1, min(per_batch, n))
    batch_stride = stride_for(n, seed * 41 + 3)
    visits = [0] * n
    out = []
    for batch_idx in range(calls):
        active = min(per_batch, n, rows)
        per, rem = rows // active, rows % active
        start = ((batch_idx // hold) * world + rank) * batch_stride
        chunks = []
        for slot in range(active):
            count = per + (1 if slot < rem else 0)
            idx = (start + slot * batch_stride) % n
            tokens, nb, offset, stride = shards[idx]
            ids = (offset + (visits[idx] + torch.arange(count)) * stride) % nb
            visits[idx] += count
            chunks.append(torch.as_tensor(tokens)[(ids * T)[:, None] + torch.arange(T + 1)[None]])
        local = torch.cat(chunks).to(torch.int64)
        out.append((local[:, :-1], local[:, 1:]))
    return out


@pytest.mark.parametrize("rank, world, seed, hold, per_batch", [(0, 1, 42, 3, 1), (1, 2, 300, 2, 2), (2, 3, 444, 5, 3)])
def test_shard_hold_matches_pr1120(tmp_path, rank, world, seed, hold, per_batch):
    lengths = [900, 1300, 10, 700, 1100, 1000]  # the third shard holds no block: left out, indices keep counting it
    folder = write_position_shards(tmp_path / "ds", lengths)
    tokens = [np.arange(s, s + n) for s, n in zip(starts_of(lengths), lengths)]
    loader = make_loader(
        "shard_hold", folder, rank, world, T, L, seed=seed, hold_steps=hold, shards_per_batch=per_batch
    )
    assert isinstance(loader, ShardHoldLoader)
    want = reference_shard_hold(tokens, rank, world, L // T, 40, seed, hold, per_batch)
    got = batches(loader, 40)
    assert_same(got, want)
    if per_batch == 1:  # one shard per call, the same one for `hold` calls, then another
        shards = [{o[0] for o in window_origins(b, lengths)} for b in got]
        assert all(len(s) == 1 for s in shards) and shards[0] == shards[hold - 1] != shards[hold]


def test_shard_hold_batch_strides_of_the_record_seeds():
    """The record's 80 train shards: seeds 42 and 444 walk them with stride 47, seed 300 with 63 (its README)."""
    assert [choose_coprime_stride(80, seed * 41 + 3) for seed in (42, 300, 444)] == [47, 63, 47]


def roundtrip(state):
    """Through torch.save / torch.load(weights_only=True), as a Lightning checkpoint would."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", ["sequential", "shuffled", "coprime", "shard_hold"])
def test_deterministic_resume_skip_and_cross_rank_restore(data_dir, kind):
    world, done, more = 2, 70, 30
    uninterrupted = [batches(make_loader(kind, data_dir, r, world, T, L, 65536), done + more) for r in range(world)]
    assert_same(batches(make_loader(kind, data_dir, 0, world, T, L), done + more), uninterrupted[0])  # deterministic

    rank0 = make_loader(kind, data_dir, 0, world, T, L)
    batches(rank0, done)
    saved = roundtrip(rank0.state_dict())
    for r in range(world):  # a rank-0-only checkpoint restores every rank
        resumed = make_loader(kind, data_dir, r, world, T, L)
        resumed.load_state_dict(saved)
        assert resumed.calls == done
        assert_same(batches(resumed, more), uninterrupted[r][done:])
        skipped = make_loader(kind, data_dir, r, world, T, L)
        skipped.skip(done)
        assert_same(batches(skipped, more), uninterrupted[r][done:])


def test_state_from_another_setup_is_refused(data_dir):
    coprime = make_loader("coprime", data_dir, 0, 1, T, L)
    coprime.next_batch()
    other_length = make_loader("coprime", data_dir, 0, 1, 2 * T, 2 * L)
    with pytest.raises(DataError, match="different seq_len"):
        other_length.load_state_dict(coprime.state_dict())
    with pytest.raises(DataError, match="state is for a 'coprime' loader, not 'shuffled'"):
        make_loader("shuffled", data_dir, 0, 1, T, L).load_state_dict(coprime.state_dict())
    (data_dir / "fineweb_train_000005.bin").write_bytes((data_dir / "fineweb_train_000000.bin").read_bytes())
    with pytest.raises(DataError, match="different shards"):
        make_loader("coprime", data_dir, 0, 1, T, L).load_state_dict(coprime.state_dict())


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kind", ["sequential", "shuffled", "coprime"])
def test_no_train_shards(tmp_path, kind):
    (tmp_path / "ds").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path / 'ds'}: no train shards matching fineweb_train_\*\.bin"):
        make_loader(kind, tmp_path / "ds", 0, 1, T, L)
    with pytest.raises(DataError, match="dataset directory not found"):
        make_loader(kind, tmp_path / "missing", 0, 1, T, L)


@pytest.mark.parametrize("kind", ["shuffled", "coprime"])
def test_shards_too_short_for_one_sequence(tmp_path, kind):
    folder = write_position_shards(tmp_path / "ds", [T, 5])  # a sequence needs T + 1 tokens
    with pytest.raises(DataError, match=f"too short for one sequence: the longest has {T} tokens.*{T + 1}"):
        make_loader(kind, folder, 0, 1, T, L)


def test_sequential_needs_one_call_worth_of_tokens(tmp_path):
    folder = write_position_shards(tmp_path / "ds", [100, 29])
    with pytest.raises(DataError, match="hold 129 tokens, fewer than one call takes"):
        make_loader("sequential", folder, 0, 2, T, L)


def test_shuffled_rank_without_shards(data_dir):
    with pytest.raises(DataError, match="rank 5 of 6 owns no train shard"):
        make_loader("shuffled", data_dir, 5, 6, T, L)


def test_bad_arguments(data_dir):
    with pytest.raises(ConfigError, match="tokens_per_rank 70 .*multiple of seq_len 16"):
        make_loader("coprime", data_dir, 0, 1, T, 70)
    with pytest.raises(ConfigError, match="rank 2 / world_size 2"):
        make_loader("sequential", data_dir, 2, 2, T, L)
    with pytest.raises(ConfigError, match="loader 'random': expected one of sequential, shuffled, coprime"):
        make_loader("random", data_dir, 0, 1, T, L)


@pytest.mark.parametrize("kind", ["sequential", "shuffled", "coprime"])
def test_token_ids_beyond_the_vocabulary(data_dir, kind):
    """Every window read is checked (not a scan of each new shard inside the timed loop): the first batch that
    holds an id >= vocab_size stops with the shard's name. The position shards hold ids 0, 1, 2, ..."""
    loader = make_loader(kind, data_dir, 0, 1, T, L, vocab_size=600)
    with pytest.raises(DataError, match="fineweb_train_00000.\\.bin: token id .* at or above vocab_size 600"):
        batches(loader, 200)


def test_truncated_shard_is_named(data_dir):
    shard = data_dir / "fineweb_train_000002.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError, match=f"{shard}: shard size mismatch"):
        make_loader("shuffled", data_dir, 0, 1, T, L)
