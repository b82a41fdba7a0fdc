"""GPTConfig: every architecture switch of the baseline and the record systems, named as upstream names it.

The defaults are the upstream baseline (``train_gpt.py``: 9 layers, 512 wide, relu² MLP ×2, SP1024, 17,059,912
parameters). Each record in ``configs/records/`` sets only the fields where it differs. spec/model.md describes
every switch; docs/techniques.md summarises them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from pgolf_lit.errors import ConfigError

# Name fragments of the model's control tensors (gains, mixes, skip weights): the baseline's
# CONTROL_TENSOR_NAME_PATTERNS. The optimizer routes them to the scalar AdamW; the export keeps the small ones float.
BASELINE_CONTROL_PATTERNS = (
    "attn_scale",
    "attn_scales",
    "mlp_scale",
    "mlp_scales",
    "resid_mix",
    "resid_mixes",
    "q_gain",
    "skip_weight",
    "skip_weights",
)


@dataclass
class GPTConfig:
    # --- shape -----------------------------------------------------------------------------------------
    vocab_size: int = 1024
    num_layers: int = 9  # physical blocks
    model_dim: int = 512
    embedding_dim: Optional[int] = None  # token table width; None = model_dim (else embed_proj/head_proj)
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: float = 2.0  # hidden = int(mlp_mult * model_dim)
    mlp_activation: Literal["relu2", "leaky_relu2"] = "relu2"
    leaky_relu_slope: float = 0.5
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    logit_softcap: float = 30.0
    # --- attention -------------------------------------------------------------------------------------
    rope_base: float = 10000.0
    rope_dims: int = 0  # rotated dims per head; 0 = the whole head
    rope_train_seq_len: int = 0  # rescale the RoPE base for sequences longer than this; 0 = never
    qk_gain_init: float = 1.5
    xsa_last_n: int = 0  # projection-removed attention output on the last n physical layers
    # --- residual stream -------------------------------------------------------------------------------
    ln_scale: bool = False  # multiply the normed block inputs by 1/sqrt(layer+1)
    skip_gates: bool = False  # sigmoid-gated lerp on the U-Net skips
    skip_rows: Literal["physical", "recurrent"] = "physical"  # size skip_weights from L or the recurrent schedule
    skip_wiring: Literal["standard", "folder_copy"] = "standard"  # folder_copy: PR #1278 record-folder bug
    parallel_start_layer: int = 0  # >0: attention/MLP lanes from this physical layer on, merged by lane_merge
    dtg: bool = False  # dynamic token gate per block (present in Family A scripts, off in every record)
    # --- embeddings ------------------------------------------------------------------------------------
    smear_gate: bool = False
    bigram_vocab_size: int = 0  # 0 = no BigramHash
    bigram_dim: int = 128
    bigram_trigram: bool = False  # also hash (t, t-1, t-2) into the same table (not used by any record)
    ve_enabled: bool = False  # value embeddings
    ve_dim: int = 128
    ve_layers: list[int] = field(default_factory=lambda: [9, 10])
    vrl: bool = False  # value residual: mix the first block's raw V into every later block's V
    # --- depth recurrence ------------------------------------------------------------------------------
    recurrence: Literal["none", "group", "inplace", "loop"] = "none"
    recur_layers: list[int] = field(default_factory=list)  # group (PR #1334) / inplace (PR #1278)
    iter_conditioning: bool = False  # PR #1278 iter_embed / iter_gate before each repeated pass
    num_loops: int = 0  # loop (PR #1394): segment [loop_start, loop_end] runs num_loops + 1 times
    loop_start: int = 0
    loop_end: int = 0
    # --- init and heads --------------------------------------------------------------------------------
    init: Literal["baseline", "orthogonal"] = "baseline"
    proj_init_scale: bool = False  # Family A: ×1/sqrt(2L) on orthogonally initialised ".proj" weights
    mtp_num_heads: int = 0  # multi-token prediction heads (training loss only)
    mtp_loss_weight: float = 0.2

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
            raise bad("parallel_start_layer", f"must lie in [1, {self.num_layers}) or be 0, got {self.parallel_start_layer}")
        if self.mtp_num_heads < 0:
            raise bad("mtp_num_heads", f"must be >= 0, got {self.mtp_num_heads}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"gpt: unknown field(s) {unknown}; known fields are listed in pgolf_lit/config.py")
        return cls(**d)

    def replace(self, **changes: Any) -> "GPTConfig":
        return GPTConfig.from_dict({**self.to_dict(), **changes})


# ---------------------------------------------------------------------------------------------------------
# Record configs on disk
# ---------------------------------------------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def record_config_path(name: str) -> Path:
    """``configs/records/<name>.yaml`` (or ``configs/<name>.yaml``); unknown names list what exists."""
    for p in (CONFIG_DIR / "records" / f"{name}.yaml", CONFIG_DIR / f"{name}.yaml"):
        if p.is_file():
            return p
    known = sorted(p.stem for p in (CONFIG_DIR / "records").glob("*.yaml"))
    raise ConfigError(f"unknown record '{name}': expected one of {known}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def gpt_config_from_yaml(path: str | Path) -> GPTConfig:
    """The ``model.gpt`` section of a pgolf YAML config as a GPTConfig."""
    data = load_yaml(path)
    section = ((data.get("model") or {}).get("gpt")) or {}
    try:
        return GPTConfig.from_dict(section)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
