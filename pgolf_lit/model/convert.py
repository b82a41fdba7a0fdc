"""Interop with upstream ``train_gpt.py`` checkpoints.

Our parameter names are the upstream state-dict keys, so converting is checking: every key present, no key
left over, every shape as the config implies, 0-d scalars kept 0-d. Upstream stores embedding tables in bf16;
our model keeps fp32 master weights, so tensors are cast to our dtypes on the way in and (optionally) back to
the upstream dtype policy on the way out (spec/model.md §1.5, §5).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from pgolf_lit.config import GPTConfig, gpt_config_from_yaml, record_config_path
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.roles import parameter_roles

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
}

# Variants that exist only to load checkpoints of a script version that is not a record preset.
RECORD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # PR #1278's record-folder train_gpt.py: skip rows sized from 11 layers, its defective skip consumption
    "pr1278_folder_copy": ("pr1278_slot32_recur", {"skip_rows": "physical", "skip_wiring": "folder_copy"}),
}

# Records whose script sizes the RoPE rescale threshold from TRAIN_SEQ_LEN (Family A hard-codes 1024).
_ROPE_FOLLOWS_TRAIN_SEQ_LEN = {"pr1421_recur_ema9965", "pr1333_sp4096_causal_slot", "pr1394_sp8192_loop45"}

# Upstream hyperparameter names whose value maps onto a GPTConfig field of another name.
_UPSTREAM_FIELD_NAMES = {"skip_gates_enabled": "skip_gates", "vrl_enabled": "vrl", "dtg_enabled": "dtg"}


def record_gpt_config(record: str) -> GPTConfig:
    """The GPTConfig of a record preset, by our name, an upstream alias, or a loading variant."""
    record = RECORD_ALIASES.get(record, record)
    if record in RECORD_VARIANTS:
        base, changes = RECORD_VARIANTS[record]
        return record_gpt_config(base).replace(**changes)
    return gpt_config_from_yaml(record_config_path(record))


def config_from_upstream(record: str, changes: Mapping[str, Any]) -> GPTConfig:
    """A record preset with upstream hyperparameter overrides (lower-case env names) applied.

    Only names that are architecture fields change the config; list-valued knobs given as upstream strings
    ("9,10") are parsed. Unknown names are ignored, so a full upstream ``Hyperparameters`` dict can be passed.
    """
    cfg = record_gpt_config(record)
    base = RECORD_VARIANTS.get(RECORD_ALIASES.get(record, record), (RECORD_ALIASES.get(record, record),))[0]
    fields = set(cfg.to_dict())
    update: dict[str, Any] = {}
    for name, value in changes.items():
        name = _UPSTREAM_FIELD_NAMES.get(name, name)
        if name not in fields:
            continue
        if name in ("ve_layers", "recur_layers") and isinstance(value, str):
            value = [int(x) for x in value.split(",") if x.strip()]
        update[name] = value
    if "train_seq_len" in changes and base in _ROPE_FOLLOWS_TRAIN_SEQ_LEN:
        update.setdefault("rope_train_seq_len", int(changes["train_seq_len"]))
    return cfg.replace(**update) if update else cfg


def load_upstream_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load an upstream state dict into our GPT strictly, with one clear error per mismatch kind."""
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:3]}")
        raise ConfigError(f"{source}: does not match the config's model ({'; '.join(parts)}); check --config")
    converted = {}
    for name, ref in ours.items():
        t = state_dict[name]
        if not isinstance(t, Tensor):
            raise ConfigError(f"{source}: entry {name} is a {type(t).__name__}, expected a tensor")
        if tuple(t.shape) != tuple(ref.shape):
            raise ConfigError(
                f"{source}: {name} has shape {tuple(t.shape)}, the config's model expects {tuple(ref.shape)}"
            )
        converted[name] = t.to(ref.dtype)
    model.load_state_dict(converted, strict=True)


def to_upstream_state_dict(model: nn.Module, upstream_dtypes: bool = True) -> dict[str, Tensor]:
    """Our weights under the upstream keys, in the records' dtypes (each parameter's declared ``record_dtype``:
    bf16 token tables and iteration embeddings) unless told otherwise."""
    roles = parameter_roles(model)
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if upstream_dtypes and name in roles and roles[name].record_dtype == "bf16":
            t = t.to(torch.bfloat16)
        out[name] = t.contiguous()
    return out
