"""``pgolf export --ckpt RUN.ckpt --config X.yaml --out model.pgolf``: the GPTQExport callback's code outside
training. Loads the checkpoint's weights (the EMA weights when it was saved with the EMA callback, which stores
them as the state dict), calibrates GPTQ on training batches of the config's data, writes the artifact, and
prints the byte accounting. ``--upstream final_model.pt`` exports an upstream state dict instead."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from pgolf_lit.config import callback_init_args, load_config, merge_configs
from pgolf_lit.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="pgolf export", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a Lightning checkpoint of this config (loaded with weights_only=True)")
    src.add_argument("--upstream", help="an upstream train_gpt.py state dict (final_model.pt)")
    p.add_argument("--config", required=True, help="the pgolf YAML config the weights belong to")
    p.add_argument("--out", required=True, help="artifact path to write (atomically)")
    p.add_argument(
        "--settings",
        default="{}",
        help='JSON merged over the config\'s GPTQExport export settings, e.g. \'{"codec": "lzma"}\'',
    )
    p.add_argument("--calibration-batches", type=int, default=None, help="GPTQ calibration micro-batches")
    p.add_argument("--allow-over-budget", action="store_true", help="write even if model + code > the budget")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv) -> None:
    from pgolf_lit.callbacks import GPTQExport
    from pgolf_lit.data.datamodule import TokenShardDataModule
    from pgolf_lit.module import GolfModule
    from pgolf_lit.quant import ExportConfig, export_model

    args = build_parser().parse_args(argv)
    config = load_config(args.config)
    try:
        overrides = json.loads(args.settings)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--settings: not valid JSON ({e.msg})") from None
    if not isinstance(overrides, dict):
        raise ConfigError("--settings: expected a JSON object of export settings")
    cb_args = callback_init_args(config, "GPTQExport") or {}
    settings = merge_configs(cb_args.get("export") or {}, overrides)
    if args.allow_over_budget:
        settings["allow_over_budget"] = True
    # The config's own GPTQExport arguments (calibration source, loader, batches, ...), so the command cannot drift
    # from the callback; only the export settings and the batch count take the command line's values.
    exporter_args = {**cb_args, "export": ExportConfig.from_dict(settings)}
    if args.calibration_batches:
        exporter_args["calibration_batches"] = args.calibration_batches
    exporter = GPTQExport(**exporter_args)
    module = GolfModule.from_config(config)
    steps_trained = None
    if args.ckpt:
        steps_trained = module.load_checkpoint_weights(args.ckpt)
    else:
        from pgolf_lit.checkpoint import load_checkpoint_file
        from pgolf_lit.model.convert import load_upstream_state_dict

        state_dict = load_checkpoint_file(args.upstream, what="state dict")
        if not isinstance(state_dict, dict):
            raise ConfigError(f"{args.upstream}: expected an upstream state dict, got a {type(state_dict).__name__}")
        load_upstream_state_dict(module.model, state_dict, args.upstream)
    module.to(args.device)
    model = module.model
    model.set_recurrence(True)
    model.eval()
    batches = None
    if exporter.config.uses_gptq:
        if exporter.calibration == "train_continue" and steps_trained is None:
            print(
                f"note: {args.ckpt or args.upstream} records no training step; train_continue calibration reads "
                "the training stream from its start",
                file=sys.stderr,
            )
        data_args = dict(config.get("data") or {})
        data_args["vocab_size"] = model.config.vocab_size
        dm = TokenShardDataModule(**data_args)
        batches = exporter.calibration_tokens(model, dm, torch.device(args.device), steps_trained or 0)
    with torch.no_grad():
        report = export_model(
            model, exporter.config, args.out, calib_batches=batches, progress=True, eval_methods=module.test_methods
        )
    print(report.summary())
    print(f"Serialized model bytes:{report.model_bytes} code bytes:{report.code_bytes} total:{report.total_bytes}")
