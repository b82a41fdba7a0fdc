"""The records above PR #1855 (PR #1945, #1953, #2135) against their own scripts: the frontier fixtures.

Fixtures: $PGOLF_FRONTIER_FIXTURES (default ../shared/fixtures/frontier); every value is read from a case's files (a
held-out twin with other seeds and shapes exists), and everything skips cleanly without them.

- ``model/<case>``: the model of #1945/#1953/#2014 and of #2135 (AsymLogit with distinct caps on the evaluation
  logits, the symmetric softcap in the loss, packed varlen rows, the TTT LoRA of the record's mask; #2135: SmearGate
  without its BOS mask, log p(hint)), atol from the case.
- ``quant/<case>``: PR #1945's serialize (AWQ-lite selection and the protected group inside GPTQ, the int8 gate,
  LQER after AWQ): codes, scales, ``.awqg_*``, factors and meta exact, dequantized tensors bit-exact (sha256), the
  PGRP artifact byte-exact with the fixture's lrzip/brotli/torch builds.
- ``eval/<case>``: PR #1953's, PR #2014's and PR #2135's ``eval_val_ttt_phased`` on a tiny model (#1953: no-Q/V
  adapters, LoRA lr ×0.75, its context; #2014: short-document chunks chosen per batch, one phase, the val tail kept;
  #2135: K off, one phase, the scored distributions tilted by the n-gram hints, which must equal the case's):
  val_loss/val_bpb, per-document and per-chunk loss sums, the adapters' creations (A drawn from the record's seed),
  the global phases' token counts; the case's variants (each delta undone) by val_loss/val_bpb.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import fixture_root
from pgolf_lit.config import load_config, record_config_path
from pgolf_lit.eval.phased_ttt import PhasedTTTSettings, _ttt_logits
from pgolf_lit.model.convert import RECORD_ALIASES, config_from_upstream, load_upstream_state_dict, record_gpt_config
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.lora import BatchedTTTLoRA
from pgolf_lit.optim.groups import OptimConfig, route_parameters

ENV = "PGOLF_FRONTIER_FIXTURES"
ROOT = fixture_root(ENV, "frontier")
# The fixtures' record names whose model a config here builds (PR #2014 changes training and TTT only: its model is
# PR #1953's, as the model case says: "= the model of #1945/#1953/#2014"; its config builds it).
MODEL_OF = {"pr1945": "pr1945", "pr1953": "pr1953", "pr2014": "pr2014", "pr2135": "pr2135"}


def _cases(kind: str) -> list:
    folder = ROOT / kind if ROOT is not None else None
    if folder is None or not folder.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no frontier {kind} fixtures: set {ENV}"))]
    params = []
    for p in sorted(q for q in folder.iterdir() if (q / "hparams.json").is_file()):
        record = json.loads((p / "hparams.json").read_text())["record"]
        marks = [] if record in MODEL_OF else [pytest.mark.skip(reason=f"{record}'s model is not ported here")]
        params.append(pytest.param(p, id=p.name, marks=marks))
    return params


MODEL_CASES = _cases("model")


def _load(path: Path):
    return torch.load(path, weights_only=True)


def looping_active(described: str) -> bool:
    """The recurrence state a case states in prose (``looping_active=True``, ``looping_active = True``)."""
    found = re.findall(r"looping_active\s*=\s*(True|False)", described)
    assert len(set(found)) == 1, f"the case does not state its looping state once: {described!r}"
    return found[0] == "True"


def build_model(case: Path) -> tuple[dict, GPT]:
    """Our GPT for a model case: the record config under the case's resolved upstream hyperparameters (sizes
    shrunk), the case's upstream weights, looping as the case's outputs were taken."""
    hp = json.loads((case / "hparams.json").read_text())
    record = MODEL_OF[hp["record"]]
    cfg = config_from_upstream(record, hp["hyperparameters"])
    shrunk = config_from_upstream(record, {k: v["fixture"] for k, v in hp["changed_from_record"].items()})
    assert cfg == shrunk, "the record config differs from the record's own hyperparameters beyond the shrink"
    model = GPT(cfg)
    load_upstream_state_dict(model, _load(case / "state_dict.pt"), str(case / "state_dict.pt"))
    model.set_recurrence(looping_active(hp["outputs"]["logits"]))
    return hp, model.eval()


def fixture_lora(case: Path, hp: dict, model: GPT) -> BatchedTTTLoRA:
    """The case's LoRA; which adapters exist is read from its keys (the record's TTT mask)."""
    saved = _load(case / hp["ttt_lora"]["file"])
    present = {kind: any(k.startswith(f"{kind}_loras.") for k in saved) for kind in ("q", "k", "v", "o", "mlp")}
    spec = hp["ttt_lora"]
    lora = BatchedTTTLoRA(model, spec["bsz"], spec["rank"], spec["alpha"], **present)
    lora.load_state_dict(saved, strict=True)
    return lora


@pytest.mark.parametrize("case", MODEL_CASES)
def test_model_outputs_match_the_record(case):
    hp, model = build_model(case)
    inputs, ref = _load(case / "inputs.pt"), _load(case / "outputs.pt")
    ids, targets = inputs["input_ids"], inputs["target_ids"]
    assert model.num_params() == hp["param_count"]

    def close(ours, theirs, what):
        torch.testing.assert_close(ours, theirs, atol=hp["atol"], rtol=0, msg=lambda m: f"{what}: {m}")

    with torch.no_grad():
        close(model.forward_logits(ids), ref["logits"], "logits (asymmetric softcap)")
        close(model(ids, targets), ref["loss"], "loss (symmetric softcap)")
        close(model.normalize_hidden(model.forward_hidden(ids)), ref["hidden"], "hidden (final_norm output)")
        packed_ids, packed_targets = ids.reshape(1, -1), targets.reshape(1, -1)
        cu, max_seqlen = ref["cu_seqlens"], int(ref["max_seqlen"])
        close(model.forward_logits(packed_ids, cu, max_seqlen), ref["logits_varlen"], "logits_varlen")
        close(model(packed_ids, packed_targets, cu, max_seqlen), ref["loss_varlen"], "loss_varlen")
        lora = fixture_lora(case, hp, model)
        close(model.forward_ttt(ids, targets, lora), ref["ttt_per_token_loss"], "ttt_per_token_loss")
        if "ttt_log_q_hint" in ref:  # PR #2135's forward_ttt(..., hint_ids): the same loss and log p(hint)
            close(model.forward_ttt(ids, targets, lora), ref["ttt_per_token_loss_hint_path"], "loss (hint path)")
            log_probs = _ttt_logits(model, ids, lora).float().log_softmax(-1)
            log_q = log_probs.gather(-1, ref["hint_ids"][..., None]).squeeze(-1)
            close(log_q, ref["ttt_log_q_hint"], "ttt_log_q_hint")


def scored_phased_ttt(record: str) -> PhasedTTTSettings:
    """The settings of the phased TTT a record config scores with: its last phased pass (``phased_ttt``, or
    ``ngram_tilt``, phased TTT with the n-gram tilt)."""
    from pgolf_lit.records import record_eval_settings, record_test_methods

    method = [m for m in record_test_methods(record) if m in ("phased_ttt", "ngram_tilt")][-1]
    return getattr(record_eval_settings(record), method)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_ttt_mask_of_the_case_is_the_record_configs(case):
    """The adapters the case's LoRA holds are the ones the record config's phased TTT builds."""
    hp, model = build_model(case)
    saved = _load(case / hp["ttt_lora"]["file"])
    settings = scored_phased_ttt(RECORD_ALIASES[MODEL_OF[hp["record"]]])
    for kind in ("q", "k", "v", "o", "mlp"):
        assert any(k.startswith(f"{kind}_loras.") for k in saved) == getattr(settings, f"{kind}_lora"), kind


@pytest.mark.parametrize("case", MODEL_CASES)
def test_asym_caps_are_untrained_as_in_the_record(case):
    """``checks``: the caps are in no optimizer group and get no gradient from GPT.forward."""
    hp, model = build_model(case)
    checks = hp["checks"]
    routing = route_parameters(model, OptimConfig())
    assert sorted(n for n, _ in routing.no_optimizer) == sorted(checks["params_in_no_optimizer_group"])
    inputs = _load(case / "inputs.pt")
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)  # as upstream, where they require grad: still no gradient reaches them
    model(inputs["input_ids"], inputs["target_ids"]).backward()
    without = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert without == sorted(checks["params_without_grad_from_GPT.forward"])


@pytest.mark.parametrize("case", MODEL_CASES)
def test_record_parameter_counts_of_the_case(case):
    hp = json.loads((case / "hparams.json").read_text())
    counted = 0
    for record, count in hp["record_param_count"].items():
        if not isinstance(count, int) or (record not in MODEL_OF and record not in RECORD_ALIASES):
            continue
        with torch.device("meta"):
            model = GPT(record_gpt_config(RECORD_ALIASES.get(MODEL_OF.get(record, record), record)))
        assert model.num_params() == count, record
        counted += 1
    assert counted >= 2


# ---------------------------------------------------------------------------------------------------------
# eval/<case>: the record's eval_val_ttt_phased on a tiny model (PR #1953: no-Q/V adapters, LoRA lr ×0.75, context)
# ---------------------------------------------------------------------------------------------------------

VARIANTS_KEY = "variants_(same_weights_and_seeds)"
# The records whose evaluation procedure is ported.
EVAL_PORTED = {"pr1945", "pr1953", "pr2014", "pr2135"}
SLOW_VARIANTS_OF = {"pr1953", "pr2014", "pr2135"}  # 5-8 s each; the primary case stays in the default suite


def _eval_params() -> list:
    params = []
    for p in _cases("eval"):
        case = p.values[0]
        if case is not None and not p.marks and not (case / "stream.json").is_file():
            continue  # not a phased TTT run (PR #2135's n-gram state case: tests/test_ngram_tilt.py)
        if case is None or p.marks or not (case / "expected.json").is_file():
            params.append(pytest.param(case, "primary", id=p.id, marks=p.marks))
            continue
        record = json.loads((case / "hparams.json").read_text())["record"]
        if record not in EVAL_PORTED:
            skip = pytest.mark.skip(reason="this record's evaluation procedure is not ported here")
            params.append(pytest.param(case, "primary", id=p.id, marks=[skip]))
            continue
        expected = json.loads((case / "expected.json").read_text())
        for variant in ["primary", *expected.get(VARIANTS_KEY, {})]:
            # PR #2135's variants (the tilt off, the BOS mask on) take ~20 s each and run paths the primary covers
            marks = [pytest.mark.slow] if record in SLOW_VARIANTS_OF and variant != "primary" else []
            params.append(pytest.param(case, variant, id=f"{case.name}-{variant[:24]}", marks=marks))
    return params


def _coerce(value: str, like):
    if isinstance(like, bool):
        return bool(int(value))
    return type(like)(value) if isinstance(like, (int, float)) else value


def short_doc_chunks(h: dict) -> list[list[int]]:
    """PR #2014's TTT_SHORT_SCORE_FIRST_STEPS ("48:4,160:8") as our [[max_doc_len, chunk], ...]; without steps its
    single TTT_SHORT_DOC_LEN / TTT_SHORT_CHUNK_SIZE pair; nothing when the switch is off (or before #2014)."""
    if not h.get("ttt_short_score_first_enabled"):
        return []
    items = [item for item in h["ttt_short_score_first_steps"].split(",") if item.strip()]
    if items:
        return [[int(x) for x in item.replace("=", ":").split(":")] for item in items]
    return [[h["ttt_short_doc_len"], h["ttt_short_chunk_size"]]] if h["ttt_short_chunk_size"] > 0 else []


def phased_settings(h: dict) -> PhasedTTTSettings:
    """The case's resolved upstream hyperparameters as our settings (the record's names in each field's doc)."""
    assert h["ttt_optimizer"] == "adam" and h["val_doc_fraction"] == 1.0
    # PR #2014's switches that its record leaves off (a separate short-document LoRA, an EMA template of LoRA means,
    # length filters on the trained documents) are not ported: a case must leave them off too
    assert not h.get("ttt_short_lora_enabled") and not h.get("ttt_warm_start_mean_enabled")
    assert not h.get("ttt_train_min_doc_len") and not h.get("ttt_train_max_doc_len")
    return PhasedTTTSettings(
        chunk=h["ttt_chunk_size"],
        short_doc_chunks=short_doc_chunks(h),
        context=h["ttt_eval_seq_len"],
        batch_docs=h["ttt_batch_size"],
        lora_rank=h["ttt_lora_rank"],
        q_lora=h.get("ttt_q_lora", True),  # PR #2135's script always has Q and V adapters
        k_lora=h["ttt_k_lora"],
        v_lora=h.get("ttt_v_lora", True),
        o_lora=h["ttt_o_lora"],
        mlp_lora=h["ttt_mlp_lora"],
        lora_lr=h["ttt_lora_lr"],
        local_lr_mult=h.get("ttt_local_lr_mult", 1.0),
        beta1=h["ttt_beta1"],
        beta2=h["ttt_beta2"],
        eps=h.get("ttt_adam_eps", 1e-10),
        weight_decay=h["ttt_weight_decay"],
        grad_steps=h["ttt_grad_steps"],
        prefix_docs=h["phased_ttt_prefix_docs"],
        num_phases=h["phased_ttt_num_phases"],
        global_lr=h["global_ttt_lr"],
        global_momentum=h["global_ttt_momentum"],
        global_epochs=h["global_ttt_epochs"],
        global_grad_clip=h["global_ttt_grad_clip"],
        global_chunk_tokens=h["global_ttt_chunk_tokens"],
        global_batch_seqs=h["global_ttt_batch_seqs"],
        global_respect_doc_boundaries=h["global_ttt_respect_doc_boundaries"],
        global_warmup_chunks=h["global_ttt_warmup_chunks"],
        global_warmup_start_lr=h["global_ttt_warmup_start_lr"],
    )


class ChunkRecorder:
    """The nll of every scored target, with its stream index."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.targets, self.nll = tokens, [], []

    def on_scores(self, target_index, log_probs, state_reads_upto):
        self.targets.append(target_index.cpu())
        self.nll.append(-log_probs.gather(1, self.tokens[target_index.cpu()].view(-1, 1)).squeeze(1).double().cpu())

    def on_update(self, first_token, last_token):
        pass


@pytest.mark.parametrize("case,variant", _eval_params())
def test_phased_ttt_matches_the_record(case, variant):
    from pgolf_lit.data.shards import load_validation_byte_sidecar, load_validation_tokens
    from pgolf_lit.eval.phased_ttt import evaluate_phased_ttt
    from pgolf_lit.eval.registry import PassSetup
    from pgolf_lit.metrics import BitsPerByte, ByteCounts

    torch.set_num_threads(1)  # the fixture was made on one thread; tiny tensors run fastest so
    hp = json.loads((case / "hparams.json").read_text())
    expected = json.loads((case / "expected.json").read_text())
    want = expected if variant == "primary" else expected[VARIANTS_KEY][variant]
    hyper = dict(hp["hyperparameters"])
    for name, value in (want.get("env") or {}).items():
        if name.lower() in hyper:
            hyper[name.lower()] = _coerce(value, hyper[name.lower()])
    cfg = phased_settings(hyper)
    record = MODEL_OF[hp["record"]]
    # the env of a variant may change the model too (PR #2135's SMEAR_GATE_BOS_FIX, read from the environment)
    model = GPT(config_from_upstream(record, {**hp["hyperparameters"], **(want.get("env") or {})}))
    load_upstream_state_dict(model, _load(case / "state_dict.pt"), str(case / "state_dict.pt"))
    assert model.num_params() == hp["weights"]["param_count"]
    model.set_recurrence(looping_active(hp["ttt_model"]))
    model.eval()
    seq_len = hyper["eval_seq_len"]
    data = case / json.loads((case / "stream.json").read_text())["dir"]
    tokens = load_validation_tokens(data, 1 if hyper.get("eval_include_tail") else seq_len)  # 1: the whole split
    sidecar = load_validation_byte_sidecar(data, tokens.numel(), bos_id=model.config.bos_id)

    # the adapters' A as the record draws them: one generator seeded as its torch.manual_seed, in creation order
    generator = torch.Generator().manual_seed(hp["ttt_rng"]["seed"])
    made: list[BatchedTTTLoRA] = []

    def factory(adapted: GPT, bsz: int) -> BatchedTTTLoRA:
        lora = BatchedTTTLoRA(
            adapted,
            bsz,
            cfg.lora_rank,
            q=cfg.q_lora,
            k=cfg.k_lora,
            v=cfg.v_lora,
            o=cfg.o_lora,
            mlp=cfg.mlp_lora,
            generator=generator,
        )
        made.append(lora)
        if variant == "primary":
            entry = expected["lora_creations"][len(made) - 1]
            kinds = sorted({k.split(".")[0] for k in lora.state_dict()})
            assert (bsz, cfg.lora_rank, kinds) == (entry["bsz"], entry["rank"], entry["keys"])
            assert sum(p.numel() for p in lora.parameters()) == entry["n_params"]
            a_sum = sum(float(m.A.detach().double().sum()) for m in lora.adapters())
            assert a_sum == pytest.approx(entry["A_sum"], rel=1e-9, abs=1e-9), len(made)
        return lora

    vocab = model.config.vocab_size
    no_luts = (
        torch.zeros(vocab, dtype=torch.int16),
        torch.zeros(vocab, dtype=torch.bool),
        torch.ones(vocab, dtype=torch.bool),
    )
    metric = BitsPerByte(ByteCounts(no_luts, sidecar))
    recorder = ChunkRecorder(tokens)
    setup = PassSetup(seq_len, seq_len, recorder=recorder)
    if hyper.get("ngram_tilt_enabled"):  # PR #2135: the scored distributions tilted by the n-gram hints
        from pgolf_lit.eval.ngram_tilt import NgramTiltSettings, evaluate_ngram_tilt

        tilt = NgramTiltSettings(
            **vars(cfg), order=hyper["token_order"], threshold=hyper["token_threshold"], boost=hyper["token_boost"]
        )
        assert hyper["within_tau"] > 1 and hyper["word_tau"] > 1 and hyper["agree_add_boost"] == 0  # token-only
        hints, summary = evaluate_ngram_tilt(model, tokens, metric, tilt, setup, lora_factory=factory).details
        if variant == "primary":
            ref = _load(case / expected["ngram_hints"]["file"])
            assert torch.equal(hints.hint, ref["hint_ids"]) and torch.equal(hints.gate, ref["gate_mask"])
            assert torch.equal(hints.boost_at(torch.arange(1, tokens.numel())), ref["boost"])
    else:
        summary = evaluate_phased_ttt(model, tokens, metric, cfg, setup, lora_factory=factory).details
    values = metric.compute()
    tol = hp["tolerance"]
    assert abs(float(values["loss"]) - want["val_loss"]) <= tol["val_loss"]
    assert abs(float(values["bpb"]) - want["val_bpb"]) <= tol["val_bpb"]
    if variant != "primary":
        return
    assert len(made) == len(expected["lora_creations"])
    assert int(metric.token_count) == expected["token_count"] and float(metric.byte_count) == expected["byte_count"]
    assert tokens.numel() == expected["val_tokens"]
    targets, nll = torch.cat(recorder.targets), torch.cat(recorder.nll)
    assert torch.equal(torch.sort(targets).values, torch.arange(1, tokens.numel()))
    longest_in_batch = {d: max(entry["doc_lens"]) for entry in expected["queue"] for d in entry["docs"]}
    for doc in expected["docs"]:
        mine = (targets > doc["start"]) & (targets < doc["start"] + doc["len"])
        assert int(mine.sum()) == doc["token_count"]
        assert float(sidecar[targets[mine]].sum()) == doc["byte_sum"]
        assert float(nll[mine].sum()) == pytest.approx(doc["loss_sum"], rel=1e-4), doc["doc_index"]
        chunk_of = (targets[mine] - doc["start"] - 1) // cfg.chunk_for(longest_in_batch[doc["doc_index"]])
        for ci, (loss_sum, count, byte_sum) in enumerate(doc["chunks"]):
            in_chunk = chunk_of == ci
            assert int(in_chunk.sum()) == count and float(sidecar[targets[mine][in_chunk]].sum()) == byte_sum
            assert float(nll[mine][in_chunk].sum()) == pytest.approx(loss_sum, rel=1e-4), (doc["doc_index"], ci)
    assert [p["tokens"] for p in summary["phases"]] == [p["tokens"] for p in expected["global_sgd_phases"]]


# ---------------------------------------------------------------------------------------------------------
# quant/<case>: PR #1945's serialize (AWQ-lite inside GPTQ, then LQER, the int8 gate, the PGRP container)
# ---------------------------------------------------------------------------------------------------------

# The records' gptq_mixed_quantize keeps every tensor of at most this many elements as fp16 (a script literal).
RECORD_KEEP_FLOAT_MAX_NUMEL = 65_536
BANK_PARTS = {
    "qo_bank": ("attn.c_q.weight", "attn.proj.weight"),
    "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
    "mlp_up_bank": ("mlp.fc.weight",),
    "mlp_down_bank": ("mlp.proj.weight",),
}
QUANT_PORTED = {"pr1945", "pr2135"}


def _quant_params() -> list:
    params = []
    for p in _cases("quant"):
        case = p.values[0]
        if (
            case is not None
            and not p.marks
            and json.loads((case / "hparams.json").read_text())["record"] not in QUANT_PORTED
        ):
            p = pytest.param(case, id=p.id, marks=[pytest.mark.skip(reason="this record's export is not ported")])
        elif case is not None and not p.marks and not (case / "act_stats.pt").is_file():
            p = pytest.param(case, id=p.id, marks=[pytest.mark.skip(reason="no activation statistics: not AWQ")])
        params.append(p)
    return params


QUANT_CASES = _quant_params()


def record_unbank(banked: dict, num_layers: int) -> dict:
    """The record's ``_unbank_state_dict`` order: each bank expanded where it stands, then the other entries."""
    out = {}
    for key, t in banked.items():
        if key in BANK_PARTS:
            for j, suffix in enumerate(BANK_PARTS[key]):
                for i in range(num_layers):
                    out[f"blocks.{i}.{suffix}"] = t[j * num_layers + i]
        else:
            out[key] = t
    return out


def record_route(h: dict, name: str, t: torch.Tensor):
    """The record's routing (``gptq_mixed_quantize``): "gate", "passthrough" or (bits, clip sigmas)."""
    from pr1855_case import is_quant_gate

    if h["gated_attn_quant_gate"] and is_quant_gate(name, t):
        return "gate"
    if not t.is_floating_point() or t.numel() <= RECORD_KEEP_FLOAT_MAX_NUMEL:
        return "passthrough"
    if "tok_emb" in name:
        return h["embed_bits"], h["embed_clip_sigmas"]
    sigmas = (
        h["mlp_clip_sigmas"]
        if ".mlp." in name
        else h["attn_clip_sigmas"]
        if ".attn." in name
        else h["matrix_clip_sigmas"]
    )
    return h["matrix_bits"], sigmas


def _plain_quant_params() -> list:
    """Quant cases without AWQ (PR #2135's: GPTQ, LQER, no gate, the PGRP v2 container)."""
    params = []
    for p in _cases("quant"):
        case = p.values[0]
        if case is None or p.marks:
            params.append(p)
        elif not (case / "act_stats.pt").is_file():
            params.append(pytest.param(case, id=p.id))
    return params or [pytest.param(None, marks=pytest.mark.skip(reason="no quant case without AWQ"))]


PLAIN_QUANT_CASES = _plain_quant_params()


def _sha256_of(t: torch.Tensor) -> str:
    import hashlib

    t = t.contiguous() if t.dim() else t.reshape(1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("case", PLAIN_QUANT_CASES)
def test_record_export_and_pergroup_v2_match_the_record(case):
    """PR #2135's serialize through the record config's export (GPTQ on the case's Hessians, LQER asym group 32, the
    attention gate kept fp16): codes, scales, factors and meta exact, the dequantized tensors bit-exact; its PGRP
    v2 container: the case's artifact decodes to the case's dict, and that dict encodes to the artifact's bytes."""
    import hashlib

    import brotli

    from pgolf_lit.quant import read_artifact
    from pgolf_lit.quant.export import quantize_state_dict
    from pgolf_lit.quant.lrzip import lrzip_version
    from pgolf_lit.quant.pergroup import dequantize_mixed, pergroup_from_quantized
    from pgolf_lit.quant.pergroup_v2 import decode_pergroup_v2, encode_pergroup_v2, record_v2_order

    torch.set_num_threads(1)
    hp = json.loads((case / "hparams.json").read_text())
    h = hp["hyperparameters"]
    cfg = record_export_settings(hp)
    assert cfg.format == "pergroup_v2" and cfg.gate is None and not h["gated_attn_quant_gate"]
    assert (cfg.lqer.rank, cfg.lqer.top_k, cfg.lqer.asym_group) == (
        h["lqer_rank"],
        h["lqer_top_k"],
        h["lqer_asym_group"],
    )
    _, roles = fixture_quant_model(case, hp)
    weights = {k: v.float() for k, v in record_unbank(_load(case / "state_dict.pt"), h["num_layers"]).items()}
    quant, meta = quantize_state_dict(weights, cfg, _load(case / "hessians.pt"), roles=roles)
    ours, strings = record_v2_order(*pergroup_from_quantized(quant, meta, "test"))
    expected, meta_ref = _load(case / "expected_quant.pt"), json.loads((case / "quant_meta.json").read_text())
    assert sorted(ours) == sorted(expected)
    for key, ref in expected.items():
        assert ours[key].dtype == ref.dtype and torch.equal(ours[key], ref), key
    assert list(strings.items()) == list(meta_ref.items())
    dequant_ref = json.loads((case / "expected_dequant.json").read_text())
    flat = dequantize_mixed(expected, meta_ref, {n: getattr(torch, e["dtype"]) for n, e in dequant_ref.items()})
    for name, entry in dequant_ref.items():
        assert _sha256_of(flat[name]) == entry["sha256"], name

    artifact = (case / "artifact.ptz").read_bytes()
    decoded, decoded_meta = decode_pergroup_v2(artifact, "artifact.ptz")
    assert list(decoded_meta.items()) == list(meta_ref.items()) and sorted(decoded) == sorted(expected)
    assert all(decoded[k].dtype == t.dtype and torch.equal(decoded[k], t) for k, t in expected.items())
    cfg_model = config_from_upstream(MODEL_OF[hp["record"]], {**h, "parallel_start_layer": 0})
    assert read_artifact(case / "artifact.ptz", cfg_model).format == "pergroup_v2"  # told apart from PGRP v1
    here = {"torch": torch.__version__, "brotli": brotli.__version__, "lrzip": lrzip_version()}
    if any(here[k] != hp["versions"][k] for k in here):
        pytest.skip("artifact bytes: library builds differ from the fixture's")
    art = json.loads((case / "artifact.json").read_text())
    blob = encode_pergroup_v2(expected, meta_ref)  # the record's dict, in its order
    assert len(blob) == art["bytes"] and hashlib.sha256(blob).hexdigest() == art["sha256"]


@pytest.mark.parametrize("case", PLAIN_QUANT_CASES)
def test_hessians_from_calibration_tokens(case):
    """Our calibration pass over the case's 32 batches gives its Hessians (sum over batches / 32)."""
    from pgolf_lit.quant.hessians import collect_hessians

    torch.set_num_threads(1)
    hp = json.loads((case / "hparams.json").read_text())
    cal = hp["calibration"]
    assert cal["num_batches"] == hp["hyperparameters"]["gptq_calibration_batches"]
    tokens, per = _load(case / cal["file"]), cal["seqs_per_batch"]
    cfg = record_export_settings(hp)
    hessians, _ = collect_hessians(
        fixture_quant_model(case, hp)[0],
        [tokens[i * per : (i + 1) * per] for i in range(cal["num_batches"])],
        modules=cfg.gptq.hessian_modules,
        head=cfg.head_uses_gptq,
        min_numel=cfg.keep_float_max_numel,
        progress=False,
    )
    ref = _load(case / hp["hessians"]["file"])
    assert set(hessians) <= set(ref) and set(hessians)
    for name in hessians:
        torch.testing.assert_close(hessians[name], ref[name], atol=1e-4 * ref[name].abs().max().item(), rtol=0)


@pytest.mark.parametrize("case", QUANT_CASES)
def test_awq_lite_gptq_matches_the_record(case):
    """state_dict + Hessians + activation RMS → AWQ-lite selection → GPTQ (protected group on the int8 grid) → gate
    int8 → LQER after AWQ: codes, scales, AWQ tensors, factors and meta exact; the dequantized tensors bit-exact;
    the PGRP artifact byte-exact (same lrzip/brotli/torch builds)."""
    import hashlib

    import brotli

    from pgolf_lit.quant.awq import AwqGroups, AwqSettings, protect_mask, select_groups
    from pgolf_lit.quant.gate import GATE_META
    from pr1855_case import quantize_gate_rows
    from pgolf_lit.quant.gptq import gptq_sdclip, gptq_sdclip_protected
    from pgolf_lit.quant.lqer import LqerSettings, lqer_apply
    from pgolf_lit.quant.lrzip import lrzip_version
    from pgolf_lit.quant.pergroup import PASSTHROUGH_META, dequantize_mixed, encode_pergroup, gptq_meta

    torch.set_num_threads(1)
    hp = json.loads((case / "hparams.json").read_text())
    h = hp["hyperparameters"]
    weights = {k: v.float() for k, v in record_unbank(_load(case / "state_dict.pt"), h["num_layers"]).items()}
    hessians, act_rms = _load(case / "hessians.pt"), _load(case / "act_stats.pt")
    expected, meta_ref = _load(case / "expected_quant.pt"), json.loads((case / "quant_meta.json").read_text())
    awq_ref = json.loads((case / "awq.json").read_text())

    routes = {name: record_route(h, name, t) for name, t in weights.items()}
    gptq = {n: weights[n] for n, r in routes.items() if isinstance(r, tuple)}
    awq = AwqSettings(bits=h["awq_lite_bits"], top_k=h["awq_lite_group_top_k"], group_size=h["awq_lite_group_size"])
    candidates, chosen = select_groups(gptq, act_rms, {n: routes[n][0] for n in gptq}, awq)
    assert [(n, s, e) for _, n, s, e in candidates] == [
        (c["name"], c["start"], c["end"]) for c in awq_ref["candidates_sorted"]
    ]
    assert [score for score, *_ in candidates] == [c["score"] for c in awq_ref["candidates_sorted"]]
    assert {n: [list(g) for g in gs] for n, gs in chosen.items()} == awq_ref["selected"]

    quant, meta = {}, {}
    for name, t in weights.items():
        route = routes[name]
        if route == "gate":
            quant[name + ".gq"], quant[name + ".gs"] = quantize_gate_rows(t)
            meta[name] = GATE_META
        elif route == "passthrough":
            quant[name], meta[name] = t.to(torch.float16), PASSTHROUGH_META
        else:
            bits, sigmas = route
            if name in chosen:
                mask = protect_mask(t.shape[1], chosen[name])
                q, s_hi = gptq_sdclip_protected(t, hessians[name], bits, sigmas, mask, awq.bits)
                groups = AwqGroups(
                    torch.tensor([s for s, _ in chosen[name]], dtype=torch.int16),
                    s_hi,
                    torch.tensor(awq.group_size, dtype=torch.int16),
                )
                quant.update({name + ".q": q.q, name + ".scale": q.scale, **groups.tensors(name)})
                meta[name] = gptq_meta(bits, awq_bits=awq.bits)
            else:
                q = gptq_sdclip(t, hessians[name], bits, sigmas)
                quant[name + ".q"], quant[name + ".scale"] = q.q, q.scale
                meta[name] = gptq_meta(bits)
    lqer = LqerSettings(
        rank=h["lqer_rank"],
        top_k=h["lqer_top_k"],
        asym=h["lqer_asym_enabled"],
        asym_group=h["lqer_asym_group"],
        factor_bits=h["lqer_factor_bits"],
    )
    for name, factors in lqer_apply(weights, quant, list(gptq), lqer).items():
        quant.update(factors.tensors(name))
        meta[name] += factors.meta_suffix
    assert sorted(quant) == sorted(expected)
    for key, ref in expected.items():
        assert quant[key].dtype == ref.dtype and torch.equal(quant[key], ref), key
    assert list(meta.items()) == list(meta_ref.items())

    dequant_ref = json.loads((case / "expected_dequant.json").read_text())
    dtypes = {name: getattr(torch, entry["dtype"]) for name, entry in dequant_ref.items()}
    flat = dequantize_mixed(quant, meta, dtypes)
    for name, entry in dequant_ref.items():
        t = flat[name].contiguous()
        assert (str(t.dtype).removeprefix("torch."), list(t.shape)) == (entry["dtype"], entry["shape"]), name
        assert (
            hashlib.sha256(
                t.view(torch.uint8).numpy().tobytes() if t.dim() else t.reshape(1).view(torch.uint8).numpy().tobytes()
            ).hexdigest()
            == entry["sha256"]
        ), name

    art = json.loads((case / "artifact.json").read_text())
    blob = encode_pergroup(quant, meta)
    versions = hp["versions"]
    here = {"torch": torch.__version__, "brotli": brotli.__version__, "lrzip": lrzip_version()}
    differ = [k for k in here if here[k] != versions[k]]
    if differ:
        pytest.skip(f"artifact bytes depend on {differ}: builds differ from the fixture's")
    assert len(blob) == art["bytes"] and hashlib.sha256(blob).hexdigest() == art["sha256"]


def fixture_quant_model(case: Path, hp: dict) -> tuple[GPT, dict]:
    """Our GPT for a quant case's script settings (fp32 weights of state_dict.pt, looping on as at calibration), and
    the roles of every entry of the record's state dict.

    With fewer layers than ``parallel_start_layer`` the record's lanes never start, but its script still creates the
    parallel lambdas (unused): our model has no lanes (parallel_start_layer 0) and the lambdas are left out of the
    load; their roles are those of the lanes' lambdas (controls)."""
    from pgolf_lit.model.gpt import roles_of

    changes = dict(hp["hyperparameters"])
    roles_extra = {}
    if int(changes.get("parallel_start_layer", 0)) >= int(changes["num_layers"]):
        changes["parallel_start_layer"] = 0
    cfg = config_from_upstream(MODEL_OF[hp["record"]], changes)
    model = GPT(cfg)
    sd = {k: v.float() for k, v in _load(case / "state_dict.pt").items()}
    lanes = {k for k in sd if k.startswith("parallel_") and k not in model.state_dict()}
    if lanes:
        lane_roles = roles_of(cfg.replace(num_layers=2, parallel_start_layer=1, parallel_residual="lambdas"))
        roles_extra = {k: lane_roles[k] for k in lanes}
    load_upstream_state_dict(model, {k: v for k, v in sd.items() if k not in lanes})
    model.set_recurrence(looping_active(hp["calibration"]["forward"]))
    return model.eval(), {**model.roles, **roles_extra}


def record_export_settings(hp: dict):
    """The record config's export (pr1945's GPTQExport.export) at the record script's keep-float size."""
    from pgolf_lit.config import callback_init_args
    from pgolf_lit.quant.export import ExportConfig

    record = RECORD_ALIASES[MODEL_OF[hp["record"]]]
    export = callback_init_args(load_config(record_config_path(record)), "GPTQExport")["export"]
    return ExportConfig.from_dict({**export, "keep_float_max_numel": RECORD_KEEP_FLOAT_MAX_NUMEL})


@pytest.mark.parametrize("case", QUANT_CASES)
def test_activation_stats_from_calibration_tokens(case):
    """Our calibration pass (collect_hessians on our GPT) gives the case's Hessians and activation RMS."""
    from pgolf_lit.quant.hessians import collect_hessians

    torch.set_num_threads(1)
    hp = json.loads((case / "hparams.json").read_text())
    cal = hp["calibration"]
    tokens = _load(case / cal["file"])
    per = cal["seqs_per_batch"]
    batches = [tokens[i * per : (i + 1) * per] for i in range(cal["num_batches"])]
    cfg = record_export_settings(hp)
    hessians, report = collect_hessians(
        fixture_quant_model(case, hp)[0],
        batches,
        modules=cfg.gptq.hessian_modules,
        head=cfg.head_uses_gptq,
        min_numel=cfg.keep_float_max_numel,
        progress=False,
    )
    ref_h, ref_rms = _load(case / hp["hessians"]["file"]), _load(case / hp["act_stats"]["file"])
    hooked = set(hessians)
    assert hooked <= set(ref_h) and hooked == set(report.act_rms)
    for name in hooked:
        torch.testing.assert_close(hessians[name], ref_h[name], atol=1e-4 * ref_h[name].abs().max().item(), rtol=0)
        torch.testing.assert_close(report.act_rms[name], ref_rms[name], atol=1e-4 * ref_rms[name].max().item(), rtol=0)
    # the record also hooks c_k/c_v, which its routing keeps as floats at this size: the same input as c_q
    assert all(
        torch.equal(ref_rms[n], ref_rms[n.replace(".c_k.", ".c_q.").replace(".c_v.", ".c_q.")])
        for n in set(ref_rms) - hooked
    )


@pytest.mark.parametrize("case", QUANT_CASES)
def test_record_export_setting_gives_the_records_artifact(case):
    """The record config's export (rules, gate, LQER, ``awq``) through ``quantize_state_dict`` on the case's
    weights, Hessians and activation RMS (in the record's state-dict order) → the record's codes, meta and bytes."""
    import hashlib

    import brotli

    from pgolf_lit.quant.export import quantize_state_dict
    from pgolf_lit.quant.lrzip import lrzip_version
    from pgolf_lit.quant.pergroup import encode_pergroup, pergroup_from_quantized

    torch.set_num_threads(1)
    hp = json.loads((case / "hparams.json").read_text())
    cfg = record_export_settings(hp)
    assert cfg.awq is not None and (cfg.awq.bits, cfg.awq.top_k, cfg.awq.group_size) == tuple(
        hp["hyperparameters"][k] for k in ("awq_lite_bits", "awq_lite_group_top_k", "awq_lite_group_size")
    )
    _, roles = fixture_quant_model(case, hp)
    weights = {
        k: v.float()
        for k, v in record_unbank(_load(case / "state_dict.pt"), hp["hyperparameters"]["num_layers"]).items()
    }
    quant, meta = quantize_state_dict(
        weights, cfg, _load(case / "hessians.pt"), roles=roles, act_rms=_load(case / "act_stats.pt")
    )
    strings = pergroup_from_quantized(quant, meta, "test")
    expected = _load(case / "expected_quant.pt")
    assert sorted(strings[0]) == sorted(expected)
    for key, ref in expected.items():
        assert strings[0][key].dtype == ref.dtype and torch.equal(strings[0][key], ref), key
    assert list(strings[1].items()) == list(json.loads((case / "quant_meta.json").read_text()).items())
    here = {"torch": torch.__version__, "brotli": brotli.__version__, "lrzip": lrzip_version()}
    if any(here[k] != hp["versions"][k] for k in here):
        pytest.skip("artifact bytes: library builds differ from the fixture's")
    art = json.loads((case / "artifact.json").read_text())
    assert hashlib.sha256(encode_pergroup(*strings)).hexdigest() == art["sha256"]
