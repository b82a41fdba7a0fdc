"""GPTQExport: at the end of ``fit`` (after EMA/SWA were applied) quantize, compress and write the artifact,
then read it back and score it, as the record scripts do after training (spec/quantization.md §9).

Prints, upstream style: the pre-quantization score of the final weights, the byte accounting (model + code =
total against the 16,000,000 budget) and the roundtrip score of the reloaded artifact. The export itself is
``pgolf_lit.quant.export_model`` — the same code ``pgolf export`` runs.

Calibration for GPTQ (PR #1333/#1394 replay the first training batches; PR #1263 continues the training
stream; PR #1019 samples from the model itself) happens after the training clock stopped, inside the
``reserve_seconds`` of the WallclockBudget where a record reserves them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from pgolf_lit.eval import EvalSettings, format_result_line, run_method
from pgolf_lit.quant import ExportConfig, build_model_from_artifact, export_model
from pgolf_lit.quant.calibration import generate_calibration_tokens, token_batches


class GPTQExport(Callback):
    def __init__(
        self,
        path: str = "final_model.pgolf",
        scheme: str = "pgolf",
        settings: Optional[dict[str, Any]] = None,
        calibration: Literal["train_replay", "train_continue", "generated"] = "train_replay",
        calibration_batches: int = 64,
        roundtrip_eval: bool = True,
        label: str = "final_int6_roundtrip",
    ):
        """
        Args:
            path: artifact file; relative paths go under the run's log directory.
            scheme: export preset (``pgolf``, or a record's: ``baseline``, ``pr1263`` … ``pr1394``).
            settings: ExportConfig fields overriding the preset (e.g. ``{codec: lzma, prune: none}``).
            calibration: where GPTQ's calibration tokens come from (ignored by RTN-only schemes).
            calibration_batches: training micro-batches, or self-generated sequences (fed one at a time without
                their last token, as PR #1019), used for the Hessians.
            roundtrip_eval: reload the artifact and score it on the validation split.
            label: the roundtrip line's label (upstream: ``final_int8_zlib_roundtrip`` for the baseline).
        """
        self.path = path
        self.scheme = scheme
        self.settings = dict(settings or {})
        self.calibration = calibration
        self.calibration_batches = calibration_batches
        self.roundtrip_eval = roundtrip_eval
        self.label = label
        self.config = ExportConfig.preset(scheme, **self.settings)  # validate at construction: fail before training
        self.report = None
        self.results: dict[str, Any] = {}

    def resolve_path(self, pl_module) -> Path:
        p = Path(self.path)
        return p if p.is_absolute() else Path(pl_module.run_dir) / p

    def calibration_tokens(self, model, datamodule, device, steps_trained: int = 0) -> Optional[list[torch.Tensor]]:
        """GPTQ's calibration batches ``[rows, T]`` on ``device``, or None for RTN-only schemes; ``pgolf export``
        calls this too. ``steps_trained``: optimizer steps already taken (``train_continue`` reads the training
        stream after them)."""
        if not self.config.uses_gptq:
            return None
        if self.calibration == "generated":
            tokens = generate_calibration_tokens(
                model, model.config.vocab_size, num_seqs=self.calibration_batches,
                seq_len=datamodule.train_seq_len, device=device,
            )
            return token_batches(tokens, 1, drop_last_token=True)
        skip = steps_trained if self.calibration == "train_continue" else 0
        loader = datamodule.make_train_loader(skip_steps=skip)
        return [loader.next_batch()[0].to(device) for _ in range(self.calibration_batches)]

    def on_fit_end(self, trainer, pl_module) -> None:
        model = pl_module.model
        model.set_recurrence(True)  # export and evaluation always run with depth recurrence on
        model.eval()
        dm = trainer.datamodule
        settings = EvalSettings(seq_len=dm.val_seq_len)
        rank, world = trainer.global_rank, trainer.world_size
        with torch.no_grad():
            pre = run_method("standard", model, dm.val_tokens.to(pl_module.device), dm.luts, settings, rank, world)
        averaged = any(type(cb).__name__ in ("EMA", "SWA") for cb in trainer.callbacks)
        pre.label = "pre-quantization post-ema" if averaged else "pre-quantization"
        pl_module.log_text(format_result_line(pre))
        self.results["pre_quant"] = pre
        out = self.resolve_path(pl_module)
        if trainer.is_global_zero:
            started = time.perf_counter()
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                batches = self.calibration_tokens(model, dm, pl_module.device, trainer.global_step)
                self.report = export_model(model, self.config, out, calib_batches=batches, progress=True)
            pl_module.log_text(f"export:{self.report.summary()} time:{time.perf_counter() - started:.1f}s")
            pl_module.log_text(
                f"Serialized model bytes:{self.report.model_bytes} code bytes:{self.report.code_bytes} "
                f"total:{self.report.total_bytes}"
            )
            pl_module.write_summary(artifact={
                "path": str(out.resolve()), "model_bytes": self.report.model_bytes, "code_bytes": self.report.code_bytes,
                "total_bytes": self.report.total_bytes, "budget_bytes": self.report.budget_bytes,
                "fits": self.report.fits, "scheme": self.scheme, "codec": self.report.codec,
                "seconds": self.report.seconds,
            })
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if not self.roundtrip_eval:
            return
        reloaded = build_model_from_artifact(out, device=pl_module.device)
        reloaded.set_recurrence(True)
        with torch.no_grad():
            post = run_method("standard", reloaded, dm.val_tokens.to(pl_module.device), dm.luts, settings, rank, world)
        post.label = self.label
        pl_module.log_text(format_result_line(post))
        self.results["roundtrip"] = post
        pl_module.write_summary(pre_quant=pre, roundtrip=post)
        for name, r in (("pre_quant", pre), ("roundtrip", post)):
            for logger in trainer.loggers:
                logger.log_metrics({f"{name}_val_loss": r.val_loss, f"{name}_val_bpb": r.val_bpb}, trainer.global_step)
        if self.report is not None:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {"artifact_model_bytes": self.report.model_bytes, "artifact_code_bytes": self.report.code_bytes,
                     "artifact_total_bytes": self.report.total_bytes},
                    trainer.global_step,
                )
                logger.save()
