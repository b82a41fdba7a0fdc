"""Parameter roles: every parameter of the GPT states what it is where it is created.

A module declares the role of each parameter it owns (``CastedLinear(..., role=...)`` or ``declare_roles``), and
``parameter_roles(model)`` collects them into one table, name → ``ParamRole``. Every consumer reads that table
instead of matching names: optimizer routing (``optim/groups.py``), the export rules and Hessian hooks
(``quant/``), late QAT, the TTT trainable set, ``pgolf summary`` and the upstream converter. A parameter without a
declared role is an error when the model is built, naming it.

The roles reproduce what the record scripts decided by name patterns (``CONTROL_TENSOR_NAME_PATTERNS`` and their
hand-written optimizer lists, upstream ``train_gpt.py`` of each record): the train and quant fixtures check that.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Literal, Optional

from torch import nn

from pgolf_lit.errors import ConfigError

Kind = Literal["matrix", "embedding", "head", "projection", "control", "aux_head", "constant", "unused"]
QuantGroup = Literal["attn", "mlp", "embed", "other", "gate"]
RecordDtype = Literal["fp32", "bf16"]

KINDS: tuple[str, ...] = ("matrix", "embedding", "head", "projection", "control", "aux_head", "constant", "unused")
QUANT_GROUPS: tuple[str, ...] = ("attn", "mlp", "embed", "other", "gate")


@dataclass(frozen=True)
class ParamRole:
    """What one parameter is.

    ``kind`` decides the optimizer: matrix → Muon; embedding (token tables) → the token Adam(W), one group each;
    head (an untied output head) → the head Adam; projection (embed_proj/head_proj) → Muon unless the record
    leaves them untrained; control (gains, mixes, gates, skip weights, small scales) → the scalar Adam(W);
    aux_head (multi-token-prediction heads) → Muon, training only, never exported; constant (PR #1945's
    softcap_pos/neg) → no optimizer: a parameter the records create but never train, exported as a float; unused
    (PR #1204's layer-0 attention with DISABLE_LAYER0_ATTN) → no optimizer, never read, never exported.

    ``quant`` is the export rule that quantizes the tensor when it is too large to keep as a float (the records'
    category: attention, MLP, embedding tables, other); ``gate`` tensors may be int8-quantized per row (PR #1855's
    QuantGate) and otherwise stay float; None: always kept as a float (controls).

    ``component`` names the technique that owns the tensor (summaries; the scripts' order of hand-listed tensors).
    ``record_dtype`` is the dtype the record scripts store it in (``GPT(h).bfloat16()`` then fp32 restored for
    CastedLinear weights and control tensors: token tables and iteration embeddings stay bf16).
    ``layer`` is the physical block that holds it (None outside ``blocks``), filled in by ``parameter_roles``.
    ``declared`` numbers the declarations in the order the model made them (``declare_roles``): the scripts list
    the tensors of one technique in the order they create them (PR #1855: ``smear_gate.weight`` before
    ``smear_lambda``), which is not always ``named_parameters`` order (a module's own tensors come first there).
    """

    kind: Kind
    quant: Optional[QuantGroup] = None
    component: str = "control"
    record_dtype: RecordDtype = "fp32"
    layer: Optional[int] = None
    declared: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown parameter kind {self.kind!r}; expected one of {KINDS}")
        if self.quant is not None and self.quant not in QUANT_GROUPS:
            raise ValueError(f"unknown quant group {self.quant!r}; expected one of {QUANT_GROUPS} or None")

    @property
    def is_control(self) -> bool:
        return self.kind == "control"

    @property
    def exported(self) -> bool:
        """Training-only tensors (MTP heads) are left out of artifacts, as upstream leaves them out."""
        return self.kind not in ("aux_head", "unused")


def matrix(quant: QuantGroup, component: str) -> ParamRole:
    """A weight matrix trained by Muon and quantized by the ``quant`` rule."""
    return ParamRole("matrix", quant, component)


def control(
    component: str = "control", record_dtype: RecordDtype = "fp32", quant: Optional[QuantGroup] = None
) -> ParamRole:
    """A small trained control tensor (scalar Adam(W)); kept as a float in artifacts unless ``quant='gate'``."""
    return ParamRole("control", quant, component, record_dtype)


def constant(component: str) -> ParamRole:
    """A parameter no optimizer takes (the record scripts list it in no group); kept as a float in artifacts."""
    return ParamRole("constant", None, component)


def embedding(quant: QuantGroup, component: str) -> ParamRole:
    """A token table (token Adam(W), stored bf16 by the records)."""
    return ParamRole("embedding", quant, component, "bf16")


_DECLARATIONS = itertools.count(1)


def declare_roles(module: nn.Module, **roles: ParamRole) -> None:
    """Declare the roles of parameters ``module`` owns directly, by attribute name (e.g. ``weight=...``)."""
    table = dict(getattr(module, "param_roles", {}))
    table.update({name: dataclasses.replace(role, declared=next(_DECLARATIONS)) for name, role in roles.items()})
    module.param_roles = table


def parameter_roles(model: nn.Module) -> dict[str, ParamRole]:
    """name → role for every parameter of ``model``, in ``named_parameters`` order; raises ``ConfigError`` naming
    the first parameter nobody declared. A module with a ``layer_idx`` attribute (a transformer block) sets the
    ``layer`` of everything below it."""
    table: dict[str, ParamRole] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str, layer: Optional[int]) -> None:
        layer = getattr(module, "layer_idx", layer)
        declared = getattr(module, "param_roles", {})
        for name, p in module._parameters.items():
            if p is None or id(p) in seen:
                continue
            seen.add(id(p))
            role = declared.get(name)
            if role is None:
                raise ConfigError(
                    f"parameter {prefix}{name} of {type(module).__name__} declares no role: pass role= or call "
                    "declare_roles where it is created (pgolf_lit/model/roles.py)"
                )
            table[prefix + name] = dataclasses.replace(role, layer=layer)
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{child_name}.", layer)

    visit(model, "", None)
    # Keep named_parameters order, which every consumer iterates in.
    return {name: table[name] for name, _ in model.named_parameters()}
