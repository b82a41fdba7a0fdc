"""Which tensor gets which treatment: categories by name and the keep-float rules (spec/quantization.md §3).

Every record routes a state-dict entry by its name and size alone: small tensors stay float (they cost little and
hold the sensitive gains and mixes), large ones are quantized with the rule of their category.
"""

from __future__ import annotations

from typing import Literal

from pgolf_lit.config import BASELINE_CONTROL_PATTERNS

Category = Literal["embed", "mlp", "attn", "other"]

# Float tensors with at most this many elements are stored as floats (the comparison is <=).
KEEP_FLOAT_MAX_NUMEL = 65_536

# The lists of the later scripts; they only decide what a *large* tensor named like a control does (nothing in
# practice: every control tensor is small).
PR1263_CONTROL_PATTERNS = BASELINE_CONTROL_PATTERNS + ("smear", "dtg_gate", "ve_layer_scales", "ve_shared.scale")
PR1333_CONTROL_PATTERNS = BASELINE_CONTROL_PATTERNS + ("skip_gates", "ve_layer_scales", "ve_shared.scale", "lane_merge")
PR1394_CONTROL_PATTERNS = BASELINE_CONTROL_PATTERNS + ("skip_gates",)


def classify(name: str) -> Category:
    """The records' category of a state-dict key: tied/untied head tables, MLP, attention (incl. other ``.proj.``)."""
    if "tok_emb" in name or "lm_head" in name:
        return "embed"
    if ".mlp." in name:
        return "mlp"
    if ".attn." in name or ".proj." in name:
        return "attn"
    return "other"


def is_control(name: str, patterns: tuple[str, ...]) -> bool:
    return any(p in name for p in patterns)
