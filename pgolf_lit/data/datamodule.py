"""TokenShardDataModule: streams upstream token shards to the Trainer.

Batch sizes are in tokens and global: ``train_batch_tokens`` per optimizer step whatever the device count.
As upstream, ``grad_accum = grad_accum_base // world_size`` (8 // W on 8 GPUs) and every rank reads
``train_batch_tokens // grad_accum_base`` tokens per micro-batch; one training batch stacks the
``grad_accum`` micro-batches of one optimizer step, so the module steps once per batch.

Validation is the whole val split trimmed as upstream (train_gpt.py ``load_validation_tokens``), split into contiguous
sequence ranges per rank with no padding or duplicates (Lightning's DistributedSampler would duplicate samples, so the
datasets here are rank-aware iterables).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from pgolf_lit.data.loaders import make_loader
from pgolf_lit.data.seq_schedule import SeqSchedule
from pgolf_lit.data.shards import list_shards, load_validation_tokens
from pgolf_lit.data.tokenizer import (
    check_tokenizer_matches_dataset,
    default_tokenizer_path,
    load_tokenizer,
    validation_byte_counts,
)
from pgolf_lit.errors import ConfigError


class TrainSteps(IterableDataset):
    """Infinite stream of optimizer steps: (x, y) int64 tensors of shape [grad_accum, rows, T]; for the document
    packing loader (x, y, cu_seqlens, max_seqlen) with x, y [grad_accum, 1, N] and cu_seqlens int32 [grad_accum, K],
    each micro-batch's boundaries padded with N to the longest of the step (empty segments), so compiled graphs see
    only the loader's few bucket sizes, and ``max_seqlen`` the loader's ``seqlen_bound`` (a Python int: the longest
    segment any row can hold, which varlen attention takes as its launch bound).

    ``deferred`` (progressive context growth): the stream yields ``PendingStep`` items instead, whose batch is read
    when the step runs (``PendingStep.take``), at the cut length of that step. ``skipped_before``: calls the loader
    skipped at length changes before a resume (added to ``skipped_calls``)."""

    def __init__(self, loader, grad_accum: int, deferred: bool = False, skipped_before: int = 0):
        self.loader = loader
        self.grad_accum = grad_accum
        self.deferred = deferred
        self.skipped_before = skipped_before

    @property
    def skipped_calls(self) -> int:
        """Loader calls skipped at cut-length changes so far (a resume fast-forwards past them too)."""
        return self.skipped_before + len(getattr(self.loader, "discarded", ()))

    def take(self, cut_len: Optional[int] = None) -> tuple[torch.Tensor, ...]:
        """The next step's batch; with ``cut_len`` the packing loader cuts documents at that length from now on."""
        if cut_len is not None:
            self.loader.set_max_doc_len(cut_len)
        batches = [self.loader.next_batch() for _ in range(self.grad_accum)]
        if len(batches[0]) == 2:
            xs, ys = zip(*batches)
            return torch.stack(xs), torch.stack(ys)
        n = batches[0].inputs.size(-1)
        width = max(b.cu_seqlens.numel() for b in batches)
        cu = torch.full((len(batches), width), n, dtype=torch.int32)
        for i, b in enumerate(batches):
            cu[i, : b.cu_seqlens.numel()] = b.cu_seqlens
        return (
            torch.stack([b.inputs for b in batches]),
            torch.stack([b.targets for b in batches]),
            cu,
            self.loader.seqlen_bound,
        )

    def __iter__(self) -> Iterator:
        while True:
            yield PendingStep(self) if self.deferred else self.take()


class PendingStep:
    """A training step whose batch is read when the step runs, not when Lightning fetches it (one step ahead): its
    cut length follows the training clock at the step (``TokenShardDataModule.on_before_batch_transfer`` takes it)."""

    __slots__ = ("steps",)

    def __init__(self, steps: TrainSteps):
        self.steps = steps

    def take(self, cut_len: int) -> tuple[torch.Tensor, ...]:
        return self.steps.take(cut_len)


class PassIndices(IterableDataset):
    """0 .. n-1 on every rank: iterable, so Lightning never shards it with a DistributedSampler (which would hand
    different passes to different ranks and deadlock their collectives), whatever ``use_distributed_sampler`` says."""

    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


class ValSequences(IterableDataset):
    """This rank's contiguous range of non-overlapping val sequences, ``seqs_per_batch`` at a time, each
    ``seq_len + 1`` tokens (inputs and shifted targets)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, seqs_per_batch: int, rank: int, world_size: int):
        total = (tokens.numel() - 1) // seq_len
        self.tokens, self.seq_len, self.seqs_per_batch = tokens, seq_len, seqs_per_batch
        self.first, self.last = total * rank // world_size, total * (rank + 1) // world_size

    def __len__(self) -> int:
        """Batches on this rank (so validation bars have a length)."""
        return -(-(self.last - self.first) // self.seqs_per_batch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(sequences [B, seq_len + 1], the stream position of the first one's first token)."""
        for a in range(self.first, self.last, self.seqs_per_batch):
            b = min(a + self.seqs_per_batch, self.last)
            seqs = self.tokens[a * self.seq_len : b * self.seq_len + 1].unfold(0, self.seq_len + 1, self.seq_len)
            yield seqs, torch.tensor(a * self.seq_len)


class TokenShardDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str = "data/datasets/fineweb10B_sp1024",
        tokenizer_path: Optional[str] = None,
        vocab_size: int = 1024,
        train_batch_tokens: int = 524_288,
        train_seq_len: int = 1024,
        grad_accum_base: int = 8,
        loader: str = "sequential",
        val_seq_len: Optional[int] = None,
        val_batch_tokens: int = 524_288,
        val_max_tokens: int = 0,
        val_include_tail: bool = False,
        build_embedded: bool = False,
        seq_schedule: str = "",
        shard_hold_steps: int = 64,
        shards_per_batch: int = 1,
        loader_seed: Optional[int] = None,
    ):
        """
        Args:
            data_dir: the dataset directory holding ``fineweb_train_*.bin`` and ``fineweb_val_*.bin``.
            tokenizer_path: SentencePiece model for the byte LUTs; default
                ``<data_dir>/../../tokenizers/fineweb_<vocab_size>_bpe.model`` (the upstream layout).
            vocab_size: must equal the tokenizer's and the model's (linked to ``model.gpt.vocab_size``).
            train_batch_tokens: global tokens per optimizer step (upstream TRAIN_BATCH_TOKENS).
            train_seq_len: training sequence length (upstream TRAIN_SEQ_LEN).
            grad_accum_base: world_size × grad_accum; upstream hard-codes 8, so a world size must divide it.
            loader: ``sequential`` (baseline, PR #1263/#1278/#1321), ``shuffled`` (PR #1394), ``coprime``
                (PR #1333/#1334/#1421) or ``packed`` (PR #1855: whole documents packed into one row per
                micro-batch, with their ``cu_seqlens`` for varlen attention).
            val_seq_len: sequence length of validation and of the val trimming (default train_seq_len); under
                ``pgolf`` it is linked to ``model.evaluation.seq_len``, the evaluation window length.
            val_batch_tokens: global validation tokens per step (upstream VAL_BATCH_SIZE / VAL_BATCH_TOKENS).
            val_max_tokens: score only the first N val tokens (0 = the whole split); for quick CPU runs only.
            val_include_tail: keep the whole val split instead of trimming it to a multiple of val_seq_len (plus
                one); under ``pgolf`` linked to ``model.evaluation.include_tail`` (upstream EVAL_INCLUDE_TAIL).
            build_embedded: if the data directory does not exist, build it from the embedded stdlib corpus
                (the CPU demo's first run).
            seq_schedule: progressive context growth (PR #2014 TRAIN_SEQ_SCHEDULE, ``data/seq_schedule.py``):
                ``LENGTH@FRACTION,...`` such as ``1024@0.1,2048@0.7,3072@1.0``, the packed documents' cut length
                by training fraction (the packed row stays the micro-batch; each length must divide it and none
                exceed train_seq_len); empty: train_seq_len throughout. Needs ``loader: packed``.
            shard_hold_steps: ``loader: shard_hold`` (PR #1120): calls each rank stays on its shard (upstream
                COPRIME_SHARD_HOLD_STEPS).
            shards_per_batch: ``loader: shard_hold``: shards one call reads (upstream COPRIME_SHARDS_PER_BATCH).
            loader_seed: ``loader: shard_hold``: the seed of its walks (upstream SEED); None = the run's seed (what
                ``seed_everything`` set, read when the loader is built).
        """
        super().__init__()
        self.data_dir = Path(data_dir)
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self.vocab_size = vocab_size
        self.train_batch_tokens = train_batch_tokens
        self.train_seq_len = train_seq_len
        self.grad_accum_base = grad_accum_base
        self.loader_kind = loader
        self.val_seq_len = val_seq_len or train_seq_len
        self.val_batch_tokens = val_batch_tokens
        self.val_max_tokens = val_max_tokens
        self.val_include_tail = val_include_tail
        self.build_embedded = build_embedded
        self.seq_schedule = seq_schedule
        self.shard_hold_steps, self.shards_per_batch, self.loader_seed = shard_hold_steps, shards_per_batch, loader_seed
        self.seq_plan = SeqSchedule.parse(seq_schedule, train_seq_len) if str(seq_schedule).strip() else None
        if self.seq_plan is not None and loader != "packed":
            raise ConfigError(f"data.seq_schedule: needs loader 'packed' (it cuts packed documents), got {loader!r}")
        self.luts = None  # the tokenizer's byte LUTs (byte_counts.luts)
        self.byte_counts = None  # ByteCounts: the LUTs, and the val byte sidecar where the split has one
        self.val_tokens: Optional[torch.Tensor] = None
        self.train_calls_skipped = 0  # loader calls skipped at length changes (seq_schedule); saved in checkpoints
        self.rank, self.world_size = 0, 1
        self._check_values()
        self._check_sizes()

    # --- sizes -----------------------------------------------------------------------------------------
    def _check_values(self) -> None:
        """Types and ranges of the size arguments, each named (a 0 would divide by zero further on)."""

        def integer(name: str, value, low: int, what: str) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"data.{name}: must be {what}, got {value!r}")

        for name in ("train_batch_tokens", "train_seq_len", "grad_accum_base", "val_batch_tokens"):
            integer(name, getattr(self, name), 1, "a positive integer")
        integer("val_seq_len", self.val_seq_len, 1, "a positive integer (or null: train_seq_len)")
        integer("val_max_tokens", self.val_max_tokens, 0, "0 (the whole split) or a positive number of tokens")

    def _check_sizes(self, world_size: int = 1) -> None:
        if self.grad_accum_base % world_size:
            raise ConfigError(
                f"data.grad_accum_base: world size {world_size} does not divide {self.grad_accum_base} "
                f"(gradient accumulation is grad_accum_base // world_size)"
            )
        micro = self.train_batch_tokens // self.grad_accum_base
        if self.train_batch_tokens % self.grad_accum_base or micro % self.train_seq_len:
            raise ConfigError(
                f"data.train_batch_tokens: {self.train_batch_tokens} must split into {self.grad_accum_base} "
                f"micro-batches of whole sequences of train_seq_len {self.train_seq_len}"
            )
        if self.seq_plan is not None:
            self.seq_plan.check_micro_batch(micro)
        if self.val_batch_tokens // self.grad_accum_base < self.val_seq_len:
            raise ConfigError(
                f"data.val_batch_tokens: {self.val_batch_tokens} / {self.grad_accum_base} is less than one "
                f"sequence of val_seq_len {self.val_seq_len}"
            )

    @property
    def grad_accum(self) -> int:
        return self.grad_accum_base // self.world_size

    @property
    def micro_batch_tokens(self) -> int:
        """Tokens per rank per micro-batch; fixed, so the global batch does not depend on the world size."""
        return self.train_batch_tokens // self.grad_accum_base

    @property
    def default_tokenizer_path(self) -> Path:
        return default_tokenizer_path(self.data_dir, self.vocab_size)

    # --- Lightning hooks -------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.build_embedded and not self.data_dir.exists():
            from pgolf_lit.data.build import build_embedded_dataset

            build_embedded_dataset(self.data_dir, self.vocab_size)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        self._check_sizes(self.world_size)
        if self.val_tokens is None:
            trim = 1 if self.val_include_tail else self.val_seq_len  # a multiple of 1 (+ 1): every token
            tokens = load_validation_tokens(self.data_dir, trim, self.vocab_size)
            if self.val_max_tokens:
                keep = max(self.val_max_tokens // self.val_seq_len, 1) * self.val_seq_len
                tokens = tokens[: min(keep, tokens.numel() - 1) + 1]
            self.val_tokens = tokens
            self.byte_counts = None
        if self.byte_counts is None:
            tokenizer_path = self.tokenizer_path or self.default_tokenizer_path
            sp = load_tokenizer(tokenizer_path, self.vocab_size)
            check_tokenizer_matches_dataset(sp, tokenizer_path, self.data_dir)
            self.byte_counts = validation_byte_counts(sp, self.vocab_size, self.data_dir, self.val_tokens.numel())
            self.luts = self.byte_counts.luts
        if stage in (None, "fit"):
            list_shards(self.data_dir, "train")  # a clear error now, not at the first batch

    def make_train_loader(self, skip_steps: int = 0, kind: Optional[str] = None):
        """A fresh training loader for this rank (``kind``: another loader than the training one, e.g. the
        shuffled sequences PR #1855 calibrates GPTQ on), fast-forwarded past ``skip_steps`` optimizer steps."""
        kind = kind or self.loader_kind
        loader = make_loader(
            kind,
            self.data_dir,
            rank=self.rank,
            world_size=self.world_size,
            seq_len=self.train_seq_len,
            tokens_per_rank=self.micro_batch_tokens,
            vocab_size=self.vocab_size,
            **(self._shard_hold_options() if kind == "shard_hold" else {}),
        )
        if skip_steps:
            loader.skip(skip_steps * self.grad_accum)
        return loader

    def _shard_hold_options(self) -> dict:
        seed = self.loader_seed
        if seed is None:  # the run's seed (seed_everything leaves it in PL_GLOBAL_SEED), else upstream's 1337
            seed = int(os.environ.get("PL_GLOBAL_SEED", 1337))
        return {"seed": seed, "hold_steps": self.shard_hold_steps, "shards_per_batch": self.shards_per_batch}

    def train_dataloader(self) -> DataLoader:
        # On resume the trainer has restored global_step before building dataloaders: continue the stream there.
        skip = self.trainer.global_step if self.trainer is not None else 0
        loader = self.make_train_loader(skip)
        skipped = self.train_calls_skipped if skip else 0  # and past the calls skipped at length changes before it
        loader.skip(skipped)
        steps = TrainSteps(loader, self.grad_accum, deferred=self.seq_plan is not None, skipped_before=skipped)
        return DataLoader(steps, batch_size=None, pin_memory=torch.cuda.is_available())

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """A deferred training step (``seq_schedule``) is read now, at the cut length the module's schedule gives
        this step: Lightning fetched it a step ahead, before the training clock could tell the step's stage."""
        if isinstance(batch, PendingStep):
            pending, batch = batch, batch.take(self.trainer.lightning_module.step_schedule().seq_len)
            self.train_calls_skipped = pending.steps.skipped_calls
        return batch

    def state_dict(self) -> dict:
        return {"train_calls_skipped": self.train_calls_skipped} if self.seq_plan is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_calls_skipped = int(state_dict.get("train_calls_skipped", 0))

    def _val_loader(self) -> DataLoader:
        seqs = max(self.val_batch_tokens // self.grad_accum_base // self.val_seq_len, 1)
        ds = ValSequences(self.val_tokens, self.val_seq_len, seqs, self.rank, self.world_size)
        return DataLoader(ds, batch_size=None, pin_memory=torch.cuda.is_available())

    def val_dataloader(self) -> DataLoader:
        return self._val_loader()

    def test_dataloader(self) -> DataLoader:
        """One item per evaluation pass of the module (``test_methods``); every rank runs every pass, and each
        pass splits its windows across the ranks itself."""
        methods = getattr(self.trainer.lightning_module, "test_methods", ["standard"])
        return DataLoader(PassIndices(len(methods)), batch_size=None)
