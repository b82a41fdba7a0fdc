"""Evaluate an artifact on N devices with Lightning Fabric, outside the Trainer (``pgolf eval``).

Every rank loads the artifact, the val split and the byte LUTs, then runs each method through
``pgolf_lit.eval.run_method`` (``eval/artifact_eval.py``; the same code ``pgolf test`` runs inside the Trainer),
so both paths give the same numbers. The model is not wrapped in DDP: the eval methods reduce their own sums, and
TTT all-reduces its own gradients. Rank 0 prints one upstream-style line per pass.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional, Sequence

import lightning as L

from pgolf_lit.eval.registry import DEFAULT_TEST_METHODS
from pgolf_lit.config import GPTConfig
from pgolf_lit.eval import EvalResult, EvalSettings
from pgolf_lit.eval.artifact_eval import evaluate_artifact_file
from pgolf_lit.fileio import atomic_write_text


def evaluate_on_rank(
    fabric: L.Fabric,
    artifact: str,
    data_dir: str,
    tokenizer_path: Optional[str],
    methods: Sequence[str],
    settings: EvalSettings,
    precision: str,
    compile: bool,
    val_max_tokens: int = 0,
    model_config: Optional[GPTConfig] = None,
    attention_backend: str = "auto",
) -> list[EvalResult]:
    return evaluate_artifact_file(
        artifact,
        data_dir,
        methods,
        settings,
        tokenizer_path,
        fabric.device,
        precision,
        compile,
        val_max_tokens,
        model_config,
        attention_backend,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
        log=fabric.print,
    )


def evaluate_artifact(
    artifact: str,
    data_dir: str,
    methods: Sequence[str] = DEFAULT_TEST_METHODS,
    settings: Optional[EvalSettings] = None,
    tokenizer_path: Optional[str] = None,
    accelerator: str = "auto",
    devices: int | str = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    compile: bool = False,
    val_max_tokens: int = 0,
    results_json: Optional[str] = None,
    model_config: Optional[GPTConfig] = None,
    attention_backend: str = "auto",
) -> list[EvalResult]:
    """Launch Fabric and evaluate ``artifact`` with every method; returns rank 0's results. ``model_config`` is
    needed for upstream record files (they hold no config) and checked against a native file's own."""
    fabric = L.Fabric(accelerator=accelerator, devices=devices, strategy=strategy, precision=precision)
    fabric.launch()
    results = evaluate_on_rank(
        fabric,
        artifact,
        data_dir,
        tokenizer_path,
        methods,
        settings or EvalSettings(),
        precision,
        compile,
        val_max_tokens,
        model_config,
        attention_backend,
    )
    if results_json and fabric.is_global_zero:
        atomic_write_text(results_json, json.dumps([asdict(r) for r in results], indent=2))
    return results
