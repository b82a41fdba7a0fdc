"""``pgolf eval ARTIFACT --data DIR --method sliding [--method slot ...]``: evaluate an artifact under Lightning
Fabric on N devices (``--devices 2 --strategy ddp``), outside the Trainer, with the same code ``pgolf test``
runs. Settings come from ``--config`` (its ``model.evaluation`` section) and can be overridden by flags."""

from __future__ import annotations

import argparse
import dataclasses

from pgolf_lit.eval.registry import DEFAULT_TEST_METHODS
from pgolf_lit.config import load_config
from pgolf_lit.errors import ConfigError
from pgolf_lit.eval import EvalSettings, eval_methods


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="pgolf eval", description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="a pgolf artifact (pgolf export / GPTQExport)")
    p.add_argument("--data", required=True, help="dataset directory with fineweb_val_*.bin")
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: <data>/../../tokenizers/...)")
    p.add_argument(
        "--method",
        action="append",
        choices=list(eval_methods()),
        help="pass to run; repeat for several (default: the --config's test_methods, else standard + sliding)",
    )
    p.add_argument("--config", default=None, help="take evaluation settings from this pgolf YAML config")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--window-rule", choices=("exact", "legacy"), default=None, help="the sliding pass's window rule")
    p.add_argument("--val-max-tokens", type=int, default=0, help="score only the first N val tokens (quick checks)")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", default="1")
    p.add_argument("--strategy", default="auto")
    p.add_argument("--precision", default="32-true", help="bf16-mixed on GPUs, as the records")
    p.add_argument("--compile", action="store_true")
    p.add_argument(
        "--attention-backend",
        choices=("auto", "fa3", "sdpa", "math"),
        default="auto",
        help="attention kernel (auto: FA3 on CUDA bf16 when installed, else SDPA)",
    )
    p.add_argument("--progress", action="store_true")
    p.add_argument("--results-json", default=None, help="also write the results as JSON")
    return p


def methods_from(args) -> list[str]:
    """``--method`` flags, else the config's ``model.test_methods`` (the passes ``pgolf test`` runs), else
    standard + sliding."""
    if args.method:
        return args.method
    if args.config:
        methods = (load_config(args.config).get("model") or {}).get("test_methods")
        if methods:
            return list(methods)
    return list(DEFAULT_TEST_METHODS)


def settings_from(args) -> EvalSettings:
    settings = EvalSettings()
    if args.config:
        section = ((load_config(args.config).get("model") or {}).get("evaluation")) or {}
        settings = EvalSettings.from_dict(section)
    if args.seq_len is not None:
        settings.seq_len = args.seq_len
    if args.stride is not None:
        settings.stride = args.stride
    if args.window_rule:
        settings.sliding = dataclasses.replace(settings.sliding, window_rule=args.window_rule)
    settings.progress = args.progress
    settings.validate()
    return settings


def model_config_from(args):
    """The ``--config``'s model (as ``pgolf test`` builds it; upstream record files hold no config), else None."""
    from pgolf_lit.config import gpt_config_from_yaml

    return gpt_config_from_yaml(args.config) if args.config else None


def main(argv) -> None:
    from pgolf_lit.fabric_eval import evaluate_artifact

    args = build_parser().parse_args(argv)
    if args.val_max_tokens < 0:
        raise ConfigError(f"--val-max-tokens: must be 0 (the whole split) or positive, got {args.val_max_tokens}")
    devices = int(args.devices) if args.devices.isdigit() else args.devices
    evaluate_artifact(
        args.artifact,
        args.data,
        methods=methods_from(args),
        settings=settings_from(args),
        tokenizer_path=args.tokenizer,
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        precision=args.precision,
        compile=args.compile,
        val_max_tokens=args.val_max_tokens,
        results_json=args.results_json,
        model_config=model_config_from(args),
        attention_backend=args.attention_backend,
    )
