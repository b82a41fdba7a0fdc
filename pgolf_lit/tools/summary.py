"""``pgolf summary --config X``: what a user checks before spending GPU money.

Prints the total parameter count (``total_params: N``), the count by owning technique (each parameter's declared
role), the layer schedule with and
without recurrence, and an estimate of the int6 artifact size.

The size estimate is the entropy of Gaussian weights quantized the way PR #1394 does (SDClip k = 12.85 σ on
int6 matrices, k = 20 σ on an int8 embedding; small tensors fp16; one fp16 scale per row). An entropy coder
lands close to it (brotli-11 on the real PR #1394 weights: 15.97 MB against a 15.7 MB estimate), but it is an
estimate: the exported artifact's size is the number that counts.
"""

from __future__ import annotations

import argparse
import math

from pgolf_lit.config import gpt_config_from_yaml
from pgolf_lit.model.gpt import GPT
from pgolf_lit.quant.quantizers import KEEP_FLOAT_MAX_NUMEL


def gaussian_code_bits(clip_sigmas: float, bits: int) -> float:
    """Entropy (bits per value) of N(0, 1) rounded to a grid of step k·σ/R (differential entropy − log2 step)."""
    step = clip_sigmas / (2 ** (bits - 1) - 1)
    return 0.5 * math.log2(2 * math.pi * math.e) - math.log2(step)


def estimate_artifact_bytes(model: GPT) -> int:
    total_bits = 0.0
    for name, p in model.state_dict().items():
        role = model.roles[name]
        if not role.exported:
            continue
        if p.numel() <= KEEP_FLOAT_MAX_NUMEL or role.is_control:
            total_bits += 16 * p.numel()
            continue
        bits = gaussian_code_bits(20.0, 8) if role.quant == "embed" else gaussian_code_bits(12.85, 6)
        total_bits += bits * p.numel() + 16 * p.shape[0]
    return int(total_bits / 8)


def summarize(model: GPT) -> list[str]:
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
    est = estimate_artifact_bytes(model)
    lines.append(f"int6 artifact estimate: {est} bytes model (Gaussian entropy at SDClip 12.85σ/int6, 20σ/int8 embed)")
    return lines


def main(argv) -> None:
    parser = argparse.ArgumentParser(prog="pgolf summary", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a pgolf YAML config (its model.gpt section is used)")
    args = parser.parse_args(argv)
    model = GPT(gpt_config_from_yaml(args.config))
    print("\n".join(summarize(model)))
