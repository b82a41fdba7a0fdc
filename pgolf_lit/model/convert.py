"""Interop with upstream ``train_gpt.py`` checkpoints: the record-config lookups of upstream hyperparameters, over
``state_dicts.py`` (strict loading, PR #1855's parameter banks, record dtypes), whose names it re-exports."""

from __future__ import annotations

from typing import Any, Mapping

from pgolf_lit.config import GPTConfig, gpt_config_from_yaml, load_config, record_config_path
from pgolf_lit.model.state_dicts import (  # noqa: F401  (re-exported: reading an artifact imports state_dicts alone)
    BANK_NAMES,
    BANKS,
    bank_slices,
    bank_state_dict,
    load_upstream_state_dict,
    to_upstream_state_dict,
    unbank_state_dict,
)

# Names the upstream fixtures and scripts use for a record, mapped to our record configs.
RECORD_ALIASES = {
    "baseline": "baseline_sp1024",
    "pr1263": "pr1263_slot16",
    "pr1278": "pr1278_slot32_recur",
    "pr1321": "pr1321_slot48",
    "pr1334": "pr1421_recur_ema9965",  # PR #1334's model is PR #1421's (which only changes the EMA decay)
    "pr1421": "pr1421_recur_ema9965",
    "pr1333": "pr1333_sp4096_causal_slot",
    "pr1394": "pr1394_sp8192_loop45",
    "pr1855": "pr1855_sp8192_lqer_sparsegate",
    "pr1945": "pr1945_awq_asymlogit",
    "pr1953": "pr1953_longctx_noqv",
    "pr2014": "pr2014_progressive_shortdoc",
    "pr2135": "pr2135_calib32_ngram_tilt",
}

# Variants that exist only to load checkpoints of a script version that is not a record preset.
RECORD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # PR #1278's record-folder train_gpt.py: skip rows sized from 11 layers, its defective skip consumption
    "pr1278_folder_copy": ("pr1278_slot32_recur", {"skip_rows": "physical", "skip_wiring": "folder_copy"}),
}

# Upstream hyperparameter names whose value maps onto a GPTConfig field of another name.
_UPSTREAM_FIELD_NAMES = {
    "skip_gates_enabled": "skip_gates", "vrl_enabled": "vrl", "dtg_enabled": "dtg",
    "smear_gate_enabled": "smear_gate", "sparse_attn_gate_enabled": "sparse_attn_gate",
}  # fmt: skip


def _coerce_like(value: Any, current: Any) -> Any:
    """An env-style string (``"48"``, ``"0.5"``, ``"1"``) as the type of the field's current value."""
    if not isinstance(value, str) or isinstance(current, str):
        return value
    if isinstance(current, bool):
        return bool(int(value))
    if isinstance(current, int):
        return int(value)
    if isinstance(current, float):
        return float(value)
    return value


def record_gpt_config(record: str) -> GPTConfig:
    """The GPTConfig of a record preset, by our name, an upstream alias, or a loading variant."""
    record = RECORD_ALIASES.get(record, record)
    if record in RECORD_VARIANTS:
        base, changes = RECORD_VARIANTS[record]
        return record_gpt_config(base).replace(**changes)
    return gpt_config_from_yaml(record_config_path(record))


def _rope_follows_train_seq_len(record: str) -> bool:
    """The record config's ``record.rope_follows_train_seq_len``: its script sizes the RoPE rescale threshold from
    TRAIN_SEQ_LEN (the baseline's family hard-codes 1024)."""
    return bool((load_config(record_config_path(record)).get("record") or {}).get("rope_follows_train_seq_len"))


def config_from_upstream(record: str, changes: Mapping[str, Any], harness_cast: bool = False) -> GPTConfig:
    """A record preset with upstream hyperparameter overrides (lower-case env names) applied.

    Only names that are architecture fields change the config; list-valued knobs given as upstream strings
    ("9,10") are parsed, other env-style strings take the field's type. Unknown names are ignored, so a full
    upstream ``Hyperparameters`` dict (or env) can be passed. ``rope_yarn`` false (PR #1855) turns the RoPE
    length rescale off whatever ``rope_train_seq_len`` says.

    The model is the one the script's constructor builds from these hyperparameters: its RoPE tables are fp32
    (``rope_inv_freq_dtype`` / ``rope_positions_dtype`` fp32, as every fixture ran it) unless ``harness_cast``:
    then the preset's, i.e. as the script's run casts the model with ``.bfloat16()`` before training and before
    evaluating (what ``pgolf convert --from-upstream`` with the record's config gives).
    """
    cfg = record_gpt_config(record)
    base = RECORD_VARIANTS.get(RECORD_ALIASES.get(record, record), (RECORD_ALIASES.get(record, record),))[0]
    current = cfg.to_dict()
    update: dict[str, Any] = {}
    for name, value in changes.items():
        name = _UPSTREAM_FIELD_NAMES.get(name.lower(), name.lower())
        if name not in current:
            continue
        if name in ("ve_layers", "recur_layers") and isinstance(value, str):
            value = [int(x) for x in value.split(",") if x.strip()]
        update[name] = _coerce_like(value, current[name])
    if "train_seq_len" in changes and _rope_follows_train_seq_len(base):
        update.setdefault("rope_train_seq_len", int(changes["train_seq_len"]))
    rope_yarn = {k.lower(): v for k, v in changes.items()}.get("rope_yarn")
    if rope_yarn is not None and not _coerce_like(rope_yarn, True):
        update["rope_train_seq_len"] = 0
    if not harness_cast:
        update.setdefault("rope_inv_freq_dtype", "fp32")
        update.setdefault("rope_positions_dtype", "fp32")
    return cfg.replace(**update) if update else cfg
