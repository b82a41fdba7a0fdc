"""Reading an artifact back into a model: the decoder side of every container, nothing of the export.

Each container format registers its reader where it is defined (``register_container``, the way eval methods and
codecs register): ``native_read.py`` (pgolf's container), ``pergroup_read.py`` (PR #1855's PGRP) and
``upstream_read.py`` (the record scripts' ``torch.save`` files). ``read_artifact`` asks each registered reader
whether the bytes are its format (``sniff``), the one without a magic (upstream) last. ``pgolf_lit.quant``
imports every container; the wrapped evaluation program (``code_size.py``) carries only its artifact's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.errors import ArtifactError
from pgolf_lit.eval.context import Weights
from pgolf_lit.model.state_dicts import load_upstream_state_dict, to_upstream_state_dict
from pgolf_lit.model.gpt import GPT

PathLike = Union[str, Path]
MAX_RAW_BYTES = 1 << 30  # far above any 16 MB artifact (records: < 100 MB raw); a larger claim is damaged or crafted


@dataclass
class LoadedArtifact:
    config: GPTConfig
    state_dict: dict[str, Tensor]
    format: str  # "native" or the upstream container style
    info: dict[str, Any]
    weights: Weights  # what scoring these weights scores (the label of its result lines)


@dataclass(frozen=True)
class Container:
    """A registered container format. ``name`` is its ``export.format``; ``read(data, source, config)`` decodes a
    file's bytes (``source`` names it in errors; ``config`` is the model config, required by formats that hold
    none); ``sniff(data)`` says whether bytes are this format (None: the fallback, tried last); ``needs``: modules
    beyond ``read``'s own module (and what it imports) that reading needs."""

    name: str
    read: Callable[[bytes, str, Optional[GPTConfig]], LoadedArtifact]
    sniff: Optional[Callable[[bytes], bool]] = None
    needs: tuple[str, ...] = ()

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules that reading this format needs (``code_size.py`` counts them and what they import)."""
        return (self.read.__module__, *self.needs)


CONTAINERS: dict[str, Container] = {}


def register_container(container: Container) -> Container:
    if container.name in CONTAINERS:
        raise ValueError(f"container {container.name!r} is registered twice")
    CONTAINERS[container.name] = container
    return container


def read_bytes(path: PathLike) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the artifact ({e.strerror or e})") from None


def record_config_required(config: Optional[GPTConfig], source: str) -> GPTConfig:
    if config is None:
        raise ArtifactError(f"{source}: an upstream record artifact holds no model config; pass the record's config")
    return config


def record_dtypes(config: GPTConfig) -> dict[str, torch.dtype]:
    """The dtypes of the record's own model of ``config``, which its weights dequantize to (bf16 tables)."""
    return {k: v.dtype for k, v in to_upstream_state_dict(GPT(config), banked=False).items()}


def read_artifact(path: PathLike, config: Optional[GPTConfig] = None) -> LoadedArtifact:
    """Read a native or upstream artifact into a dequantized state dict.

    A native file carries its GPTConfig (``config``, when given, must equal it). An upstream record file holds
    none: ``config`` is required, and its weights dequantize to the record's live dtypes (bf16 tables).
    """
    data = read_bytes(path)
    for container in sorted(CONTAINERS.values(), key=lambda c: c.sniff is None):
        if container.sniff is None or container.sniff(data):
            return container.read(data, str(path), config)
    raise ArtifactError(f"{path}: not an artifact of the container(s) this program reads ({', '.join(CONTAINERS)})")


def load_artifact(path: PathLike, config: Optional[GPTConfig] = None) -> tuple[GPTConfig, dict[str, Tensor]]:
    """``(GPTConfig, dequantized state dict)`` of an artifact; see ``read_artifact``."""
    art = read_artifact(path, config)
    return art.config, art.state_dict


def build_model_from_artifact(
    path: PathLike, config: Optional[GPTConfig] = None, device: Union[str, torch.device] = "cpu"
) -> GPT:
    """A GPT holding the artifact's dequantized weights, with recurrence as it was at export (native files)."""
    return model_from_artifact(read_artifact(path, config), str(path), device)


def model_from_artifact(art: LoadedArtifact, source: str, device: Union[str, torch.device] = "cpu") -> GPT:
    """A GPT holding a read artifact's dequantized weights (see ``build_model_from_artifact``)."""
    model = GPT(art.config)
    load_upstream_state_dict(model, art.state_dict, source)
    model.set_recurrence(bool(art.info.get("recurrence_active", False)))
    return model.to(device).eval()
