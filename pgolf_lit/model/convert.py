"""Interop with upstream ``train_gpt.py`` checkpoints.

Up to PR #1394 our parameter names are the upstream state-dict keys, so converting is checking: every key
present, no key left over, every shape as the config implies, 0-d scalars kept 0-d. PR #1855 (from PR #1523 on)
stores the 66 block matrices in four parameter banks; those are mapped to and from our per-block names exactly
as the script's own ``_unbank_state_dict`` / ``_rebank_state_dict`` do (PR #1855 train_gpt.py):

    qo_bank[i] = blocks.i.attn.c_q.weight      qo_bank[L+i] = blocks.i.attn.proj.weight
    kv_bank[i] = blocks.i.attn.c_k.weight      kv_bank[L+i] = blocks.i.attn.c_v.weight
    mlp_up_bank[i] = blocks.i.mlp.fc.weight    mlp_down_bank[i] = blocks.i.mlp.proj.weight

Upstream stores embedding tables in bf16. A GPT is built fp32 (under a bf16 precision the module then applies
the records' dtype policy, ``GPT.apply_record_dtypes``), so tensors are cast to the model's dtypes on the way in
and (optionally) to the upstream dtype policy on the way out (each parameter role's ``record_dtype``).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

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
    "pr1855": "pr1855_sp8192_lqer_sparsegate",
    "pr1945": "pr1945_awq_asymlogit",
    "pr1953": "pr1953_longctx_noqv",
}

# Variants that exist only to load checkpoints of a script version that is not a record preset.
RECORD_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # PR #1278's record-folder train_gpt.py: skip rows sized from 11 layers, its defective skip consumption
    "pr1278_folder_copy": ("pr1278_slot32_recur", {"skip_rows": "physical", "skip_wiring": "folder_copy"}),
}

# Records whose script sizes the RoPE rescale threshold from TRAIN_SEQ_LEN (Family A hard-codes 1024).
_ROPE_FOLLOWS_TRAIN_SEQ_LEN = {"pr1421_recur_ema9965", "pr1333_sp4096_causal_slot", "pr1394_sp8192_loop45"}

# Upstream hyperparameter names whose value maps onto a GPTConfig field of another name.
_UPSTREAM_FIELD_NAMES = {
    "skip_gates_enabled": "skip_gates", "vrl_enabled": "vrl", "dtg_enabled": "dtg",
    "smear_gate_enabled": "smear_gate", "sparse_attn_gate_enabled": "sparse_attn_gate",
}  # fmt: skip

# The four banks of PR #1855 and, for each, the per-block matrices it stacks: (bank, [(offset, suffix), ...]).
# Slice offset·L + i of a bank is the matrix ``blocks.i.<suffix>``.
BANKS: tuple[tuple[str, tuple[tuple[int, str], ...]], ...] = (
    ("qo_bank", ((0, "attn.c_q.weight"), (1, "attn.proj.weight"))),
    ("kv_bank", ((0, "attn.c_k.weight"), (1, "attn.c_v.weight"))),
    ("mlp_up_bank", ((0, "mlp.fc.weight"),)),
    ("mlp_down_bank", ((0, "mlp.proj.weight"),)),
)
BANK_NAMES = tuple(name for name, _ in BANKS)


def bank_slices(num_layers: int) -> dict[str, tuple[str, int]]:
    """Per-block matrix name → (bank, slice index) for a model of ``num_layers`` blocks."""
    return {
        f"blocks.{i}.{suffix}": (bank, offset * num_layers + i)
        for bank, parts in BANKS
        for offset, suffix in parts
        for i in range(num_layers)
    }


def unbank_state_dict(state_dict: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """PR #1855's banked state dict under our per-block names (other entries unchanged); PR #1855 train_gpt.py
    ``_unbank_state_dict``. A bank whose leading size is not its matrix count is an error naming it."""
    out = {k: v for k, v in state_dict.items() if k not in BANK_NAMES}
    for bank, parts in BANKS:
        if bank not in state_dict:
            continue
        t = state_dict[bank]
        if not isinstance(t, Tensor) or t.dim() != 3 or t.size(0) != len(parts) * num_layers:
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ConfigError(
                f"{bank}: expected {len(parts) * num_layers} stacked matrices for {num_layers} layers, got {shape}"
            )
        for name, (b, index) in bank_slices(num_layers).items():
            if b == bank:
                out[name] = t[index].clone()
    return out


def bank_state_dict(state_dict: Mapping[str, Tensor], num_layers: int) -> dict[str, Tensor]:
    """Our per-block state dict with the block matrices stacked into PR #1855's four banks (first, in the
    script's order), PR #1855 train_gpt.py ``_rebank_state_dict``."""
    slices = bank_slices(num_layers)
    missing = sorted(set(slices) - set(state_dict))
    if missing:
        raise ConfigError(f"cannot build the parameter banks: missing {len(missing)} matrices, e.g. {missing[:3]}")
    out: dict[str, Tensor] = {}
    for bank, parts in BANKS:
        out[bank] = torch.stack(
            [state_dict[f"blocks.{i}.{suffix}"] for offset, suffix in parts for i in range(num_layers)]
        ).contiguous()
    out.update({k: v for k, v in state_dict.items() if k not in slices})
    return out


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


def config_from_upstream(record: str, changes: Mapping[str, Any]) -> GPTConfig:
    """A record preset with upstream hyperparameter overrides (lower-case env names) applied.

    Only names that are architecture fields change the config; list-valued knobs given as upstream strings
    ("9,10") are parsed, other env-style strings take the field's type. Unknown names are ignored, so a full
    upstream ``Hyperparameters`` dict (or env) can be passed. ``rope_yarn`` false (PR #1855) turns the RoPE
    length rescale off whatever ``rope_train_seq_len`` says.
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
    if "train_seq_len" in changes and base in _ROPE_FOLLOWS_TRAIN_SEQ_LEN:
        update.setdefault("rope_train_seq_len", int(changes["train_seq_len"]))
    rope_yarn = {k.lower(): v for k, v in changes.items()}.get("rope_yarn")
    if rope_yarn is not None and not _coerce_like(rope_yarn, True):
        update["rope_train_seq_len"] = 0
    return cfg.replace(**update) if update else cfg


def load_upstream_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Load an upstream state dict into our GPT strictly, with one clear error per mismatch kind. A banked state
    dict (PR #1855: ``qo_bank`` …) is recognised by its keys and unbanked first."""
    if any(name in state_dict for name in BANK_NAMES):
        try:
            state_dict = unbank_state_dict(state_dict, len(model.blocks))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
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


def to_upstream_state_dict(
    model: nn.Module, upstream_dtypes: bool = True, banked: Optional[bool] = None
) -> dict[str, Tensor]:
    """Our weights under the upstream keys, in the records' dtypes (each parameter's declared ``record_dtype``:
    bf16 token tables and iteration embeddings) unless told otherwise; the block matrices stacked into the four
    fp32 banks when ``banked`` (default: the config's ``state_dict_layout`` is ``banks``, PR #1855). Exports
    pass ``banked=False``: the records unbank before quantizing."""
    roles = parameter_roles(model)
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if upstream_dtypes and name in roles and roles[name].record_dtype == "bf16":
            t = t.to(torch.bfloat16)
        out[name] = t.contiguous()
    config = getattr(model, "config", None)
    if banked is None:
        banked = config is not None and getattr(config, "state_dict_layout", "per_block") == "banks"
    if banked:
        out = bank_state_dict(out, len(model.blocks))
    return out
