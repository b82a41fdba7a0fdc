"""Acceptance test of pgolf_lit.quant against what the upstream record scripts produced.

Fixtures: every directory with an hparams.json under $PGOLF_QUANT_FIXTURES (default ../shared/fixtures/quant);
see that folder's README ("How a project test should use them"). Which routine runs is chosen by
``hparams.json["record"]``, every setting comes from the case files; no case name, shape or value is written here.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import fixture_cases
from pgolf_lit.model.convert import config_from_upstream, load_upstream_state_dict
from pgolf_lit.model.gpt import GPT, roles_of
from pgolf_lit.quant.artifact import (
    RECORD_UPSTREAM_STYLE,
    encode_upstream,
    quant_from_upstream,
    read_upstream_artifact,
    upstream_container,
)
from pgolf_lit.quant.calibration import token_batches
from pgolf_lit.quant.compress import byte_unshuffle, compress, get_codec
from pgolf_lit.quant.export import ExportConfig, quantize_state_dict
from pgolf_lit.quant.gptq import BLOCK_SIZE, DAMPING, factor_hessian, gptq_sweep, permuted_weight
from pgolf_lit.quant.hessians import collect_hessians
from pgolf_lit.quant.prune import selective_prune
from pgolf_lit.quant.quantized import dequantize
from pgolf_lit.quant.rtn import INT8_CLIP_QUANTILE, PERCENTILE_CANDIDATES
from pgolf_lit.records import record_export_config

CASES = fixture_cases("PGOLF_QUANT_FIXTURES", "quant")

# README point 1: GPTQ codes may differ only at rounding ties, at most 0.1 % of a matrix.
MAX_TIE_MISMATCH = 0.001
NEAR_TIE = 1e-5  # |w/s - (k + 1/2)| relative to |w/s| at a row's first differing column


# ---------------------------------------------------------------------------------------------------------
# Reading a case
# ---------------------------------------------------------------------------------------------------------


class Case:
    def __init__(self, path: Path):
        self.path = path
        self.hp = self.json("hparams.json")
        self.art = self.json(self.hp.get("artifact", "artifact.json"))
        self.quant_meta = self.json("quant_meta.json")
        self.prune = self.json("prune.json") if (path / "prune.json").is_file() else None
        self.record = self.hp["record"]
        self.style = RECORD_UPSTREAM_STYLE[self.record]

    def json(self, name: str):
        return json.loads((self.path / name).read_text())

    def tensors(self, name: str) -> dict:
        return torch.load(self.path / name, weights_only=True)

    def live_state_dict(self) -> dict:
        dtypes = self.hp["live_dtypes"]
        return {k: v.to(getattr(torch, dtypes[k])) for k, v in self.tensors("state_dict.pt").items()}

    def hessians(self):
        return self.tensors(self.hp["hessians"]["file"]) if "hessians" in self.hp else None

    @property
    def template_dtypes(self) -> dict:
        return self.art["dequant_dtypes"]

    @property
    def shuffle_stride(self) -> int:
        return (self.art["byte_shuffle"] or {}).get("stride", 0)

    def export_config(self) -> ExportConfig:
        """The record config's export settings (its GPTQExport ``export``), written in the record's own container,
        with every setting the case states taken from the case."""
        s = self.hp["settings"]
        assert s.get("percentile_candidates", list(PERCENTILE_CANDIDATES)) == list(PERCENTILE_CANDIDATES)
        assert s.get("INT8_CLIP_Q", INT8_CLIP_QUANTILE) == INT8_CLIP_QUANTILE
        cfg = record_export_config(self.record)
        assert cfg.upstream_style == self.style, "the record config names another upstream container"
        changes = {
            "format": "upstream",
            "keep_float_max_numel": self.hp["keep_float_max_numel"],
            "codec": self.art["compressor"]["name"],
            "shuffle_stride": self.shuffle_stride,
        }
        if "block_size" in s:
            changes["gptq"] = dataclasses.replace(cfg.gptq, block_size=s["block_size"])
        if "clip_range" in s:  # the int6 scripts' matrix range
            bits = (s["clip_range"] + 1).bit_length()
            for cat in ("mlp", "attn"):
                changes[cat] = dataclasses.replace(getattr(cfg, cat), bits=bits)
        if "matrix_bits" in s:  # PR #1394: tok_emb by the embed settings, every other tensor by the matrix ones
            for cat in ("mlp", "attn", "other"):
                changes[cat] = dataclasses.replace(
                    getattr(cfg, cat), bits=s["matrix_bits"], clip_sigmas=s["matrix_clip_sigmas"]
                )
            changes["embed"] = dataclasses.replace(cfg.embed, bits=s["embed_bits"], clip_sigmas=s["embed_clip_sigmas"])
        return dataclasses.replace(cfg, **changes)

    def roles(self) -> dict:
        """The parameter roles our GPT declares for the case's model; the script's control patterns (where the
        case states them) must pick out exactly the tensors the roles call controls, where that decides anything."""
        roles = roles_of(calibration_config(self))
        s = self.hp["settings"]
        patterns = s.get("CONTROL_TENSOR_NAME_PATTERNS", s.get("INT8_KEEP_FLOAT_FP32_NAME_PATTERNS"))
        if patterns is not None:
            shapes = self.tensors("state_dict.pt")
            keep_fp32 = "INT8_KEEP_FLOAT_FP32_NAME_PATTERNS" in s  # the baseline: small controls stay fp32
            for name, t in shapes.items():
                matters = keep_fp32 or t.numel() > self.hp["keep_float_max_numel"]
                if matters and t.is_floating_point():
                    assert roles[name].is_control == any(p in name for p in patterns), name
        return roles

    def reference_quant(self) -> dict:
        """The quantizer's output before any pruning."""
        return self.tensors("quant_before_prune.pt" if self.prune else "expected_quant.pt")

    def container(self, flat: dict) -> dict:
        """The dict the script saved, assembled from a flat ``w`` dict and quant_meta.json."""
        if "meta" in self.quant_meta:
            return {"w": flat, "m": self.quant_meta["meta"]}
        extra = self.quant_meta["container_extra"]
        quantized = {n[: -len(".q")]: t for n, t in flat.items() if n.endswith(".q")}
        obj = {
            "__quant_format__": self.quant_meta["format"],
            "quantized": quantized,
            "scales": {n: flat[n + ".scale"] for n in quantized},
            "dtypes": extra["dtypes"],
            "passthrough": {n: t for n, t in flat.items() if not n.endswith((".q", ".scale"))},
        }
        for key in ("qmeta", "passthrough_orig_dtypes"):
            if extra.get(key):
                obj[key] = extra[key]
        return obj


@functools.lru_cache(maxsize=None)
def quantized_from_reference_hessians(path: Path):
    """Run the port's reproduce-mode quantizer once per case (GPTQ takes seconds)."""
    case = Case(path)
    return quantize_state_dict(case.live_state_dict(), case.export_config(), case.hessians(), roles=case.roles())


def codec_reproduces(case: Case) -> bool:
    """Whether this machine's codec build turns the fixture's own container into the fixture's exact blob."""
    blob = (case.path / case.art["file"]).read_bytes()
    codec = case.art["compressor"]["name"]
    raw = byte_unshuffle(get_codec(codec).decompress(blob))
    return compress(raw, codec, case.shuffle_stride) == blob


def gptq_names(case: Case) -> set:
    hessians = case.hessians() or {}
    return {
        name
        for name, entry in quantized_from_reference_hessians(case.path)[1].items()
        if entry.get("method") == "gptq" and name in hessians
    }


# ---------------------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------------------


def assert_same_tensors(ours: dict, expected: dict, tie_tolerant: dict | None = None) -> None:
    """Same keys; every tensor equal with the same dtype. Codes of GPTQ tensors named in ``tie_tolerant``
    (name → (weight, Hessian, bits)) may differ at rounding ties only."""
    tie_tolerant = tie_tolerant or {}
    assert sorted(ours) == sorted(expected), "tensor keys differ"  # container order: see the bytes test
    for key, ref in expected.items():
        got = ours[key]
        assert (got.dtype, got.shape) == (ref.dtype, ref.shape), key
        name = key[: -len(".q")]
        if key.endswith(".q") and name in tie_tolerant and not torch.equal(got, ref):
            assert_tie_mismatches(key, got, ref, ours[name + ".scale"], *tie_tolerant[name])
        else:
            assert torch.equal(got, ref), f"{key}: {(got != ref).sum().item()} values differ"


def assert_tie_mismatches(key, got, ref, scale, weight, hessian, bits, damping, block_size) -> None:
    """GPTQ codes off by rounding ties only: at most 0.1 %, and each differing row first differs (in the sweep
    order) where w/s sits within NEAR_TIE of a half-integer, where an ulp of platform arithmetic decides.
    ``damping`` and ``block_size`` are the GPTQ settings the codes were made with."""
    mismatched = (got != ref).sum().item()
    assert mismatched <= MAX_TIE_MISMATCH * got.numel(), f"{key}: {mismatched} codes differ (> 0.1 %)"
    factor = factor_hessian(hessian, damping)
    ratios = replay_sweep_ratios(
        permuted_weight(weight, factor),
        factor.upper,
        scale.float(),
        ref[:, factor.perm],
        got[:, factor.perm],
        2 ** (bits - 1) - 1,
        block_size,
    )
    for row, ratio in ratios.items():
        distance = abs(ratio - (torch.floor(torch.tensor(ratio)).item() + 0.5))
        assert distance <= NEAR_TIE * max(1.0, abs(ratio)), f"{key}: row {row} first differs at w/s = {ratio!r}"


def replay_sweep_ratios(w_perm, upper, scale, ref_perm, got_perm, r, block_size) -> dict:
    """Run the GPTQ sweep with the reference codes forced; return w/s at each differing row's first difference.

    Up to that column a row's codes equal ours, so its state is exactly what our sweep computed there.
    """
    first = {}
    rows, cols = w_perm.shape
    work = w_perm.clone()
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, u_block = work[:, start:end].clone(), upper[start:end, start:end]
        errors = torch.zeros(rows, end - start)
        for j in range(end - start):
            column = block[:, j]
            for row in (ref_perm[:, start + j] != got_perm[:, start + j]).nonzero().flatten().tolist():
                first.setdefault(row, (column[row] / scale[row]).item())
            q = ref_perm[:, start + j].float()
            err = (column - q * scale) / u_block[j, j]
            errors[:, j] = err
            block[:, j:] -= err.unsqueeze(1) * u_block[j, j:].unsqueeze(0)
        if end < cols:
            work[:, end:] -= errors @ upper[start:end, end:]
    return first


def tie_context(case: Case, hessians: dict) -> dict:
    cfg = case.export_config()
    sd = case.live_state_dict()
    _, meta = quantized_from_reference_hessians(case.path)
    return {
        n: (sd[n].float(), hessians[n], meta[n]["bits"], cfg.gptq.damping, cfg.gptq.block_size)
        for n in gptq_names(case)
    }


# ---------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------


def test_tie_tolerance_accepts_a_crafted_tie_and_refuses_any_other_difference():
    """The tie branch of the fixture tests runs only where a platform rounds a tie otherwise, which the visible
    fixtures may never show: a tie is made here. The first column of the sweep (act-order's first) has no error
    feedback, so w = 2.5·s there is an exact tie; codes made from w nudged by one ulp round it the other way and
    differ from there on (as another platform's would). Any difference that does not start at a tie is refused."""
    torch.manual_seed(0)
    rows, cols, bits = 256, 256, 6  # a flipped tie changes ~50 later codes of its row: under 0.1 % of 65,536
    x = torch.randn(512, cols)
    hessian = x.T @ x
    scale = torch.full((rows,), 0.125)  # a power of two: w / s is exact
    weight = torch.randn(rows, cols) * 0.2
    factor = factor_hessian(hessian, DAMPING)
    first = int(factor.perm[0])
    weight[3, first] = 2.5 * 0.125

    def codes(w):
        return gptq_sweep(permuted_weight(w, factor), factor.upper, scale, 2 ** (bits - 1) - 1, BLOCK_SIZE)[
            :, factor.inv_perm
        ]

    got = codes(weight)
    nudged = weight.clone()
    nudged[3, first] = torch.nextafter(torch.tensor(2.5 * 0.125), torch.tensor(1.0))
    ref = codes(nudged)
    assert (got != ref).any() and (got != ref).nonzero()[:, 0].unique().tolist() == [3]
    assert_tie_mismatches("w.q", got, ref, scale, weight, hessian, bits, DAMPING, BLOCK_SIZE)
    off = got.clone()
    off[7, int(factor.perm[5])] += 1  # a code one step away where nothing ties
    with pytest.raises(AssertionError, match="row 7 first differs"):
        assert_tie_mismatches("w.q", off, got, scale, weight, hessian, bits, DAMPING, BLOCK_SIZE)


@pytest.mark.parametrize("case", CASES)
def test_quantizer_reproduces_codes_scales_and_kept_tensors(case):
    c = Case(case)
    quant, _ = quantized_from_reference_hessians(case)
    assert_same_tensors(quant, c.reference_quant(), tie_context(c, c.hessians() or {}))


@pytest.mark.parametrize("case", CASES)
def test_quantizer_meta_matches(case):
    c = Case(case)
    quant, meta = quantized_from_reference_hessians(case)
    container = upstream_container(quant, meta, c.style)
    if "meta" in c.quant_meta:
        assert json.loads(json.dumps(container["m"])) == c.quant_meta["meta"]
    else:
        for key, value in c.quant_meta["container_extra"].items():
            assert container.get(key) == value, key
    for name, info in c.quant_meta["tensors"].items():
        if "chosen_pct" in info:
            assert meta[name]["percentile"] == info["chosen_pct"], name


@pytest.mark.parametrize("case", CASES)
def test_dequantize_matches_script_roundtrip(case):
    c = Case(case)
    quant, meta, _ = quant_from_upstream(c.container(c.tensors("expected_quant.pt")), c.template_dtypes)
    assert_same_tensors(dequantize(quant, meta), c.tensors("expected_dequant.pt"))


@pytest.mark.parametrize("case", CASES)
def test_read_upstream_artifact(case):
    c = Case(case)
    art = read_upstream_artifact(case / c.art["file"], c.template_dtypes)
    assert art.codec == c.art["compressor"]["name"]
    assert art.shuffled == bool(c.art["byte_shuffle"])
    assert art.style == c.style
    assert_same_tensors(art.state_dict, c.tensors("expected_dequant.pt"))


@pytest.mark.parametrize("case", CASES)
def test_write_upstream_artifact_bytes(case):
    c = Case(case)
    quant, meta, _ = quant_from_upstream(c.container(c.tensors("expected_quant.pt")), c.template_dtypes)
    buffer = io.BytesIO()
    torch.save(upstream_container(quant, meta, c.style), buffer)
    if torch.__version__ != c.hp["torch"]:
        loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
        assert_same_tensors(quant_from_upstream(loaded, c.template_dtypes)[0], quant)
        pytest.skip(
            f"torch {torch.__version__} here, the fixture's container bytes are torch {c.hp['torch']}'s: "
            "compared the loaded contents instead of the bytes"
        )
    assert hashlib.sha256(buffer.getvalue()).hexdigest() == c.art["raw_sha256"]
    if not codec_reproduces(c):
        pytest.skip(
            f"this {c.art['compressor']['name']} build does not recompress the fixture's own container to "
            "its blob: raw container compared, compressed bytes not comparable"
        )
    blob = encode_upstream(quant, meta, c.style, c.art["compressor"]["name"], c.shuffle_stride)
    assert len(blob) == c.art["bytes"]
    assert hashlib.sha256(blob).hexdigest() == c.art["sha256"]


def calibration_config(c: Case):
    """Our GPTConfig for the case's script settings."""
    changes = {**c.hp.get("hyperparameters", {}), **(c.hp.get("model_kwargs") or {})}
    # upstream lanes start at a layer index; one at or past the last layer means no lanes (our 0)
    if int(changes.get("parallel_start_layer", 0)) >= int(changes["num_layers"]):
        changes["parallel_start_layer"] = 0
    return config_from_upstream(c.record, changes)


def calibration_model(c: Case) -> torch.nn.Module:
    """Our GPT for the case's script settings, holding state_dict.pt in float32, recurrence as at export."""
    model = GPT(calibration_config(c))
    load_upstream_state_dict(model, c.tensors("state_dict.pt"), str(c.path / "state_dict.pt"))
    # calibration.model_state names the executed layer schedule (e.g. "[0, 0, 0]") when recurrence is on
    stated = re.search(r"\[(\d+(?:,\s*\d+)*)\]", c.hp["calibration"]["model_state"])
    if stated:
        model.set_recurrence(True)
        assert model.layer_schedule() == [int(x) for x in stated.group(1).split(",")]
    return model.eval()


def collected_hessians(c: Case) -> dict:
    cal = c.hp["calibration"]
    tokens = c.tensors(cal["file"])
    cfg = c.export_config()
    hessians, report = collect_hessians(
        calibration_model(c),
        token_batches(tokens, cal["seqs_per_batch"]),
        modules=cfg.gptq.hessian_modules,
        head=cfg.head_uses_gptq,
        damping=cfg.gptq.hessian_damping,
        progress=False,
    )
    assert report.num_batches == cal["num_batches"]
    return hessians


@pytest.mark.parametrize("case", CASES)
def test_hessians_from_calibration_tokens(case):
    c = Case(case)
    if "calibration" not in c.hp:
        pytest.skip("no GPTQ calibration in this case")
    reference = c.hessians()
    ours = collected_hessians(c)
    assert sorted(ours) == sorted(reference)
    for name, ref in reference.items():
        torch.testing.assert_close(ours[name], ref, atol=1e-4 * ref.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_calibration_to_codes_end_to_end(case):
    c = Case(case)
    if "calibration" not in c.hp:
        pytest.skip("no GPTQ calibration in this case")
    hessians = collected_hessians(c)
    quant, _ = quantize_state_dict(c.live_state_dict(), c.export_config(), hessians, roles=c.roles())
    assert_same_tensors(quant, c.reference_quant(), tie_context(c, hessians))


def prune_setup(c: Case):
    flat = c.tensors("quant_before_prune.pt")
    quant, meta, _ = quant_from_upstream(c.container(flat), c.template_dtypes)
    names = [n for n, e in meta.items() if e["kind"] == "int" and e["bits"] < 8 and quant[n + ".scale"].ndim == 1]
    codec = c.art["compressor"]["name"]
    code_bytes = c.prune["code_bytes"]

    def total_bytes(q) -> int:
        return len(encode_upstream(q, meta, c.style, codec, c.shuffle_stride)) + code_bytes

    return quant, meta, names, total_bytes


@pytest.mark.parametrize("case", CASES)
def test_upstream_pruning_reproduces_script(case):
    c = Case(case)
    if c.prune is None:
        pytest.skip("no pruning in this case")
    quant, meta, names, total_bytes = prune_setup(c)
    pruned, report = selective_prune(
        quant,
        [n + ".q" for n in names],
        [n + ".scale" for n in names],
        total_bytes,
        c.prune["target_bytes"],
        mode="upstream",
    )
    assert report.unpruned_bytes - c.prune["code_bytes"] == c.prune["unpruned_blob_bytes"]
    assert report.excess_bytes == c.prune["excess_bytes"]
    assert report.n_candidates == c.prune["n_candidates"]
    assert report.n_pruned == c.prune["n_prune"] == 8 * c.prune["excess_bytes"]
    assert report.pruned_per_tensor == c.prune["pruned_per_tensor"]
    assert report.last_score == pytest.approx(c.prune["score_of_last_pruned"], rel=1e-12)
    assert report.final_bytes - c.prune["code_bytes"] == c.prune["final_blob_bytes"]
    expected = c.tensors("expected_quant.pt")
    assert_same_tensors({k: pruned[k] for k in expected}, expected)


@pytest.mark.parametrize("case", CASES)
def test_search_pruning_fits_with_fewer_zeros(case):
    c = Case(case)
    if c.prune is None:
        pytest.skip("no pruning in this case")
    quant, _, names, total_bytes = prune_setup(c)
    pruned, report = selective_prune(
        quant,
        [n + ".q" for n in names],
        [n + ".scale" for n in names],
        total_bytes,
        c.prune["target_bytes"],
        mode="search",
    )
    assert report.fits and total_bytes(pruned) == report.final_bytes <= c.prune["target_bytes"]
    assert 0 < report.n_pruned <= c.prune["n_prune"]
    changed = [(pruned[k] != quant[k]) for k in quant]
    assert sum(int(m.sum()) for m in changed) == report.n_pruned
    for key in quant:
        mask = pruned[key] != quant[key]
        assert (quant[key][mask].abs() == 1).all() and (pruned[key][mask] == 0).all()
