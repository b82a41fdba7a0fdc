"""Score-first test-time training (PR #1334/#1421 ``eval_val_ttt``).

The stream is cut into chunks of ``chunk_tokens`` positions; a window belongs to the chunk where its scored
slice starts. Chunk by chunk: first score the chunk's windows with the current weights (no grad), then train
on the chunk's full sequences, which were all scored in this or an earlier chunk. Weights and SGD momentum
carry over from chunk to chunk; the last chunk is never trained on. Training happens on a deep copy, so the
caller's model is untouched.

Distributed training is world-size invariant: the chunk's sequences form global batches of ``batch_seqs``;
each rank takes a contiguous part of a batch, backpropagates its share of the batch-mean loss, and the
gradients are summed over ranks, so every rank applies the gradient of the whole batch. This equals the
upstream AVG of per-rank means whenever ranks hold equal shares (the records' case), and unlike it does not
deadlock when the shares differ: a rank without sequences still joins every all-reduce, with zero gradients.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_lit.errors import ConfigError
from pgolf_lit.eval.recording import NO_STATE, ScoreRecorder
from pgolf_lit.eval.registry import AuditCase, EvalMethod, PassOutcome, PassSetup
from pgolf_lit.eval.scoring import (
    WINDOW_RULES,
    Window,
    WindowBatch,
    WindowRule,
    at_least_fp32,
    batched,
    model_device,
    progress_bar,
    rank_share,
    score_batch,
    sliding_windows,
    sum_gradients_over_ranks,
)
from pgolf_lit.metrics import BitsPerByte
from pgolf_lit.model.roles import parameter_roles


@dataclass(frozen=True)
class TTTSettings:
    """Score-first TTT on the evaluation's windows. Defaults: the PR #1334 settings on pgolf_lit's exact windows
    (``window_rule: ttt`` reproduces PR #1334)."""

    window_rule: WindowRule = "exact"
    """Window list: ``exact`` (every target once) or ``ttt`` (PR #1334's list: legacy minus short tail windows)."""
    chunk_tokens: int = 32768
    """Stream positions per chunk: score a chunk's windows, then train on its sequences."""
    lr: float = 0.002
    """Peak SGD learning rate (cosine over the chunks)."""
    momentum: float = 0.9
    """SGD momentum, carried from chunk to chunk."""
    epochs: int = 3
    """Passes over each chunk's sequences."""
    batch_seqs: int = 32
    """Windows per scoring batch and sequences per training batch."""
    freeze_blocks: int = 0
    """The first n transformer blocks are not trained."""
    grad_clip: float = 1.0
    """Global-norm clip over the trained parameters; 0 = off."""
    hash_embed_size: int = 0
    """Rows of PR #1529's TTT-time hash embedding (``eval/ttt_hash_embed.py``; upstream HASH_EMBED_ENABLED=1 with
    HASH_EMBED_SIZE=16384): created at zero and trained with the weights; 0 = none."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ConfigError:
            return ConfigError(f"ttt.{name}: {msg}")

        if self.window_rule not in WINDOW_RULES:
            raise bad("window_rule", f"must be one of {WINDOW_RULES}, got {self.window_rule!r}")
        for name in ("chunk_tokens", "batch_seqs"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if self.hash_embed_size < 0:
            raise bad("hash_embed_size", f"must be >= 0 (0 = no hash embedding), got {self.hash_embed_size}")
        if self.epochs < 0 or self.freeze_blocks < 0:
            raise bad("epochs", f"epochs and freeze_blocks must be >= 0, got {self.epochs} / {self.freeze_blocks}")

    @property
    def compliant(self) -> bool:
        """Score-first TTT is compliant (issue #1017's conditions); only the legacy-style window lists re-score
        targets."""
        return self.window_rule == "exact"

    def lr_for_chunk(self, chunk: int, n_chunks: int) -> float:
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * chunk / max(n_chunks - 1, 1)))


def chunk_windows(windows: Sequence[Window], chunk_tokens: int, total: int) -> list[list[Window]]:
    """Windows grouped by the chunk holding the first position of their scored slice."""
    n_chunks = -(-total // chunk_tokens)
    chunks: list[list[Window]] = [[] for _ in range(n_chunks)]
    for w in windows:
        chunks[min((w.ws + w.s) // chunk_tokens, n_chunks - 1)].append(w)
    return chunks


def trainable_parameters(model: nn.Module, freeze_blocks: int) -> list[nn.Parameter]:
    """Every exported parameter outside the first ``freeze_blocks`` blocks (by each parameter's declared layer);
    sets requires_grad accordingly. Training-only heads (MTP) never score, so they are not trained either, nor are
    constants (AsymLogit's caps: no record trains them)."""
    roles = parameter_roles(model)
    trained = []
    for name, p in model.named_parameters():
        role = roles[name]
        frozen = role.kind == "constant" or (role.layer is not None and role.layer < freeze_blocks)
        train = role.exported and not frozen
        p.requires_grad_(train)
        if train:
            trained.append(p)
    return trained


class _ScoreFirstLearner:
    """The adapted copy of the model with its optimizer, scoring and training one chunk at a time."""

    def __init__(self, model: nn.Module, cfg: TTTSettings, setup: PassSetup):
        self.cfg, self.options = cfg, setup.options
        self.seq_len, self.rank, self.world_size = setup.seq_len, setup.rank, setup.world_size
        self.device = model_device(model)
        self.model = copy.deepcopy(model)
        self.params = trainable_parameters(self.model, cfg.freeze_blocks)
        forward = self.model.forward_logits
        if cfg.hash_embed_size:
            from pgolf_lit.eval.ttt_hash_embed import TTTHashEmbedding

            hash_embed = TTTHashEmbedding(self.model, cfg.hash_embed_size)
            self.params.append(hash_embed.table)
            forward = hash_embed.wrap(forward)
        self.optimizer = torch.optim.SGD(self.params, lr=cfg.lr, momentum=cfg.momentum)  # momentum carries over
        self.forward = self.options.compiled(forward)
        self.reads_upto = NO_STATE  # the last stream index any update so far has read

    def score(
        self, tokens: Tensor, windows: Sequence[Window], metric: BitsPerByte, recorder: Optional[ScoreRecorder]
    ) -> None:
        """This rank's share of the chunk's windows, with the current weights, before any training on them."""
        self.model.eval()
        with torch.no_grad():
            for group in batched(rank_share(windows, self.rank, self.world_size), self.cfg.batch_seqs):
                batch = WindowBatch.gather(tokens, group, self.seq_len, self.device)
                with self.options.autocast():
                    logits = self.forward(batch.inputs)
                score_batch(batch, logits, metric, recorder, torch.full((len(group),), self.reads_upto))

    def train(
        self, tokens: Tensor, chunk_start: int, n_seqs: int, lr: float, recorder: Optional[ScoreRecorder]
    ) -> None:
        """``epochs`` passes over the chunk's first ``n_seqs`` full sequences in global batches of ``batch_seqs``."""
        cfg, seq_len = self.cfg, self.seq_len
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        for _ in range(cfg.epochs):
            for first in range(0, n_seqs, cfg.batch_seqs):
                count = min(cfg.batch_seqs, n_seqs - first)
                mine = rank_share(range(first, first + count), self.rank, self.world_size)
                self.optimizer.zero_grad(set_to_none=True)
                if len(mine):
                    seqs = tokens[chunk_start + mine.start * seq_len : chunk_start + mine.stop * seq_len + 1]
                    seqs = seqs.to(device=self.device, dtype=torch.int64)
                    with self.options.autocast():
                        logits = self.forward(seqs[:-1].view(-1, seq_len))
                    loss_sum = F.cross_entropy(
                        at_least_fp32(logits.reshape(-1, logits.size(-1))), seqs[1:], reduction="sum"
                    )
                    (loss_sum / (count * seq_len)).backward()  # this rank's share of the global batch mean
                if self.world_size > 1:
                    sum_gradients_over_ranks(self.params)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.optimizer.step()
                batch_last = chunk_start + (first + count) * seq_len
                self.reads_upto = max(self.reads_upto, batch_last)
                if recorder is not None:
                    recorder.on_update(chunk_start + first * seq_len, batch_last)


def evaluate_ttt(
    model: nn.Module, tokens: Tensor, metric: BitsPerByte, cfg: TTTSettings, setup: PassSetup
) -> PassOutcome:
    """Score-first TTT over the stream; this rank's scores go into ``metric``.

    With ``world_size > 1`` a process group must be initialised (gradients are all-reduced every step).
    ``recorder`` sees each optimizer step as an update reading the stream tokens of its global batch, and
    each score with the last token any update so far has read.
    """
    if setup.world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("TTT with world_size > 1 needs an initialised torch.distributed process group")
    seq_len, recorder = setup.seq_len, setup.recorder
    total = tokens.numel() - 1
    chunks = chunk_windows(sliding_windows(total, seq_len, setup.stride, cfg.window_rule), cfg.chunk_tokens, total)
    learner = _ScoreFirstLearner(model, cfg, setup)
    with progress_bar(len(chunks), "score-first TTT", setup.progress) as bar:
        for index, windows in enumerate(chunks):
            bar.update()
            if not windows:  # as upstream: a chunk without windows is neither scored nor trained on
                continue
            learner.score(tokens, windows, metric, recorder)
            chunk_start = index * cfg.chunk_tokens
            n_seqs = (min(chunk_start + cfg.chunk_tokens, total) - chunk_start) // seq_len
            if index < len(chunks) - 1 and cfg.epochs > 0 and n_seqs > 0:
                learner.train(tokens, chunk_start, n_seqs, cfg.lr_for_chunk(index, len(chunks)), recorder)
    extra = {
        "stride": setup.stride,
        "window_rule": cfg.window_rule,
        "chunk_tokens": cfg.chunk_tokens,
        "ttt_lr": cfg.lr,
        "ttt_epochs": cfg.epochs,
    }
    return PassOutcome(cfg.compliant, extra)


def _audit_ttt(rule: WindowRule, hash_embed_size: int = 0) -> AuditCase:
    # chunks of 64 positions, one epoch; the batch is part of TTT (its training batches); PR #1529's hash embedding
    # with 64 rows at the audit's 40-token vocabulary, so that pairs share rows as they do at 16384 rows
    name = f"ttt_{'score_first' if rule == 'ttt' else rule}" + ("_hash_embed" if hash_embed_size else "")
    return AuditCase(
        name,
        lambda a: TTTSettings(rule, 64, epochs=1, batch_seqs=a.batch_windows, hash_embed_size=hash_embed_size),
        spans_documents=True,
    )


# Score-first test-time training (PR #1334/#1421).
METHODS = (
    EvalMethod(
        "ttt",
        TTTSettings,
        evaluate_ttt,
        "final_{q}_ttt",
        "ttt",
        audit=(_audit_ttt("ttt"), _audit_ttt("exact"), _audit_ttt("exact", hash_embed_size=64)),
    ),
)
