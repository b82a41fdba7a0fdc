"""The GPT of the baseline and every record system, built from a GPTConfig. Plain PyTorch.

Forward, top to bottom (upstream ``GPT.forward``; PR #1855 ``GPT._forward_hidden``):
  token embedding (→ token SmearGate, PR #1855) (+ BigramHash) → RMSNorm (→ embed_proj) (→ SmearGate) = x0
  encoder half of the layer schedule, pushing each output on a stack
  decoder half: pop a U-Net skip (scaled, optionally gated) before each block; from ``parallel_start_layer``
  on, attention and MLP run in two lanes (lane_merge: PR #1333; lambdas: PR #1529/#1855)
  → forward_hidden ends here (pre final norm)
  final RMSNorm (→ head_proj) → tied or untied head → softcap

The layer schedule is the list of physical blocks executed; depth recurrence makes it longer without adding
block parameters. Parameter names equal the upstream scripts' state-dict keys up to PR #1394, so those
checkpoints load as they are; PR #1855 stores the block matrices in four banks, which ``pgolf convert`` maps
to these per-block names (``pgolf_lit.model.convert``).

Packed rows: every forward takes ``cu_seqlens``/``max_seqlen`` (inputs [1, N]) and then attends only inside
each document (``attention.causal_attention``). Per-document LoRA adapters (``pgolf_lit.model.lora``) plug in
through ``forward_hidden(..., lora=)`` and ``forward_ttt``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.errors import ConfigError
from pgolf_lit.model.attention import ATTENTION_BACKENDS, CausalSelfAttention, PackedSegments, Rotary
from pgolf_lit.model.layers import MLP, BigramHash, CastedLinear, SmearGate, rms_norm, smear_previous_token
from pgolf_lit.model.roles import ParamRole, constant, control, declare_roles, embedding, parameter_roles


# ---------------------------------------------------------------------------------------------------------
# Layer schedules (depth recurrence) and U-Net skip plans
# ---------------------------------------------------------------------------------------------------------


def layer_schedule(cfg: GPTConfig, recurrence_active: bool) -> list[int]:
    """Physical block index of every executed position.

    group (PR #1334): the recur_layers re-run once as a group after the first pass of the last of them,
        e.g. 4,5 → 0..5,4,5,6..10.
    inplace (PR #1278): every recur layer runs twice in a row, e.g. 4,5 → 0..4,4,5,5,6..10.
    loop (PR #1394): the segment [loop_start, loop_end] runs num_loops + 1 times, e.g. 2,4,5 → 0..5,4,5,4,5,6..10.
    """
    n = cfg.num_layers
    if not recurrence_active or cfg.recurrence == "none":
        return list(range(n))
    if cfg.recurrence == "group":
        last = cfg.recur_layers[-1]
        return list(range(last + 1)) + list(cfg.recur_layers) + list(range(last + 1, n))
    if cfg.recurrence == "inplace":
        repeat = set(cfg.recur_layers)
        return [j for i in range(n) for j in ([i, i] if i in repeat else [i])]
    segment = list(range(cfg.loop_start, cfg.loop_end + 1))
    return list(range(cfg.loop_start)) + segment * (cfg.num_loops + 1) + list(range(cfg.loop_end + 1, n))


def num_skip_rows(cfg: GPTConfig) -> int:
    """Rows of skip_weights: from the physical depth, or from the recurrent schedule (PR #1278 root, PR #1394)."""
    n = len(layer_schedule(cfg, cfg.skip_rows == "recurrent"))
    return min(n // 2, n - n // 2)


def skip_plan(cfg: GPTConfig, schedule: list[int]) -> list[Optional[int]]:
    """For each decoder position: the skip_weights row to add a popped skip with, -1 to pop and drop, None
    to leave the stack alone.

    standard: row j while the stack is non-empty and j < rows (every record script).
    folder_copy: PR #1278's record-folder script: only while j < stack size, row min(j, rows-1).
    """
    rows = num_skip_rows(cfg)
    n_enc = len(schedule) // 2
    stack, plan = n_enc, []
    for j in range(len(schedule) - n_enc):
        row: Optional[int] = None
        if cfg.skip_wiring == "folder_copy":
            if stack and j < stack:
                row = min(j, rows - 1) if rows else -1
        elif stack and j < rows:
            row = j
        if row is not None:
            stack -= 1
        plan.append(row)
    return plan


# ---------------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """resid_mix with x0 → x + attn_scale·attn(norm(x)·s) → x + mlp_scale·mlp(norm(x)·s) (→ DTG gate)."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        d = cfg.model_dim
        self.layer_idx = layer_idx  # read by parameter_roles: everything below is in this layer
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        declare_roles(self, attn_scale=control(), mlp_scale=control(), resid_mix=control())
        self.attn = CausalSelfAttention(
            d,
            cfg.num_heads,
            cfg.num_kv_heads,
            rope_dims=cfg.rope_dims,
            qk_gain_init=cfg.qk_gain_init,
            xsa=layer_idx >= cfg.num_layers - cfg.xsa_last_n,
            vrl_gate=cfg.vrl and layer_idx > 0,
            sparse_gate_window=cfg.gate_window if cfg.sparse_attn_gate else 0,
            sparse_gate_scale=cfg.sparse_attn_gate_scale,
            sparse_gate_init_std=cfg.sparse_attn_gate_init_std,
            sparse_gate_gain=cfg.sparse_attn_gate_gain,
        )
        self.mlp = MLP(d, cfg.mlp_hidden, cfg.mlp_activation, cfg.leaky_relu_slope)
        self.ln_scale_factor = 1.0 / math.sqrt(layer_idx + 1) if cfg.ln_scale else 1.0
        self.dtg_gate: Optional[nn.Linear] = None
        if cfg.dtg:
            self.dtg_gate = nn.Linear(d, 1, bias=True)
            declare_roles(self.dtg_gate, weight=control("dtg"), bias=control("dtg"))
            nn.init.zeros_(self.dtg_gate.weight)
            nn.init.constant_(self.dtg_gate.bias, 2.0)

    def _mlp(self, n: Tensor, adapter) -> Tensor:
        """MLP of the normed input, plus the LoRA bypass read from the same input (PR #1855 ``_block_with_lora``)."""
        out = self.mlp(n)
        if adapter is not None and adapter.mlp is not None:
            out = out + adapter.mlp(n)
        return out

    def forward(self, x, x0, rope, ve=None, v_first=None, segments=None, adapter=None) -> tuple[Tensor, Tensor]:
        mix = self.resid_mix.to(x.dtype)
        x_in = mix[0] * x + mix[1] * x0
        attn_out, v_raw = self.attn(rms_norm(x_in) * self.ln_scale_factor, rope, ve, v_first, segments, adapter)
        x = x_in + self.attn_scale.to(x.dtype) * attn_out
        x = x + self.mlp_scale.to(x.dtype) * self._mlp(rms_norm(x) * self.ln_scale_factor, adapter)
        if self.dtg_gate is not None:
            gate = torch.sigmoid(self.dtg_gate(x_in.detach()))
            x = x_in + gate * (x - x_in)
        return x, v_raw

    def forward_parallel(
        self, lane_a, lane_m, x0, rope, ve=None, v_first=None, segments=None, adapter=None
    ) -> tuple[Tensor, Tensor]:
        """PR #1333's parallel lanes: attention reads and writes lane_a (with resid_mix), the MLP lane_m only."""
        mix = self.resid_mix.to(lane_a.dtype)
        a_in = mix[0] * lane_a + mix[1] * x0
        attn_out, _ = self.attn(rms_norm(a_in) * self.ln_scale_factor, rope, ve, v_first, segments, adapter)
        lane_a = a_in + self.attn_scale.to(a_in.dtype) * attn_out
        lane_m = lane_m + self.mlp_scale.to(lane_m.dtype) * self._mlp(rms_norm(lane_m) * self.ln_scale_factor, adapter)
        return lane_a, lane_m

    def forward_lambdas(
        self, lane0, lane1, x0, rope, post: Tensor, resid: Tensor, ve=None, v_first=None, segments=None, adapter=None
    ) -> tuple[Tensor, Tensor]:
        """PR #1529's two lanes (PR #1855 train_gpt.py ``GPT._parallel_block``): attention reads
        resid_mix·(lane0, x0), the MLP reads lane1, and each output is written to both lanes:
        lane_k ← resid[k]·lane_k + post[0, k]·attn + post[1, k]·mlp. The residual is the unmixed lane0."""
        mix = self.resid_mix.to(lane0.dtype)
        a_in = mix[0] * lane0 + mix[1] * x0
        attn_out, _ = self.attn(rms_norm(a_in) * self.ln_scale_factor, rope, ve, v_first, segments, adapter)
        attn_out = self.attn_scale.to(attn_out.dtype) * attn_out
        mlp_out = self.mlp_scale.to(lane1.dtype) * self._mlp(rms_norm(lane1) * self.ln_scale_factor, adapter)
        post, resid = post.to(lane0.dtype), resid.to(lane0.dtype)
        new0 = resid[0] * lane0 + post[0, 0] * attn_out + post[1, 0] * mlp_out
        new1 = resid[1] * lane1 + post[0, 1] * attn_out + post[1, 1] * mlp_out
        return new0, new1


# ---------------------------------------------------------------------------------------------------------
# GPT
# ---------------------------------------------------------------------------------------------------------


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        d, e, v = cfg.model_dim, cfg.emb_dim, cfg.vocab_size
        self.tok_emb = nn.Embedding(v, e)
        declare_roles(self.tok_emb, weight=embedding("embed", "embeddings"))
        projection = ParamRole("projection", "other", "embed_projection")
        self.embed_proj = CastedLinear(e, d, role=projection) if e != d else None
        self.head_proj = CastedLinear(d, e, role=projection) if e != d else None
        hashed = BigramHash
        if cfg.bigram_sum_hash:
            from pgolf_lit.model.bigram_sum_hash import SumBigramHash as hashed
        self.bigram = (
            hashed(cfg.bigram_vocab_size, cfg.bigram_dim, d, cfg.bigram_trigram) if cfg.bigram_vocab_size else None
        )
        token_smear = cfg.smear_gate and cfg.smear_gate_form == "token"
        self.smear = SmearGate(d) if cfg.smear_gate and cfg.smear_gate_form == "channel" else None
        self.smear_prenorm = None
        if cfg.smear_gate and cfg.smear_gate_form == "prenorm":
            from pgolf_lit.model.smear_prenorm import PrenormSmearGate

            self.smear_prenorm = PrenormSmearGate(d)
        # PR #1855's token SmearGate, on the raw embedding; the upstream names smear_gate / smear_lambda.
        self.smear_gate = (
            CastedLinear(cfg.gate_window, 1, role=control("smear"), zero_init=True) if token_smear else None
        )
        self.smear_lambda = nn.Parameter(torch.zeros(1)) if token_smear else None
        declare_roles(self, smear_lambda=control("smear"))
        rows = num_skip_rows(cfg)
        self.skip_weights = nn.Parameter(torch.ones(rows, d))
        self.skip_gates = nn.Parameter(torch.zeros(rows, d)) if cfg.skip_gates else None
        declare_roles(self, skip_weights=control("skip"), skip_gates=control("skip"))
        n_repeats = len(layer_schedule(cfg, True)) - cfg.num_layers
        self.iter_embed = self.iter_gate = None
        if cfg.iter_conditioning and n_repeats > 0:
            self.iter_embed = nn.Parameter(torch.randn(n_repeats, d) * 0.02)
            self.iter_gate = nn.Parameter(torch.full((n_repeats, d), -2.0))
        # 2-D and outside the records' control patterns: the scripts keep these two in bf16.
        iteration = control("iteration", record_dtype="bf16")
        declare_roles(self, iter_embed=iteration, iter_gate=iteration)
        lanes = cfg.parallel_residual if cfg.parallel_start_layer else None
        block = Block
        if lanes == "gptj":  # one stream from parallel_start_layer on (PR #1412/#1493)
            from pgolf_lit.model.gptj_residual import gptj_block as block
        self.blocks = nn.ModuleList(block(cfg, i) for i in range(cfg.num_layers))
        self.ve_shared = None
        if cfg.ve_enabled:
            from pgolf_lit.model.value_embedding import ValueEmbedding

            self.ve_shared = ValueEmbedding(v, cfg.ve_dim, cfg.kv_dim)
        self.ve_layer_scales = nn.ParameterList(
            [nn.Parameter(torch.ones(1)) for _ in (cfg.ve_layers if cfg.ve_enabled else [])]
        )
        declare_roles(
            self.ve_layer_scales, **{str(j): control("value_embedding") for j in range(len(self.ve_layer_scales))}
        )
        self._ve_index = {layer: j for j, layer in enumerate(cfg.ve_layers)} if cfg.ve_enabled else {}
        self.lane_merge = nn.Parameter(torch.tensor(0.5)) if lanes == "lane_merge" else None
        # PR #1529/#1855: sized for every physical layer, as upstream, though only rows >= parallel_start_layer act.
        n = cfg.num_layers
        self.parallel_post_lambdas = nn.Parameter(torch.ones(n, 2, 2)) if lanes == "lambdas" else None
        self.parallel_resid_lambdas = nn.Parameter(torch.full((n, 2), 1.1)) if lanes == "lambdas" else None
        parallel = control("parallel_residual")
        declare_roles(self, lane_merge=parallel, parallel_post_lambdas=parallel, parallel_resid_lambdas=parallel)
        head = ParamRole("head", "embed", "embeddings")
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(e, v, role=head, zero_init=True)
        mtp = ParamRole("aux_head", None, "mtp_heads")
        self.mtp_heads = nn.ModuleList(CastedLinear(d, v, role=mtp, zero_init=True) for _ in range(cfg.mtp_num_heads))
        # AsymLogit (PR #1945): the two caps of the evaluation softcap, under the upstream names. The records put them
        # in no optimizer and the training loss never reads them, so they stay at logit_softcap; requires_grad is off
        # so that data parallelism does not wait for gradients that never come.
        cap = float(cfg.logit_softcap)
        self.softcap_pos = nn.Parameter(torch.tensor(cap), requires_grad=False) if cfg.asym_logit else None
        self.softcap_neg = nn.Parameter(torch.tensor(cap), requires_grad=False) if cfg.asym_logit else None
        declare_roles(self, softcap_pos=constant("asym_logit"), softcap_neg=constant("asym_logit"))
        self.rotary = Rotary(
            cfg.rope_dims or cfg.head_dim,
            cfg.rope_base,
            cfg.rope_train_seq_len,
            cfg.rope_inv_freq_dtype,
            cfg.rope_positions_dtype,
        )
        # Layer schedule and skip plan for each recurrence state. A plain attribute: before Python 3.12
        # functools.cached_property takes an RLock that torch.compile(fullgraph=True) cannot trace.
        self._plans: dict[bool, tuple[list[int], list[Optional[int]]]] = {
            active: (s, skip_plan(cfg, s)) for active in (False, True) for s in [layer_schedule(cfg, active)]
        }
        self.recurrence_active = False
        self.fused_ce = None  # fused_kernels.use_fused_kernels: the fused softcapped CE of forward's loss
        self.fused_force = False
        if cfg.block_controls == "position":  # PR #1204 (position_controls.py)
            from pgolf_lit.model.position_controls import attach

            attach(self)
        self._init_weights()
        # Every parameter's role, declared above and in the blocks; a missing declaration fails here.
        self.roles: dict[str, ParamRole] = parameter_roles(self)

    def _init_weights(self) -> None:
        cfg = self.config
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_emb.weight, mean=0.0, std=cfg.tied_embed_init_std)
        for module in self.modules():
            if not isinstance(module, nn.Linear):
                continue
            if getattr(module, "zero_init", False):
                nn.init.zeros_(module.weight)
            elif cfg.init == "orthogonal" and min(module.weight.shape) >= 64:
                nn.init.orthogonal_(module.weight, gain=1.0)
                if cfg.proj_init_scale and getattr(module, "output_proj", False):
                    with torch.no_grad():
                        module.weight.mul_(1.0 / math.sqrt(2 * cfg.num_layers))

    # --- recurrence state ------------------------------------------------------------------------------
    def set_attention_backend(self, backend: str) -> None:
        """Choose the attention kernel of every block (``auto | fa3 | sdpa | math``, see ``ATTENTION_BACKENDS``)."""
        if backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend: expected one of {list(ATTENTION_BACKENDS)}, got {backend!r}")
        for block in self.blocks:
            block.attn.backend = backend

    def set_recurrence(self, active: bool) -> None:
        """Switch depth recurrence on or off (a no-op for configs without recurrence)."""
        self.recurrence_active = bool(active)

    def layer_schedule(self) -> list[int]:
        return self._plans[self.recurrence_active][0]

    # --- forward ---------------------------------------------------------------------------------------
    def forward_hidden(
        self, ids: Tensor, cu_seqlens: Optional[Tensor] = None, max_seqlen: int = 0, lora=None
    ) -> Tensor:
        """The residual stream after the last block, before the final norm: [B, T, model_dim].

        ``cu_seqlens`` (int32, padded with N) with ``ids`` [1, N]: a packed row whose documents attend only
        within themselves (PR #1855 train_gpt.py ``GPT._forward_hidden``); ``max_seqlen`` is FA3's hint.
        ``lora``: a ``BatchedTTTLoRA`` built for the current layer schedule; its slot ``p`` adapts the block at
        schedule position ``p`` (PR #1855 ``GPT.forward_ttt``).
        """
        cfg = self.config
        segments = PackedSegments.build(cu_seqlens, max_seqlen, ids) if cu_seqlens is not None else None
        x = self.tok_emb(ids)
        if self.smear_gate is not None:
            x = smear_previous_token(
                x, ids, self.smear_gate.weight, self.smear_lambda, cfg.bos_id if cfg.smear_gate_bos_fix else -1
            )
        if self.bigram is not None:
            x = x + self.bigram(ids)
        if self.smear_prenorm is not None:
            x = self.smear_prenorm(x)
        x = rms_norm(x)
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        if self.smear is not None:
            x = self.smear(x)
        x0 = x
        rope = self.rotary(ids.size(1))
        ve_base = self.ve_shared(ids) if self.ve_shared is not None else None
        if cfg.block_controls == "position":
            from pgolf_lit.model.position_controls import run_positions

            return run_positions(self, x, x0, rope, ve_base, segments, lora)
        schedule, plan = self._plans[self.recurrence_active]
        n_enc = len(schedule) // 2
        if lora is not None and lora.num_slots != len(schedule):
            raise ValueError(
                f"the LoRA has {lora.num_slots} layer slots, the model runs {len(schedule)} layers now "
                f"(recurrence {'on' if self.recurrence_active else 'off'}): build it after setting the recurrence"
            )
        lambdas = self.parallel_post_lambdas is not None

        stack: list[Tensor] = []
        v_first: Optional[Tensor] = None
        seen: set[int] = set()
        repeat_idx = 0
        lanes: Optional[tuple[Tensor, Tensor]] = None
        for pos, layer in enumerate(schedule):
            # The lanes fork at the first decoder block >= parallel_start_layer: PR #1855 (lambdas) before its skip,
            # PR #1333/#1477 (lane_merge) after it. Later skips go to lane0 (lambdas, skip_after_fork) or are dropped.
            if pos >= n_enc and (lanes is None or lambdas or cfg.skip_after_fork):
                fork = lanes is None and layer >= cfg.parallel_start_layer and (lambdas or self.lane_merge is not None)
                if fork and lambdas:
                    lanes = (x, x)
                row = plan[pos - n_enc]
                if row is not None:
                    skip = stack.pop()
                    if row >= 0:
                        if lanes is None:
                            x = self._add_skip(x, skip, row)
                        else:
                            lanes = (self._add_skip(lanes[0], skip, row), lanes[1])
                if fork and lanes is None:
                    lanes = (x, x)
            if layer in seen and self.iter_embed is not None:
                gate = torch.sigmoid(self.iter_gate[repeat_idx].to(x.dtype))
                x = x + gate * self.iter_embed[repeat_idx].to(x.dtype)
                repeat_idx += 1
            seen.add(layer)
            ve = self._value_embedding(ve_base, layer)
            block = self.blocks[layer]
            adapter = lora.slot(pos) if lora is not None else None
            if lanes is not None:
                if lambdas:
                    post, resid = self.parallel_post_lambdas[layer], self.parallel_resid_lambdas[layer]
                    lanes = block.forward_lambdas(
                        lanes[0], lanes[1], x0, rope, post, resid, ve, v_first, segments, adapter
                    )
                else:
                    lanes = block.forward_parallel(lanes[0], lanes[1], x0, rope, ve, v_first, segments, adapter)
                continue
            x, v_raw = block(x, x0, rope, ve, v_first, segments, adapter)
            if cfg.vrl and v_first is None:
                v_first = v_raw
            if pos < n_enc:
                stack.append(x)
        if lanes is not None:
            x = self._merge_lanes(*lanes)
        return x

    def _merge_lanes(self, lane0: Tensor, lane1: Tensor) -> Tensor:
        if self.lane_merge is not None:
            m = self.lane_merge.to(lane0.dtype)
            return m * lane0 + (1 - m) * lane1
        final = self.config.parallel_final_lane  # PR #1855 train_gpt.py ``GPT._final_parallel_hidden``
        if final == "attn":
            return lane0
        if final == "mlp":
            return lane1
        return 0.5 * (lane0 + lane1)

    def _add_skip(self, x: Tensor, skip: Tensor, row: int) -> Tensor:
        scaled = self.skip_weights[row].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[row].to(x.dtype)))

    def _value_embedding(self, ve_base: Optional[Tensor], layer: int) -> Optional[Tensor]:
        if ve_base is None or layer not in self._ve_index:
            return None
        return ve_base * self.ve_layer_scales[self._ve_index[layer]].to(ve_base.dtype)

    def normalize_hidden(self, h: Tensor) -> Tensor:
        """Final RMSNorm (and head_proj when embedding_dim != model_dim): the input of the output head."""
        z = rms_norm(h)
        return self.head_proj(z) if self.head_proj is not None else z

    def head_logits(self, z: Tensor) -> Tensor:
        """The pre-softcap logits of the tied or untied head."""
        return F.linear(z, self.tok_emb.weight) if self.lm_head is None else self.lm_head(z)

    def softcap(self, raw: Tensor, symmetric: bool = False) -> Tensor:
        """c·tanh(z/c); with AsymLogit (PR #1945 ``GPT._apply_asym_softcap``) and not ``symmetric``:
        where(z > 0, sp·tanh(z/sp), sn·tanh(z/sn)), the caps cast to z's dtype as upstream."""
        if self.softcap_pos is None or symmetric:
            c = self.config.logit_softcap
            return c * torch.tanh(raw / c)
        sp, sn = self.softcap_pos.to(raw.dtype), self.softcap_neg.to(raw.dtype)
        return torch.where(raw > 0, sp * torch.tanh(raw / sp), sn * torch.tanh(raw / sn))

    def logits_from_normed(
        self, z: Tensor, logit_bias: Optional[Tensor] = None, lora=None, symmetric: bool = False
    ) -> Tensor:
        """Tied or untied head (plus the LoRA head adapter of ``lora``), an optional additive logit bias (SLOT),
        then the softcap: the evaluation one (AsymLogit when on) unless ``symmetric`` (the training loss's)."""
        raw = self.head_logits(z)
        if lora is not None:
            raw = raw + lora.lm_head_lora(z)
        if logit_bias is not None:
            raw = raw + logit_bias
        return self.softcap(raw, symmetric)

    def logits_from_hidden(self, h: Tensor) -> Tensor:
        return self.logits_from_normed(self.normalize_hidden(h))

    def forward_logits(self, ids: Tensor, cu_seqlens: Optional[Tensor] = None, max_seqlen: int = 0) -> Tensor:
        """Softcapped logits [B, T, V] (a packed row with ``cu_seqlens``: see ``forward_hidden``)."""
        return self.logits_from_hidden(self.forward_hidden(ids, cu_seqlens, max_seqlen))

    def forward(
        self, ids: Tensor, targets: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None, max_seqlen: int = 0
    ) -> Tensor:
        """Logits [B,T,V] without targets; with targets the mean cross entropy (fp32) over all positions,
        plus the multi-token-prediction loss in training mode when MTP heads exist. The softcapped CE is the
        eager form of PR #1855's fused Triton kernel (the same function), which ``set_fused_kernels`` swaps in: it
        reads the pre-softcap logits and applies the softcap in fp32. The loss always uses the symmetric softcap
        (AsymLogit acts on the evaluation logits only, as in PR #1945); the logits without targets are the evaluation
        ones. ``cu_seqlens``: see ``forward_hidden``."""
        z = self.normalize_hidden(self.forward_hidden(ids, cu_seqlens, max_seqlen))
        if targets is None:
            return self.logits_from_normed(z)
        if self.fused_ce is not None and (z.is_cuda or self.fused_force):
            raw = self.head_logits(z)
            loss = self.fused_ce(raw.reshape(-1, raw.size(-1)), targets.reshape(-1), self.config.logit_softcap)
        else:  # the training loss keeps the symmetric softcap under AsymLogit too (PR #1945's GPT.forward)
            logits = self.logits_from_normed(z, symmetric=True)
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        if self.training and len(self.mtp_heads) and self.config.mtp_loss_weight > 0:
            from pgolf_lit.model.mtp import mtp_loss

            loss = loss + self.config.mtp_loss_weight * mtp_loss(self.mtp_heads, z, targets, self.config.logit_softcap)
        return loss

    def forward_ttt(self, ids: Tensor, targets: Tensor, lora) -> Tensor:
        """Per-token cross entropy [B, T] (fp32, no reduction) with per-document LoRA adapters: row b uses the
        adapters of document b of ``lora`` (a ``BatchedTTTLoRA`` of batch size B). Dense causal attention per
        row. PR #1855 train_gpt.py ``GPT.forward_ttt``."""
        z = self.normalize_hidden(self.forward_hidden(ids, lora=lora))
        logits = self.logits_from_normed(z, lora=lora)
        B, T, V = logits.shape
        return F.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), reduction="none").reshape(B, T)

    def apply_record_dtypes(self) -> list[str]:
        """The records' dtype policy (``GPT(h).bfloat16()``, then fp32 restored for CastedLinear weights and control
        tensors): every parameter whose role declares ``record_dtype: bf16`` (the token tables, PR #1278's iteration
        embeddings) is stored in bf16, so the embedding output and the residual stream are bf16 under autocast.
        Returns the names cast. Reproduce mode (the fixtures) keeps everything fp32 by not calling this."""
        cast = []
        for name, p in self.named_parameters():
            if self.roles[name].record_dtype == "bf16" and p.dtype != torch.bfloat16:
                p.data = p.data.to(torch.bfloat16)
                cast.append(name)
        return cast

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def roles_of(cfg: GPTConfig) -> dict[str, ParamRole]:
    """The parameter roles of the GPT a config builds, without allocating its weights (built on the meta device)."""
    with torch.device("meta"):
        return GPT(cfg).roles
