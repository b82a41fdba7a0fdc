"""Reading a PR #1855 quantization fixture case, and the record's routing of its tensors (test helper).

Cases: every folder under ``$PGOLF_PR1855_FIXTURES/quant`` (default ``../shared/fixtures/pr1855/quant``) whose
``artifact.json`` describes a PGRP container. Every setting comes from the case's ``hparams.json``
(``hyperparameters``, ``keep_float_max_numel``, ``versions``); no shape or value of a case is written here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import brotli
import pytest
import torch

from conftest import fixture_root
from pgolf_lit.quant.gate import GATE_META, GateSettings, gate_shape_qualifies
from pgolf_lit.quant.gptq import BLOCK_SIZE, DAMPING, gptq_sdclip
from pgolf_lit.quant.lqer import LqerSettings, lqer_apply
from pgolf_lit.quant.rtn import quantize_row_amax
from pgolf_lit.quant.lrzip import lrzip_version
from pgolf_lit.quant.pergroup import PASSTHROUGH_META, gptq_meta


def is_quant_gate(name: str, t: torch.Tensor, settings: GateSettings = GateSettings()) -> bool:
    """The record script's name rule for the int8 gate path (`gptq_mixed_quantize`); the package routes by the
    declared gate role instead, so this reference lives with the tests that read upstream state dicts."""
    return name.endswith(settings.name_suffix) and gate_shape_qualifies(t, settings)


def quantize_gate_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes and fp16 row scales of a gate, through the exporter's quantizer (row_amax at 8 bits)."""
    q = quantize_row_amax(w, 8)
    return q.q, q.scale


ENV = "PGOLF_PR1855_FIXTURES"
# the record's parameter banks: bank name -> the per-layer weights it stacks, in bank order
BANKS = {
    "qo_bank": ("attn.c_q.weight", "attn.proj.weight"),
    "kv_bank": ("attn.c_k.weight", "attn.c_v.weight"),
    "mlp_up_bank": ("mlp.fc.weight",),
    "mlp_down_bank": ("mlp.proj.weight",),
}


def pergroup_cases() -> list:
    root = fixture_root(ENV, "pr1855")
    reason = f"no PR #1855 PGRP fixtures: set {ENV} or provide ../shared"
    skip = pytest.param(None, marks=pytest.mark.skip(reason=reason))
    if root is None or not (root / "quant").is_dir():
        return [skip]
    cases = []
    for p in sorted((root / "quant").iterdir()):
        art = p / "artifact.json"
        if (p / "hparams.json").is_file() and art.is_file():
            if json.loads(art.read_text()).get("container", {}).get("magic") == "PGRP":
                cases.append(pytest.param(p, id=p.name))
    return cases or [skip]


class Case:
    def __init__(self, path: Path):
        self.path = path
        self.hp = self.json("hparams.json")
        self.hyper = self.hp["hyperparameters"]
        self.art = self.json("artifact.json")
        self.qmeta = self.json("quant_meta.json")
        self.num_layers = int(self.hyper["num_layers"])

    def json(self, name: str):
        return json.loads((self.path / name).read_text())

    def tensors(self, name: str):
        return torch.load(self.path / name, weights_only=True)

    @property
    def artifact_bytes(self) -> bytes:
        return (self.path / self.art["file"]).read_bytes()

    def flat_state_dict(self) -> dict:
        """state_dict.pt with the banks split into per-layer weights, in the record's order (`_unbank_state_dict`)."""
        return self.unbank(self.tensors("state_dict.pt"))

    def unbank(self, banked: dict) -> dict:
        out = {}
        for key, t in banked.items():
            if key in BANKS:
                for j, suffix in enumerate(BANKS[key]):
                    for i in range(self.num_layers):
                        out[f"blocks.{i}.{suffix}"] = t[j * self.num_layers + i]
            else:
                out[key] = t
        return out

    def rebank(self, flat: dict) -> dict:
        """The inverse of ``flat_state_dict`` (the record's `_rebank_state_dict`)."""
        out, used = {}, set()
        for key, suffixes in BANKS.items():
            names = [f"blocks.{i}.{s}" for s in suffixes for i in range(self.num_layers)]
            out[key] = torch.stack([flat[n] for n in names])
            used.update(names)
        out.update({k: v for k, v in flat.items() if k not in used})
        return out

    def route(self, name: str, t: torch.Tensor):
        """The record's routing (`gptq_mixed_quantize`): "gate", "passthrough" or ("gptq", bits, clip sigmas)."""
        h = self.hyper
        if h["gated_attn_quant_gate"] and is_quant_gate(name, t):
            return "gate"
        if not t.is_floating_point() or t.numel() <= self.hp["keep_float_max_numel"]:
            return "passthrough"
        if "tok_emb" in name:
            return "gptq", h["embed_bits"], h["embed_clip_sigmas"]
        if ".mlp." in name:
            return "gptq", h["matrix_bits"], h["mlp_clip_sigmas"]
        if ".attn." in name:
            return "gptq", h["matrix_bits"], h["attn_clip_sigmas"]
        return "gptq", h["matrix_bits"], h["matrix_clip_sigmas"]

    def lqer_settings(self) -> LqerSettings:
        h = self.hyper
        return LqerSettings(
            rank=h["lqer_rank"],
            top_k=h["lqer_top_k"],
            asym=h["lqer_asym_enabled"],
            asym_group=h["lqer_asym_group"],
            factor_bits=h["lqer_factor_bits"],
        )

    def versions_match(self) -> list[str]:
        """What differs from the builds that wrote artifact.ptz (empty: the bytes must match exactly)."""
        v = self.hp["versions"]
        here = {"torch": torch.__version__, "brotli": brotli.__version__, "lrzip": lrzip_version()}
        return [f"{k} {here[k]} here, {v[k]} in the fixture" for k in ("torch", "brotli", "lrzip") if here[k] != v[k]]


def quantize_without_lqer(c: Case, weights: dict, hessians: dict):
    """Gate int8, fp16 passthrough and GPTQ as the record routes them; (quant, meta, GPTQ names in order)."""
    quant, meta, gptq_names = {}, {}, []
    for name, t in weights.items():
        route = c.route(name, t)
        if route == "gate":
            quant[name + ".gq"], quant[name + ".gs"] = quantize_gate_rows(t)
            meta[name] = GATE_META
        elif route == "passthrough":
            quant[name] = t.to(torch.float16) if t.is_floating_point() else t
            meta[name] = PASSTHROUGH_META
        else:
            _, bits, sigmas = route
            r = gptq_sdclip(t, hessians[name], bits, sigmas)
            quant[name + ".q"], quant[name + ".scale"] = r.q, r.scale
            meta[name] = gptq_meta(bits)
            gptq_names.append(name)
    return quant, meta, gptq_names


def add_lqer(c: Case, weights: dict, quant: dict, meta: dict, gptq_names: list) -> dict:
    """LQER on the GPTQ results, added to ``quant`` and ``meta`` as the record does; returns the factors."""
    if not c.hyper["lqer_enabled"]:
        return {}
    factors = lqer_apply(weights, quant, gptq_names, c.lqer_settings())
    for name, f in factors.items():
        quant.update(f.tensors(name))
        meta[name] = meta[name] + f.meta_suffix
    return factors


def tie_settings() -> tuple[float, int]:
    """The GPTQ settings (damping, block size) PR #1855's codes were made with, for
    ``test_quant_fixtures.assert_tie_mismatches``."""
    return DAMPING, BLOCK_SIZE


@functools.lru_cache(maxsize=None)
def case(path: Path) -> Case:
    return Case(path)
