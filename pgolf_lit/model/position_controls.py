"""Block controls by layer-schedule position (PR #1204 train_gpt.py ``GPT``: its Block list is built per virtual
layer, the weight banks per physical layer; ``GPTConfig.block_controls: position``).

Position p of the running schedule uses the matrices of its physical layer and everything else of position p:
attn_scale, mlp_scale, resid_mix and q_gain (block p's own for p < num_layers, ``position_controls[p - n]`` past
the physical depth), the ln scale 1/√(p+1), XSA when p is among the last xsa_last_n positions of the recurrent
schedule, the value embedding when p is in ve_layers, and no attention at p = 0 with disable_layer0_attn. Without
recurrence position = layer. When recurrence switches on, the controls of positions from the first repeat on
serve other layers than before (upstream's behaviour, kept). The schedule's repeated passes may run their own
MLP (``repeat_mlp.py``) and from parallel_start_layer the stream runs in two lanes (``sublayer_lanes.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from pgolf_lit.errors import ConfigError
from pgolf_lit.model.attention import apply_rotary, causal_attention, remove_self_value
from pgolf_lit.model.layers import rms_norm
from pgolf_lit.model.roles import ParamRole, control, declare_roles

COUNTED_WHEN = "block_controls=position"


class PositionControl(nn.Module):
    """The control tensors of one schedule position past the physical depth (upstream ``blocks.{p}``)."""

    def __init__(self, dim: int, num_heads: int, qk_gain_init: float):
        super().__init__()
        self.attn_scale = nn.Parameter(torch.ones(dim))
        self.mlp_scale = nn.Parameter(torch.ones(dim))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(dim), torch.zeros(dim))))
        self.q_gain = nn.Parameter(torch.full((num_heads,), float(qk_gain_init)))
        role = control("position_controls")
        declare_roles(self, attn_scale=role, mlp_scale=role, resid_mix=role, q_gain=role)


def check(cfg) -> None:
    """What PR #1204's layer loop cannot run, as one-line errors naming the field (kept out of GPTConfig.validate,
    whose code every record counts)."""

    def bad(name: str, msg: str) -> ConfigError:
        return ConfigError(f"gpt.{name}: {msg}")

    if cfg.repeat_untie_mlp != "none":
        if cfg.recurrence != "group":
            raise bad("repeat_untie_mlp", "needs recurrence group (PR #1204's form)")
        if not set(cfg.repeat_untie_mlp_layers) <= set(cfg.recur_layers):
            raise bad("repeat_untie_mlp_layers", f"must be a subset of recur_layers {cfg.recur_layers}")
    if cfg.parallel_start_layer and cfg.parallel_residual != "sublayer":
        raise bad("parallel_residual", "position control runs the sublayer lanes only (PR #1204)")
    if cfg.vrl or cfg.iter_conditioning or cfg.sparse_attn_gate or cfg.dtg:
        raise bad(
            "block_controls",
            "position runs PR #1204's layer loop, which has no value residual, iteration embedding, sparse "
            "attention gate or token gate",
        )


def attach(model: nn.Module) -> None:
    """Add what position control needs to a GPT being built: the control sets past the physical depth, the repeated
    passes' MLPs, the sublayer lanes' lambdas; mark layer 0's attention matrices unused when it is off."""
    from pgolf_lit.model.gpt import layer_schedule

    cfg = model.config
    check(cfg)
    recurrent = layer_schedule(cfg, True)
    extra = len(recurrent) - cfg.num_layers
    model.position_controls = nn.ModuleList(
        PositionControl(cfg.model_dim, cfg.num_heads, cfg.qk_gain_init) for _ in range(extra)
    )
    model.repeat_mlp = None
    if cfg.repeat_untie_mlp == "full":
        from pgolf_lit.model.repeat_mlp import build_repeat_mlps

        # upstream runs the repeat MLPs at positions [P//2, P//2 + len(recur_layers)); ours at each layer's second
        # pass. The two agree when the repeated group starts the decoder half.
        first_repeat = recurrent.index(cfg.recur_layers[0], cfg.recur_layers[-1] + 1)
        if first_repeat != len(recurrent) // 2:
            raise ConfigError(
                f"gpt.recur_layers: {cfg.recur_layers} repeat at position {first_repeat}, but PR #1204's untied MLPs "
                f"serve positions from {len(recurrent) // 2} on; choose layers whose repeat starts the decoder"
            )
        model.repeat_mlp = build_repeat_mlps(cfg)
    if cfg.parallel_start_layer:
        from pgolf_lit.model.sublayer_lanes import sublayer_lambdas

        for active in (False, True):
            schedule = layer_schedule(cfg, active)
            if any(layer >= cfg.parallel_start_layer for layer in schedule[: len(schedule) // 2]):
                raise ConfigError("gpt.parallel_start_layer: the sublayer lanes start in the decoder half only")
        model.parallel_post_lambdas, model.parallel_resid_lambdas = sublayer_lambdas(cfg.num_layers)
    if cfg.disable_layer0_attn:
        attn = model.blocks[0].attn
        for lin in (attn.c_q, attn.c_k, attn.c_v, attn.proj):
            declare_roles(lin, weight=ParamRole("unused", None, "layer0_attention_off"))


def _controls(model: nn.Module, pos: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    n = model.config.num_layers
    if pos < n:
        b = model.blocks[pos]
        return b.attn_scale, b.mlp_scale, b.resid_mix, b.attn.q_gain
    c = model.position_controls[pos - n]
    return c.attn_scale, c.mlp_scale, c.resid_mix, c.q_gain


def _attend(attn: nn.Module, x: Tensor, rope, q_gain: Tensor, xsa: bool, ve: Optional[Tensor], segments) -> Tensor:
    """``CausalSelfAttention.forward`` with the position's q_gain and XSA switch (no VRL, gate or LoRA here)."""
    B, T, D = x.shape
    q = attn.c_q(x).reshape(B, T, attn.num_heads, attn.head_dim)
    k = attn.c_k(x).reshape(B, T, attn.num_kv_heads, attn.head_dim)
    v = attn.c_v(x)
    v = (v if ve is None else v + ve).reshape(B, T, attn.num_kv_heads, attn.head_dim)
    q, k = rms_norm(q, attn.head_dim), rms_norm(k, attn.head_dim)
    cos, sin = rope[0].to(q.dtype), rope[1].to(q.dtype)
    q = apply_rotary(q, cos, sin, attn.rope_dims) * q_gain.to(q.dtype)[None, None, :, None]
    y = causal_attention(q, apply_rotary(k, cos, sin, attn.rope_dims), v, segments, attn.backend)
    if xsa:
        y = remove_self_value(y, v)
    return attn.proj(y.reshape(B, T, D))


def run_positions(
    model: nn.Module, x: Tensor, x0: Tensor, rope, ve_base: Optional[Tensor], segments, lora=None
) -> Tensor:
    """The layer loop of ``GPT.forward_hidden`` under position control (upstream ``GPT._backbone``)."""
    from pgolf_lit.model.gpt import layer_schedule

    if lora is not None:
        raise ConfigError("gpt.block_controls: position has no per-document LoRA (no record combines them)")
    cfg = model.config
    schedule, plan = model._plans[model.recurrence_active]
    n_enc = len(schedule) // 2
    xsa_from = len(layer_schedule(cfg, True)) - cfg.xsa_last_n
    stack: list[Tensor] = []
    lanes: Optional[tuple[Tensor, Tensor]] = None
    seen: set[int] = set()
    for pos, layer in enumerate(schedule):
        if pos >= n_enc:
            if lanes is None and cfg.parallel_start_layer and layer >= cfg.parallel_start_layer:
                lanes = (x, x)
            row = plan[pos - n_enc]
            if row is not None:
                skip = stack.pop()
                if row >= 0 and lanes is None:
                    x = model._add_skip(x, skip, row)
                elif row >= 0:  # into both lanes (upstream ``_apply_skip_parallel``)
                    lanes = (model._add_skip(lanes[0], skip, row), model._add_skip(lanes[1], skip, row))
        block = model.blocks[layer]
        mlp = block.mlp
        if layer in seen and model.repeat_mlp is not None and str(layer) in model.repeat_mlp:
            mlp = model.repeat_mlp[str(layer)]
        seen.add(layer)
        attn_scale, mlp_scale, mix, q_gain = _controls(model, pos)
        s = 1.0 / (pos + 1) ** 0.5 if cfg.ln_scale else 1.0
        ve = model._value_embedding(ve_base, pos)

        def read(lane: Tensor, mix=mix) -> Tensor:
            m = mix.to(lane.dtype)
            return m[0] * lane + m[1] * x0

        def attn_out(h: Tensor, pos=pos, block=block, attn_scale=attn_scale, q_gain=q_gain, ve=ve, s=s) -> Tensor:
            y = _attend(block.attn, rms_norm(h) * s, rope, q_gain, pos >= xsa_from, ve, segments)
            return attn_scale.to(h.dtype) * y

        def mlp_out(h: Tensor, mlp=mlp, mlp_scale=mlp_scale, s=s) -> Tensor:
            return mlp_scale.to(h.dtype) * mlp(rms_norm(h) * s)

        attn_on = not (cfg.disable_layer0_attn and pos == 0)
        if lanes is not None:
            from pgolf_lit.model.sublayer_lanes import sublayer_step

            lanes = sublayer_step(
                lanes,
                model.parallel_post_lambdas[layer],
                model.parallel_resid_lambdas[layer],
                (lambda h: attn_out(read(h))) if attn_on else None,
                lambda h: mlp_out(read(h)),
            )
            continue
        x = read(x)
        if attn_on:
            x = x + attn_out(x)
        x = x + mlp_out(x)
        if pos < n_enc:
            stack.append(x)
    return x if lanes is None else 0.5 * (lanes[0] + lanes[1])
