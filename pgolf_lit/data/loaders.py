"""Rank-aware training token loaders: the three orders in which the record systems read the train shards.

Each loader yields micro-batches ``(x, y)``, int64 CPU tensors of shape ``(rows, seq_len)`` with
``rows = tokens_per_rank // seq_len``, where ``tokens_per_rank`` is upstream's ``L = B // (world_size * G)``; ``y``
is ``x`` shifted one token to the right. One ``next_batch()`` call is one upstream ``next_batch`` call, so an
optimizer step makes G of them (upstream train_gpt.py ``DistributedTokenLoader.next_batch``):

- ``SequentialLoader``: the baseline's ``TokenStream`` + ``DistributedTokenLoader`` (one stream over the sorted
  shards, wrapping after the last; each call takes ``world_size * (L + 1)`` tokens and rank r keeps slice r).
- ``ShuffledSequenceLoader``: PR #1394 (rank-owned shards, random phase and order per shard, shard picked in
  proportion to its remaining windows).
- ``CoprimeStrideLoader``: PR #1334/#1333/#1421 and the 2026-03-29 record (per-shard coprime-stride cursors, a
  shard mix that widens as training progresses).
- ``ShardHoldLoader``: PR #1120 (Rascal; each rank holds one shard for ``hold_steps`` calls, the shard and the
  blocks inside it walked with strides coprime to their counts, derived from the run's seed).
- ``DocumentPackingLoader``: PR #1855 (and the records from 2026-04-10_VarLenAttn on): each call gives one packed
  row ``(1, tokens_per_rank)`` per rank plus its document boundaries ``cu_seqlens`` for variable-length attention
  (a ``PackedBatch``, not an ``(x, y)`` pair).

The random loaders draw from numpy's PCG64 in exactly upstream's order, so they give upstream's batches.

Shards are memory-mapped (validated header and size; token ids checked against ``vocab_size`` on first use), never
loaded into memory whole. ``state_dict()``/``load_state_dict()`` resume exactly and at once; ``skip(n)``
fast-forwards n calls without reading tokens (free for the sequential loader, a replay of the random draws for the
others: about 0.5 ms per call for the shuffled loader at 48 rows). A checkpoint written by rank 0 only can restore
every rank: a state saved by another rank is replayed from the start by its call count, which gives the same
position because every loader is a function of (shards, rank, world size, lengths, calls).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch

from pgolf_lit.data.packing import CU_SEQLENS_BUCKET, build_cu_seqlens
from pgolf_lit.data.shards import list_shards, load_shard, read_num_tokens
from pgolf_lit.data.tokenizer import BOS_ID
from pgolf_lit.errors import ConfigError, DataError

# CoprimeStrideLoader's schedule (upstream constants): the shard mix widens and the preference for shards with
# many blocks left flattens over the first MIX_WARMUP_CALLS calls.
MIX_WARMUP_CALLS = 1800.0
ALPHA_START, ALPHA_DROP = 0.90, 0.40
FNV_PRIME = 1099511628211


class ShardSet:
    """A fixed list of (already validated) shards whose memory maps are opened on first use.

    Token ids are checked against the vocabulary in the windows actually read, not by a scan of each newly touched
    shard: a full scan (~200 MB per shard, ~50 shards per rank in a record run) would run inside the timed
    training loop, where the records read no more than their batches.
    """

    def __init__(self, files: list[Path], num_tokens: list[int], vocab_size: int | None):
        self.files = files
        self.vocab_size = vocab_size
        self.num_tokens = np.array(num_tokens, dtype=np.int64)
        self._maps: dict[int, np.ndarray] = {}

    def tokens(self, index: int) -> np.ndarray:
        if index not in self._maps:
            self._maps[index] = load_shard(self.files[index])
        return self._maps[index]

    def window(self, index: int, start: int, length: int) -> np.ndarray:
        window = np.asarray(self.tokens(index)[start : start + length], dtype=np.int64)
        if self.vocab_size is not None and window.size and int(window.max()) >= self.vocab_size:
            bad = start + int(np.argmax(window >= self.vocab_size))
            raise DataError(
                f"{self.files[index]}: token id {int(window.max())} at or above vocab_size {self.vocab_size} "
                f"(at index {bad}); the shards were made with another tokenizer than the model's vocab_size expects"
            )
        return window


def _random_phase(rng: np.random.Generator, num_tokens: int, seq_len: int) -> int:
    """A random offset in [0, seq_len) for a shard's window grid, as upstream; no draw when there is no choice."""
    max_phase = min(seq_len - 1, max(0, num_tokens - seq_len - 1))
    return int(rng.integers(max_phase + 1)) if max_phase > 0 else 0


class TokenLoader:
    """Common shape, checks, iteration and resume logic; subclasses plan window positions and read them."""

    kind = ""
    # True when the position does not depend on the rank, so any rank's saved state restores this one directly.
    rank_independent_position = False

    def __init__(
        self,
        data_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        seq_len: int,
        tokens_per_rank: int,
        vocab_size: int | None = None,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} / world_size {world_size}: need world_size >= 1 and 0 <= rank < world_size")
        if seq_len < 1:
            raise ConfigError(f"seq_len {seq_len}: must be positive")
        if tokens_per_rank < seq_len or tokens_per_rank % seq_len:
            raise ConfigError(
                f"tokens_per_rank {tokens_per_rank} (train_batch_tokens // (world_size * grad_accum)): must be a "
                f"positive multiple of seq_len {seq_len}"
            )
        self.data_dir = Path(data_dir)
        self.rank, self.world_size = rank, world_size
        self.seq_len, self.tokens_per_rank = seq_len, tokens_per_rank
        self.rows = tokens_per_rank // seq_len
        self.vocab_size = vocab_size
        self.calls = 0
        self.train_files = list_shards(self.data_dir, "train")
        self.train_tokens = [read_num_tokens(f) for f in self.train_files]  # every header and size checked here

    # subclass hooks ---------------------------------------------------------------------------------------------
    def _plan(self):
        """Advance the loader by one call and describe what to read (no token is read)."""
        raise NotImplementedError

    def _read(self, plan: list[tuple[int, int]]) -> np.ndarray:
        """The planned windows as an int64 array of shape (rows, seq_len + 1): by default ``plan`` lists
        (shard, start) of windows in ``self.shards``, as the multi-shard loaders plan them."""
        return np.stack([self.shards.window(shard, start, self.seq_len + 1) for shard, start in plan])

    def _position_state(self) -> dict:
        raise NotImplementedError

    def _load_position(self, state: dict) -> None:
        raise NotImplementedError

    def _restart(self) -> None:
        """Return to the state of a freshly built loader."""
        raise NotImplementedError

    def _resume_key(self) -> dict:
        """What a saved state must agree on to be restored here: by default the shards and every length."""
        return {
            "shards": self._shard_list(),
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "tokens_per_rank": self.tokens_per_rank,
        }

    def _shard_list(self) -> list[list]:
        return [[f.name, n] for f, n in zip(self.train_files, self.train_tokens)]

    # public API ---------------------------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.from_numpy(self._read(self._plan()))
        self.calls += 1
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def skip(self, calls: int) -> None:
        """Fast-forward ``calls`` calls: the next batch is the one an uninterrupted loader would give then."""
        for _ in range(calls):
            self._plan()
            self.calls += 1

    def state_dict(self) -> dict:
        """Plain Python values and int64 tensors (safe for ``torch.load(weights_only=True)``)."""
        return {
            "kind": self.kind,
            "rank": self.rank,
            "calls": self.calls,
            **self._resume_key(),
            **self._position_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise DataError(
                f"{self.data_dir}: saved loader state is for a {state.get('kind')!r} loader, not {self.kind!r}"
            )
        for key, value in self._resume_key().items():
            if state.get(key) != value:
                raise DataError(
                    f"{self.data_dir}: saved {self.kind} loader state has a different {key} "
                    f"({_short(state.get(key))} saved, {_short(value)} now); it cannot be resumed exactly"
                )
        if state["rank"] == self.rank or self.rank_independent_position:
            self._load_position(state)
            self.calls = int(state["calls"])
        else:
            self._restart()
            self.calls = 0
            self.skip(int(state["calls"]))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class SequentialLoader(TokenLoader):
    """Upstream ``TokenStream`` + ``DistributedTokenLoader``: the sorted shards as one cyclic stream.

    Each call consumes ``world_size * (tokens_per_rank + 1)`` tokens and rank r keeps the r-th span, so any split
    of a step between ranks and accumulation sees the same windows. The position is one offset into the cyclic
    stream, rank-independent, so the saved state of any rank (of any world size) resumes every rank.
    """

    kind = "sequential"
    rank_independent_position = True

    def __init__(
        self,
        data_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        seq_len: int,
        tokens_per_rank: int,
        vocab_size: int | None = None,
    ):
        super().__init__(data_dir, rank, world_size, seq_len, tokens_per_rank, vocab_size)
        self.shards = ShardSet(self.train_files, self.train_tokens, vocab_size)
        self.span = tokens_per_rank + 1
        self._shard_ends = np.cumsum(self.shards.num_tokens)
        self.total_tokens = int(self._shard_ends[-1])
        if self.total_tokens < world_size * self.span:
            raise DataError(
                f"{self.data_dir}: the train shards hold {self.total_tokens} tokens, fewer than one call takes "
                f"(world_size {world_size} x (tokens_per_rank {tokens_per_rank} + 1))"
            )
        self.offset = 0

    def _plan(self) -> int:
        start = (self.offset + self.rank * self.span) % self.total_tokens
        self.offset = (self.offset + self.world_size * self.span) % self.total_tokens
        return start

    def _read_stream(self, start: int, length: int) -> np.ndarray:
        """``length`` tokens of the cyclic stream from global position ``start``, across shard ends and the wrap."""
        pieces = []
        position = start
        while length:
            shard = int(np.searchsorted(self._shard_ends, position, side="right"))
            shard_start = int(self._shard_ends[shard] - self.shards.num_tokens[shard])
            local = position - shard_start
            take = min(length, int(self.shards.num_tokens[shard]) - local)
            pieces.append(self.shards.window(shard, local, take))
            length -= take
            position = (position + take) % self.total_tokens
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def _read(self, start: int) -> np.ndarray:
        span = self._read_stream(start, self.span)
        # Row i is span[i*T : i*T + T + 1]: x rows are consecutive T-token pieces and y the same shifted by one.
        return np.ascontiguousarray(np.lib.stride_tricks.sliding_window_view(span, self.seq_len + 1)[:: self.seq_len])

    def skip(self, calls: int) -> None:
        self.offset = (self.offset + calls * self.world_size * self.span) % self.total_tokens
        self.calls += calls

    def _position_state(self) -> dict:
        return {"offset": self.offset}

    def _load_position(self, state: dict) -> None:
        self.offset = int(state["offset"]) % self.total_tokens

    def _restart(self) -> None:
        self.offset = 0

    def _resume_key(self) -> dict:
        return {"shards": self._shard_list()}


class ShuffledSequenceLoader(TokenLoader):
    """PR #1394's ``ShuffledSequenceLoader``: each rank samples its own shards' windows without replacement.

    Rank r owns shards ``sorted[r::world_size]`` and a ``Generator(PCG64(r))``. Each owned shard gets a random
    phase and a random order of its windows (``seq_len + 1`` tokens, starting every ``seq_len``); each row picks a
    shard with probability proportional to its windows left and takes its last one; when all are used, every shard
    is reshuffled. Windows never cross shards.
    """

    kind = "shuffled"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        seq_len: int,
        tokens_per_rank: int,
        vocab_size: int | None = None,
    ):
        super().__init__(data_dir, rank, world_size, seq_len, tokens_per_rank, vocab_size)
        owned = self.train_files[rank::world_size]
        if not owned:
            raise DataError(
                f"{self.data_dir}: rank {rank} of {world_size} owns no train shard (only {len(self.train_files)} "
                f"fineweb_train_*.bin); the shuffled loader needs at least one shard per rank"
            )
        self.shards = ShardSet(owned, self.train_tokens[rank::world_size], vocab_size)
        if int(self.shards.num_tokens.max()) < seq_len + 1:
            raise DataError(
                f"{self.data_dir}: rank {rank}'s train shards are too short for one sequence: the longest has "
                f"{int(self.shards.num_tokens.max())} tokens, a sequence needs seq_len + 1 = {seq_len + 1}"
            )
        self._restart()

    def _reset_shard(self, index: int) -> None:
        num_tokens = int(self.shards.num_tokens[index])
        phase = _random_phase(self.rng, num_tokens, self.seq_len)
        num_windows = max(0, (num_tokens - 1 - phase) // self.seq_len)
        self.starts[index] = phase + self.rng.permutation(num_windows).astype(np.int64) * self.seq_len
        self.remaining[index] = num_windows

    def _restart(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64(self.rank))
        self.starts: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * len(self.shards.files)
        self.remaining = [0] * len(self.shards.files)
        for index in range(len(self.shards.files)):
            self._reset_shard(index)

    def _plan(self) -> list[tuple[int, int]]:
        # Probabilities are remaining / remaining.sum() in float64, recomputed per row, as upstream: the exact
        # floats matter because Generator.choice turns them into a CDF.
        remaining = np.array(self.remaining, dtype=np.float64)
        plan = []
        for _ in range(self.rows):
            total = remaining.sum()
            if total <= 0:
                for index in range(len(self.shards.files)):
                    self._reset_shard(index)
                remaining = np.array(self.remaining, dtype=np.float64)
                total = remaining.sum()
            index = int(self.rng.choice(len(self.shards.files), p=remaining / total))
            self.remaining[index] -= 1
            remaining[index] -= 1
            plan.append((index, int(self.starts[index][self.remaining[index]])))
        return plan

    def _position_state(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "starts": [torch.from_numpy(s[:n].copy()) for s, n in zip(self.starts, self.remaining)],
        }

    def _load_position(self, state: dict) -> None:
        self.rng = np.random.Generator(np.random.PCG64(self.rank))
        self.rng.bit_generator.state = state["rng"]
        self.starts = [torch.as_tensor(s, dtype=torch.int64).numpy() for s in state["starts"]]
        self.remaining = [len(s) for s in self.starts]


class CoprimeStrideLoader(TokenLoader):
    """The coprime-stride multi-shard loader (PR #1334/#1333/#1421, 2026-03-29 record; upstream class name
    ``DistributedTokenLoader``).

    All ranks share one generator, seeded by an FNV-style hash of the sorted shard paths, and build the same
    global batch of ``rows * world_size`` windows; rank r keeps windows r, r + W, ... Each shard has a cursor that
    walks its blocks in the order ``start + k * stride (mod blocks)`` with ``gcd(stride, blocks) = 1``, so it visits
    every block once per pass (sampling without replacement in O(1) state). Each call picks a mix of shards that
    grows from ``low`` to ``high`` over the first 1800 calls and interleaves their windows.

    The seed hashes ``str(path)`` of each shard as built from ``data_dir``: to reproduce an upstream run exactly,
    spell ``data_dir`` as upstream did (``./data/datasets/fineweb10B_sp4096`` and ``data/datasets/...`` hash the
    same; an absolute path does not).
    """

    kind = "coprime"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        seq_len: int,
        tokens_per_rank: int,
        vocab_size: int | None = None,
    ):
        super().__init__(data_dir, rank, world_size, seq_len, tokens_per_rank, vocab_size)
        self.shards = ShardSet(self.train_files, self.train_tokens, vocab_size)
        self.seed = self.path_hash(self.shards.files)
        base_blocks = (self.shards.num_tokens - 1) // seq_len
        self.eligible = np.nonzero(base_blocks > 0)[0].astype(np.int64)
        if self.eligible.size == 0:
            raise DataError(
                f"{self.data_dir}: every train shard is too short for one sequence: the longest has "
                f"{int(self.shards.num_tokens.max())} tokens, a sequence needs seq_len + 1 = {seq_len + 1}"
            )
        self.base_blocks = base_blocks[self.eligible]
        self.global_windows = self.rows * world_size
        self._restart()

    @staticmethod
    def path_hash(files: list[Path]) -> int:
        """64-bit FNV-1-style hash (xor then multiply, starting from 0) of the UTF-8 bytes of every path string."""
        seed = 0
        for path in files:
            for byte in str(path).encode():
                seed = ((seed ^ byte) * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
        return seed

    def _restart(self) -> None:
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        n = len(self.shards.files)
        self.cursor_phase = np.zeros(n, dtype=np.int64)
        self.cursor_blocks = np.zeros(n, dtype=np.int64)
        self.cursor_next = np.zeros(n, dtype=np.int64)
        self.cursor_start = np.zeros(n, dtype=np.int64)
        self.cursor_stride = np.ones(n, dtype=np.int64)
        self.cursor_started = np.zeros(n, dtype=bool)

    def _coprime_stride(self, blocks: int) -> int:
        if blocks <= 1:
            return 1
        while True:
            stride = int(self.rng.integers(1, blocks))
            if math.gcd(stride, blocks) == 1:
                return stride

    def _reset_cursor(self, shard: int) -> None:
        """A new pass over a shard: new phase, block count, start block and stride (drawn in that order)."""
        phase = _random_phase(self.rng, int(self.shards.num_tokens[shard]), self.seq_len)
        blocks = (int(self.shards.num_tokens[shard]) - 1 - phase) // self.seq_len
        self.cursor_phase[shard] = phase
        self.cursor_blocks[shard] = blocks
        self.cursor_next[shard] = 0
        self.cursor_start[shard] = int(self.rng.integers(blocks)) if blocks > 1 else 0
        self.cursor_stride[shard] = self._coprime_stride(blocks)
        self.cursor_started[shard] = True

    def _take(self, shard: int, count: int) -> list[tuple[int, int]]:
        """The next ``count`` window starts of a shard's cursor, starting new passes as needed."""
        taken: list[tuple[int, int]] = []
        while len(taken) < count:
            if not self.cursor_started[shard] or self.cursor_next[shard] >= self.cursor_blocks[shard]:
                self._reset_cursor(shard)
            blocks, first = int(self.cursor_blocks[shard]), int(self.cursor_next[shard])
            phase, start, stride = (
                int(self.cursor_phase[shard]),
                int(self.cursor_start[shard]),
                int(self.cursor_stride[shard]),
            )
            n = min(count - len(taken), blocks - first)
            taken += [(shard, phase + ((start + k * stride) % blocks) * self.seq_len) for k in range(first, first + n)]
            self.cursor_next[shard] = first + n
        return taken

    def _shard_probabilities(self, progress: float) -> np.ndarray:
        started = self.cursor_started[self.eligible]
        left = np.maximum(self.cursor_blocks[self.eligible] - self.cursor_next[self.eligible], 1)
        remaining = np.where(started, left, self.base_blocks).astype(np.float64)
        weights = np.power(remaining, ALPHA_START - ALPHA_DROP * progress)
        total = float(weights.sum())
        if not np.isfinite(total) or total <= 0.0:
            weights = np.ones(self.eligible.size, dtype=np.float64)
            total = float(weights.sum())
        return weights / total

    def _plan(self) -> list[tuple[int, int]]:
        eligible_count, global_windows = int(self.eligible.size), self.global_windows
        progress = min(self.calls / MIX_WARMUP_CALLS, 1.0)  # calls are micro-batches, as upstream
        probabilities = self._shard_probabilities(progress)
        low = min(max(8, self.world_size), eligible_count, global_windows)
        high = min(max(32, self.world_size * 8), eligible_count, global_windows)
        mix = max(1, min(int(round(low + progress * (high - low))), eligible_count, global_windows))

        picked = self.rng.choice(eligible_count, size=mix, replace=False, p=probabilities)
        picked_probabilities = probabilities[picked].copy()
        picked_probabilities /= picked_probabilities.sum()
        counts = np.ones(mix, dtype=np.int64)
        if global_windows > mix:
            counts += self.rng.multinomial(global_windows - mix, picked_probabilities).astype(np.int64)
        order = self.rng.permutation(mix)
        shards, counts = self.eligible[picked][order], counts[order]

        buckets = []
        for shard, count in zip(shards.tolist(), counts.tolist()):
            bucket = self._take(shard, count)
            if len(bucket) > 1:
                bucket = [bucket[k] for k in self.rng.permutation(len(bucket)).tolist()]
            buckets.append(bucket)
        # Interleave: each round visits the non-empty buckets in a fresh random order and takes each one's last.
        windows: list[tuple[int, int]] = []
        active = buckets
        while active:
            visiting = [active[k] for k in self.rng.permutation(len(active)).tolist()]
            for bucket in visiting:
                windows.append(bucket.pop())
            active = [bucket for bucket in visiting if bucket]
        return windows[self.rank :: self.world_size]

    def _position_state(self) -> dict:
        return {
            "rng": self.rng.bit_generator.state,
            "cursors": {
                name: torch.from_numpy(getattr(self, f"cursor_{name}").astype(np.int64))
                for name in ("phase", "blocks", "next", "start", "stride", "started")
            },
        }

    def _load_position(self, state: dict) -> None:
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.rng.bit_generator.state = state["rng"]
        for name, values in state["cursors"].items():
            dtype = bool if name == "started" else np.int64
            setattr(self, f"cursor_{name}", torch.as_tensor(values).numpy().astype(dtype))


def choose_coprime_stride(modulus: int, salt: int) -> int:
    """PR #1120's deterministic stride: ``salt mod modulus`` (1 instead of 0), raised until coprime with ``modulus``
    (wrapping to 1)."""
    if modulus <= 1:
        return 1
    candidate = abs(salt) % modulus or 1
    while math.gcd(candidate, modulus) != 1:
        candidate += 1
        if candidate >= modulus:
            candidate = 1
    return candidate


class ShardHoldLoader(TokenLoader):
    """PR #1120's ``CoprimeDistributedTokenLoader`` (upstream LOADER_MODE=coprime in that script): no randomness,
    every walk a function of the seed.

    Shard k (index in the sorted file list; shards without one full block are left out) is cut into
    ``(tokens - 1) // seq_len`` blocks and walked ``offset_k + visits · stride_k (mod blocks)`` with
    ``offset_k = (131·seed + 17·k) mod blocks`` and ``stride_k = choose_coprime_stride(blocks, 29·seed + 7·k + 1)``;
    ``visits`` counts the blocks this rank already took from it. Call c of rank r reads ``shards_per_batch`` shards,
    slot j the usable shard ``((c // hold_steps · world_size + r) · S + j · S) mod n`` with the batch stride
    ``S = choose_coprime_stride(n, 41·seed + 3)``, so a rank stays on one shard for ``hold_steps`` calls (64: four
    seconds of an 8-GPU run) and the ranks hold different shards. Rows are split evenly over the slots (the first
    ones take the remainder). Windows are ``seq_len + 1`` tokens from a block start; they never cross shards.
    """

    kind = "shard_hold"

    def __init__(
        self,
        data_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        seq_len: int,
        tokens_per_rank: int,
        vocab_size: int | None = None,
        *,
        seed: int = 1337,
        hold_steps: int = 64,
        shards_per_batch: int = 1,
    ):
        super().__init__(data_dir, rank, world_size, seq_len, tokens_per_rank, vocab_size)
        if hold_steps < 1 or shards_per_batch < 1:
            raise ConfigError(
                f"shard_hold loader: hold_steps and shards_per_batch must be >= 1, got {hold_steps} and "
                f"{shards_per_batch}"
            )
        usable = [k for k, n in enumerate(self.train_tokens) if (n - 1) // seq_len > 0]
        if not usable:
            raise DataError(
                f"{self.data_dir}: every train shard is too short for one sequence: the longest has "
                f"{max(self.train_tokens)} tokens, a sequence needs seq_len + 1 = {seq_len + 1}"
            )
        self.shards = ShardSet(
            [self.train_files[k] for k in usable], [self.train_tokens[k] for k in usable], vocab_size
        )
        self.blocks = [(self.train_tokens[k] - 1) // seq_len for k in usable]
        self.offsets = [(seed * 131 + k * 17) % b for k, b in zip(usable, self.blocks)]
        self.strides = [choose_coprime_stride(b, seed * 29 + k * 7 + 1) for k, b in zip(usable, self.blocks)]
        self.seed, self.hold_steps = seed, hold_steps
        self.shards_per_batch = min(shards_per_batch, len(usable))
        self.batch_stride = choose_coprime_stride(len(usable), seed * 41 + 3)
        self._restart()

    def _restart(self) -> None:
        self.visits = np.zeros(len(self.blocks), dtype=np.int64)

    def _plan(self) -> list[tuple[int, int]]:
        n = len(self.blocks)
        active = min(self.shards_per_batch, self.rows)
        per_slot, extra = divmod(self.rows, active)
        first = (self.calls // self.hold_steps * self.world_size + self.rank) * self.batch_stride
        plan = []
        for slot in range(active):
            count = per_slot + (1 if slot < extra else 0)
            shard = (first + slot * self.batch_stride) % n
            visits = int(self.visits[shard]) + np.arange(count, dtype=np.int64)
            blocks = (self.offsets[shard] + visits * self.strides[shard]) % self.blocks[shard]
            self.visits[shard] += count
            plan += [(shard, int(b) * self.seq_len) for b in blocks]
        return plan

    def _resume_key(self) -> dict:
        return {
            **super()._resume_key(),
            "seed": self.seed,
            "hold_steps": self.hold_steps,
            "shards_per_batch": self.shards_per_batch,
        }

    def _position_state(self) -> dict:
        return {"visits": torch.from_numpy(self.visits.copy())}

    def _load_position(self, state: dict) -> None:
        self.visits = torch.as_tensor(state["visits"], dtype=torch.int64).numpy().copy()


class PackedBatch(NamedTuple):
    """One ``DocumentPackingLoader`` call for one rank."""

    inputs: torch.Tensor  # int64 (1, tokens_per_rank)
    targets: torch.Tensor  # int64 (1, tokens_per_rank): inputs shifted one token to the right
    cu_seqlens: torch.Tensor  # int32 (64k,): segment boundaries in inputs, padded with tokens_per_rank
    max_seqlen: int  # this row's longest segment (training passes the loader's ``seqlen_bound`` instead)


class DocumentPackingLoader(TokenLoader):
    """PR #1855 train_gpt.py ``DocumentPackingLoader``: the shards in order, packed rows with document boundaries.

    Every rank walks all train shards in sorted order (wrapping after the last) with the same cursor, which starts
    at each shard's first BOS. A call takes ``world_size`` consecutive spans of ``tokens_per_rank + 1`` tokens from
    the cursor (rank r the r-th; ``inputs`` its first ``tokens_per_rank`` tokens, ``targets`` its last), then moves
    the cursor past them; when the spans would run past the shard's end, the rest of the shard is skipped (rows never
    cross shards). The row's segments start at position 0 and at each BOS, cut every ``max_doc_len`` tokens
    (default ``seq_len``), as ``build_cu_seqlens``. Each span's last token is only a target, as in the sequential
    loader; the tokens before a shard's first BOS and after its last full call are never read.

    Every shard must hold a BOS (the #1855 version dropped #1787's fallback for shards without one). The position is
    ``(shard, cursor)``, the same on every rank, so any rank's saved state resumes every rank; the background
    prefetch thread of upstream is left out (memory-mapped shards make a call a copy of one span), but not its one
    visible effect: when the cut length changes (``set_max_doc_len``, progressive context growth), the calls it had
    prepared are skipped.
    """

    kind = "packed"
    rank_independent_position = True
    # Calls the record's loader keeps prepared ahead of the one it hands out (its prefetch queue). At a change of the
    # cut length it discards them, so their tokens are skipped (PR #2014; spec/frontier.md §4.1).
    PREFETCHED_CALLS = 2

    def __init__(
        self,
        data_dir: str | os.PathLike,
        rank: int,
        world_size: int,
        seq_len: int,
        tokens_per_rank: int,
        vocab_size: int | None = None,
        *,
        max_doc_len: int | None = None,
        bos_id: int = BOS_ID,
        cu_bucket: int = CU_SEQLENS_BUCKET,
    ):
        super().__init__(data_dir, rank, world_size, seq_len, tokens_per_rank, vocab_size)
        self.shards = ShardSet(self.train_files, self.train_tokens, vocab_size)
        self.span = tokens_per_rank + 1
        self.max_doc_len = seq_len if max_doc_len is None else max_doc_len
        self.bos_id, self.cu_bucket = bos_id, cu_bucket
        self.discarded: list[tuple[int, int]] = []  # (rank's span start, its cut) of every call skipped at a change
        if int(self.shards.num_tokens.max()) < world_size * self.span:
            raise DataError(
                f"{self.data_dir}: no train shard holds one call: the longest has {int(self.shards.num_tokens.max())} "
                f"tokens, a call takes world_size {world_size} x (tokens_per_rank {tokens_per_rank} + 1)"
            )
        self._restart()

    @property
    def seqlen_bound(self) -> int:
        """No segment of any row is longer: documents are cut every ``max_doc_len`` tokens. Training hands it to
        varlen attention as ``max_seqlen`` (upstream passes its training length): FA3 sizes its launch grid from
        it, so the row length (48x larger at the records' sizes) would launch mostly empty blocks."""
        return self.max_doc_len

    def _enter_shard(self, index: int) -> None:
        self.shard = index
        self.bos = np.flatnonzero(np.asarray(self.shards.tokens(index)) == self.bos_id)
        if self.bos.size == 0:
            raise DataError(
                f"{self.shards.files[index]}: no BOS token (id {self.bos_id}); the document-packing loader finds "
                f"documents by their BOS and needs one in every shard"
            )
        self.cursor = int(self.bos[0])

    def _restart(self) -> None:
        self._enter_shard(0)
        self.handed_out = False  # the record's prefetch queue fills at its first call

    def set_max_doc_len(self, max_doc_len: int) -> None:
        """Cut documents every ``max_doc_len`` tokens from the next call on. A change after this loader handed out a
        call skips the ``PREFETCHED_CALLS`` calls the record's loader had prepared at the old length."""
        if max_doc_len == self.max_doc_len:
            return
        if self.handed_out:
            for _ in range(self.PREFETCHED_CALLS):
                self.discarded.append((self._plan()[1], self.max_doc_len))
                self.calls += 1
        self.max_doc_len = max_doc_len

    def _plan(self) -> tuple[int, int]:
        call_tokens = self.world_size * self.span
        for _ in range(len(self.shards.files) + 1):
            if self.cursor + call_tokens <= int(self.shards.num_tokens[self.shard]):
                break
            self._enter_shard((self.shard + 1) % len(self.shards.files))
        else:
            raise DataError(
                f"{self.data_dir}: no train shard holds one call ({call_tokens} tokens) after its first BOS"
            )
        start = self.cursor + self.rank * self.span
        self.cursor += call_tokens
        return self.shard, start

    def _read(self, plan: tuple[int, int]) -> np.ndarray:
        shard, start = plan
        return self.shards.window(shard, start, self.span)

    def next_batch(self) -> PackedBatch:
        shard, start = self._plan()
        span = torch.from_numpy(self._read((shard, start)))
        self.calls += 1
        self.handed_out = True
        inputs = span[:-1]
        # The current shard's BOS list serves: a span never starts in a shard the cursor has left.
        bos = self.bos[np.searchsorted(self.bos, start) : np.searchsorted(self.bos, start + self.tokens_per_rank)]
        cu_seqlens, max_seqlen = build_cu_seqlens(bos - start, inputs.numel(), self.max_doc_len, self.cu_bucket)
        return PackedBatch(inputs[None].contiguous(), span[1:][None].contiguous(), cu_seqlens, max_seqlen)

    def __next__(self) -> PackedBatch:
        return self.next_batch()

    def _position_state(self) -> dict:
        return {"shard": self.shard, "cursor": self.cursor}

    def _load_position(self, state: dict) -> None:
        self._enter_shard(int(state["shard"]))
        self.cursor = int(state["cursor"])


LOADERS = {
    cls.kind: cls
    for cls in (SequentialLoader, ShuffledSequenceLoader, CoprimeStrideLoader, ShardHoldLoader, DocumentPackingLoader)
}


def make_loader(
    kind: str,
    data_dir: str | os.PathLike,
    rank: int,
    world_size: int,
    seq_len: int,
    tokens_per_rank: int,
    vocab_size: int | None = None,
    **options,
) -> TokenLoader:
    """Build a loader by name (``sequential``, ``shuffled``, ``coprime``, ``shard_hold``, ``packed``) over
    ``data_dir``'s fineweb_train_*.bin (``packed`` yields ``PackedBatch`` items rather than ``(x, y)``).

    ``data_dir`` is the dataset folder (e.g. ``data/datasets/fineweb10B_sp1024``); ``tokens_per_rank`` is
    ``train_batch_tokens // (world_size * grad_accum_steps)``; ``vocab_size`` checks every token id; ``options``:
    the loader's own keyword settings (``shard_hold``: seed, hold_steps, shards_per_batch).
    """
    if kind not in LOADERS:
        raise ConfigError(f"loader {kind!r}: expected one of {', '.join(LOADERS)}")
    return LOADERS[kind](data_dir, rank, world_size, seq_len, tokens_per_rank, vocab_size, **options)
