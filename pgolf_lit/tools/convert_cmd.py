"""``pgolf convert --from-upstream final_model.pt --config X.yaml --out model.ckpt`` (and ``--to-upstream``):
upstream train_gpt.py state dicts <-> pgolf checkpoints. Up to PR #1394 our parameter names are the upstream keys;
PR #1855's parameter banks (qo_bank, kv_bank, mlp_up_bank, mlp_down_bank) are recognised on the way in and written
on the way out when the config's ``state_dict_layout`` is ``banks``. Every key and shape is checked against the
config; the first mismatch is named."""

from __future__ import annotations

import argparse
import io

import torch

from pgolf_lit.checkpoint import load_checkpoint_file, save_checkpoint_file
from pgolf_lit.config import gpt_config_from_yaml
from pgolf_lit.errors import ConfigError
from pgolf_lit.fileio import atomic_write_bytes
from pgolf_lit.model.convert import load_upstream_state_dict, to_upstream_state_dict
from pgolf_lit.model.gpt import GPT


def _save(obj, path: str) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: str) -> dict:
    obj = load_checkpoint_file(path, what="state dict")  # weights only, checksum verified when it has one
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a state dict, got a {type(obj).__name__}")
    return obj


def main(argv) -> None:
    p = argparse.ArgumentParser(allow_abbrev=False, prog="pgolf convert", description=__doc__.splitlines()[0])
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-upstream", metavar="FINAL_MODEL_PT")
    direction.add_argument("--to-upstream", metavar="PGOLF_CKPT")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cfg = gpt_config_from_yaml(args.config)
    model = GPT(cfg)
    if args.from_upstream:
        load_upstream_state_dict(model, _load(args.from_upstream), args.from_upstream)
        # A Lightning-style checkpoint of GolfModule weights (load with `pgolf test --ckpt_path` or export --ckpt),
        # written like every checkpoint: atomically, fsynced, with its checksum.
        save_checkpoint_file(
            {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "pgolf_gpt": cfg.to_dict()},
            args.out,
        )
    else:
        ckpt = _load(args.to_upstream)
        sd = ckpt.get("state_dict", ckpt)
        sd = {k[len("model.") :]: v for k, v in sd.items() if k.startswith("model.")} or sd
        load_upstream_state_dict(model, sd, args.to_upstream)
        _save(to_upstream_state_dict(model), args.out)
    print(f"wrote {args.out} ({model.num_params()} parameters, {len(model.state_dict())} tensors)")
