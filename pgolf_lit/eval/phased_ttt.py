"""Phased score-first TTT (PR #1855 train_gpt.py ``eval_val_ttt_phased``, ``train_val_ttt_global_sgd_distributed``)
and its diagnostic, the document-isolated varlen eval (the same script's ``eval_val``).

Documents are the stretches from one BOS to the next BOS inclusive (the next document's BOS is a document's last
target); the last one ends at the stream end. They are sorted by length, cut into batches of ``batch_docs``, and
the batches are scored longest first. A batch is scored chunk by chunk with one LoRA adapter per document
(``pgolf_lit.model.lora``): each chunk is scored first, then the document's adapter takes one AdamW step on it, so
a chunk only ever influences later chunks of its own document. Each window holds up to ``context`` tokens of the
document's own left context. Between batches, three times, the whole base model is fine-tuned by SGD on the
documents scored so far (the "global phases"); later batches are scored with the updated model.

State that carries across documents, as in the record: the adapters' A matrices (warm start; fresh ones only for
a batch of another size and after a global phase) and the base weights changed by the global phases. Both only
ever learned from documents already scored.

Ranks: the record's ranks claim batches from a file counter in /tmp and pause for a phase once a shared document
count reaches its boundary; every other rank first finishes the batch it holds, so on 8 ranks 7 more batches are
scored before each phase than on one. Here the phases sit at fixed queue positions computed from the world size
the schedule follows (``phase_cuts``: after the batch that reaches each boundary, plus one batch in flight per
other rank; ``PhasedTTTSettings.schedule_world``, default the evaluating world, so one process can reproduce the
record's 8-rank phases), and between them every rank deals the batches the same way, each to the rank with the
least predicted work (``deal``): no shared file system, a reproducible run, and with one rank the record's order
exactly.

The recorder sees every scored position with the largest stream index read by any update its adapter or the base
weights depend on, and every update with the stream range it read (a global-SGD step: the range of the stream
positions of the documents it trained on).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_lit.data.packing import build_cu_seqlens
from pgolf_lit.errors import ConfigError
from pgolf_lit.eval.context import ForwardOptions
from pgolf_lit.eval.recording import NO_STATE, ScoreRecorder
from pgolf_lit.eval.registry import AuditCase, EvalMethod, PassOutcome, PassSetup
from pgolf_lit.eval.scoring import (
    Window,
    WindowBatch,
    at_least_fp32,
    batched,
    eval_mode,
    model_device,
    progress_bar,
    rank_share,
    score_batch,
    sequence_windows,
    sum_gradients_over_ranks,
)
from pgolf_lit.metrics import BitsPerByte
from pgolf_lit.model.lora import DEFAULT_ALPHA, BatchedTTTLoRA
from pgolf_lit.model.roles import parameter_roles


# ---------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------


@dataclass
class PhasedTTTSettings:
    """Phased score-first TTT. Defaults: PR #1855's record values (its env and the script's defaults), except
    ``schedule_world`` (the evaluating world; the record's config sets its 8)."""

    chunk: int = 48
    """Positions scored per step of a document (TTT_CHUNK_SIZE); its adapter trains on each chunk after scoring it."""
    short_doc_chunks: list[list[int]] = field(default_factory=list)
    """Short-document score-first chunks (PR #2014 TTT_SHORT_SCORE_FIRST_STEPS=256:8,2000:24 as [[256, 8], [2000,
    24]]): a batch whose longest document (BOS to the next BOS inclusive) has at most N tokens uses the chunk of the
    first such [N, chunk] by N, all its documents alike; longer ones use ``chunk``. Empty: ``chunk`` always."""
    context: int = 2048
    """Longest window of a document: a chunk sees up to this many tokens of its own document (TTT_EVAL_SEQ_LEN)."""
    batch_docs: int = 64
    """Documents adapted together, one adapter each (TTT_BATCH_SIZE)."""
    lora_rank: int = 80
    """Rank of every adapter (TTT_LORA_RANK)."""
    lora_alpha: float = DEFAULT_ALPHA
    """Adapter outputs are scaled by alpha / rank (TTT_LORA_ALPHA)."""
    warm_start_a: bool = True
    """A full batch keeps the previous batch's trained A matrices, only B is zeroed (TTT_WARM_START_A)."""
    q_lora: bool = True
    """Adapters on the queries (TTT_Q_LORA; PR #1953's TTT_MASK=no_qv turns it and v_lora off)."""
    k_lora: bool = True
    """Adapters on the keys (TTT_K_LORA; off in PR #2135)."""
    v_lora: bool = True
    """Adapters on the values (TTT_V_LORA; off with PR #1953's TTT_MASK=no_qv)."""
    o_lora: bool = True
    """Low-rank bypass around each attention (TTT_O_LORA)."""
    mlp_lora: bool = True
    """Low-rank bypass around each MLP (TTT_MLP_LORA)."""
    lora_lr: float = 1e-4
    """AdamW learning rate of the adapters (TTT_LORA_LR), times local_lr_mult."""
    local_lr_mult: float = 1.0
    """Multiplier of lora_lr for the per-document adapters (TTT_LOCAL_LR_MULT; PR #1953: 0.75, i.e. 7.5e-5)."""
    beta1: float = 0.0
    """AdamW beta1 (TTT_BETA1)."""
    beta2: float = 0.99
    """AdamW beta2 (TTT_BETA2)."""
    eps: float = 1e-10
    """AdamW epsilon."""
    weight_decay: float = 0.5
    """AdamW decoupled weight decay of the adapters (TTT_WEIGHT_DECAY)."""
    grad_steps: int = 1
    """AdamW steps per scored chunk (TTT_GRAD_STEPS); 0 = no adaptation."""
    prefix_docs: int = 2500
    """Documents the global phases train on in total (PHASED_TTT_PREFIX_DOCS); 0 = no global phases."""
    num_phases: int = 3
    """Global phases, at equal shares of ``prefix_docs`` scored documents (PHASED_TTT_NUM_PHASES)."""
    global_lr: float = 0.001
    """Peak SGD learning rate of a global phase, cosine over its chunks (GLOBAL_TTT_LR)."""
    global_momentum: float = 0.9
    """SGD momentum of a global phase, fresh each phase (GLOBAL_TTT_MOMENTUM)."""
    global_epochs: int = 1
    """Passes over each chunk of a global phase (GLOBAL_TTT_EPOCHS); 0 = phases train nothing."""
    global_grad_clip: float = 1.0
    """Global-norm clip of a global-phase step; 0 = off (GLOBAL_TTT_GRAD_CLIP)."""
    global_chunk_tokens: int = 32768
    """Tokens per chunk of a global phase's training stream; the last is never trained (GLOBAL_TTT_CHUNK_TOKENS)."""
    global_batch_seqs: int = 32
    """Evaluation-length sequences per global-phase step, over all ranks (GLOBAL_TTT_BATCH_SEQS)."""
    global_respect_doc_boundaries: bool = True
    """Global-phase sequences attend within their documents (a packed row with BOS boundaries)."""
    global_warmup_chunks: int = 0
    """Chunks of linear lr warmup before the cosine (GLOBAL_TTT_WARMUP_CHUNKS)."""
    global_warmup_start_lr: float = 0.0
    """Learning rate of the first warmup chunk (GLOBAL_TTT_WARMUP_START_LR)."""
    lora_seed: Optional[int] = 0
    """Seed of the adapters' random A matrices, so every evaluation of an artifact gives the same score; None =
    torch's global generator (the record: whatever state training left it in)."""
    compile_warmup: bool = True
    """With compiled forwards: compile on random tokens before scoring (never on validation data)."""
    schedule_world: Optional[int] = None
    """Ranks whose schedule the global phases follow: each phase runs once the batch reaching its boundary and one
    batch in flight on every other rank are scored (``phase_cuts``). None = the evaluating world size; PR #1855's
    config sets 8, the record's world, so one GPU pauses where its 8 ranks did (1,296 / 2,128 / 2,960 documents
    scored before the phases, against 848 / 1,680 / 2,512 on one rank)."""

    def __post_init__(self) -> None:
        def bad(name: str, msg: str) -> ConfigError:
            return ConfigError(f"evaluation.phased_ttt.{name}: {msg}")

        for name in (
            "chunk",
            "context",
            "batch_docs",
            "lora_rank",
            "num_phases",
            "global_chunk_tokens",
            "global_batch_seqs",
        ):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if self.chunk > self.context:
            raise bad("chunk", f"must be at most context={self.context}, got {self.chunk}")
        for n, c in self.short_doc_chunks:
            if min(n, c) <= 0 or c > self.context:
                raise bad("short_doc_chunks", f"[{n}, {c}]: expected [max_doc_len, chunk], 0 < chunk <= context")
        for name in ("grad_steps", "prefix_docs", "global_epochs", "global_warmup_chunks"):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        for name in (
            "lora_lr",
            "local_lr_mult",
            "weight_decay",
            "global_lr",
            "global_momentum",
            "global_grad_clip",
            "eps",
        ):
            if getattr(self, name) < 0:
                raise bad(name, f"must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise bad(name, f"must lie in [0, 1), got {getattr(self, name)}")
        if self.schedule_world is not None and (isinstance(self.schedule_world, bool) or self.schedule_world < 1):
            raise bad("schedule_world", f"must be a positive rank count or null, got {self.schedule_world!r}")

    def chunk_for(self, longest_doc: int) -> int:
        """The chunk of a batch whose longest document has ``longest_doc`` tokens (``short_doc_chunks``)."""
        return next((c for n, c in sorted(self.short_doc_chunks) if longest_doc <= n), self.chunk)

    def phase_boundaries(self, n_docs: int) -> list[int]:
        """Scored-document counts after which each global phase runs (the record's boundaries)."""
        prefix = max(0, min(n_docs, self.prefix_docs))
        return [prefix * (i + 1) // self.num_phases for i in range(self.num_phases)]

    def global_lr_for_chunk(self, chunk: int, n_chunks: int) -> float:
        warmup = max(0, min(self.global_warmup_chunks, n_chunks - 1))
        if warmup > 0 and chunk < warmup:
            t = chunk / max(warmup - 1, 1)
            return self.global_warmup_start_lr + (self.global_lr - self.global_warmup_start_lr) * t
        decay_steps = max(n_chunks - 1 - warmup, 1)
        return self.global_lr * 0.5 * (1.0 + math.cos(math.pi * max(chunk - warmup, 0) / decay_steps))


@dataclass
class DocIsolatedSettings:
    """The document-isolated diagnostic: non-overlapping ``seq_len`` sequences, each batch one packed row whose
    documents attend only within themselves, every document piece at most ``seq_len`` long."""

    batch_seqs: int = 32
    """Sequences per packed row (per rank: the record's VAL_BATCH_SIZE / 8 ranks / 2048)."""

    def __post_init__(self) -> None:
        if self.batch_seqs <= 0:
            raise ConfigError(f"evaluation.doc_isolated.batch_seqs: must be positive, got {self.batch_seqs}")


# ---------------------------------------------------------------------------------------------------------
# Documents and the queue
# ---------------------------------------------------------------------------------------------------------


def find_documents(tokens: Tensor, bos_id: int) -> list[tuple[int, int]]:
    """(start, length) of each document: BOS to the next BOS inclusive, the last one to the stream end (the
    record's ``_find_docs``). A stream not starting with BOS gets a first document from 0 (the record streams
    always start with BOS), so every target is scored; a document with nothing to predict is left out."""
    bos = (tokens == bos_id).nonzero(as_tuple=True)[0].tolist()
    if not bos or bos[0] != 0:
        bos = [0] + bos
    n = tokens.numel()
    docs = []
    for i, start in enumerate(bos):
        end = bos[i + 1] + 1 if i + 1 < len(bos) else n
        if end - start >= 2:
            docs.append((start, end - start))
    return docs


def document_queue(docs: list[tuple[int, int]], batch_docs: int) -> list[tuple[int, list[int]]]:
    """Batches of document indices in scoring order: sorted by length (stable), cut into ``batch_docs``, then the
    batches ordered by their longest document, longest first (ties keep their order); each with its index in the
    ascending cut (the record's ``_build_ttt_global_batches``)."""
    ascending = sorted(range(len(docs)), key=lambda i: docs[i][1])
    batches = [ascending[i : i + batch_docs] for i in range(0, len(ascending), batch_docs)]
    indexed = list(enumerate(batches))
    indexed.sort(key=lambda ib: -max(docs[i][1] for i in ib[1]))
    return indexed


# ---------------------------------------------------------------------------------------------------------
# Phased TTT
# ---------------------------------------------------------------------------------------------------------


def phase_cuts(batch_sizes: list[int], boundaries: list[int], world_size: int = 1) -> list[int]:
    """Queue positions after which the global phases run, as ``world_size`` ranks of the record reach them.

    The record (``eval_val_ttt_phased``): after each batch a rank adds its documents to a shared count, raises the
    pause flag once the count reaches the current boundary, and pauses if the flag is up; a rank that finished
    before the flag went up has already claimed its next batch, so each other rank scores one more batch before
    the phase. Taking batches to finish in the order they were claimed, phase p runs after batch
    ``m + world_size - 1`` (capped at the queue's end), where m is the first batch that brings the scored documents
    to ``boundaries[p]`` and at least one past the previous phase (the count is checked after a batch; on resuming
    every rank claims one). None when every boundary is 0; none once the queue is used up (where fewer batches
    are left than ranks, the record's ranks that find the queue empty leave while the others wait for them at the
    pause; here the phase follows the last batch). A pure function of its arguments. At the records' settings the
    counts do not depend on the finishing order (PR #1855's logs: 1,296 / 2,128 / 2,960 documents scored on 8
    ranks; tests/eval/test_phased_ttt.py simulates the protocol with random batch times); in general a short batch
    finishing late can move a phase by one batch."""
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not boundaries or boundaries[-1] == 0:
        return []
    n = len(batch_sizes)
    cuts, scored, k = [], 0, 0  # scored = documents in the first k batches
    for boundary in boundaries:
        if k == n:
            break
        scored, k = scored + batch_sizes[k], k + 1  # a check follows a batch
        while scored < boundary and k < n:
            scored, k = scored + batch_sizes[k], k + 1
        in_flight_end = min(k + world_size - 1, n)  # the other ranks finish the batches they hold
        while k < in_flight_end:
            scored, k = scored + batch_sizes[k], k + 1
        cuts.append(k)
    return cuts


def batch_cost(docs: list[tuple[int, int]], batch: list[int], cfg: PhasedTTTSettings) -> int:
    """Token cells the batch's forwards compute: every chunk runs all its rows at the chunk's window width."""
    chunk = cfg.chunk_for(max(docs[i][1] for i in batch))
    chunks = max(-(-(docs[i][1] - 1) // chunk) for i in batch)
    return len(batch) * sum(min((ci + 1) * chunk, cfg.context) for ci in range(chunks))


def deal(
    segment: list[tuple[int, list[int]]],
    docs: list[tuple[int, int]],
    cfg: PhasedTTTSettings,
    rank: int,
    world_size: int,
    offset: int,
) -> list[int]:
    """This rank's queue items of one segment between global phases: each item, in queue order, goes to the rank
    with the least work dealt so far (ties to the lower rank), the work being ``batch_cost``. It mimics the
    record's first-free-rank-claims-next queue without its shared file; every rank computes the same deal."""
    if world_size == 1:
        return list(range(offset, offset + len(segment)))
    loads, mine = [0] * world_size, []
    for k, (_, batch) in enumerate(segment):
        target = min(range(world_size), key=lambda r: (loads[r], r))
        loads[target] += batch_cost(docs, batch, cfg)
        if target == rank:
            mine.append(offset + k)
    return mine


LoraFactory = Callable[[nn.Module, int], BatchedTTTLoRA]  # (the adapted model, batch size) -> adapters


class _PhasedLearner:
    """The adapted copy of the model, the reusable adapters and their optimizer."""

    def __init__(
        self, model: nn.Module, cfg: PhasedTTTSettings, options: ForwardOptions, lora_factory: Optional[LoraFactory]
    ):
        self.cfg, self.options = cfg, options
        self.device = model_device(model)
        self.model = copy.deepcopy(model)  # the global phases change the base weights; the caller's stay
        self.model.eval()
        roles = parameter_roles(self.model)
        # every exported parameter (the record trains all of base_model.parameters(); training-only heads never score)
        self.global_params = [p for name, p in self.model.named_parameters() if roles[name].exported]
        self._freeze()
        generator = None
        if cfg.lora_seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(cfg.lora_seed)
        if lora_factory is None:
            self.new_lora = lambda bsz: self.adapters(bsz, generator)
        else:
            self.new_lora = lambda bsz: lora_factory(self.model, bsz)
        # dynamic shapes: every chunk index gives another window length (the record compiles forward_ttt so too)
        self.forward = options.compiled(self.model.forward_ttt, dynamic=True)
        self.reusable = self.new_lora(cfg.batch_docs)
        self.reusable_reads = torch.full((cfg.batch_docs,), NO_STATE, dtype=torch.int64)

    def adapters(self, bsz: int, generator: Optional[torch.Generator]) -> BatchedTTTLoRA:
        """``bsz`` adapters as the settings shape them: fp32 as the record's (under bf16 autocast), fp64 for an fp64
        model (the audit)."""
        cfg = self.cfg
        lora = BatchedTTTLoRA(
            self.model,
            bsz,
            cfg.lora_rank,
            cfg.lora_alpha,
            q=cfg.q_lora,
            k=cfg.k_lora,
            v=cfg.v_lora,
            o=cfg.o_lora,
            mlp=cfg.mlp_lora,
            generator=generator,
        )
        return lora.to(torch.promote_types(self.model.tok_emb.weight.dtype, torch.float32))

    def _freeze(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)

    def optimizer(self, lora: BatchedTTTLoRA) -> torch.optim.Optimizer:
        cfg = self.cfg
        fused = self.device.type in ("cuda", "cpu") and all(p.is_floating_point() for p in lora.parameters())
        return torch.optim.AdamW(
            lora.parameters(),
            lr=cfg.lora_lr * cfg.local_lr_mult,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            fused=fused,
        )

    def adapters_for(self, bsz: int) -> tuple[BatchedTTTLoRA, Tensor]:
        """A full batch reuses the adapters (B zeroed, A kept or redrawn), any other size gets fresh ones; with
        the stream index each slot's A has read up to."""
        if bsz == self.reusable.bsz:
            self.reusable.reset(self.cfg.warm_start_a)
            if not self.cfg.warm_start_a:
                self.reusable_reads.fill_(NO_STATE)
            return self.reusable, self.reusable_reads
        return self.new_lora(bsz), torch.full((bsz,), NO_STATE, dtype=torch.int64)

    def after_global_phase(self) -> None:
        self._freeze()
        self.reusable = self.new_lora(self.cfg.batch_docs)
        self.reusable_reads = torch.full((self.cfg.batch_docs,), NO_STATE, dtype=torch.int64)

    def warm_up_compile(self, vocab_size: int) -> None:
        """Compile the TTT forward and backward at the shortest and longest window on random tokens with a
        throw-away adapter (the record's warmup; no validation token is read). Draws no adapter randomness."""
        cfg = self.cfg
        lora = self.adapters(cfg.batch_docs, torch.Generator(self.device).manual_seed(0))
        opt = self.optimizer(lora)
        generator = torch.Generator(self.device).manual_seed(0)
        for length in (*(c for _, c in cfg.short_doc_chunks), cfg.chunk, cfg.context):
            x, y = (
                torch.randint(0, vocab_size, (cfg.batch_docs, length), device=self.device, generator=generator)
                for _ in range(2)
            )
            with self.options.autocast():
                loss = self.forward(x, y, lora)
            loss[:, : min(cfg.chunk, length)].mean(dim=-1).sum().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def _ttt_logits(model: nn.Module, x: Tensor, lora: BatchedTTTLoRA) -> Tensor:
    """The logits ``forward_ttt`` scores (for the recorder, which needs the whole distributions)."""
    return model.logits_from_normed(model.normalize_hidden(model.forward_hidden(x, lora=lora)), lora=lora)


def _score_and_train_batch(
    learner: _PhasedLearner,
    tokens: Tensor,
    docs: list[tuple[int, int]],
    metric: BitsPerByte,
    recorder: Optional[ScoreRecorder],
    global_reads: int,
    train_first: bool = False,
    tilt: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
) -> None:
    """One batch of documents, chunk by chunk in lockstep: score the chunk of every document, then one AdamW
    step per ``grad_steps`` on the documents whose chunk is not their last. ``train_first`` swaps the two (a
    deliberately leaking variant, only for the audit's negative control)."""
    cfg, device, model = learner.cfg, learner.device, learner.model
    bsz = len(docs)
    chunk = cfg.chunk_for(max(n for _, n in docs))
    lora, slot_reads = learner.adapters_for(bsz)
    optimizer = learner.optimizer(lora)
    starts = torch.tensor([s for s, _ in docs], dtype=torch.int64)
    pred_lens = torch.tensor([n - 1 for _, n in docs], dtype=torch.int64)
    num_chunks = (pred_lens + chunk - 1) // chunk
    last = tokens.numel() - 1
    for ci in range(int(num_chunks.max())):
        active = ci < num_chunks
        trains = (num_chunks - 1 > ci) & active
        chunk_start = ci * chunk
        chunk_end = torch.where(num_chunks - 1 == ci, pred_lens, torch.full_like(pred_lens, (ci + 1) * chunk))
        win_start = (chunk_end - cfg.context).clamp_min(0)
        win_len = torch.where(active, chunk_end - win_start, 0)
        # the common window of a full chunk: every training row has it (its chunk is not its document's last)
        full_end = (ci + 1) * chunk
        width = min(full_end, cfg.context)
        train_offset = chunk_start - max(0, full_end - cfg.context)
        cols = torch.arange(width)
        positions = starts[:, None] + win_start[:, None] + cols  # stream index of each input cell
        inside = cols < win_len[:, None]
        inputs = torch.where(inside, tokens[positions.clamp(max=last)], 0).long().to(device)
        targets = torch.where(inside, tokens[(positions + 1).clamp(max=last)], 0).long().to(device)
        local = cols + win_start[:, None]  # position inside the document
        scored = inside & (local >= chunk_start)
        batch = WindowBatch(
            windows=[Window(0, 0, width)] * bsz,
            inputs=inputs,
            targets=targets,
            positions=positions.to(device),
            scored=scored.to(device),
        )

        def forward() -> tuple[Tensor, Optional[Tensor]]:
            with learner.options.autocast():
                if recorder is None and tilt is None:
                    return learner.forward(inputs, targets, lora), None
                logits = _ttt_logits(model, inputs, lora)
            nll = F.cross_entropy(
                at_least_fp32(logits).reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
            ).view(bsz, width)
            return nll, logits

        def train(per_token: Optional[Tensor]) -> None:
            mask = trains.to(device=device, dtype=torch.float32)
            for step in range(cfg.grad_steps):
                if per_token is None or step > 0:
                    per_token = forward()[0]
                per_doc = per_token[:, train_offset : train_offset + chunk].mean(dim=-1)
                optimizer.zero_grad(set_to_none=True)
                (per_doc * mask.to(per_doc.dtype)).sum().backward()
                optimizer.step()
            read_upto = starts + win_start + win_len  # the last target of each trained window
            slot_reads[trains] = torch.maximum(slot_reads[trains], read_upto[trains])
            if recorder is not None:
                for b in trains.nonzero(as_tuple=True)[0].tolist():
                    recorder.on_update(int(starts[b] + win_start[b]), int(read_upto[b]))

        needs_train = bool(trains.any()) and cfg.grad_steps > 0
        if train_first and needs_train:
            train(None)
        with torch.set_grad_enabled(needs_train and not train_first):
            per_token, logits = forward()
        with torch.no_grad():
            reads = torch.maximum(slot_reads, torch.tensor(global_reads))
            if logits is None:
                mask = batch.scored
                metric.update(per_token.detach()[mask], inputs[mask], targets[mask], batch.positions[mask] + 1)
            else:
                score_batch(batch, logits.detach(), metric, recorder, reads, tilt)
        if needs_train and not train_first:
            train(per_token)


def _global_phase(
    learner: _PhasedLearner,
    tokens: Tensor,
    docs: list[tuple[int, int]],
    seq_len: int,
    rank: int,
    world_size: int,
    recorder: Optional[ScoreRecorder],
) -> tuple[int, list[float]]:
    """SGD on the full model over the concatenated documents (the record's ``train_val_ttt_global_sgd_distributed``):
    chunks of ``global_chunk_tokens``, the last one skipped, cosine lr over chunks; each chunk's full ``seq_len``
    sequences in steps of ``global_batch_seqs``. Returns (largest stream index read, the step losses).

    A step's batch is split over the ranks and its summed gradient applied on every rank, so the result does not
    depend on the world size (the record averages per-rank means of per-rank batches, the same at its settings:
    16 sequences per chunk over 8 ranks, one step per chunk)."""
    cfg, model, device = learner.cfg, learner.model, learner.device
    if not docs:  # a phase at a zero boundary (prefix_docs < num_phases) trains nothing, as in the record
        learner.after_global_phase()
        return NO_STATE, []
    stream = torch.cat([tokens[s : s + n] for s, n in docs])
    where = torch.cat([torch.arange(s, s + n) for s, n in docs])  # stream index of each concatenated token
    params = learner.global_params
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=cfg.global_lr, momentum=cfg.global_momentum)
    total = stream.numel() - 1
    n_chunks = -(-total // cfg.global_chunk_tokens)
    bos = model.config.bos_id
    reads, losses = NO_STATE, []
    for ci in range(n_chunks - 1 if cfg.global_epochs > 0 else 0):
        first = ci * cfg.global_chunk_tokens
        n_seqs = (min(first + cfg.global_chunk_tokens, total) - first) // seq_len
        if n_seqs <= 0:
            continue
        lr = cfg.global_lr_for_chunk(ci, n_chunks)
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.train()
        for _ in range(cfg.global_epochs):
            for b0 in range(0, n_seqs, cfg.global_batch_seqs):
                count = min(cfg.global_batch_seqs, n_seqs - b0)
                mine = rank_share(range(b0, b0 + count), rank, world_size)
                optimizer.zero_grad(set_to_none=True)
                if len(mine):
                    a, b = first + mine.start * seq_len, first + mine.stop * seq_len + 1
                    row = stream[a:b].to(device=device, dtype=torch.int64)
                    x, y = row[:-1], row[1:]
                    with torch.enable_grad(), learner.options.autocast():
                        if cfg.global_respect_doc_boundaries:
                            bos_at = (x == bos).nonzero(as_tuple=True)[0]
                            cu, max_len = build_cu_seqlens(bos_at, x.numel(), seq_len)
                            loss = model(x[None], y[None], cu.to(device), max_len)
                        else:
                            loss = model(x.view(-1, seq_len), y.view(-1, seq_len))
                    share = len(mine) / count
                    (loss * share if share != 1.0 else loss).backward()  # this rank's share of the batch mean
                    losses.append(float(loss.detach()))
                    if recorder is not None:
                        recorder.on_update(int(where[a:b].min()), int(where[a:b].max()))
                if world_size > 1:
                    sum_gradients_over_ranks(params)
                if cfg.global_grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.global_grad_clip)
                optimizer.step()
                batch_rows = range(first + b0 * seq_len, first + (b0 + count) * seq_len + 1)
                reads = max(reads, int(where[batch_rows.start : batch_rows.stop].max()))
        model.eval()
    model.eval()
    learner.after_global_phase()
    return reads, losses


def evaluate_phased_ttt(
    model: nn.Module,
    tokens: Tensor,
    metric: BitsPerByte,
    cfg: PhasedTTTSettings,
    setup: PassSetup,
    lora_factory: Optional[LoraFactory] = None,
    train_first: bool = False,
    tilt: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
) -> PassOutcome:
    """Phased score-first TTT over the stream; this rank's scores go into ``metric``.

    ``setup.seq_len``: the evaluation length, the sequence length of the global phases. ``lora_factory(model, bsz)``
    replaces the adapter construction (tests set the A matrices of a reference run). ``train_first`` is the audit's
    leaking negative control. ``tilt`` reshapes every scored distribution (``score_batch``); the adapters still train
    on the untilted loss. With ``world_size > 1`` a process group must be initialised. The outcome's ``details``:
    documents, batches, the world the phases were scheduled for, and per global phase the documents scored before
    it, the documents it trained on and its step losses.
    """
    seq_len, rank, world_size = setup.seq_len, setup.rank, setup.world_size
    options, recorder = setup.options, setup.recorder
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError("phased TTT with world_size > 1 needs an initialised torch.distributed process group")
    tokens = tokens.cpu()  # windows are gathered on the host and moved per chunk, as the record does
    bos = model.config.bos_id
    docs = find_documents(tokens, bos)
    queue = document_queue(docs, cfg.batch_docs)
    boundaries = cfg.phase_boundaries(len(docs))
    learner = _PhasedLearner(model, cfg, options, lora_factory)
    if options.compile and cfg.compile_warmup:
        learner.warm_up_compile(model.config.vocab_size)
    global_reads = NO_STATE
    schedule_world = cfg.schedule_world or world_size
    summary = {
        "documents": len(docs),
        "batches": len(queue),
        "boundaries": boundaries,
        "schedule_world": schedule_world,
        "phases": [],
    }
    cuts = phase_cuts([len(batch) for _, batch in queue], boundaries, schedule_world)
    with progress_bar(len(queue), "phased TTT", setup.progress) as bar:
        first = 0
        for segment_end, phase_after in [*((k, p) for p, k in enumerate(cuts)), (len(queue), None)]:
            for item in deal(queue[first:segment_end], docs, cfg, rank, world_size, first):
                _, batch = queue[item]
                _score_and_train_batch(
                    learner, tokens, [docs[i] for i in batch], metric, recorder, global_reads, train_first, tilt
                )
            bar.update(segment_end - first)
            first = segment_end
            if phase_after is None:
                continue
            # every rank knows what all ranks scored so far: the deal is deterministic
            scored = sorted(
                (ascending_index, pos, doc)
                for ascending_index, batch in queue[:segment_end]
                for pos, doc in enumerate(batch)
            )
            chosen = [docs[doc] for _, _, doc in scored[: boundaries[phase_after]]]
            reads, losses = _global_phase(learner, tokens, chosen, seq_len, rank, world_size, recorder)
            global_reads = max(global_reads, reads)
            summary["phases"].append(
                {
                    "documents": len(chosen),
                    "tokens": sum(n for _, n in chosen),
                    "scored_before": len(scored),
                    "losses": losses,
                }
            )
    extra = {
        "docs": summary["documents"],
        "chunk": cfg.chunk,
        "context": cfg.context,
        "lora_rank": cfg.lora_rank,
        "phases": len(summary["phases"]),
        "prefix_docs": summary["boundaries"][-1],
        "schedule_world": summary["schedule_world"],
    }
    return PassOutcome(True, extra, details=summary)


# ---------------------------------------------------------------------------------------------------------
# The document-isolated diagnostic
# ---------------------------------------------------------------------------------------------------------


def evaluate_doc_isolated(
    model: nn.Module, tokens: Tensor, metric: BitsPerByte, cfg: DocIsolatedSettings, setup: PassSetup
) -> PassOutcome:
    """The record's ``eval_val``: the ``T // seq_len`` non-overlapping sequences, contiguous rank split,
    ``batch_seqs`` of them as one packed row whose segments start at every BOS and at most every ``seq_len``
    tokens; every position scored. The record truncates each rank's share to a multiple of ``batch_seqs``
    (``# TODO: Don't truncate this``); here every sequence is scored, so every target counts once."""
    device, seq_len, options = model_device(model), setup.seq_len, setup.options
    forward = options.compiled(model.forward_logits)
    bos = model.config.bos_id
    sequences = rank_share(sequence_windows(tokens.numel() - 1, seq_len), setup.rank, setup.world_size)
    groups = batched(sequences, cfg.batch_seqs)
    with (
        eval_mode(model),
        torch.inference_mode(),
        progress_bar(len(groups), "doc-isolated eval", setup.progress) as bar,
    ):
        for group in groups:
            length = sum(w.wl for w in group)
            batch = WindowBatch.gather(tokens, [Window(group[0].ws, 0, length)], length, device)
            bos_at = (batch.inputs[0] == bos).nonzero(as_tuple=True)[0]
            cu, max_len = build_cu_seqlens(bos_at, length, seq_len)
            with options.autocast():
                logits = forward(batch.inputs, cu.to(device), max_len)
            score_batch(batch, logits, metric, setup.recorder)
            bar.update()
    return PassOutcome(True)


def audit_scale(a, **changes) -> PhasedTTTSettings:
    """Phased TTT at the audit's scale: its 10 documents of 11-70 tokens, chunks of 8, 2 documents per batch, rank-2
    adapters, 2 global phases over the first 6 documents scored."""
    return PhasedTTTSettings(
        chunk=8,
        context=a.seq_len,
        batch_docs=2,
        lora_rank=2,
        lora_lr=0.01,
        prefix_docs=6,
        num_phases=2,
        global_lr=0.01,
        global_chunk_tokens=2 * a.seq_len,
        global_batch_seqs=2,
        lora_seed=a.seed,
        **changes,
    )


# doc_isolated: PR #1855's eval_val, non-overlapping sequences as packed rows, documents attending within
# themselves; phased_ttt: PR #1855's scored pass, per-document LoRA chunk by chunk plus global SGD phases. D does not
# apply to either: the batch is the packed row (a document crossing a sequence boundary inside a row keeps its
# context there, the record's definition), or the documents adapted together.
METHODS = (
    EvalMethod(
        "doc_isolated",
        DocIsolatedSettings,
        evaluate_doc_isolated,
        "diagnostic quantized",
        "doc_isolated",
        audit=(
            AuditCase("doc_isolated", lambda a: DocIsolatedSettings(a.batch_windows), documents=True, isolated=True),
        ),
    ),
    EvalMethod(
        "phased_ttt",
        PhasedTTTSettings,
        evaluate_phased_ttt,
        "quantized_ttt_phased",
        "ttt_phased",
        audit=(
            AuditCase("phased_ttt", audit_scale, documents=True, spans_documents=True),
            AuditCase(
                "phased_ttt_no_qv",  # PR #1953/#2014: no Q/V adapters, LoRA lr x0.75
                lambda a: audit_scale(a, q_lora=False, v_lora=False, local_lr_mult=0.75),
                documents=True,
                spans_documents=True,
            ),
        ),
    ),
)
