"""Properties of pgolf_lit/eval that hold for any model: window tiling, equalities between methods in their
degenerate settings, score-first ordering of TTT, untouched caller models, rank invariance over real gloo
processes, and the result line. A tiny float64 GPT makes "equal" mean equal to ~1e-12."""

from __future__ import annotations

import copy
import json
from collections import Counter
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pgolf_lit.data.tokenizer import count_bytes
from pgolf_lit.errors import ConfigError
from pgolf_lit.eval import (
    EvalResult,
    EvalSettings,
    ForwardOptions,
    PassSetup,
    SlidingSettings,
    StandardSettings,
    TTTSettings,
    evaluate_sliding,
    evaluate_slot,
    evaluate_standard,
    evaluate_ttt,
    format_result_line,
    rank_share,
    run_method,
    SlotSettings,
    Weights,
    evaluation_context,
    sliding_windows,
)
from pgolf_lit.eval.audit import AuditSetup, audit_luts, audit_model, audit_tokens, record_slot
from pgolf_lit.eval.context import EvalContext
from pgolf_lit.eval.ttt import trainable_parameters
from pgolf_lit.metrics import BitsPerByte

SETUP = AuditSetup()
L, STRIDE = SETUP.seq_len, SETUP.stride


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add overhead (and stall on a busy machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    return audit_model(SETUP), audit_tokens(SETUP), audit_luts(SETUP.vocab_size)


def slot_procedure(name: str, **changes) -> SlotSettings:
    """A record config's SLOT procedure (``pr1263``, ``pr1278``, ``pr1321``; ``pr1333``: its batch-shared
    reproduction), or pgolf's compliant default (``causal_per_window``), with changes."""
    return replace(SlotSettings() if name == "causal_per_window" else record_slot(name, "slot"), **changes)


def artifact_context(settings, forward=None) -> EvalContext:
    """Scoring an int6 artifact on the CPU in fp32 (the labels upstream gives such passes)."""
    ctx = evaluation_context(
        settings,
        precision="32-true",
        device=torch.device("cpu"),
        compile=False,
        weights=Weights(quantized=True, tag="int6"),
    )
    return replace(ctx, forward=forward) if forward is not None else ctx


def measure(run, model, tokens, luts, cfg, setup=PassSetup(L, STRIDE)) -> tuple[float, int, int]:
    """(val_loss, scored tokens, bytes) of one pass ``run(model, tokens, metric, cfg, setup)``."""
    metric = BitsPerByte(luts)
    run(model, tokens, metric, cfg, setup)
    return float(metric.compute()["loss"]), int(metric.token_count), int(metric.byte_count)


def assert_same(a, b, atol=1e-12):
    assert a[1:] == b[1:]
    assert a[0] == pytest.approx(b[0], abs=atol, rel=0)


# ---------------------------------------------------------------------------------------------------------
# Windows
# ---------------------------------------------------------------------------------------------------------


def scored_positions(windows) -> list[int]:
    return [p for w in windows for p in range(w.ws + w.s, w.ws + w.wl)]


@pytest.mark.parametrize("total", [1, 7, 31, 32, 33, 64, 100, 257, 1000])
@pytest.mark.parametrize("seq_len", [1, 4, 32, 48])
def test_exact_windows_tile_the_stream_once(total, seq_len):
    for stride in sorted({1, 2, 3, seq_len // 3, seq_len // 2, seq_len - 1, seq_len} & set(range(1, seq_len + 1))):
        windows = sliding_windows(total, seq_len, stride, "exact")
        assert scored_positions(windows) == list(range(total)), (total, seq_len, stride)
        for w in windows[1:]:
            assert w.s == seq_len - stride and w.s < w.wl <= seq_len
        for world_size in (1, 2, 3, 8):
            shares = [rank_share(windows, r, world_size) for r in range(world_size)]
            assert [w for share in shares for w in share] == windows
        # The legacy rule covers everything, some positions more than once. The TTT rule drops tail windows
        # shorter than the stride, which (upstream behaviour) leaves the last few positions unscored unless the
        # stride divides total - seq_len, as it does in every record.
        assert set(scored_positions(sliding_windows(total, seq_len, stride, "legacy"))) == set(range(total))
        unscored = set(range(total)) - set(scored_positions(sliding_windows(total, seq_len, stride, "ttt")))
        assert all(p >= total - stride for p in unscored)
        if total <= seq_len or (total - seq_len) % stride == 0:
            assert not unscored


def test_legacy_rule_rescores_the_tail():
    total = SETUP.total_targets
    counts = Counter(scored_positions(sliding_windows(total, L, STRIDE, "legacy")))
    assert max(counts.values()) == L // STRIDE and sum(counts.values()) > total


# ---------------------------------------------------------------------------------------------------------
# Degenerate settings: equal to a simpler method
# ---------------------------------------------------------------------------------------------------------


def test_sliding_with_stride_seq_len_equals_standard(tiny):
    model, tokens, luts = tiny
    standard = measure(evaluate_standard, model, tokens, luts, StandardSettings(batch_seqs=3))
    assert standard[1] == SETUP.total_targets and standard[2] == count_bytes(tokens, luts)
    for rule in ("exact", "legacy", "ttt"):
        sliding = measure(evaluate_sliding, model, tokens, luts, SlidingSettings(rule, 5), PassSetup(L, L))
        assert_same(sliding, standard)


@pytest.mark.parametrize("preset", ["pr1263", "pr1321", "pr1333", "causal_per_window"])
def test_slot_with_zero_steps_equals_sliding(tiny, preset):
    model, tokens, luts = tiny
    cfg = slot_procedure(preset, steps=0, batch_windows=4)
    sliding = measure(evaluate_sliding, model, tokens, luts, SlidingSettings(cfg.window_rule))
    assert_same(measure(evaluate_slot, model, tokens, luts, cfg), sliding)


@pytest.mark.parametrize("rule", ["exact", "ttt"])
@pytest.mark.parametrize("no_update", [{"lr": 0.0}, {"epochs": 0}])
def test_ttt_without_updates_equals_sliding(tiny, rule, no_update):
    model, tokens, luts = tiny
    cfg = TTTSettings(window_rule=rule, chunk_tokens=64, batch_seqs=3, **no_update)
    sliding = measure(evaluate_sliding, model, tokens, luts, SlidingSettings(rule))
    assert_same(measure(evaluate_ttt, model, tokens, luts, cfg), sliding)


def test_ttt_hash_embedding_follows_pr1529(tiny):
    """PR #1529 ``forward_logits_with_hash``: x0 = rms_norm(tok_emb(ids)) + table[(prev·2039 + ids) mod size],
    prev the window's previous token (0 first); zero at the start, trained with the weights."""
    import copy

    import torch.nn.functional as F

    from pgolf_lit.config import GPTConfig
    from pgolf_lit.eval.ttt_hash_embed import TTTHashEmbedding
    from pgolf_lit.model.gpt import GPT

    torch.manual_seed(0)
    plain = GPT(GPTConfig(vocab_size=64, num_layers=2, model_dim=16, num_heads=2, num_kv_heads=1, mlp_mult=2))
    ids = torch.randint(0, 64, (2, 12))
    prev = torch.zeros_like(ids)
    prev[:, 1:] = ids[:, :-1]
    gpt = copy.deepcopy(plain)
    hashed = TTTHashEmbedding(gpt, 40)
    with torch.no_grad():
        hashed.table.normal_()
    entering = []
    gpt.blocks[0].register_forward_pre_hook(lambda module, args: entering.append(args[1]))
    with torch.no_grad():
        logits = hashed.wrap(gpt.forward_logits)(ids)
        want = F.rms_norm(plain.tok_emb(ids), (16,)) + hashed.table[(prev * 2039 + ids) % 40]
        torch.testing.assert_close(entering[0], want, atol=1e-6, rtol=0)
        assert not torch.allclose(logits, plain.forward_logits(ids))
    assert [n for n, _ in gpt.named_parameters()] == [n for n, _ in plain.named_parameters()]  # not in the model

    model, tokens, luts = tiny
    sliding = measure(evaluate_sliding, model, tokens, luts, SlidingSettings("exact"))
    off = TTTSettings(chunk_tokens=64, batch_seqs=3, lr=0.0, hash_embed_size=16384)
    assert_same(measure(evaluate_ttt, model, tokens, luts, off), sliding)  # zeros: no effect until trained
    trained = TTTSettings(chunk_tokens=64, batch_seqs=3, lr=0.05, epochs=1)
    with_hash = measure(evaluate_ttt, model, tokens, luts, replace(trained, hash_embed_size=128))
    assert with_hash[0] != measure(evaluate_ttt, model, tokens, luts, trained)[0]
    with pytest.raises(ConfigError, match="hash_embed_size"):
        TTTSettings(hash_embed_size=-1)


# ---------------------------------------------------------------------------------------------------------
# State: score before update, caller's model untouched
# ---------------------------------------------------------------------------------------------------------


class EventLog:
    """A ScoreRecorder keeping the order of scores and updates."""

    def __init__(self):
        self.events = []

    def on_scores(self, target_index, log_probs, state_reads_upto):
        self.events.append(("score", target_index.tolist()))

    def on_update(self, first_token, last_token):
        self.events.append(("update", first_token, last_token))


def snapshot(model):
    return {name: (p.detach().clone(), p.requires_grad, p.grad) for name, p in model.named_parameters()}


def assert_untouched(model, before):
    for name, p in model.named_parameters():
        weights, requires_grad, grad = before[name]
        assert torch.equal(p, weights) and p.requires_grad == requires_grad and p.grad is grad, name


@pytest.mark.parametrize("rule", ["exact", "ttt"])
def test_ttt_trains_only_on_scored_tokens(tiny, rule):
    model, tokens, luts = tiny
    before = snapshot(model)
    log = EventLog()
    cfg = TTTSettings(window_rule=rule, chunk_tokens=80, lr=0.05, epochs=2, batch_seqs=2)
    metric = BitsPerByte(luts)
    evaluate_ttt(model, tokens, metric, cfg, PassSetup(L, STRIDE, recorder=log))

    scored: set[int] = set()
    updates = 0
    for event in log.events:
        if event[0] == "score":
            scored.update(event[1])
        else:
            _, first, last = event
            assert set(range(max(first, 1), last + 1)) <= scored, f"trained on unscored tokens in [{first}, {last}]"
            updates += 1
    assert updates > 0 and log.events[-1][0] == "score"
    assert_untouched(model, before)
    sliding = measure(evaluate_sliding, model, tokens, luts, SlidingSettings(rule))
    assert abs(float(metric.compute()["loss"]) - sliding[0]) > 1e-6, "the updates should change later scores"


def test_ttt_freezes_the_first_blocks(tiny):
    model = copy.deepcopy(tiny[0])
    trained = {id(p) for p in trainable_parameters(model, freeze_blocks=1)}
    for name, p in model.named_parameters():
        assert (id(p) in trained) is (not name.startswith("blocks.0.")) is p.requires_grad, name
    assert any(name.startswith("tok_emb") and id(p) in trained for name, p in model.named_parameters())


@pytest.mark.parametrize("preset", ["pr1263", "pr1333", "causal_per_window"])
def test_slot_leaves_the_model_untouched(tiny, preset):
    model, tokens, luts = tiny
    before = snapshot(model)
    cfg = slot_procedure(preset, steps=3, batch_windows=4)
    slot = measure(evaluate_slot, model, tokens, luts, cfg)
    assert_untouched(model, before)
    sliding = measure(evaluate_sliding, model, tokens, luts, SlidingSettings(cfg.window_rule))
    assert slot[0] < sliding[0]


def test_slot_warm_start(tiny):
    model, tokens, luts = tiny
    cfg = slot_procedure("pr1278", steps=3, batch_windows=4)
    cold = measure(evaluate_slot, model, tokens, luts, cfg)
    warm = measure(evaluate_slot, model, tokens, luts, replace(cfg, warm_start=0.85))
    assert warm[1:] == cold[1:] and warm[0] != cold[0]
    with pytest.raises(ConfigError, match="warm_start"):
        slot_procedure("causal_per_window", warm_start=0.5)


def test_per_window_causal_slot_is_independent_of_the_batch(tiny):
    model, tokens, luts = tiny
    cfg = slot_procedure("causal_per_window", steps=4)
    results = [measure(evaluate_slot, model, tokens, luts, replace(cfg, batch_windows=b)) for b in (1, 4, 64)]
    for other in results[1:]:
        assert_same(other, results[0])


# ---------------------------------------------------------------------------------------------------------
# Two gloo processes give the one-process results
# ---------------------------------------------------------------------------------------------------------

# TTT chunks of 3 sequences in batches of 2: ranks get unequal shares, and in each chunk's second batch rank 0
# has no sequence and joins the all-reduce with zero gradients.
DISTRIBUTED_SETTINGS = dict(
    seq_len=L,
    stride=STRIDE,
    causal_slot=slot_procedure("causal_per_window", steps=4, batch_windows=4),
    ttt=TTTSettings(chunk_tokens=3 * L, lr=0.05, epochs=2, batch_seqs=2),
)
DISTRIBUTED_METHODS = ("sliding", "causal_slot", "ttt")


def run_all(rank: int, world_size: int) -> dict:
    model, tokens, luts = audit_model(SETUP), audit_tokens(SETUP), audit_luts(SETUP.vocab_size)
    settings = EvalSettings(**DISTRIBUTED_SETTINGS)
    results = {}
    for method in DISTRIBUTED_METHODS:
        r = run_method(method, model, tokens, luts, artifact_context(settings), rank=rank, world_size=world_size)
        results[method] = (r.val_loss, r.val_bpb, r.tokens, r.bytes)
    return results


def distributed_worker(rank: int, world_size: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    results = run_all(rank, world_size)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    # Leave together: a gloo peer that exits while the other still tears down can abort it (SIGABRT, ~1 in 12).
    dist.barrier()
    dist.destroy_process_group()


def test_two_gloo_processes_equal_one(tmp_path):
    out = tmp_path / "results.json"
    mp.spawn(distributed_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, join=True)
    two = json.loads(out.read_text())
    one = run_all(0, 1)
    for method in DISTRIBUTED_METHODS:
        loss, bpb, tokens, nbytes = two[method]
        assert (tokens, nbytes) == one[method][2:], method
        # float64 model: a window's loss is the same up to float64 rounding in either batch shape, and the ranks'
        # float64 partial sums add in another order; ~1e4 terms of ~5 nats put the error near 1e-12, far below 1e-10.
        assert loss == pytest.approx(one[method][0], abs=1e-10, rel=0), method
        assert bpb == pytest.approx(one[method][1], abs=1e-10, rel=0), method


# ---------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------


def test_result_line_format():
    result = EvalResult(
        label="final_int6_sliding_window",
        val_loss=1.234567891,
        val_bpb=0.5,
        tokens=10,
        bytes=20,
        eval_time_ms=1234.56,
        compliant=True,
        extra={"stride": 64, "window_rule": "exact"},
    )
    assert format_result_line(result) == (
        "final_int6_sliding_window val_loss:1.23456789 val_bpb:0.50000000 eval_time:1235ms eval_time_includes:none "
        "stride:64 window_rule:exact compliant:yes"
    )
    compiled = replace(result, eval_time_includes=("compile", "precompute"))
    assert " eval_time:1235ms eval_time_includes:compile+precompute stride:64 " in format_result_line(compiled)


def test_run_method_labels_and_compliance(tiny):
    model, tokens, luts = tiny
    settings = EvalSettings(
        seq_len=L,
        stride=STRIDE,
        standard=StandardSettings(batch_seqs=4),
        slot=slot_procedure("pr1263", steps=1),
        causal_slot=slot_procedure("causal_per_window", steps=1),
        ttt=TTTSettings(chunk_tokens=64, epochs=1),
        labels={"standard": "quantized"},
    )
    expected = {
        "standard": ("quantized", True),
        "sliding": ("final_int6_sliding_window", True),
        "slot": ("final_slot", False),
        "causal_slot": ("final_causal_slot", True),
        "ttt": ("final_int6_ttt", True),
    }
    for method, (label, compliant) in expected.items():
        result = run_method(method, model, tokens, luts, artifact_context(settings))
        assert (result.label, result.compliant) == (label, compliant), method
        if compliant:
            assert (result.tokens, result.bytes) == (SETUP.total_targets, count_bytes(tokens, luts)), method
        assert format_result_line(result).startswith(f"{label} val_loss:")
    legacy_settings = replace(settings, sliding=SlidingSettings(window_rule="legacy"))
    legacy = run_method("sliding", model, tokens, luts, artifact_context(legacy_settings))
    assert not legacy.compliant and legacy.tokens > SETUP.total_targets


def test_labels_say_which_weights_were_scored(tiny):
    """Float weights are never labelled as a quantized roundtrip, and an override applies to artifacts only."""
    model, tokens, luts = tiny
    settings = EvalSettings(seq_len=L, stride=STRIDE, labels={"standard": "final_int8_zlib_roundtrip"})
    cpu = torch.device("cpu")
    cases = {
        Weights.float_weights(): ("pre-quantization", "pre-quantization sliding_window"),
        Weights.float_weights("post-ema"): ("pre-quantization post-ema", "pre-quantization post-ema sliding_window"),
        Weights(quantized=True, tag="int6"): ("final_int8_zlib_roundtrip", "final_int6_sliding_window"),
    }
    for weights, labels in cases.items():
        ctx = evaluation_context(settings, precision="32-true", device=cpu, compile=False, weights=weights)
        got = tuple(run_method(m, model, tokens, luts, ctx).label for m in ("standard", "sliding"))
        assert got == labels, weights


def test_bf16_autocast_stays_close_to_fp32(tiny):
    """The CUDA records run under bf16 autocast; the same code path on CPU must work and stay near fp32."""
    model, tokens, luts = tiny
    model = copy.deepcopy(model).float()
    settings = EvalSettings(**DISTRIBUTED_SETTINGS)
    for method in DISTRIBUTED_METHODS:
        fp32 = run_method(method, model, tokens, luts, artifact_context(settings))
        bf16 = run_method(
            method, model, tokens, luts, artifact_context(settings, ForwardOptions.bf16("cpu", compile=False))
        )
        assert (bf16.tokens, bf16.bytes) == (fp32.tokens, fp32.bytes)
        assert bf16.val_loss == pytest.approx(fp32.val_loss, abs=0.05) and bf16.val_loss != fp32.val_loss, method
