"""Phased score-first TTT (PR #1855 ``eval_val_ttt_phased``) and the document-isolated eval (its ``eval_val``):
the record's own run on a tiny model (``$PGOLF_PR1855_FIXTURES/eval/<case>``; every setting and number read from
the case's files, skipped without them), the zero-update limit against the document-isolated eval, the causality
audit with a leaking variant, and a run through the registry on a random model without fixtures."""

from __future__ import annotations

import heapq
import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import fixture_root
from pgolf_lit.config import CONFIG_DIR, GPTConfig, load_config
from pgolf_lit.data.shards import load_validation_byte_sidecar, load_validation_tokens
from pgolf_lit.errors import ConfigError
from pgolf_lit.eval import EvalSettings, PassSetup, Weights, eval_methods, evaluation_context, run_method
from pgolf_lit.eval.audit import AuditSetup, audit, audit_methods
from pgolf_lit.eval.phased_ttt import (
    DocIsolatedSettings,
    PhasedTTTSettings,
    deal,
    document_queue,
    evaluate_doc_isolated,
    evaluate_phased_ttt,
    find_documents,
    phase_cuts,
)
from pgolf_lit.metrics import BitsPerByte, ByteCounts
from pgolf_lit.model.convert import config_from_upstream, load_upstream_state_dict
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.lora import BatchedTTTLoRA

ROOT = fixture_root("PGOLF_PR1855_FIXTURES", "pr1855")
SLOW_VARIANTS = {"no_global_phases", "one_phase"}  # the same code paths as primary / no_adaptation


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread (intra-op parallelism stalls on a busy machine); the fixture was made
    on one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _eval_cases() -> list:
    folder = ROOT / "eval" if ROOT is not None else None
    if folder is None or not folder.is_dir():
        return [pytest.param(None, None, marks=pytest.mark.skip(reason="no PR #1855 eval fixtures"))]
    params = []
    for case in sorted(p for p in folder.iterdir() if (p / "expected.json").is_file()):
        expected = json.loads((case / "expected.json").read_text())
        for variant in ["primary", *expected.get("variants", {})]:
            marks = [pytest.mark.slow] if variant in SLOW_VARIANTS else []
            params.append(pytest.param(case, variant, id=f"{case.name}-{variant}", marks=marks))
    return params


def settings_from_fixture(hp: dict, overrides: dict) -> PhasedTTTSettings:
    """The case's resolved upstream settings (``settings`` + a variant's overrides) as our dataclass."""
    s = {**hp["settings"], **overrides}
    assert s["ttt_optimizer"] == "adam" and s["val_doc_fraction"] == 1.0
    return PhasedTTTSettings(
        chunk=s["ttt_chunk_size"],
        context=s["ttt_eval_seq_len"],
        batch_docs=s["ttt_batch_size"],
        lora_rank=s["ttt_lora_rank"],
        lora_alpha=hp["lora_alpha"],
        warm_start_a=hp["lora_warm_start_a"],
        k_lora=s["ttt_k_lora"],
        o_lora=s["ttt_o_lora"],
        mlp_lora=s["ttt_mlp_lora"],
        lora_lr=s["ttt_lora_lr"],
        beta1=s["ttt_beta1"],
        beta2=s["ttt_beta2"],
        eps=hp["hyperparameters"].get("ttt_adam_eps", 1e-10),
        weight_decay=s["ttt_weight_decay"],
        grad_steps=s["ttt_grad_steps"],
        prefix_docs=s["phased_ttt_prefix_docs"],
        num_phases=s["phased_ttt_num_phases"],
        global_lr=s["global_ttt_lr"],
        global_momentum=s["global_ttt_momentum"],
        global_epochs=s["global_ttt_epochs"],
        global_grad_clip=s["global_ttt_grad_clip"],
        global_chunk_tokens=s["global_ttt_chunk_tokens"],
        global_batch_seqs=s["global_ttt_batch_seqs"],
        global_respect_doc_boundaries=s["global_ttt_respect_doc_boundaries"],
        global_warmup_chunks=s["global_ttt_warmup_chunks"],
        lora_seed=hp["ttt_rng"]["seed"],
    )


class NllRecorder:
    """Keeps the nll of every scored target (the fixture's per-document sums) and counts the updates."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.targets, self.nll, self.updates = tokens, [], [], 0

    def on_scores(self, target_index, log_probs, state_reads_upto):
        self.targets.append(target_index.cpu())
        self.nll.append(-log_probs.gather(1, self.tokens[target_index.cpu()].view(-1, 1)).squeeze(1).double().cpu())

    def on_update(self, first_token, last_token):
        self.updates += 1


@pytest.mark.parametrize("case,variant", _eval_cases())
def test_phased_ttt_matches_the_record(case: Path, variant: str):
    hp = json.loads((case / "hparams.json").read_text())
    expected = json.loads((case / "expected.json").read_text())
    want = expected if variant == "primary" else expected["variants"][variant]
    tol = expected["tolerance"]
    cfg = settings_from_fixture(hp, want.get("overrides", {}))
    gpt = config_from_upstream(hp["record"], {k: v["fixture"] for k, v in hp["changed_from_record"].items()})
    model = GPT(gpt)
    load_upstream_state_dict(model, torch.load(case / "state_dict.pt", weights_only=True))
    model.set_recurrence(bool(hp["recurrence"]["value"]))
    model.eval()
    assert model.num_params() == hp["weights"]["param_count"]
    seq_len = hp["settings"]["eval_seq_len"]
    data = case / hp["val_data"]["dir"]
    tokens = load_validation_tokens(data, seq_len)
    sidecar = load_validation_byte_sidecar(data, tokens.numel(), bos_id=gpt.bos_id)
    inits = torch.load(case / "lora_inits.pt", weights_only=True)[variant]

    # the adapters' A exactly as the record drew them, in creation order (and the recipe reproduces the first)
    made: list[int] = []

    def from_fixture(adapted: GPT, bsz: int) -> BatchedTTTLoRA:
        entry = inits[len(made)]
        assert (entry["bsz"], entry["rank"]) == (bsz, cfg.lora_rank)
        lora = BatchedTTTLoRA(adapted, bsz, cfg.lora_rank, cfg.lora_alpha)
        lora.load_state_dict({**lora.state_dict(), **entry["A"]})
        made.append(bsz)
        return lora

    recipe = BatchedTTTLoRA(
        model,
        inits[0]["bsz"],
        cfg.lora_rank,
        cfg.lora_alpha,
        generator=torch.Generator().manual_seed(hp["ttt_rng"]["seed"]),
    )
    for name, a in inits[0]["A"].items():
        assert torch.equal(recipe.state_dict()[name], a), name

    vocab = gpt.vocab_size
    no_luts = (
        torch.zeros(vocab, dtype=torch.int16),
        torch.zeros(vocab, dtype=torch.bool),
        torch.ones(vocab, dtype=torch.bool),
    )
    metric = BitsPerByte(ByteCounts(no_luts, sidecar))
    recorder = NllRecorder(tokens)
    summary = evaluate_phased_ttt(
        model, tokens, metric, cfg, PassSetup(seq_len, seq_len, recorder=recorder), lora_factory=from_fixture
    ).details
    values = metric.compute()
    assert len(made) == len(inits)
    assert int(metric.token_count) == want["token_count"] and float(metric.byte_count) == want["byte_count"]
    assert abs(float(values["loss"]) - want["val_loss"]) <= tol["atol_val_loss"]
    assert abs(float(values["bpb"]) - want["val_bpb"]) <= tol["atol_val_bpb"]

    targets, nll = torch.cat(recorder.targets), torch.cat(recorder.nll)
    assert torch.equal(torch.sort(targets).values, torch.arange(1, tokens.numel()))
    for doc in want["docs"]:
        mine = (targets > doc["start"]) & (targets < doc["start"] + doc["len"])
        assert int(mine.sum()) == doc["token_count"]
        assert float(sidecar[targets[mine]].sum()) == doc["byte_sum"]
        mean = float(nll[mine].sum()) / doc["token_count"]
        assert abs(mean - doc["loss_sum"] / doc["token_count"]) <= tol["atol_val_loss"], doc["doc_index"]

    assert len(summary["phases"]) == len(want["phases"])
    for ours, theirs in zip(summary["phases"], want["phases"]):
        assert ours["tokens"] == theirs["tokens"] and ours["scored_before"] == theirs["docs_scored_before"]
        torch.testing.assert_close(
            torch.tensor(ours["losses"]), torch.tensor(theirs["train_losses"]), atol=tol["atol_val_loss"], rtol=0
        )


# ---------------------------------------------------------------------------------------------------------
# Without fixtures: a random GPT on a synthetic BOS-separated stream
# ---------------------------------------------------------------------------------------------------------

VOCAB, BOS = 64, 1


def random_model(seed: int = 0, dtype=torch.float32) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, bos_id=BOS))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.to(dtype).eval()


def stream(doc_starts: list[int], total: int, seed: int = 2) -> torch.Tensor:
    tokens = torch.randint(2, VOCAB, (total + 1,), generator=torch.Generator().manual_seed(seed))
    tokens[doc_starts] = BOS
    return tokens


def luts() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids = torch.arange(VOCAB)
    return torch.where(ids < 2, 0, 1 + ids % 3).to(torch.int16), (ids >= 2) & (ids % 2 == 0), ids < 2


def run(model, tokens, cfg, seq_len, recorder=None) -> BitsPerByte:
    metric = BitsPerByte(luts())
    evaluate_phased_ttt(model, tokens, metric, cfg, PassSetup(seq_len, seq_len, recorder=recorder))
    return metric


TINY = PhasedTTTSettings(
    chunk=8,
    context=32,
    batch_docs=3,
    lora_rank=4,
    lora_lr=1e-2,
    prefix_docs=5,
    num_phases=2,
    global_lr=1e-2,
    global_chunk_tokens=64,
    global_batch_seqs=2,
    lora_seed=0,
)


def test_documents_and_queue_follow_the_record():
    tokens = stream([0, 10, 15, 40, 41], 60)
    docs = find_documents(tokens, BOS)
    # BOS to next BOS inclusive, the last to the end; adjacent BOS make a one-target document
    assert docs == [(0, 11), (10, 6), (15, 26), (40, 2), (41, 20)]
    queue = document_queue(docs, 2)
    # ascending cut [3, 1], [0, 4], [2]; batches by their longest document, longest first
    assert queue == [(2, [2]), (1, [0, 4]), (0, [3, 1])]
    assert find_documents(stream([5], 20), BOS)[0] == (0, 6)  # a stream without a leading BOS: a document from 0
    assert TINY.phase_boundaries(4) == [2, 4] and replace(TINY, prefix_docs=0).phase_boundaries(9) == [0, 0]
    # phases after the batch reaching each boundary, at most one per batch; none without a prefix
    assert phase_cuts([2, 4, 4, 4], [2, 4, 6]) == [1, 2, 3] and phase_cuts([2, 4, 4, 4], [6]) == [2]
    assert phase_cuts([4, 4], [1, 2, 3]) == [1, 2] and phase_cuts([4, 4], [0, 0]) == []
    # the ranks' deals partition the queue, each rank's in queue order; the longest batch's rank gets less after it
    many = find_documents(stream(list(range(0, 600, 7)) + [700, 900], 1000), BOS)
    batches = document_queue(many, 4)
    deals = [deal(batches, many, TINY, r, 3, 0) for r in range(3)]
    assert sorted(sum(deals, [])) == list(range(len(batches))) and all(d == sorted(d) for d in deals)
    assert deals[0][0] == 0 and len(deals[0]) < min(len(deals[1]), len(deals[2]))


# ---------------------------------------------------------------------------------------------------------
# Where the global phases fall on N ranks (the record's logs)
# ---------------------------------------------------------------------------------------------------------

# (documents, batch_docs, prefix_docs, num_phases, ranks, documents scored before each phase). The logs are not
# under ../shared, so their numbers are stated here with their source (upstream parameter-golf record folders).
LOGGED_PAUSES = {
    # PR #1855 (2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611) train_seed{42,0,1234}.log, all
    # three alike: "world_size: 8", "ttt_batch_size: 64", "ttt_phased: total_docs:50000 prefix_docs:2500 ...
    # num_phases:3 boundaries:[833, 1666, 2500]", "ttpp: phase:1/3 pd:1296 gd:833", "ttpp: phase:2/3 pd:2128
    # gd:1666", "ttpp: phase:3/3 pd:2960 gd:2500" (PR #1945's and PR #1953's six logs print the same lines)
    "pr1855_8_ranks": (50000, 64, 2500, 3, 8, [1296, 2128, 2960]),
    # PR #2014 (2026-04-30_SP8192_CaseOps_Progressive3k_ShortDocTTT) train_seed{42,0,314}.log: "ttt_batch_size: 24",
    # "num_phases:1 boundaries:[2500]", "ttpp: phase:1/1 pd:2672 gd:2500"
    "pr2014_8_ranks": (50000, 24, 2500, 1, 8, [2672]),
    # PR #2135 (2026-05-01_SP8192_PR2130Base_Calib32) train_seed{42,0,314}.log: "ttt_batch_size: 64",
    # "num_phases:1 boundaries:[2500]", "ttpp: phase:1/1 pd:2960 gd:2500"
    "pr2135_8_ranks": (50000, 64, 2500, 1, 8, [2960]),
    # one rank (not logged): the phase follows the batch that reaches its boundary
    "pr1855_1_rank": (50000, 64, 2500, 3, 1, [848, 1680, 2512]),
}


def record_queue_sizes(n_docs: int, batch_docs: int) -> list[int]:
    """Batch sizes in queue order for documents of distinct lengths (only the longest batch is short)."""
    return [len(batch) for _, batch in document_queue([(0, n + 2) for n in range(n_docs)], batch_docs)]


def simulate_record_pauses(sizes: list[int], boundaries: list[int], ranks: int, seed: int) -> list[int]:
    """The record's protocol with random batch times: a rank claims the next batch from the shared counter,
    scores it, adds its documents to the shared count, raises the pause flag once the count reaches the current
    boundary, then pauses if the flag is up, else claims again; when every rank has paused the phase runs
    (recording the count) and every rank claims anew. Returns the count at each phase."""
    rng = random.Random(seed)
    events: list[tuple[float, int, int]] = []  # (finish time, rank, queue position)
    claimed, count, flag, phase, paused, pauses = 0, 0, False, 0, 0, []

    def claim(rank: int, now: float) -> None:
        nonlocal claimed
        if claimed < len(sizes):
            heapq.heappush(events, (now + rng.uniform(0.1, 10.0), rank, claimed))
            claimed += 1

    for r in range(ranks):
        claim(r, 0.0)
    while events:
        now, rank, item = heapq.heappop(events)
        count += sizes[item]
        if phase < len(boundaries):
            flag = flag or count >= boundaries[phase]
            if flag:
                paused += 1
                if paused == ranks:  # the barrier: every rank has finished the batch it held
                    pauses.append(count)
                    phase, flag, paused = phase + 1, False, 0
                    for r in rng.sample(range(ranks), ranks):
                        claim(r, now)
                continue
        claim(rank, now)
    return pauses


@pytest.mark.parametrize("case", sorted(LOGGED_PAUSES))
def test_phase_cuts_reproduce_the_logged_pauses(case):
    n_docs, batch_docs, prefix, phases, ranks, logged = LOGGED_PAUSES[case]
    cfg = PhasedTTTSettings(batch_docs=batch_docs, prefix_docs=prefix, num_phases=phases)
    boundaries = cfg.phase_boundaries(n_docs)
    sizes = record_queue_sizes(n_docs, batch_docs)
    scored = list(itertools.accumulate(sizes, initial=0))
    cuts = phase_cuts(sizes, boundaries, ranks)
    assert [scored[k] for k in cuts] == logged
    assert phase_cuts(sizes, boundaries, ranks) == cuts  # pure: same arguments, same answer
    # the record's own protocol gives these counts whatever order its ranks finish in (random batch times)
    for seed in range(3):
        assert simulate_record_pauses(sizes, boundaries, ranks, seed) == logged, seed


def test_phase_cuts_on_more_ranks_wait_for_the_batches_in_flight():
    sizes = [2, 4, 4, 4, 4, 4]
    assert phase_cuts(sizes, [2, 4, 6]) == [1, 2, 3]
    assert phase_cuts(sizes, [2, 4, 6], 2) == [2, 4, 6]  # one more batch each; the third at the queue's end
    assert phase_cuts(sizes, [2, 4, 6], 3) == [3, 6]  # the queue runs out before the third phase
    assert phase_cuts(sizes, [0, 0], 8) == [] and phase_cuts(sizes, [0, 2], 8) == [6]
    with pytest.raises(ValueError, match="world_size"):
        phase_cuts(sizes, [2], 0)
    # the simulated record agrees (only the first batch is short); on 5 ranks the record itself is undefined: 4 ranks
    # find the queue empty and leave while the fifth waits for them at the pause
    for ranks in (1, 2, 3):
        for seed in range(3):
            got = simulate_record_pauses(sizes, [2, 4, 6], ranks, seed)
            assert got == [sum(sizes[:k]) for k in phase_cuts(sizes, [2, 4, 6], ranks)], (ranks, seed)


def test_schedule_world_moves_the_phases_on_one_process():
    model, tokens = random_model(), stream([0, 60, 110, 150, 185, 215, 240, 260, 275, 285], 295)
    cfg = replace(TINY, batch_docs=2, prefix_docs=4)
    docs = find_documents(tokens, BOS)
    sizes = [len(batch) for _, batch in document_queue(docs, cfg.batch_docs)]
    summaries = {}
    for world in (None, 2):
        metric = BitsPerByte(luts())
        outcome = evaluate_phased_ttt(model, tokens, metric, replace(cfg, schedule_world=world), PassSetup(32, 32))
        summaries[world] = outcome.details
        assert int(metric.token_count) == 295  # every target once, on any schedule
    for world, ranks in ((None, 1), (2, 2)):
        summary = summaries[world]
        cuts = phase_cuts(sizes, cfg.phase_boundaries(len(docs)), ranks)
        assert summary["schedule_world"] == ranks
        assert [p["scored_before"] for p in summary["phases"]] == [sum(sizes[:k]) for k in cuts]
        assert [p["documents"] for p in summary["phases"]] == cfg.phase_boundaries(len(docs))
    assert [p["scored_before"] for p in summaries[None]["phases"]] == [2, 4]
    assert [p["scored_before"] for p in summaries[2]["phases"]] == [4, 8]


PHASED_RECORDS = [
    p
    for p in sorted((CONFIG_DIR / "records").glob("*.yaml"))
    if "phased_ttt" in load_config(p)["model"]["test_methods"]
]


@pytest.mark.parametrize("path", PHASED_RECORDS, ids=lambda p: p.stem)
def test_record_configs_schedule_the_phases_for_their_record_world(path):
    """Every config that scores phased TTT pauses where its own record world did (a tiny twin on one process: 1)."""
    merged = load_config(path)
    settings = EvalSettings.from_dict(merged["model"]["evaluation"])
    assert settings.phased_ttt.schedule_world == merged["record"]["world"]


def test_zero_updates_equal_the_document_isolated_eval():
    """Where the windows coincide (every document one full-context window: sequences starting with BOS, chunk =
    context = seq_len), TTT without updates is the document-isolated eval; with shorter chunks the windows differ
    in length only, so the scores agree to float rounding; lr 0 is exactly no update."""
    seq_len, n = 32, 8
    model, tokens = random_model(), stream(list(range(0, n * 32 + 1, 32)), n * 32)
    isolated = BitsPerByte(luts())
    evaluate_doc_isolated(model, tokens, isolated, DocIsolatedSettings(batch_seqs=1), PassSetup(seq_len, seq_len))
    frozen = replace(TINY, chunk=seq_len, context=seq_len, grad_steps=0, prefix_docs=0)
    one_window = run(model, tokens, frozen, seq_len)
    for name in ("token_count", "byte_count"):
        assert float(getattr(one_window, name)) == float(getattr(isolated, name)), name
    # The same windows, batched three documents at a time vs one: equal up to per-term fp32 rounding (see below).
    torch.testing.assert_close(one_window.loss_sum, isolated.loss_sum, rtol=2.0**-20, atol=0)

    no_steps = run(model, tokens, replace(frozen, chunk=8), seq_len)
    lr_zero = run(model, tokens, replace(frozen, chunk=8, grad_steps=1, lora_lr=0.0), seq_len)
    assert float(lr_zero.loss_sum) == float(no_steps.loss_sum)
    assert float(no_steps.token_count) == float(isolated.token_count) == n * seq_len
    # Same windows, other batch shapes: each fp32 per-token loss may differ by a few fp32 ulps (the kernels block
    # their dot products by shape), and a sum of positive terms keeps the largest relative error of a term. So the
    # bound is per-term fp32 rounding (16 ulps = 2^-20), not float64's: observed 2e-9; a window with other context
    # moves the sum by ~1e-3.
    torch.testing.assert_close(no_steps.loss_sum, isolated.loss_sum, rtol=2.0**-20, atol=0)
    adapted = run(model, tokens, replace(frozen, chunk=8, grad_steps=1), seq_len)
    assert float(adapted.loss_sum) != float(no_steps.loss_sum)


def test_registered_method_scores_every_target_once_and_keeps_the_model():
    total, seq_len = 320, 32
    model, tokens = random_model(), stream([0, 30, 95, 120, 180, 200, 251, 300], total)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = EvalSettings(seq_len=seq_len, stride=seq_len, phased_ttt=TINY)
    context = evaluation_context(
        settings, precision="32-true", device=torch.device("cpu"), compile=False, weights=Weights.float_weights()
    )
    result = run_method("phased_ttt", model, tokens, luts(), context)
    assert result.tokens == total and result.compliant
    assert result.extra["phases"] == TINY.num_phases and result.extra["docs"] == 8
    assert result.extra["schedule_world"] == 1  # the evaluating world: one process
    assert result.label == "pre-quantization ttt_phased"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed: the global phases must train a copy"
    plain = run_method("doc_isolated", model, tokens, luts(), context)
    assert plain.tokens == total and plain.compliant and plain.bytes == result.bytes
    assert result.val_loss != plain.val_loss


def test_global_phases_change_later_scores_only():
    model, tokens = random_model(), stream([0, 60, 110, 150, 185, 215, 240, 260, 275, 285], 295)
    with_phases = NllRecorder(tokens)
    run(model, tokens, TINY, 32, recorder=with_phases)
    without = NllRecorder(tokens)
    run(model, tokens, replace(TINY, prefix_docs=0), 32, recorder=without)
    a = torch.cat(with_phases.nll)[torch.argsort(torch.cat(with_phases.targets))]
    b = torch.cat(without.nll)[torch.argsort(torch.cat(without.targets))]
    # the stream's documents get shorter, so the first batch (the two longest, the first ~110 targets) is scored
    # before any phase; the documents scored after the phases differ
    assert torch.equal(a[:110], b[:110]) and not torch.equal(a[150:], b[150:])
    assert with_phases.updates > without.updates


@pytest.mark.parametrize(
    "field,value",
    [
        ("chunk", 0),
        ("chunk", 4096),
        ("batch_docs", 0),
        ("beta2", 1.0),
        ("prefix_docs", -1),
        ("global_batch_seqs", 0),
        ("schedule_world", 0),
    ],
)
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"phased_ttt.{field}"):
        PhasedTTTSettings(**{field: value})
    with pytest.raises(ConfigError, match="doc_isolated.batch_seqs"):
        EvalSettings.from_dict({"doc_isolated": {"batch_seqs": 0}})


# ---------------------------------------------------------------------------------------------------------
# The causality audit
# ---------------------------------------------------------------------------------------------------------


def test_audit_passes_phased_ttt_and_fails_training_before_scoring():
    setup = AuditSetup()
    real = audit_methods(setup)["phased_ttt"]
    (case, _) = eval_methods()["phased_ttt"].audit
    # the audit's phased TTT with each chunk trained on before it is scored
    cfg = replace(case.settings(setup), prefix_docs=0)

    def leaky(model, tokens, metric, recorder, batch, rank, world):
        pass_setup = PassSetup(setup.seq_len, setup.stride, recorder=recorder)
        evaluate_phased_ttt(model, tokens, metric, cfg, pass_setup, train_first=True)

    good = audit(real, setup)
    bad = audit(replace(real, name="phased_ttt_train_first", run=leaky), setup)
    assert good.compliant and good.score_before_update and good.exactly_once and good.prefix_invariant
    assert good.updates > 0
    assert not bad.score_before_update and bad.update_violations > 0
    assert not bad.prefix_invariant and bad.violations_self > 0  # a chunk's own tokens moved its scores
    assert bad.exactly_once and not bad.compliant


def test_short_document_chunks_follow_the_longest_document_of_a_batch():
    """PR #2014's TTT_SHORT_SCORE_FIRST_STEPS: the first pair (by max length) that holds the batch's longest document
    gives the chunk, whatever order the pairs are listed in; longer batches keep ``chunk``."""
    cfg = replace(TINY, chunk=16, short_doc_chunks=[[60, 8], [20, 4]])
    assert [cfg.chunk_for(n) for n in (5, 20, 21, 60, 61)] == [4, 4, 8, 8, 16]
    assert TINY.chunk_for(10_000) == TINY.chunk
    with pytest.raises(ConfigError, match=r"phased_ttt\.short_doc_chunks: \[60, 64\]: expected \[max_doc_len, chunk\]"):
        replace(TINY, short_doc_chunks=[[60, 64]])  # a chunk longer than the context
    # a batch of short documents takes its own chunk: more adapter steps, another score than the plain chunk
    model, tokens = random_model(), stream([0, 18, 40, 55, 70, 90, 130, 170], 200)
    short, plain = run(model, tokens, replace(TINY, short_doc_chunks=[[30, 4]]), 32), run(model, tokens, TINY, 32)
    assert float(short.token_count) == float(plain.token_count) == 200
    assert float(short.loss_sum) != float(plain.loss_sum)


def test_a_kept_tail_is_scored_by_every_pass():
    """EVAL_INCLUDE_TAIL (PR #2014): a stream that is no multiple of seq_len plus one is scored whole; the standard
    and document-isolated passes score a last, shorter sequence; the full sequences score as before."""
    seq_len, total = 32, 330
    model, tokens = random_model(), stream([0, 30, 95, 120, 180, 200, 251, 300], total)
    settings = EvalSettings(seq_len=seq_len, stride=seq_len, phased_ttt=TINY, include_tail=True)
    context = evaluation_context(
        settings, precision="32-true", device=torch.device("cpu"), compile=False, weights=Weights.float_weights()
    )
    trimmed = tokens[: total // seq_len * seq_len + 1]
    for method in ("standard", "doc_isolated", "phased_ttt"):
        whole, cut = (
            run_method(method, model, tokens, luts(), context),
            run_method(method, model, trimmed, luts(), context),
        )
        assert (whole.tokens, cut.tokens) == (total, total // seq_len * seq_len), method
        if method != "phased_ttt":  # the same full sequences, plus the tail's
            assert whole.val_loss * whole.tokens > cut.val_loss * cut.tokens, method
