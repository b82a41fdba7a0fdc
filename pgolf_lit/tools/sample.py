"""``pgolf sample --config X (--artifact A | --ckpt C) --prompt "Once upon"``: text a trained model writes.

Weights from an artifact (dequantized, so this is what the scored model writes) or a Lightning checkpoint;
the tokenizer is the config's (``data.tokenizer_path`` or the dataset's default); a CaseOps tokenizer's output is
decoded back to cased text. Sampling is temperature (and optional top-k) over the model's training context.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pgolf_lit.errors import ConfigError, PgolfError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgolf sample", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="the pgolf YAML config (or a record name) the weights belong to")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--artifact", help="a pgolf artifact (pgolf export / GPTQExport)")
    src.add_argument("--ckpt", help="a Lightning checkpoint of this config")
    p.add_argument("--prompt", default="", help="text to continue (empty: start from the BOS token)")
    p.add_argument("--tokens", type=int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--samples", type=int, default=1, help="independent continuations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default=None, help="SentencePiece model (default: the config's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def main(argv) -> None:
    from pgolf_lit.config import load_config, resolve_config_path
    from pgolf_lit.data.caseops import decode_caseops, encode_caseops, is_caseops_tokenizer
    from pgolf_lit.data.tokenizer import default_tokenizer_path, load_tokenizer
    from pgolf_lit.model.generate import generate
    from pgolf_lit.module import GolfModule

    args = build_parser().parse_args(argv)
    if args.tokens < 1 or args.samples < 1 or args.temperature <= 0:
        raise ConfigError("pgolf sample: --tokens and --samples must be >= 1 and --temperature > 0")
    config_path = resolve_config_path(args.config)
    config = load_config(config_path)
    module = GolfModule.from_config(config)
    if args.artifact:
        module.load_artifact(args.artifact)
    else:
        module.load_checkpoint_weights(args.ckpt)
    model = module.model.to(args.device).eval()
    model.set_recurrence(True)
    vocab = model.config.vocab_size
    data = config.get("data") or {}
    tokenizer = (
        args.tokenizer
        or data.get("tokenizer_path")
        or default_tokenizer_path(Path(data.get("data_dir", "data/datasets/fineweb10B_sp1024")), vocab)
    )
    sp = load_tokenizer(tokenizer, vocab)
    caseops = is_caseops_tokenizer(sp)
    prompt = encode_caseops(args.prompt) if caseops else args.prompt
    ids = [sp.bos_id()] + sp.encode(prompt) if sp.bos_id() >= 0 else sp.encode(prompt)
    ids = torch.tensor([ids] * args.samples, device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    context = int(data.get("train_seq_len", 1024))
    out = generate(
        model, ids, args.tokens, temperature=args.temperature, top_k=args.top_k, context=context, generator=generator
    )
    for i, row in enumerate(out.tolist()):
        text = sp.decode([t for t in row if t != sp.bos_id()])
        if caseops:
            try:
                text = decode_caseops(text)
            except PgolfError:
                pass  # a sample that stops inside an operator sequence is shown as written
        print(f"--- sample {i + 1} ({args.tokens} tokens, temperature {args.temperature:g}) ---\n{text}")
