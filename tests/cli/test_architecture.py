"""The joints between the layers: declared parameter roles, the registries, records as YAML overlays, the
callbacks' package name and the package list. Everything here runs real components (GPTs, the optimizer
builder, the exporter, the LightningCLI parser) on CPU in seconds."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import pgolf_lit_listing
from pgolf_lit.config import CONFIG_DIR, GPTConfig, callback_init_args, load_config, load_yaml, merge_configs
from pgolf_lit.errors import ConfigError
from pgolf_lit.model import attention as attention_module
from pgolf_lit.model.gpt import GPT
from pgolf_lit.model.roles import control, declare_roles, parameter_roles
from pgolf_lit.optim.groups import OptimConfig, route_parameters
from pgolf_lit.quant.export import ExportConfig, quantize_state_dict
from pgolf_lit.records import published_record_configs
from pgolf_lit.tiny_twin import tiny_twin, tiny_twin_overlay

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=64, num_layers=2, model_dim=32, num_heads=2, num_kv_heads=1)
TINY_TWINS = sorted((CONFIG_DIR / "records").glob("*_tiny.yaml"))


# ---------------------------------------------------------------------------------------------------------
# Parameter roles
# ---------------------------------------------------------------------------------------------------------


class GatedAttention(attention_module.CausalSelfAttention):
    """A newcomer's per-head output gate, with (or without) its role declared where it is created."""

    declare = True

    def __init__(self, dim, num_heads, num_kv_heads, **kwargs):
        super().__init__(dim, num_heads, num_kv_heads, **kwargs)
        self.head_gate = nn.Parameter(torch.zeros(num_heads, 16))  # 32 values: within QuantGate's range
        if self.declare:
            declare_roles(self, head_gate=control("head_gate", quant="gate"))


def gated_gpt(monkeypatch, declare: bool) -> GPT:
    monkeypatch.setattr(GatedAttention, "declare", declare)
    monkeypatch.setattr("pgolf_lit.model.gpt.CausalSelfAttention", GatedAttention)
    return GPT(GPTConfig(**TINY))


def test_an_undeclared_parameter_fails_at_construction_naming_it(monkeypatch):
    with pytest.raises(ConfigError, match=r"parameter blocks\.0\.attn\.head_gate of GatedAttention declares no role"):
        gated_gpt(monkeypatch, declare=False)


def test_a_declared_gate_is_routed_and_exported_by_its_role_alone(monkeypatch):
    """The issue's newcomer case: no YAML list names the gate, and still Muon never sees it and the export keeps
    it float (or int8 per row with a gate rule), while its layer is known to the TTT freeze rule."""
    model = gated_gpt(monkeypatch, declare=True)
    roles = parameter_roles(model)
    assert roles["blocks.1.attn.head_gate"].layer == 1 and roles["blocks.1.attn.head_gate"].is_control
    routing = route_parameters(model, OptimConfig())
    scalar, muon = {n for n, _ in routing.scalar}, {n for n, _ in routing.muon}
    assert {"blocks.0.attn.head_gate", "blocks.1.attn.head_gate"} <= scalar
    assert not any("head_gate" in n for n in muon)
    sd = model.state_dict()
    _, meta = quantize_state_dict(sd, ExportConfig(keep_float_max_numel=0), roles=roles)
    assert meta["blocks.0.attn.head_gate"]["kind"] == "float"
    assert meta["blocks.0.attn.c_q.weight"]["kind"] == "int"
    gate_rule = ExportConfig(keep_float_max_numel=0, gate={"bits": 8, "method": "rtn", "scale": "row_amax"})
    quant, meta = quantize_state_dict(sd, gate_rule, {}, roles=roles)
    assert meta["blocks.0.attn.head_gate"]["kind"] == "int" and quant["blocks.0.attn.head_gate.q"].dtype == torch.int8


def test_every_parameter_of_every_record_has_one_role_and_one_optimizer():
    from pgolf_lit.optim.presets import record_optim_config

    for path in sorted((CONFIG_DIR / "records").glob("*_tiny.yaml")) + [CONFIG_DIR / "baseline_sp1024.yaml"]:
        cfg = load_config(path)
        model = GPT(GPTConfig.from_dict(cfg["model"].get("gpt") or {}))
        routing = route_parameters(model, OptimConfig.from_dict(cfg["model"].get("optim") or {}))
        routed = [
            n
            for group in (routing.token, routing.head, routing.muon, routing.scalar, routing.no_optimizer)
            for n, _ in group
        ]
        assert sorted(routed) == sorted(model.roles) == sorted(n for n, _ in model.named_parameters()), path.name
        assert all(model.roles[n].kind == "matrix" for n, _ in routing.muon), path.name
    assert record_optim_config("pr1394") == OptimConfig.from_dict(
        load_config(CONFIG_DIR / "records" / "pr1394_sp8192_loop45.yaml")["model"]["optim"]
    )


def test_record_dtypes_come_from_the_roles():
    from pgolf_lit.model.convert import to_upstream_state_dict

    model = GPT(GPTConfig(**TINY, recurrence="inplace", recur_layers=[1], iter_conditioning=True, bigram_vocab_size=32))
    sd = to_upstream_state_dict(model)
    bf16 = sorted(n for n, t in sd.items() if t.dtype == torch.bfloat16)
    assert bf16 == ["bigram.embed.weight", "iter_embed", "iter_gate", "tok_emb.weight"]


def test_dtg_in_parallel_lanes_is_refused():
    with pytest.raises(ConfigError, match="gpt.dtg"):
        GPTConfig(**{**TINY, "num_layers": 3}, dtg=True, parallel_start_layer=2)


# ---------------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------------


def test_quantizers_are_a_registry():
    from pgolf_lit.quant.gptq import GPTQSettings
    from pgolf_lit.quant.quantizers import TensorRule, quantizers
    from pgolf_lit.quant.rtn import RtnSettings

    assert {"rtn", "gptq"} <= set(quantizers()) and quantizers()["gptq"].needs_hessian
    assert quantizers()["gptq"].settings is GPTQSettings and quantizers()["rtn"].settings is RtnSettings
    with pytest.raises(ConfigError, match="gptq takes one of"):
        TensorRule(bits=6, method="gptq", scale="quantile").validate("export.mlp")
    with pytest.raises(ConfigError, match=r"export.gptq: unknown field\(s\) \['fallbak'\]"):
        ExportConfig.from_dict({"gptq": {"fallbak": "error"}})


# A whole new quantizer, as its author writes it: its settings, its function, its declaration (quantizers.py).
SIGN = '''
"""Every weight to plus or minus its row's scale."""

from dataclasses import dataclass

import torch

from pgolf_lit.quant.quantizers import Quantized, Quantizer


@dataclass
class SignSettings:
    shrink: float = 1.0
    """The row's scale is its mean |w| times this."""


def quantize_sign(name, t, rule, bits, hessian, settings):
    scale = (t.abs().mean(dim=-1) * settings.shrink).to(torch.float16)
    return Quantized(torch.where(t >= 0, 1, -1).to(torch.int8), scale), {"method": "sign", "shrink": settings.shrink}


QUANTIZERS = (Quantizer("sign", quantize_sign, scales=("row_amax",), settings=SignSettings),)
'''


def test_a_quantizer_in_one_file_gets_its_export_section(tmp_path, monkeypatch):
    """Listed once in QUANTIZER_MODULES, a quantizer's settings dataclass is the ``export.<name>`` section, and the
    export hands that section to it."""
    (tmp_path / "sign_quantizer.py").write_text(SIGN)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pgolf_lit_listing("pgolf_lit.quant.quantizers", "QUANTIZER_MODULES", "sign_quantizer"):
        from pgolf_lit.model.config import GPTConfig as FreshGPTConfig
        from pgolf_lit.model.gpt import GPT as FreshGPT
        from pgolf_lit.quant.export import ExportConfig as FreshExportConfig, quantize_state_dict as fresh_quantize

        sign = {"method": "sign", "bits": 2, "scale": "row_amax"}
        cfg = FreshExportConfig.from_dict({"sign": {"shrink": 0.5}, "mlp": sign, "keep_float_max_numel": 0})
        assert cfg.sign.shrink == 0.5 and cfg.gptq.fallback == "rtn"  # beside the quantizers that were there
        model = FreshGPT(FreshGPTConfig(**TINY))
        _, meta = fresh_quantize(model.state_dict(), cfg, roles=model.roles)
        mlp = [entry for name, entry in meta.items() if model.roles[name].quant == "mlp"]
        assert mlp and all(entry["method"] == "sign" and entry["shrink"] == 0.5 for entry in mlp)


@pytest.mark.slow  # ~15 s: a 2-process DDP test run
def test_test_passes_run_on_every_rank_whatever_the_sampler_flag(run_cwd):
    """Under DDP with Lightning's distributed sampler on, every rank still runs every pass (a sampler that split
    the passes would deadlock their collectives or drop passes)."""
    from pgolf_lit.run_summary import read_summary

    config = CONFIG_DIR / "records" / "pr1394_sp8192_loop45_tiny.yaml"
    cmd = [
        sys.executable,
        "-m",
        "pgolf_lit.cli",
        "test",
        "--config",
        str(config),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.use_distributed_sampler",
        "true",
        "--data.val_max_tokens",
        "2048",
        "--data.grad_accum_base",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.version",
        "t",
    ]
    out = subprocess.run(cmd, cwd=run_cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    tested = read_summary(run_cwd / "runs" / config.stem / "t")["test"]
    assert sorted(tested) == ["sliding", "standard"]
    assert all(r["label"].startswith("pre-quantization") for r in tested.values())


# ---------------------------------------------------------------------------------------------------------
# Records as YAML overlays
# ---------------------------------------------------------------------------------------------------------

# What a CPU twin may change: sizes, step counts and where the data is. Everything else is a switch.
SIZE_FIELDS = {
    "gpt": {
        "vocab_size",
        "model_dim",
        "embedding_dim",
        "num_heads",
        "num_kv_heads",
        "rope_dims",
        "rope_train_seq_len",
        "bigram_vocab_size",
        "bigram_dim",
        "ve_dim",
        "gate_window",  # the gated channels: every channel of the record stays every channel of the twin
    },
}
SCALE_KEYS = {
    # a twin runs on one CPU process: its device count and strategy (and record.world) are sizes too
    "trainer": {
        "accelerator",
        "devices",
        "strategy",
        "precision",
        "max_steps",
        "val_check_interval",
        "log_every_n_steps",
        "logger",
        "callbacks",
    },
    "model": {"gpt", "schedule", "evaluation", "compile", "train_log_every"},
    "record": {"world"},
}
CALLBACK_SCALE_ARGS = {
    "max_seconds",
    "steps",
    "recurrent_steps",
    "decay",
    "every",
    "at_step",
    "calibration_batches",
    "export",
}
EVAL_SCALE_ARGS = {
    "seq_len",
    "stride",
    "steps",
    "batch_windows",
    "chunk_tokens",
    "epochs",
    "batch_seqs",
    # phased TTT's sizes: chunk and context lengths, documents per batch, adapter rank, phase sizes
    "chunk",
    "short_doc_chunks",  # PR #2014's [max_doc_len, chunk] pairs: lengths
    "context",
    "batch_docs",
    "lora_rank",
    "prefix_docs",
    "global_chunk_tokens",
    "global_batch_seqs",
    # the world the phases are scheduled for: a one-process twin keeps its own (as record.world)
    "schedule_world",
}


def assert_sizes_only(overlay: dict, base: dict) -> None:
    """``overlay`` on ``base`` (a record config, overlays resolved) changes only sizes: every switch, callback,
    optimizer setting and evaluation procedure of the record stays."""
    for section, keys in SCALE_KEYS.items():
        assert set(overlay.get(section) or {}) <= keys, (section, set(overlay[section]) - keys)
    for cb in overlay["trainer"].get("callbacks") or []:
        assert set(cb.get("init_args") or {}) <= CALLBACK_SCALE_ARGS, cb
        assert set((cb.get("init_args") or {}).get("export") or {}) <= {"keep_float_max_numel"}, cb
    assert set(overlay["model"].get("gpt") or {}) <= SIZE_FIELDS["gpt"]
    for name, section in (overlay["model"].get("evaluation") or {}).items():
        if isinstance(section, dict):
            assert set(section) <= EVAL_SCALE_ARGS, (name, section)

    merged = merge_configs(base, overlay)
    classes = [[c["class_path"] for c in cfg["trainer"]["callbacks"]] for cfg in (merged, base)]
    assert classes[0] == classes[1]
    assert merged["model"]["test_methods"] == base["model"]["test_methods"]
    gpt_tiny, gpt_base = GPTConfig.from_dict(merged["model"]["gpt"]), GPTConfig.from_dict(base["model"]["gpt"])
    switches = {f.name for f in dataclasses.fields(GPTConfig)} - SIZE_FIELDS["gpt"]
    assert {k: getattr(gpt_tiny, k) for k in switches} == {k: getattr(gpt_base, k) for k in switches}
    assert merged["model"].get("optim") == base["model"].get("optim")
    tiny_export = ExportConfig.from_dict(callback_init_args(merged, "GPTQExport")["export"])
    base_export = ExportConfig.from_dict(callback_init_args(base, "GPTQExport")["export"])
    unscaled = [dataclasses.replace(e, keep_float_max_numel=0) for e in (tiny_export, base_export)]
    assert unscaled[0] == unscaled[1]


@pytest.mark.parametrize("tiny", TINY_TWINS, ids=lambda p: p.stem)
def test_every_tiny_twin_is_an_overlay_that_keeps_its_records_switches(tiny):
    record = tiny.with_name(tiny.name.replace("_tiny", ""))
    overlay = load_yaml(tiny)
    assert overlay["extends"] == record.name
    assert_sizes_only(overlay, load_config(record))


@pytest.mark.parametrize("record", published_record_configs(), ids=lambda p: p.stem)
def test_every_derived_tiny_twin_changes_sizes_only(record):
    """The twin every published record gets without a file follows the rule of the hand-written ones."""
    base = load_config(record)
    overlay = tiny_twin_overlay(base)
    assert_sizes_only(overlay, base)
    twin = tiny_twin(base)
    assert (twin["trainer"]["devices"], twin["trainer"]["accelerator"], twin["record"]["world"]) == (1, "cpu", 1)
    assert GPTConfig.from_dict(twin["model"]["gpt"]).model_dim == 64
    assert "params" not in twin["record"]  # the twin is not the record


@pytest.mark.parametrize("tiny", TINY_TWINS[:2], ids=lambda p: p.stem)
def test_stacked_configs_equal_the_overlay(tiny):
    from pgolf_lit.cli import make_cli

    record = tiny.with_name(tiny.name.replace("_tiny", ""))
    alone = make_cli(["--config", str(tiny)], run=False).config
    stacked = make_cli(["--config", str(record), "--config", str(tiny)], run=False).config
    assert alone == stacked
    assert alone.model.gpt.model_dim == 64
    assert len(alone.trainer.callbacks) == len(load_config(record)["trainer"]["callbacks"])


def test_a_config_that_extends_another_logs_under_its_own_name(tmp_path):
    """A child config without its own logger name runs in runs/<its stem>, not in its parent's folder (where
    ``--ckpt_path last`` would resume the parent's run); a name it sets itself, or one given on the command line,
    wins."""
    from pgolf_lit.cli import make_cli

    parent = CONFIG_DIR / "records" / "pr1394_sp8192_loop45_tiny.yaml"
    child = tmp_path / "my_variant.yaml"
    child.write_text(f"extends: {parent}\nmodel: {{gpt: {{qk_gain_init: 5.25}}}}\n")
    named = tmp_path / "named_variant.yaml"
    named.write_text(f"extends: {parent}\ntrainer: {{logger: {{init_args: {{name: chosen}}}}}}\n")

    def logger_name(*args: str) -> str:
        return make_cli(["--config", *args], run=False).trainer.logger.name

    assert logger_name(str(child)) == "my_variant"
    assert logger_name(str(named)) == "chosen"
    assert logger_name(str(child), "--trainer.logger.init_args.name", "cli") == "cli"
    assert logger_name(str(parent)) == "pr1394_sp8192_loop45_tiny"
    # a config that extends nothing and names no run logs under its stem too (the record configs name none)
    standalone = tmp_path / "standalone.yaml"
    standalone.write_text((CONFIG_DIR / "leaderboard" / "2026-03-18_baseline.yaml").read_text())
    assert "name:" not in standalone.read_text()
    assert logger_name(str(standalone)) == "standalone"


def test_merge_configs_matches_callbacks_by_class():
    base = {
        "trainer": {
            "callbacks": [
                {"class_path": "A", "init_args": {"x": 1, "y": 2}},
                {"class_path": "B", "init_args": {"z": 3}},
            ]
        },
        "model": {"gpt": {"a": 1}},
    }
    over = {
        "trainer": {"callbacks": [{"class_path": "B", "init_args": {"z": 4}}, {"class_path": "C"}]},
        "model": {"gpt": {"b": 2}},
    }
    merged = merge_configs(base, over)
    assert merged["trainer"]["callbacks"] == [
        {"class_path": "A", "init_args": {"x": 1, "y": 2}},
        {"class_path": "B", "init_args": {"z": 4}},
        {"class_path": "C"},
    ]
    assert merged["model"]["gpt"] == {"a": 1, "b": 2}
    # a class the base lacks goes where the overlay puts it: before the next class both have, else at the end
    over = {"trainer": {"callbacks": [{"class_path": "D"}, {"class_path": "B"}, {"class_path": "E"}]}}
    classes = [c["class_path"] for c in merge_configs(base, over)["trainer"]["callbacks"]]
    assert classes == ["A", "D", "B", "E"]
    # remove: true drops the base's callback of that class; a class the base lacks cannot be removed
    dropped = merge_configs(base, {"trainer": {"callbacks": [{"class_path": "A", "remove": True}]}})
    assert dropped["trainer"]["callbacks"] == [{"class_path": "B", "init_args": {"z": 3}}]
    with pytest.raises(ConfigError, match="the base attaches none"):
        merge_configs(base, {"trainer": {"callbacks": [{"class_path": "Z", "remove": True}]}})
    # key: {remove: true} drops the base's key (a record without its parent's TTT settings)
    assert merge_configs(base, {"model": {"gpt": {"remove": True}}})["model"] == {}
    with pytest.raises(ConfigError, match="ttt: 'remove: true' drops a key the base config has"):
        merge_configs(base, {"model": {"ttt": {"remove": True}}})


def test_extends_loops_and_bad_values_are_one_line_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: [x]\n")
    with pytest.raises(ConfigError, match="c.yaml: 'extends' must be the path"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "d.yaml")


def test_no_record_procedure_hides_in_python():
    import pgolf_lit.eval.slot as slot
    import pgolf_lit.quant.export as export

    assert not hasattr(slot, "SLOT_PRESETS") and not hasattr(export, "PRESETS")
    assert not hasattr(ExportConfig, "preset")
    for path in (CONFIG_DIR / "records").glob("*.yaml"):
        text = path.read_text()
        assert "control_tensor_patterns" not in text and "scheme:" not in text, path.name


# ---------------------------------------------------------------------------------------------------------
# The callbacks package and the package list
# ---------------------------------------------------------------------------------------------------------


def test_a_users_callbacks_module_does_not_shadow_ours(tmp_path):
    """A callbacks.py in the working directory (a common name) must not break any record config."""
    (tmp_path / "callbacks.py").write_text("raise SystemExit('the user module was imported')\n")
    config = CONFIG_DIR / "records" / "pr1394_sp8192_loop45_tiny.yaml"
    code = (
        "from pgolf_lit.cli import make_cli\n"
        f"cli = make_cli(['--config', {str(config)!r}, '--trainer.logger', 'false'], run=False)\n"
        "print(sorted(type(c).__name__ for c in cli.trainer.callbacks if type(c).__module__.startswith('pgolf_lit')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "GPTQExport" in out.stdout and "EMA" in out.stdout


def test_setup_cfg_lists_every_package():
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {"pgolf_lit"} | {f"pgolf_lit.{p.parent.name}" for p in (ROOT / "pgolf_lit").glob("*/__init__.py")}
    assert found | {"pgolf_lit.callbacks", "pgolf_lit.configs"} == listed
    assert cfg["options"]["package_dir"].split() == [
        "pgolf_lit.callbacks",
        "=",
        "callbacks",
        "pgolf_lit.configs",
        "=",
        "configs",
    ]


def test_the_record_table_in_the_docs_is_current():
    """docs/techniques.md §8 is generated from the configs; a config change without regenerating it fails here."""
    out = subprocess.run(
        [sys.executable, "-m", "pgolf_lit.tools.record_table", "--check"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr


def test_compile_settings_set_dynamo_as_the_records():
    import torch._dynamo

    from pgolf_lit.module import CompileSettings
    from pgolf_lit.records import record_config

    saved = (torch._dynamo.config.optimize_ddp, torch._dynamo.config.cache_size_limit)
    saved_tf32 = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    try:
        settings = CompileSettings(**record_config("pr1421")["model"]["compile_settings"])
        settings.apply(torch.device("cpu"), compiling=True)
        assert torch._dynamo.config.optimize_ddp is False and torch._dynamo.config.cache_size_limit == 32
        # The CUDA branch (TF32 first) runs without a GPU too: it once died there on a shadowed `torch` name.
        settings.apply(torch.device("cuda"), compiling=True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch._dynamo.config.optimize_ddp, torch._dynamo.config.cache_size_limit = saved
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved_tf32[:2]
        torch.set_float32_matmul_precision(saved_tf32[2])


def test_every_callback_argument_has_help_text():
    # `pgolf fit --trainer.callbacks.help <class>` shows the Args: docstrings; an undocumented knob is a blank line.
    import inspect

    from docstring_parser import parse

    import pgolf_lit.callbacks as callbacks

    missing = []
    for name in callbacks.__all__:
        cls = getattr(callbacks, name)
        if not cls.__init__.__module__.startswith("pgolf_lit."):  # Lightning's own __init__ (and its docs)
            continue
        documented = {p.arg_name for p in parse(cls.__init__.__doc__ or "").params}
        for arg, param in inspect.signature(cls.__init__).parameters.items():
            if arg != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) and arg not in documented:
                missing.append(f"{name}.{arg}")
    assert not missing, missing
