"""GPTConfig: every architecture switch of the baseline and the record systems, named as upstream names it.

The defaults are the upstream baseline (``train_gpt.py``: 9 layers, 512 wide, relu² MLP ×2, SP1024, 17,059,912
parameters). Each record in ``configs/records/`` sets only the fields where it differs. docs/techniques.md
describes every switch and names its upstream origin.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from pgolf_lit.errors import CheckedConfig


@dataclass
class GPTConfig(CheckedConfig):
    """Every architecture switch, under its upstream name; the defaults are the upstream baseline's."""

    SECTION = "gpt"

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
    sparse_attn_gate_gain: float = 1.0
    """Multiplier of the sparse gate's output: 2.0 is PR #1667's attention-output gate, 2·σ(W·x[:12]) per head from
    zero init, so 1 at the start (upstream GATE_ATTN_OUT=1 with GATE_ATTN_SRC=proj, GATE_WIDTH=12)."""
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
    parallel_residual: Literal["lane_merge", "lambdas", "gptj", "sublayer"] = "lane_merge"
    """Form of the parallel blocks. Two lanes from the first decoder position at or past parallel_start_layer:
    lane_merge (PR #1333/#1421): attention writes lane a, the MLP lane m, merged by one learned scalar. lambdas
    (PR #1529/#1855): each block writes both lanes through parallel_post_lambdas and decays them by
    parallel_resid_lambdas; skips go to the attention lane; the end takes parallel_final_lane. One stream: gptj
    (GPT-J, PR #1412/#1493/#1514, model/gptj_residual.py): every physical block >= parallel_start_layer adds
    attention and MLP of the same normed input to x; no parameter is added. sublayer (PR #1204, upstream
    PARALLEL_RESIDUAL=1): attention, then the MLP, each decays both lanes by its own resid lambda (init √1.1) and
    writes both; the MLP reads the lane attention just wrote; skips go to both lanes; the end is the lanes' mean
    (``sublayer_lanes.py``; needs block_controls position)."""
    skip_after_fork: bool = False
    """lane_merge form: the U-Net skips scheduled after the fork keep coming, added to the attention lane, instead
    of being dropped (PR #1477, hard-coded there: no env var). The lambdas form always does this; gptj has no fork."""
    parallel_final_lane: Literal["mean", "attn", "mlp"] = "mean"
    """lambdas form: the hidden state after the last block: the lanes' mean, the attention lane or the MLP lane
    (upstream PARALLEL_FINAL_LANE)."""
    block_controls: Literal["physical", "position"] = "physical"
    """Whose are a block's controls (attn_scale, mlp_scale, resid_mix, q_gain), its ln scale, XSA, value embedding
    and the layer-0 attention switch: the physical block's (every record but one), or the layer schedule position's
    (PR #1204, whose Block list is built per virtual layer: a repeated layer gets its own controls, and the later
    positions' controls move to the next physical layers when recurrence switches on; ``position_controls.py``)."""
    disable_layer0_attn: bool = False
    """The block at schedule position 0 runs no attention (upstream DISABLE_LAYER0_ATTN, PR #1204); its attention
    matrices stay in the model, untrained, and are left out of the artifact. Needs block_controls position."""
    dtg: bool = False
    """Dynamic token gate per block (present in the PR #1263 family's scripts, off in every record)."""
    # --- embeddings ------------------------------------------------------------------------------------
    smear_gate: bool = False
    """Smear each position with the previous one; smear_gate_form says how (upstream SMEAR_GATE_ENABLED)."""
    smear_gate_form: Literal["channel", "token", "prenorm"] = "channel"
    """channel (PR #1263 family): a per-channel sigmoid mix with the previous position after the embedding norm.
    prenorm (PR #65's USE_SMEARGATE, model/smear_prenorm.py): that mix before the norm, on tok_emb + BigramHash,
    keeping σ(gate) of the token, gate from 3.
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
    bigram_sum_hash: bool = False
    """PR #65's BigramHash form (model/bigram_sum_hash.py): (prev·92821 + cur) mod n, N(0, 0.01) table, no output
    scale; off: the PR #162 family's XOR hash, last bucket for position 0, zero table, learned scale 0.05. No env
    var: the form of PR #65's train_gpt_v5.py (BIGRAM_HASH_BUCKETS / BIGRAM_HASH_DIM)."""
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
    repeat_untie_mlp: Literal["none", "full"] = "none"
    """full: the repeated pass of each group-recurrent layer in repeat_untie_mlp_layers runs its own MLP, a copy of
    the layer's MLP taken when recurrence switches on (upstream REPEAT_UNTIE_MLP, PR #1204; ``repeat_mlp.py``)."""
    repeat_untie_mlp_layers: list[int] = field(default_factory=list)
    """The recur layers whose repeated pass has its own MLP; empty = all of them (upstream REPEAT_UNTIE_MLP_LAYERS)."""
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
        self.repeat_untie_mlp_layers = [int(i) for i in self.repeat_untie_mlp_layers]
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
        """Every field's range and the switches that need each other (``config_checks.py``)."""
        try:  # the counted program (quant/code_size.py) carries no checks: it reads configs checked when written
            from pgolf_lit.model.config_checks import check_gpt_config
        except ImportError:
            return
        check_gpt_config(self)
