"""The checks of a GPTConfig: every field's range and the switches that need each other, each failure one line
naming ``gpt.<field>``. They run wherever a config is made or read by the package (YAML, checkpoints, artifacts);
the counted program that scores an artifact (quant/code_size.py) leaves them out, as the config it reads was checked
when the artifact was written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pgolf_lit.errors import ConfigError

if TYPE_CHECKING:
    from pgolf_lit.model.config import GPTConfig

TRAINING_ONLY = "input checks: the artifact's config was checked when it was written"


def check_gpt_config(cfg: "GPTConfig") -> None:
    def bad(name: str, msg: str) -> ConfigError:
        return ConfigError(f"gpt.{name}: {msg}")

    for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads"):
        if getattr(cfg, name) <= 0:
            raise bad(name, f"must be positive, got {getattr(cfg, name)}")
    if cfg.vocab_size > 65536:
        raise bad("vocab_size", f"{cfg.vocab_size} does not fit the uint16 shard format (at most 65536)")
    if cfg.model_dim % cfg.num_heads:
        raise bad("num_heads", f"{cfg.num_heads} does not divide model_dim {cfg.model_dim}")
    if cfg.num_heads % cfg.num_kv_heads:
        raise bad("num_kv_heads", f"{cfg.num_kv_heads} does not divide num_heads {cfg.num_heads}")
    if cfg.head_dim % 2:
        raise bad("num_heads", f"head dim {cfg.head_dim} (model_dim / num_heads) must be even for RoPE")
    if cfg.rope_dims < 0 or cfg.rope_dims > cfg.head_dim or cfg.rope_dims % 2:
        raise bad("rope_dims", f"must be even and within [0, head dim {cfg.head_dim}], got {cfg.rope_dims}")
    rd = cfg.rope_dims or cfg.head_dim
    if cfg.rope_train_seq_len and rd <= 2:
        raise bad("rope_dims", "the RoPE base rescale needs more than 2 rotated dims")
    if cfg.logit_softcap <= 0:
        raise bad("logit_softcap", f"must be positive, got {cfg.logit_softcap}")
    if cfg.mlp_hidden <= 0:
        raise bad("mlp_mult", f"gives an empty MLP ({cfg.mlp_mult} × {cfg.model_dim})")
    if cfg.embedding_dim is not None and cfg.embedding_dim <= 0:
        raise bad("embedding_dim", f"must be positive or null, got {cfg.embedding_dim}")
    if not 0 <= cfg.xsa_last_n:
        raise bad("xsa_last_n", f"must be >= 0, got {cfg.xsa_last_n}")
    if cfg.bigram_vocab_size < 0 or cfg.bigram_vocab_size == 1:
        raise bad("bigram_vocab_size", f"must be 0 (off) or >= 2, got {cfg.bigram_vocab_size}")
    if cfg.bigram_sum_hash and cfg.bigram_trigram:
        raise bad("bigram_trigram", "PR #65's sum-hash BigramHash (bigram_sum_hash) has no trigram form")
    if cfg.ve_enabled:
        for i in cfg.ve_layers:
            if not 0 <= i < cfg.num_layers:
                raise bad("ve_layers", f"layer {i} is out of range [0, {cfg.num_layers})")
    if cfg.recurrence in ("group", "inplace"):
        if not cfg.recur_layers:
            raise bad("recur_layers", f"recurrence '{cfg.recurrence}' needs at least one layer")
        for i in cfg.recur_layers:
            if not 0 <= i < cfg.num_layers:
                raise bad("recur_layers", f"layer {i} is out of range [0, {cfg.num_layers})")
        if len(set(cfg.recur_layers)) != len(cfg.recur_layers):
            raise bad("recur_layers", f"repeats a layer: {cfg.recur_layers}")
    if cfg.recurrence == "loop":
        if not 0 <= cfg.loop_start <= cfg.loop_end < cfg.num_layers:
            raise bad(
                "loop_start",
                f"need 0 <= loop_start <= loop_end < num_layers, got {cfg.loop_start}..{cfg.loop_end} "
                f"with {cfg.num_layers} layers",
            )
        if cfg.num_loops < 1:
            raise bad("num_loops", f"recurrence 'loop' needs num_loops >= 1, got {cfg.num_loops}")
    if cfg.iter_conditioning and cfg.recurrence == "none":
        raise bad("iter_conditioning", "needs a recurrence form")
    if cfg.parallel_start_layer and not 0 < cfg.parallel_start_layer < cfg.num_layers:
        raise bad("parallel_start_layer", f"must lie in [1, {cfg.num_layers}) or be 0, got {cfg.parallel_start_layer}")
    if cfg.dtg and cfg.parallel_start_layer:
        raise bad(
            "dtg",
            "the dynamic token gate has no parallel-lane form (no script combines them); "
            "set dtg false or parallel_start_layer 0",
        )
    if cfg.mtp_num_heads < 0:
        raise bad("mtp_num_heads", f"must be >= 0, got {cfg.mtp_num_heads}")
    choices = {
        "smear_gate_form": ("channel", "token", "prenorm"),
        "parallel_residual": ("lane_merge", "lambdas", "gptj", "sublayer"),
        "block_controls": ("physical", "position"),
        "repeat_untie_mlp": ("none", "full"),
        "parallel_final_lane": ("mean", "attn", "mlp"),
        "state_dict_layout": ("per_block", "banks"),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise bad(name, f"expected one of {list(allowed)}, got {getattr(cfg, name)!r}")
    if cfg.block_controls != "position" and (
        cfg.parallel_residual == "sublayer" or cfg.disable_layer0_attn or cfg.repeat_untie_mlp != "none"
    ):  # the rest of PR #1204's checks: position_controls.attach
        raise bad("block_controls", "PR #1204's sublayer lanes, layer-0 switch and repeat MLPs need 'position'")
    token_smear = cfg.smear_gate and cfg.smear_gate_form == "token"
    if token_smear or cfg.sparse_attn_gate:
        width = cfg.emb_dim if token_smear else cfg.model_dim
        if not 0 < cfg.gate_window <= min(width, cfg.model_dim):
            raise bad(
                "gate_window",
                f"must lie in [1, {min(width, cfg.model_dim)}] (the gated input's width), got {cfg.gate_window}",
            )
    if cfg.sparse_attn_gate_init_std < 0:
        raise bad("sparse_attn_gate_init_std", f"must be >= 0, got {cfg.sparse_attn_gate_init_std}")
    if cfg.bos_id < -1 or cfg.bos_id >= cfg.vocab_size:
        raise bad("bos_id", f"must be a token id below vocab_size {cfg.vocab_size} or -1 (no mask), got {cfg.bos_id}")
