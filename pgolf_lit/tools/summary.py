"""``pgolf summary --config X``: what a user checks before spending GPU money.

Prints the total parameter count (``total_params: N``), the count by owning technique (each parameter's declared
role), the layer schedule with and
without recurrence, and an estimate of the int6 artifact size.

The size estimate is the entropy of Gaussian weights quantized by the config's GPTQExport rules where they are
SDClip rules (bits and k per quant group; PR #1394's k = 12.85 σ int6 matrices and k = 20 σ int8 embedding
otherwise; small tensors fp16; one fp16 scale per row). An entropy coder lands close to it (brotli-11 on the real
PR #1394 weights: 15.97 MB against a 15.7 MB estimate), but it is an estimate: the exported artifact's size is
the number that counts.
"""

from __future__ import annotations

import argparse
import math

import torch

from typing import Optional

from pgolf_lit.config import callback_init_args, gpt_config_from_yaml, load_config
from pgolf_lit.model.gpt import GPT
from pgolf_lit.quant.quantizers import KEEP_FLOAT_MAX_NUMEL

# (bits, SDClip k) per quant group when the config names no SDClip rule: PR #1394's export.
DEFAULT_RULES = {"attn": (6, 12.85), "mlp": (6, 12.85), "other": (6, 12.85), "embed": (8, 20.0)}


def gaussian_code_bits(clip_sigmas: float, bits: int) -> float:
    """Entropy (bits per value) of N(0, 1) rounded to a grid of step k·σ/R (differential entropy − log2 step)."""
    step = clip_sigmas / (2 ** (bits - 1) - 1)
    return 0.5 * math.log2(2 * math.pi * math.e) - math.log2(step)


def export_rules(config: dict) -> dict[str, tuple[int, float]]:
    """(bits, SDClip k) per quant group from the config's GPTQExport ``export`` block (SDClip rules only)."""
    rules = dict(DEFAULT_RULES)
    export = (callback_init_args(config, "GPTQExport") or {}).get("export") or {}
    for group in rules:
        rule = export.get(group) or {}
        if rule.get("scale", "sdclip") == "sdclip" and "bits" in rule:
            rules[group] = (int(rule["bits"]), float(rule.get("clip_sigmas", 12.85)))
    return rules


def estimate_artifact_bytes(model: GPT, rules: Optional[dict[str, tuple[int, float]]] = None) -> int:
    rules = rules or DEFAULT_RULES
    total_bits = 0.0
    for name, p in model.state_dict().items():
        role = model.roles[name]
        if not role.exported:
            continue
        if p.numel() <= KEEP_FLOAT_MAX_NUMEL or role.is_control:
            total_bits += 16 * p.numel()
            continue
        bits, clip = rules.get(role.quant or "other", rules["other"])
        total_bits += gaussian_code_bits(clip, bits) * p.numel() + 16 * p.shape[0]
    return int(total_bits / 8)


def summarize(model: GPT, rules: Optional[dict[str, tuple[int, float]]] = None) -> list[str]:
    by_cat: dict[str, int] = {}
    for name, p in model.named_parameters():
        component = model.roles[name].component
        by_cat[component] = by_cat.get(component, 0) + p.numel()
    lines = [f"total_params: {model.num_params()}"]
    lines += [f"  {cat}: {n}" for cat, n in sorted(by_cat.items(), key=lambda kv: -kv[1])]
    active = model.recurrence_active
    model.set_recurrence(False)
    lines.append(f"layer_schedule (training start): {model.layer_schedule()}")
    model.set_recurrence(True)
    lines.append(f"layer_schedule (recurrence on, evaluation): {model.layer_schedule()}")
    model.set_recurrence(active)
    rules = rules or DEFAULT_RULES
    est = estimate_artifact_bytes(model, rules)
    how = ", ".join(f"{g} {k:g}σ/int{b}" for g, (b, k) in rules.items())
    lines.append(f"int6 artifact estimate: {est} bytes model (Gaussian entropy at SDClip {how})")
    return lines


def main(argv) -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="pgolf summary", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a pgolf YAML config (its model.gpt section is used)")
    args = parser.parse_args(argv)
    # Shapes are all a summary reads: build on the meta device (no weights, no orthogonal init of ~30M values).
    with torch.device("meta"):
        model = GPT(gpt_config_from_yaml(args.config))
    print("\n".join(summarize(model, export_rules(load_config(args.config)))))
