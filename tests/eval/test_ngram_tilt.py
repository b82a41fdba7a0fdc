"""The token-only online n-gram tilt (``pgolf_lit/eval/ngram_tilt.py``, PR #2135): the table against a plain
reference of the record's C state and against the record's own outputs (``$PGOLF_FRONTIER_FIXTURES/eval/
pr2135_ngram_state_and_tilt``: hints, per-position top token/probability, a continuation probe, the final table,
the tilted losses; every value read from the case, skipped without it), the tilt's normalization, and the tilt
composed with phased TTT (the adapters learn from the untilted loss)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import fixture_root
from pgolf_lit.config import GPTConfig
from pgolf_lit.errors import ConfigError
from pgolf_lit.eval import EvalSettings, Weights, eval_methods, evaluation_context, run_method
from pgolf_lit.eval.registry import PassSetup
from pgolf_lit.eval.ngram_tilt import (
    PAIR_MIX,
    ROLLING_COEFFS,
    NgramHints,
    NgramTiltSettings,
    build_hints,
    context_counts,
    evaluate_ngram_tilt,
    tilted_nll,
)
from pgolf_lit.eval.phased_ttt import PhasedTTTSettings, evaluate_phased_ttt
from pgolf_lit.metrics import BitsPerByte
from pgolf_lit.model.gpt import GPT

ROOT = fixture_root("PGOLF_FRONTIER_FIXTURES", "frontier")
CASE = ROOT / "eval" / "pr2135_ngram_state_and_tilt" if ROOT is not None else None
needs_case = pytest.mark.skipif(CASE is None or not CASE.is_dir(), reason="no frontier n-gram fixture")
U64 = (1 << 64) - 1


def reference_counts(targets: np.ndarray, order: int) -> tuple[list, list, list, dict, dict]:
    """online_ngram_state.c's token expert, written plainly: a ring seeded with targets[0], 64-bit context and pair
    hashes, lookup before update, the top continuation replaced only by a strictly larger count."""
    span = order - 1
    ring = [int(targets[0])]
    ctx: dict[int, list[int]] = {}  # key -> [total, top_count, top_token]
    pairs: dict[int, int] = {}
    top, count, total = [], [], []
    for tok in map(int, targets):
        if len(ring) >= span:
            key = 0
            for k, t in enumerate(ring[-span:]):
                key ^= (t * ROLLING_COEFFS[k]) & U64
            entry = ctx.get(key)
            top.append(entry[2] if entry else 0)
            count.append(entry[1] if entry else 0)
            total.append(entry[0] if entry else 0)
            pkey = ((key * PAIR_MIX) & U64) ^ ((tok * ROLLING_COEFFS[span % 32]) & U64)
            pairs[pkey] = c = pairs.get(pkey, 0) + 1
            if entry is None:
                ctx[key] = [1, c, tok]
            else:
                entry[0] += 1
                if c > entry[1]:
                    entry[1], entry[2] = c, tok
        else:
            top.append(0), count.append(0), total.append(0)
        ring.append(tok)
    return top, count, total, ctx, pairs


def repetitive(n: int, vocab: int, seed: int) -> np.ndarray:
    """Tokens with recurring stretches (contexts repeat, hints fire, counts tie and change their top)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, vocab, size=n).astype(np.uint16)
    for _ in range(n // 40):
        src, dst = rng.integers(0, n - 30, size=2)
        x[dst : dst + 25] = x[src : src + 25]
    return x


@pytest.mark.parametrize("order,vocab,n", [(16, 300, 40_000), (3, 7, 3_000), (2, 5, 500), (5, 65_535, 2_000)])
def test_table_equals_the_plain_reference(order, vocab, n):
    """Two parts (40 K positions), tiny vocabularies (collisions of contexts and ties of counts), the largest
    uint16 ids (the widest keys)."""
    x = repetitive(n, vocab, seed=order)
    top, count, total, ctx, pairs = reference_counts(x, order)
    got = context_counts(x, order, keep_state=True)
    assert got.top_token.tolist() == top and got.top_count.tolist() == count and got.total.tolist() == total
    assert {int(r[0]): [int(r[1]) & 0xFFFFFFFF, int(r[1]) >> 32, int(r[2])] for r in got.ctx_rows} == ctx
    assert {int(r[0]): int(r[1]) for r in got.pair_rows} == pairs
    assert 0 < int((got.top_prob >= np.float32(0.8)).sum()) < n


def test_hints_never_read_their_own_or_later_targets():
    tokens = torch.from_numpy(repetitive(4_000, 50, seed=3).astype(np.int64))
    cfg = NgramTiltSettings(order=6)
    base = build_hints(tokens, cfg)
    assert base.gated > 100
    for p in (1, 200, 1_777, 3_999):  # perturb x_p: hints of targets j <= p stay, as reads_upto says
        changed = tokens.clone()
        changed[p] = (changed[p] + 1) % 50
        other = build_hints(changed, cfg)
        assert torch.equal(other.hint[:p], base.hint[:p]) and torch.equal(other.gate[:p], base.gate[:p])
    assert torch.equal(base.reads_upto(torch.tensor([1, 5])), torch.tensor([0, 4]))
    assert torch.equal(base.update_order(), torch.arange(1, tokens.numel()))


def test_tilt_is_the_normalized_exponential_tilt():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 11, generator=generator, dtype=torch.float64) * 3
    hints = NgramHints(torch.tensor([3, 0, 7, 0, 10, 2]), torch.tensor([True, False, True, False, True, True]), 2.625)
    index = torch.tensor([1, 2, 3, 4, 5, 6])
    tilted = hints.tilt(logits, index)
    p, q = logits.softmax(-1), tilted.softmax(-1)
    torch.testing.assert_close(q.sum(-1), torch.ones(6, dtype=torch.float64), atol=1e-15, rtol=0)
    for row in range(6):
        if not hints.gate[row]:
            assert torch.equal(tilted[row], logits[row])
            continue
        h = int(hints.hint[row])
        z = 1 + p[row, h] * (np.exp(2.625) - 1)
        weight = torch.ones(11, dtype=torch.float64)
        weight[h] = np.exp(2.625)
        explicit = p[row] * weight / z
        torch.testing.assert_close(q[row], explicit, atol=1e-15, rtol=0)
    targets = torch.tensor([3, 4, 1, 5, 10, 9])
    nll = -logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)
    log_q = logits.log_softmax(-1).gather(1, hints.hint[:, None]).squeeze(1)
    closed = tilted_nll(nll, log_q, targets == hints.hint, hints.boost_at(index))
    torch.testing.assert_close(
        closed, -tilted.log_softmax(-1).gather(1, targets[:, None]).squeeze(1), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("field,value", [("order", 1), ("order", 34), ("threshold", 0.0), ("boost", -1.0)])
def test_bad_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"ngram_tilt.{field}"):
        NgramTiltSettings(**{field: value})
    with pytest.raises(ConfigError, match="ngram_tilt.chunk"):  # phased TTT's own checks name this section
        NgramTiltSettings(chunk=0)
    section = EvalSettings.from_dict({"ngram_tilt": {"order": 4, "chunk": 8}}).ngram_tilt
    assert isinstance(section, PhasedTTTSettings) and section.chunk == 8 and section.order == 4


# ---------------------------------------------------------------------------------------------------------
# The record's own outputs
# ---------------------------------------------------------------------------------------------------------


def _load(name: str):
    return torch.load(CASE / name, weights_only=True)


@needs_case
def test_hints_and_table_match_the_records_c_state():
    hp = json.loads((CASE / "hparams.json").read_text())
    expected = json.loads((CASE / "expected.json").read_text())
    record = hp["record_settings"]
    assert record["within_tau"] > 1 and record["word_tau"] > 1 and record["agree_add_boost"] == 0  # token-only
    cfg = NgramTiltSettings(
        order=record["token_order"], threshold=record["token_threshold"], boost=record["token_boost"]
    )
    stream, native, hints_ref = _load("stream.pt"), _load("native_outputs.pt"), _load("hints.pt")
    targets = stream["targets"].numpy().astype(np.uint16)
    assert torch.equal(stream["targets"], stream["tokens"][1:])
    counts = context_counts(targets, cfg.order, keep_state=True)
    assert np.array_equal(counts.top_token, native["token_top_token"].numpy())
    assert np.array_equal(counts.top_prob, native["token_top_prob"].numpy())
    hints = build_hints(stream["tokens"], cfg)
    assert torch.equal(hints.hint, hints_ref["record.hint_ids"]) and torch.equal(
        hints.gate, hints_ref["record.gate_mask"]
    )
    assert torch.equal(hints.boost_at(torch.arange(1, targets.size + 1)), hints_ref["record.boost"])
    assert hints.gated == expected["hint_counts"]["record"]["gated"]

    # the continuation probe: the state after the stream processing more tokens = the stream extended by them
    probe = native["probe_tokens"].numpy().astype(np.uint16)
    more = context_counts(np.concatenate([targets, probe]), cfg.order)
    assert np.array_equal(more.top_token[-probe.size :], native["probe_token_top_token"].numpy())
    assert np.array_equal(more.top_prob[-probe.size :], native["probe_token_top_prob"].numpy())

    # the final table: the same contexts and pairs (uint64 keys), totals, top counts and tokens
    state = _load("state_after.pt")
    ring = state["token_ring"].roll(-state["token_head"])
    assert ring.tolist() == targets[-state["token_ctx_len"] :].tolist()
    keys = state["token_ctx.keys_u64_as_i64"].numpy().view(np.uint64)
    ref_ctx = {int(k): (int(r[1]), int(r[2]), int(r[3])) for k, r in zip(keys, state["token_ctx.rows"].numpy())}
    mine = {int(r[0]): (int(r[1]) & 0xFFFFFFFF, int(r[1]) >> 32, int(r[2])) for r in counts.ctx_rows}
    assert mine == ref_ctx
    keys = state["token_pair.keys_u64_as_i64"].numpy().view(np.uint64)
    ref_pairs = {int(k): int(r[1]) for k, r in zip(keys, state["token_pair.rows"].numpy())}
    assert {int(r[0]): int(r[1]) for r in counts.pair_rows} == ref_pairs


@needs_case
def test_tilted_losses_match_the_records_closed_form():
    tilt = _load("tilt.pt")
    expected = json.loads((CASE / "expected.json").read_text())["tilt"]
    hit = tilt["target_ids"] == tilt["hint_ids"]
    fast = tilted_nll(tilt["ptl"], tilt["log_q_hint"], hit, tilt["boost"])
    torch.testing.assert_close(fast, tilt["tilted_fast_fp32"], atol=1e-6, rtol=0)
    wide = tilted_nll(tilt["ptl"].double(), tilt["log_q_hint"].double(), hit, tilt["boost"].double()).float()
    torch.testing.assert_close(wide, tilt["tilted_fp64_fn"], atol=1e-12, rtol=0)

    # the case's logits (its recipe): our scoring path (β on the hint's logit) gives the full-vocabulary tilted nll
    n, vocab, block = tilt["ptl"].numel(), 8192, 256
    assert expected["summary"]["n_targets"] == n
    generator, rows = torch.Generator().manual_seed(6601), []
    for a in range(0, n, block):
        z = torch.randn(min(block, n - a), vocab, generator=generator) * 2.0
        every_other = tilt["gate_mask"][a : a + block].nonzero().squeeze(1)[::2]
        z[every_other, tilt["hint_ids"][a : a + block][every_other].clamp(min=0)] += 6.0
        rows.append(z)
    logits = torch.cat(rows)
    assert torch.equal(-logits.log_softmax(-1).gather(1, tilt["target_ids"][:, None]).squeeze(1), tilt["ptl"])
    hints = NgramHints(tilt["hint_ids"], tilt["gate_mask"], float(tilt["boost"].max()))
    rows = torch.cat([tilt["gate_mask"].nonzero().squeeze(1), torch.arange(0, n, 50)])  # gated rows and a sample
    tilted = hints.tilt(logits[rows], rows + 1).double()
    ours = -tilted.log_softmax(-1).gather(1, tilt["target_ids"][rows, None]).squeeze(1)
    torch.testing.assert_close(ours, tilt["tilted_full_vocab_nll_fp64"][rows], atol=1e-5, rtol=0)
    assert float((tilted.softmax(-1).sum(-1) - 1).abs().max()) < 1e-12


# ---------------------------------------------------------------------------------------------------------
# Composed with phased TTT
# ---------------------------------------------------------------------------------------------------------

VOCAB, BOS = 48, 1
PHASED = dict(
    chunk=8,
    context=32,
    batch_docs=2,
    lora_rank=4,
    lora_lr=1e-2,
    prefix_docs=3,
    num_phases=1,
    global_lr=1e-2,
    global_chunk_tokens=64,
    global_batch_seqs=2,
)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1, bos_id=BOS))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def doc_stream() -> torch.Tensor:
    """Documents of falling length, later ones repeating stretches of earlier ones (the n-gram fires)."""
    x = torch.from_numpy(repetitive(240, VOCAB - 2, seed=5).astype(np.int64)) + 2
    x[120:180] = x[10:70]
    x[[0, 70, 120, 160, 190, 210, 225]] = BOS
    return x


class Recorder:
    def __init__(self):
        self.index, self.log_probs, self.reads = [], [], []

    def on_scores(self, target_index, log_probs, state_reads_upto):
        self.index.append(target_index), self.log_probs.append(log_probs), self.reads.append(state_reads_upto)

    def on_update(self, first_token, last_token):
        pass

    def by_target(self):
        order = torch.argsort(torch.cat(self.index))
        return torch.cat(self.index)[order], torch.cat(self.log_probs)[order], torch.cat(self.reads)[order]


def byte_luts():
    ids = torch.arange(VOCAB)
    return torch.where(ids < 2, 0, 1 + ids % 3).to(torch.int16), ids >= 2, ids < 2


def test_tilt_reshapes_the_scores_and_never_the_adaptation():
    torch.set_num_threads(1)
    model, tokens = tiny_model(), doc_stream()
    cfg = NgramTiltSettings(order=4, **PHASED)
    plain, tilted = Recorder(), Recorder()
    evaluate_phased_ttt(
        model, tokens, BitsPerByte(byte_luts()), PhasedTTTSettings(**PHASED), PassSetup(32, 32, recorder=plain)
    )
    metric = BitsPerByte(byte_luts())
    hints, _ = evaluate_ngram_tilt(model, tokens, metric, cfg, PassSetup(32, 32, recorder=tilted)).details
    assert hints.gated >= 20
    index, base, _ = plain.by_target()
    index2, tilted_lp, reads = tilted.by_target()
    assert torch.equal(index, torch.arange(1, tokens.numel())) and torch.equal(index, index2)
    gate = hints.gate[index - 1]
    # the adapters learned the same things: ungated distributions identical, gated ones exactly tilted
    assert torch.equal(tilted_lp[~gate], base[~gate])
    expected = hints.tilt(base, index).log_softmax(-1)
    torch.testing.assert_close(tilted_lp, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(tilted_lp.exp().sum(-1), torch.ones(index.numel()), atol=1e-5, rtol=0)
    assert bool((reads >= index - 1).all())  # every tilted distribution read the table up to its previous target
    # the metric scored the tilted distributions, every target once
    nll = -tilted_lp.gather(1, tokens[index][:, None]).squeeze(1)
    assert int(metric.token_count) == index.numel()
    torch.testing.assert_close(metric.loss_sum, nll.double().sum(), rtol=1e-6, atol=0)
    # β = 0 is phased TTT itself
    zero = BitsPerByte(byte_luts())
    evaluate_ngram_tilt(model, tokens, zero, replace(cfg, boost=0.0), PassSetup(32, 32))
    plain_metric = BitsPerByte(byte_luts())
    evaluate_phased_ttt(model, tokens, plain_metric, PhasedTTTSettings(**PHASED), PassSetup(32, 32))
    assert float(zero.loss_sum) == float(plain_metric.loss_sum)


def test_registered_pass_reports_the_hints_and_the_precompute():
    torch.set_num_threads(1)
    model, tokens = tiny_model(), doc_stream()
    assert "ngram_tilt" in eval_methods()
    settings = EvalSettings(
        seq_len=32, stride=32, phased_ttt=PhasedTTTSettings(**PHASED), ngram_tilt=NgramTiltSettings(order=4, **PHASED)
    )
    context = evaluation_context(
        settings, precision="32-true", device=torch.device("cpu"), compile=False, weights=Weights.float_weights()
    )
    result = run_method("ngram_tilt", model, tokens, byte_luts(), context)
    plain = run_method("phased_ttt", model, tokens, byte_luts(), context)
    assert result.tokens == tokens.numel() - 1 and "precompute" in result.eval_time_includes
    assert result.extra["ngram_gated"] == build_hints(tokens, settings.ngram_tilt).gated > 0
    assert result.extra["ngram_state"] == "stream_order" and not result.compliant
    assert result.val_loss != plain.val_loss


# ---------------------------------------------------------------------------------------------------------
# PR #2135's tiny twin end to end
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("lrzip") is None, reason="the PGRP v2 container needs lrzip (apt-get install lrzip)")
def test_pr2135_tiny_twin_fits_exports_and_scores_the_tilted_pass(run_cwd):
    """pgolf fit of the twin (SmearGate without its BOS mask, LQER group 32, fp16 gate, PGRP v2, lzma code), then
    pgolf test of its artifact with the n-gram-tilted phased TTT, on a short stream."""
    from pgolf_lit.config import CONFIG_DIR, load_config
    from pgolf_lit.quant.code_size import measure_code_size
    from pgolf_lit.quant.pergroup_v2 import is_pergroup_v2
    from pgolf_lit.run_summary import read_summary

    record = "pr2135_calib32_ngram_tilt_tiny"
    config = CONFIG_DIR / "records" / f"{record}.yaml"
    base = [sys.executable, "-m", "pgolf_lit.cli"]
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.version"]
    fit = subprocess.run(
        [*base, "fit", "--config", str(config), *quiet, "fit"], cwd=run_cwd, capture_output=True, text=True
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = run_cwd / "runs" / record / "fit"
    summary = read_summary(run_dir)
    artifact = run_dir / "final_model.pgolf"
    assert is_pergroup_v2(artifact.read_bytes()) and summary["artifact"]["fits"]
    assert (
        summary["artifact"]["code_bytes"] > 0
        and abs(summary["roundtrip"]["val_bpb"] - summary["pre_quant"]["val_bpb"]) < 0.05
    )
    test = subprocess.run(
        [*base, "test", "--config", str(config), "--artifact", str(artifact), "--data.val_max_tokens", "1024"]
        + ["--model.test_methods", "[ngram_tilt]", *quiet, "t"],
        cwd=run_cwd,
        capture_output=True,
        text=True,
    )
    assert test.returncode == 0, test.stderr[-3000:]
    tilted = read_summary(run_cwd / "runs" / record / "t")["test"]["ngram_tilt"]
    assert tilted["label"] == "quantized_ttt_phased" and tilted["eval_time_includes"] == ["precompute"]
    assert tilted["extra"]["ngram_order"] == load_config(config)["model"]["evaluation"].get("ngram_tilt", {}).get(
        "order", NgramTiltSettings().order
    )
    seq_len = load_config(config)["model"]["evaluation"]["seq_len"]
    assert tilted["tokens"] == 1024 // seq_len * seq_len and not tilted["compliant"]
    methods = load_config(config)["model"]["test_methods"]
    model = GPTConfig.from_dict(load_config(config)["model"]["gpt"])
    lzma_code = measure_code_size(["pergroup_v2"], methods, wrapper="lzma", model=model).counted_bytes
    brotli_code = measure_code_size(["pergroup_v2"], methods, model=model).counted_bytes
    assert summary["artifact"]["code_bytes"] == lzma_code != brotli_code
