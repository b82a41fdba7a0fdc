"""Evaluate an artifact file in plain PyTorch: read it, build its model, load the val split and its byte counts,
and run each pass by name. ``pgolf eval`` runs this on every Fabric rank (``fabric_eval.py``); the wrapped program
that an artifact's code bytes count (``pgolf_lit/quant/code_size.py``) is this module and what it imports, with
only the artifact's container and its config's passes registered.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from pgolf_lit.model.config import GPTConfig
from pgolf_lit.data.shards import load_validation_tokens
from pgolf_lit.data.tokenizer import (
    check_tokenizer_matches_dataset,
    default_tokenizer_path,
    load_tokenizer,
    validation_byte_counts,
)
from pgolf_lit.eval.context import evaluation_context
from pgolf_lit.eval.runner import EvalResult, EvalSettings, format_result_line, run_method
from pgolf_lit.quant.reader import model_from_artifact, read_artifact


def evaluate_artifact_file(
    artifact: str,
    data_dir: str,
    methods: Sequence[str],
    settings: Optional[EvalSettings] = None,
    tokenizer_path: Optional[str] = None,
    device: Union[str, torch.device] = "cpu",
    precision: str = "32-true",
    compile: bool = False,
    val_max_tokens: int = 0,
    model_config: Optional[GPTConfig] = None,
    attention_backend: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    log: Optional[Callable[[str], None]] = print,
) -> list[EvalResult]:
    """Every pass of ``methods`` on ``artifact``, on this rank (collective when ``world_size`` > 1: every rank calls
    it). ``model_config`` is needed for upstream record files (they hold none) and checked against a native file's
    own. ``log`` gets one upstream-style result line per pass (None: silent)."""
    settings = settings or EvalSettings()
    device = torch.device(device)
    art = read_artifact(artifact, model_config)
    model = model_from_artifact(art, artifact, device)
    model.set_attention_backend(attention_backend)
    vocab = model.config.vocab_size
    # The data folder first: a missing one is named as such, not as its missing tokenizer.
    tokens = load_validation_tokens(data_dir, 1 if settings.include_tail else settings.seq_len, vocab)  # 1: no trim
    tokenizer_path = tokenizer_path or default_tokenizer_path(data_dir, vocab)
    sp = load_tokenizer(tokenizer_path, vocab)
    check_tokenizer_matches_dataset(sp, tokenizer_path, data_dir)
    if val_max_tokens:
        tokens = tokens[: max(val_max_tokens // settings.seq_len, 1) * settings.seq_len + 1]
    byte_counts = validation_byte_counts(sp, vocab, data_dir, tokens.numel())
    context = evaluation_context(settings, precision=precision, device=device, compile=compile, weights=art.weights)
    results = []
    for method in methods:
        result = run_method(method, model, tokens.to(device), byte_counts, context, rank=rank, world_size=world_size)
        if log is not None:
            log(format_result_line(result))
        results.append(result)
    return results
