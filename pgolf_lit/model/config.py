"""GPTConfig: every architecture switch of the baseline and the record systems, named as upstream names it.

The defaults are the upstream baseline (``train_gpt.py``: 9 layers, 512 wide, relu² MLP ×2, SP1024, 17,059,912
parameters). Each record in ``configs/records/`` sets only the fields where it differs. docs/techniques.md
describes every switch and names its upstream origin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pgolf_lit.errors import ConfigError, check_field_types


@dataclass
class GPTConfig:
    """Every architecture switch, under its upstream name; the defaults are the upstream baseline's."""

    # --- shape -----------------------------------------------------------------------------------------
    vocab_size: int = 1024
    """Tokenizer vocabulary (SP1024 baseline; SP4096 PR #1333/#1421; SP8192 PR #1394/#1855)."""
    num_layers: int = 9
    """Physical transformer blocks (depth recurrence re-runs some of them without new parameters)."""
    model_dim: int = 512
    """Width of the residual stream."""
    embedding_dim: Optional[int] = None
    """Token table width; null = model_dim, else embed_proj/head_proj map between the two."""
    num_heads: int = 8
    """Query heads."""
    num_kv_heads: int = 4
    """Key/value heads (grouped-query attention); must divide num_heads."""
    mlp_mult: float = 2.0
    """MLP hidden width = int(mlp_mult · model_dim)."""
    mlp_activation: Literal["relu2", "leaky_relu2"] = "relu2"
    """relu(x)² (baseline) or leaky_relu(x, slope)² (every record)."""
    leaky_relu_slope: float = 0.5
    """Negative slope of leaky_relu2."""
    tie_embeddings: bool = True
    """The output head reuses the token table (every record)."""
    tied_embed_init_std: float = 0.005
    """Standard deviation of the tied token table's init."""
    logit_softcap: float = 30.0
    """Logits pass through c·tanh(z/c)."""
    asym_logit: bool = False
    """AsymLogit (PR #1923 idea, PR #1945 onwards; upstream env ASYM_LOGIT_RESCALE): two 0-d parameters softcap_pos
    and softcap_neg, both initialised to logit_softcap, and the evaluation logits (forward_logits, forward_ttt) become
    where(z > 0, sp·tanh(z/sp), sn·tanh(z/sn)); the training loss keeps the symmetric logit_softcap. No optimizer
    takes the two and the loss gives them no gradient, so in the records they stay logit_softcap: numerically the
    plain softcap (+2 parameters)."""
    # --- attention -------------------------------------------------------------------------------------
    rope_base: float = 10000.0
    """RoPE frequency base."""
    rope_dims: int = 0
    """Rotated dims per head (partial RoPE: 16 in the records); 0 = the whole head."""
    rope_train_seq_len: int = 0
    """Rescale the RoPE base for sequences longer than this (records before PR #1855); 0 = never."""
    rope_inv_freq_dtype: Literal["fp32", "bf16"] = "fp32"
    """bf16: RoPE's inverse frequencies rounded to bf16 (up to 0.37 % off), as every record script's
    model.bfloat16() leaves its inv_freq buffer; the length-rescaled frequencies stay fp32 (computed afresh)."""
    rope_positions_dtype: Literal["fp32", "bf16"] = "fp32"
    """bf16: positions rounded to bf16 before the angles (exact to 256, then steps of 2, 4, 8), as the scripts before
    PR #1855 compute their table from arange(T, dtype=inv_freq.dtype) of the bf16 buffer; not on the rescaled path."""
    qk_gain_init: float = 1.5
    """Initial value of the learned per-head query gain (PR #1394: 4.0; PR #1421/#1855: 5.0)."""
    xsa_last_n: int = 0
    """XSA: remove each head's component along its own value on the last n physical layers."""
    sparse_attn_gate: bool = False
    """SparseAttnGate (PR #1787/#1855, upstream SPARSE_ATTN_GATE_ENABLED): every head's output is multiplied by
    σ(scale · attn_gate_w · x[:gate_window]) after XSA, before the output projection (x: the normed attention input)."""
    sparse_attn_gate_scale: float = 1.0
    """Multiplier of the sparse gate's logit (upstream SPARSE_ATTN_GATE_SCALE; PR #1855: 0.5)."""
    sparse_attn_gate_init_std: float = 0.0
    """Init std of attn_gate_w; 0 = zeros, so every gate starts at 0.5 (upstream SPARSE_ATTN_GATE_INIT_STD)."""
    gate_window: int = 12
    """Leading residual channels the sparse attention gate and the token SmearGate read (upstream GATE_WINDOW)."""
    # --- residual stream -------------------------------------------------------------------------------
    ln_scale: bool = False
    """Multiply the normed block inputs by 1/sqrt(layer + 1)."""
    skip_gates: bool = False
    """Sigmoid-gated lerp on the U-Net skips (PR #1333 onwards)."""
    skip_rows: Literal["physical", "recurrent"] = "physical"
    """Size skip_weights from the physical depth or from the recurrent layer schedule (PR #1278 root, PR #1394)."""
    skip_wiring: Literal["standard", "folder_copy"] = "standard"
    """folder_copy: the skip consumption of PR #1278's record-folder script (to load its checkpoints)."""
    parallel_start_layer: int = 0
    """>0: attention and MLP run in parallel from this physical layer on, in the form parallel_residual names
    (upstream PARALLEL_START_LAYER in PR #1333/#1421/#1477, PARALLEL_RESIDUAL_START in PR #1412/#1493/#1514)."""
    parallel_residual: Literal["lane_merge", "lambdas", "gptj"] = "lane_merge"
    """Form of the parallel blocks. Two lanes from the first decoder position at or past parallel_start_layer:
    lane_merge (PR #1333/#1421): attention writes lane a, the MLP lane m, merged by one learned scalar. lambdas
    (PR #1529/#1855): each block writes both lanes through parallel_post_lambdas and decays them by
    parallel_resid_lambdas; skips go to the attention lane; the end takes parallel_final_lane. One stream: gptj
    (GPT-J, PR #1412/#1493/#1514, model/gptj_residual.py): every physical block >= parallel_start_layer adds
    attention and MLP of the same normed input to x; no parameter is added."""
    skip_after_fork: bool = False
    """lane_merge form: the U-Net skips scheduled after the fork keep coming, added to the attention lane, instead
    of being dropped (PR #1477, hard-coded there: no env var). The lambdas form always does this; gptj has no fork."""
    parallel_final_lane: Literal["mean", "attn", "mlp"] = "mean"
    """lambdas form: the hidden state after the last block: the lanes' mean, the attention lane or the MLP lane
    (upstream PARALLEL_FINAL_LANE)."""
    dtg: bool = False
    """Dynamic token gate per block (present in the PR #1263 family's scripts, off in every record)."""
    # --- embeddings ------------------------------------------------------------------------------------
    smear_gate: bool = False
    """Smear each position with the previous one; smear_gate_form says how (upstream SMEAR_GATE_ENABLED)."""
    smear_gate_form: Literal["channel", "token"] = "channel"
    """channel (PR #1263 family): a per-channel sigmoid mix with the previous position after the embedding norm.
    token (PR #1667/#1855): e_t += smear_lambda · σ(smear_gate · e_t[:gate_window]) · e_{t-1} on the raw token
    embedding, before its norm, except where token t is bos_id (no smear across documents)."""
    bos_id: int = 1
    """Token id that starts a document: the token SmearGate does not smear into it (PR #1851/#1855's fix; the
    upstream module global BOS_ID); -1 = no mask (PR #1797, which leaks the previous document into each BOS)."""
    smear_gate_bos_fix: bool = True
    """The token SmearGate's BOS mask at bos_id (upstream SMEAR_GATE_BOS_FIX, PR #2130/#2135; hard-coded on in
    PR #1855). PR #2135's run sets 0: no mask, while bos_id still delimits the documents of phased TTT."""
    bigram_vocab_size: int = 0
    """Buckets of the hashed token-pair table added to the embedding (BigramHash); 0 = off."""
    bigram_dim: int = 128
    """Width of the BigramHash table (projected to model_dim)."""
    bigram_trigram: bool = False
    """Also hash (t, t-1, t-2) into the same table (not used by any record)."""
    ve_enabled: bool = False
    """Value embeddings: a token table added to the value projection of ve_layers."""
    ve_dim: int = 128
    """Width of the value-embedding table (projected to the KV width)."""
    ve_layers: list[int] = field(default_factory=lambda: [9, 10])
    """Physical layers that receive the value embedding."""
    vrl: bool = False
    """Value residual: mix the first block's raw V into every later block's V (PR #1278/#1321)."""
    # --- depth recurrence ------------------------------------------------------------------------------
    recurrence: Literal["none", "group", "inplace", "loop"] = "none"
    """Depth recurrence form: group (PR #1334/#1421), inplace (PR #1278), loop (PR #1394)."""
    recur_layers: list[int] = field(default_factory=list)
    """The repeated layers of group / inplace recurrence."""
    iter_conditioning: bool = False
    """PR #1278's iter_embed / iter_gate added before each repeated pass."""
    num_loops: int = 0
    """loop: the segment [loop_start, loop_end] runs num_loops + 1 times."""
    loop_start: int = 0
    """loop: first layer of the repeated segment."""
    loop_end: int = 0
    """loop: last layer of the repeated segment."""
    # --- init and heads --------------------------------------------------------------------------------
    init: Literal["baseline", "orthogonal"] = "baseline"
    """Weight init: PyTorch's Linear default (baseline) or orthogonal matrices (every record)."""
    proj_init_scale: bool = False
    """PR #1263 family: ×1/sqrt(2L) on the orthogonally initialised output projections (``CastedLinear.output_proj``,
    the script's ".proj" layers)."""
    mtp_num_heads: int = 0
    """Multi-token prediction heads (a training loss only; never exported)."""
    mtp_loss_weight: float = 0.2
    """Weight of the MTP loss."""
    # --- checkpoint interop ----------------------------------------------------------------------------
    state_dict_layout: Literal["per_block", "banks"] = "per_block"
    """How the record's own script stores the block matrices: per_block (blocks.i.attn.c_q.weight …, up to PR
    #1394) or banks (qo_bank, kv_bank, mlp_up_bank, mlp_down_bank, PR #1523 onwards). Only `pgolf convert
    --to-upstream` reads it; the model is always per block and reads either layout."""

    def __post_init__(self) -> None:
        self.ve_layers = [int(i) for i in self.ve_layers]
        self.recur_layers = [int(i) for i in self.recur_layers]
        self.validate()

    # --- derived ---------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_mult * self.model_dim)

    @property
    def emb_dim(self) -> int:
        return self.embedding_dim if self.embedding_dim else self.model_dim

    def validate(self) -> None:
        def bad(name: str, msg: str) -> ConfigError:
            return ConfigError(f"gpt.{name}: {msg}")

        for name in ("vocab_size", "num_layers", "model_dim", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise bad(name, f"must be positive, got {getattr(self, name)}")
        if self.vocab_size > 65536:
            raise bad("vocab_size", f"{self.vocab_size} does not fit the uint16 shard format (at most 65536)")
        if self.model_dim % self.num_heads:
            raise bad("num_heads", f"{self.num_heads} does not divide model_dim {self.model_dim}")
        if self.num_heads % self.num_kv_heads:
            raise bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise bad("num_heads", f"head dim {self.head_dim} (model_dim / num_heads) must be even for RoPE")
        if self.rope_dims < 0 or self.rope_dims > self.head_dim or self.rope_dims % 2:
            raise bad("rope_dims", f"must be even and within [0, head dim {self.head_dim}], got {self.rope_dims}")
        rd = self.rope_dims or self.head_dim
        if self.rope_train_seq_len and rd <= 2:
            raise bad("rope_dims", "the RoPE base rescale needs more than 2 rotated dims")
        if self.logit_softcap <= 0:
            raise bad("logit_softcap", f"must be positive, got {self.logit_softcap}")
        if self.mlp_hidden <= 0:
            raise bad("mlp_mult", f"gives an empty MLP ({self.mlp_mult} × {self.model_dim})")
        if self.embedding_dim is not None and self.embedding_dim <= 0:
            raise bad("embedding_dim", f"must be positive or null, got {self.embedding_dim}")
        if not 0 <= self.xsa_last_n:
            raise bad("xsa_last_n", f"must be >= 0, got {self.xsa_last_n}")
        if self.bigram_vocab_size < 0 or self.bigram_vocab_size == 1:
            raise bad("bigram_vocab_size", f"must be 0 (off) or >= 2, got {self.bigram_vocab_size}")
        if self.ve_enabled:
            for i in self.ve_layers:
                if not 0 <= i < self.num_layers:
                    raise bad("ve_layers", f"layer {i} is out of range [0, {self.num_layers})")
        if self.recurrence in ("group", "inplace"):
            if not self.recur_layers:
                raise bad("recur_layers", f"recurrence '{self.recurrence}' needs at least one layer")
            for i in self.recur_layers:
                if not 0 <= i < self.num_layers:
                    raise bad("recur_layers", f"layer {i} is out of range [0, {self.num_layers})")
            if len(set(self.recur_layers)) != len(self.recur_layers):
                raise bad("recur_layers", f"repeats a layer: {self.recur_layers}")
        if self.recurrence == "loop":
            if not 0 <= self.loop_start <= self.loop_end < self.num_layers:
                raise bad(
                    "loop_start",
                    f"need 0 <= loop_start <= loop_end < num_layers, got {self.loop_start}..{self.loop_end} "
                    f"with {self.num_layers} layers",
                )
            if self.num_loops < 1:
                raise bad("num_loops", f"recurrence 'loop' needs num_loops >= 1, got {self.num_loops}")
        if self.iter_conditioning and self.recurrence == "none":
            raise bad("iter_conditioning", "needs a recurrence form")
        if self.parallel_start_layer and not 0 < self.parallel_start_layer < self.num_layers:
            raise bad(
                "parallel_start_layer", f"must lie in [1, {self.num_layers}) or be 0, got {self.parallel_start_layer}"
            )
        if self.dtg and self.parallel_start_layer:
            raise bad(
                "dtg",
                "the dynamic token gate has no parallel-lane form (no script combines them); "
                "set dtg false or parallel_start_layer 0",
            )
        if self.mtp_num_heads < 0:
            raise bad("mtp_num_heads", f"must be >= 0, got {self.mtp_num_heads}")
        choices = {
            "smear_gate_form": ("channel", "token"),
            "parallel_residual": ("lane_merge", "lambdas", "gptj"),
            "parallel_final_lane": ("mean", "attn", "mlp"),
            "state_dict_layout": ("per_block", "banks"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, f"expected one of {list(allowed)}, got {getattr(self, name)!r}")
        token_smear = self.smear_gate and self.smear_gate_form == "token"
        if token_smear or self.sparse_attn_gate:
            width = self.emb_dim if token_smear else self.model_dim
            if not 0 < self.gate_window <= min(width, self.model_dim):
                raise bad(
                    "gate_window",
                    f"must lie in [1, {min(width, self.model_dim)}] (the gated input's width), got {self.gate_window}",
                )
        if self.sparse_attn_gate_init_std < 0:
            raise bad("sparse_attn_gate_init_std", f"must be >= 0, got {self.sparse_attn_gate_init_std}")
        if self.bos_id < -1 or self.bos_id >= self.vocab_size:
            raise bad(
                "bos_id", f"must be a token id below vocab_size {self.vocab_size} or -1 (no mask), got {self.bos_id}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"gpt: unknown field(s) {unknown}; known fields are listed in pgolf_lit/model/config.py")
        check_field_types(cls, d, "gpt")  # YAML, checkpoints and artifacts reach validate() with these types
        return cls(**d)

    def replace(self, **changes: Any) -> "GPTConfig":
        return GPTConfig.from_dict({**self.to_dict(), **changes})
