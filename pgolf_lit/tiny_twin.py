"""A record config's tiny twin, derived: the overlay that shrinks its sizes and changes nothing else.

The hand-written ``configs/records/*_tiny.yaml`` follow one rule (tests/cli/test_architecture.py checks it: only sizes,
step counts, where the data is and the device count change; every switch, callback and evaluation procedure stays);
``tiny_twin_overlay`` applies the same rule to any config, so a leaderboard row gets its twin without a file:
one CPU process, 64-wide blocks over the embedded corpus at vocabulary 1024 (its CaseOps form when the record reads
CaseOps data), 128-token training sequences, 20 steps without a wallclock cap, and short evaluation passes.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from pgolf_lit.config import merge_configs

TRAIN_SEQ_LEN = 128
STEPS = 20
TRAINER = dict(
    accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_steps=STEPS, val_check_interval=STEPS,
    log_every_n_steps=5,
)  # fmt: skip
GPT = dict(vocab_size=1024, model_dim=64, num_heads=4, num_kv_heads=2)
DATA = dict(
    train_batch_tokens=2048, train_seq_len=TRAIN_SEQ_LEN, grad_accum_base=1, val_batch_tokens=4096,
    val_max_tokens=4096, build_embedded=True,
)  # fmt: skip
# The evaluation sections' sizes, for the methods a config scores (phased TTT's context follows the eval length).
EVAL_SECTIONS = {
    "slot": dict(steps=4, batch_windows=8),
    "causal_slot": dict(steps=4, batch_windows=8),
    "ttt": dict(chunk_tokens=2048, epochs=1, batch_seqs=4),
    "doc_isolated": dict(batch_seqs=4),
    "phased_ttt": dict(chunk=32, batch_docs=4, lora_rank=4, prefix_docs=8, global_batch_seqs=2, schedule_world=1),
}
_DATASET = re.compile(r"^.*?fineweb10B_sp\d+")


def tiny_twin_overlay(config: dict[str, Any]) -> dict[str, Any]:
    """The overlay (``extends``-style, sizes only) that makes ``config`` (overlays resolved) its CPU twin."""
    model = config.get("model") or {}
    gpt, data = model.get("gpt") or {}, config.get("data") or {}
    train_seq_len = int(data.get("train_seq_len") or 1024)

    def scaled(length: int) -> int:  # a sequence length in proportion to the training length
        return max(8, round(length * TRAIN_SEQ_LEN / train_seq_len))

    tiny_gpt: dict[str, Any] = dict(GPT)
    if gpt.get("embedding_dim"):
        tiny_gpt["embedding_dim"] = GPT["model_dim"]
    if gpt.get("rope_dims"):
        tiny_gpt["rope_dims"] = 4
    if gpt.get("rope_train_seq_len"):
        tiny_gpt["rope_train_seq_len"] = scaled(gpt["rope_train_seq_len"])
    if gpt.get("bigram_vocab_size"):
        tiny_gpt.update(bigram_vocab_size=128, bigram_dim=16)
    if gpt.get("ve_enabled"):
        tiny_gpt["ve_dim"] = 16
    if gpt.get("gate_window", 12) >= gpt.get("model_dim", 512):  # a gate over every channel (PR #1736's dense one)
        tiny_gpt["gate_window"] = GPT["model_dim"]

    evaluation = model.get("evaluation") or {}
    eval_seq_len = scaled(int(evaluation.get("seq_len") or train_seq_len))
    tiny_eval: dict[str, Any] = {"seq_len": eval_seq_len, "stride": 32}
    for method in model.get("test_methods") or []:
        if method in EVAL_SECTIONS:
            tiny_eval[method] = dict(EVAL_SECTIONS[method])
    if "phased_ttt" in tiny_eval:
        tiny_eval["phased_ttt"].update(context=eval_seq_len, global_chunk_tokens=4 * eval_seq_len)

    tiny_model: dict[str, Any] = {"gpt": tiny_gpt, "evaluation": tiny_eval, "compile": False, "train_log_every": 5}
    if (model.get("schedule") or {}).get("warmdown", "iters") == "iters":
        tiny_model["schedule"] = {"warmdown_iters": STEPS // 3}

    callbacks = [_tiny_callback(cb) for cb in (config.get("trainer") or {}).get("callbacks") or []]
    trainer: dict[str, Any] = dict(TRAINER)
    if callbacks:
        trainer["callbacks"] = callbacks
    tiny_data = dict(DATA)
    if data.get("seq_schedule"):  # progressive context (PR #2014): each stage in proportion, a multiple of 32
        from pgolf_lit.data.seq_schedule import SeqSchedule

        stages = SeqSchedule.parse(str(data["seq_schedule"]), train_seq_len).stages
        lengths = [max(32, 32 * round(scaled(length) / 32)) for _, length in stages]
        tiny_data["seq_schedule"] = SeqSchedule(tuple((t, n) for (t, _), n in zip(stages, lengths))).describe()
        tiny_data["train_seq_len"] = max(lengths)
        row = math.lcm(*lengths)  # every stage cuts the packed row into whole pieces
        tiny_data["train_batch_tokens"] = row * -(-DATA["train_batch_tokens"] // row)
        if (model.get("schedule") or {}).get("seq_change_warmup_steps"):
            tiny_model.setdefault("schedule", {})["seq_change_warmup_steps"] = 3
    if data.get("data_dir"):
        tiny_data["data_dir"] = _DATASET.sub("data/demo/datasets/fineweb10B_sp1024", str(data["data_dir"]))
    return {"trainer": trainer, "model": tiny_model, "data": tiny_data, "record": {"world": 1}}


def tiny_twin(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with its tiny twin's overlay merged on top (a config ``pgolf fit --config`` takes as a string)."""
    from pgolf_lit.config import without_published_record

    return merge_configs(without_published_record(copy.deepcopy(config)), tiny_twin_overlay(config))


def _tiny_callback(callback: dict[str, Any]) -> dict[str, Any]:
    """A callback entry's size arguments at twin scale (matched by class by ``merge_configs``)."""
    name = str(callback.get("class_path", "")).rsplit(".", 1)[-1]
    args = callback.get("init_args") or {}
    tiny: dict[str, Any] = {}
    if name == "WallclockBudget":
        tiny = {"max_seconds": 0}  # no cap: the twin's events land at the same step on any machine
    elif name == "CompilePriming":
        tiny = {"steps": 2 if args.get("steps", 20) else 0}
        if args.get("recurrent_steps"):
            tiny["recurrent_steps"] = 2
    elif name == "RecurrenceActivation" and args.get("at_step"):
        tiny = {"at_step": STEPS // 3}
    elif name == "EMA":
        tiny = {"decay": 0.9}
    elif name == "SWA":
        tiny = {"every": 2}
    elif name == "GPTQExport":
        tiny = {"export": {"keep_float_max_numel": 4096}, "calibration_batches": 4}
    return {"class_path": callback["class_path"], **({"init_args": tiny} if tiny else {})}
