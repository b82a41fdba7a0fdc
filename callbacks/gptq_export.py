"""GPTQExport: at the end of ``fit`` (after EMA/SWA were applied) quantize, compress and write the artifact,
then read it back and score it, as the record scripts do after training (PR #1334/#1394
``train_and_eval``: ``serialize``, ``deserialize``, then ``eval_val``).

Prints, upstream style: the pre-quantization score of the final weights, the byte accounting (model + code =
total against the 16,000,000 budget) and the roundtrip score of the reloaded artifact. The export itself is
``pgolf_lit.quant.export_model`` — the same code ``pgolf export`` runs; both scores go through the module's
evaluation context, so they are the numbers ``pgolf test`` prints for the same weights.

Calibration for GPTQ (PR #1333/#1394 replay the first training batches; PR #1263 continues the training
stream; PR #1019 samples from the model itself) happens after the training clock stopped, inside the
``reserve_seconds`` of the WallclockBudget where a record reserves them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from lightning.pytorch.callbacks import Callback

from pgolf_lit.errors import ConfigError, PgolfError, error_line
from pgolf_lit.eval import format_result_line
from pgolf_lit.quant import ExportConfig, export_model, model_from_artifact, read_artifact
from pgolf_lit.quant.calibration import generate_calibration_tokens, token_batches


class GPTQExport(Callback):
    def __init__(
        self,
        path: str = "final_model.pgolf",
        export: Optional[ExportConfig] = None,
        calibration: Literal["train_replay", "train_continue", "generated"] = "train_replay",
        calibration_batches: int = 64,
        calibration_loader: Optional[str] = None,
        roundtrip_eval: bool = True,
        fit_end_method: str = "standard",
    ):
        """
        Args:
            path: artifact file; relative paths go under the run's log directory.
            export: every export setting (quant rules per group, GPTQ, container, codec, budget, pruning); a record's
                YAML states its own, the defaults are pgolf's scheme.
            calibration: where GPTQ's calibration tokens come from (ignored by RTN-only schemes): the first training
                batches again (PR #1333/#1394), the training stream after the last step (PR #1263), or sequences
                sampled from the model (PR #1019).
            calibration_batches: training micro-batches, or self-generated sequences (fed one at a time without
                their last token, as PR #1019), used for the Hessians.
            calibration_loader: read the calibration batches with this loader instead of the training one (PR
                #1855 trains on packed documents but calibrates on ``shuffled`` dense sequences).
            roundtrip_eval: reload the artifact and score it with ``fit_end_method``, as the records do.
            fit_end_method: the eval pass of the fit-end lines (the float weights before quantization, then the
                reloaded artifact): ``standard`` (the dense pass of the records up to PR #1394), or the record's own
                diagnostic, e.g. ``doc_isolated`` for PR #1855 and its descendants (their logged "diagnostic
                pre-quantization post-ema" and "diagnostic quantized" lines), so the lines compare with the log's.
        """
        from pgolf_lit.eval.registry import eval_methods

        if fit_end_method not in eval_methods():
            raise ConfigError(
                f"GPTQExport.fit_end_method: {fit_end_method!r} is no eval method; expected one of "
                f"{', '.join(eval_methods())}"
            )
        self.fit_end_method = fit_end_method
        self.path = path
        self.config = export if isinstance(export, ExportConfig) else ExportConfig.from_dict(export or {})
        self.calibration = calibration
        self.calibration_batches = calibration_batches
        self.calibration_loader = calibration_loader
        self.roundtrip_eval = roundtrip_eval
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
                model,
                model.config.vocab_size,
                num_seqs=self.calibration_batches,
                seq_len=datamodule.train_seq_len,
                device=device,
            )
            return token_batches(tokens, 1, drop_last_token=True)
        skip = steps_trained if self.calibration == "train_continue" else 0
        loader = datamodule.make_train_loader(skip_steps=skip, kind=self.calibration_loader)
        return [loader.next_batch()[0].to(device) for _ in range(self.calibration_batches)]

    def on_fit_end(self, trainer, pl_module) -> None:
        self._outcome_shared = False
        try:
            self._on_fit_end(trainer, pl_module)
        except (PgolfError, OSError) as e:
            if trainer.world_size > 1 and not self._outcome_shared:  # rank 0's export failed: the others wait for it
                self._share_outcome(trainer, error_line(e))
            raise

    def _share_outcome(self, trainer, error: Optional[str]) -> None:
        """Rank 0 exports while the other ranks wait here (a broadcast instead of a barrier): they learn its outcome,
        so an over-budget or unwritable artifact stops every rank with the same line, not rank 0 alone."""
        self._outcome_shared = True
        if trainer.world_size > 1:
            error = trainer.strategy.broadcast(error, src=0)
            if error and not trainer.is_global_zero:
                raise PgolfError(error)

    def _on_fit_end(self, trainer, pl_module) -> None:
        model = pl_module.model
        # The same evaluation `pgolf test` runs (precision, compile, settings): same label, same computation.
        pre = pl_module.evaluate(self.fit_end_method)
        pl_module.log_text(format_result_line(pre))
        self.results["pre_quant"] = pre
        out = self.resolve_path(pl_module)
        if trainer.is_global_zero:
            started = time.perf_counter()
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                batches = self.calibration_tokens(model, trainer.datamodule, pl_module.device, trainer.global_step)
                reading = time.perf_counter() - started
                self.report = export_model(
                    model, self.config, out, calib_batches=batches, progress=True, eval_methods=pl_module.test_methods
                )
            spent = time.perf_counter() - started
            # The clock ledger: calibration on training data (reading it + the Hessian pass) is what a record's GPTQ
            # reserve pays for; quantizing and compressing come after and are not training.
            hessian_seconds = self.report.hessians.seconds if self.report.hessians else 0.0
            if batches is not None:
                pl_module.clock.note_after_cap("calibration", reading + hessian_seconds)
            pl_module.clock.note_after_cap("export", spent)
            pl_module.log_text(f"export:{self.report.summary()} time:{spent:.1f}s")
            budget = pl_module.wallclock_budget
            reserve = budget.reserve_seconds if budget is not None and budget.effective_cap_ms is not None else 0.0
            hessians = self.report.hessians
            verdict = "" if spent <= reserve or not reserve else " OVER the reserve: the export ran past the cap"
            pl_module.log_text(
                f"gptq:hessians:{len(hessians.names) if hessians else 0} "
                f"hessian_time:{(hessians.seconds if hessians else 0.0):.1f}s time:{spent:.1f}s "
                f"reserve:{reserve:g}s{verdict}"
            )
            pl_module.log_text(
                f"Serialized model bytes:{self.report.model_bytes} code bytes:{self.report.code_bytes} "
                f"total:{self.report.total_bytes}"
            )
            pl_module.write_summary(
                artifact={
                    "path": str(out.resolve()),
                    "model_bytes": self.report.model_bytes,
                    "code_bytes": self.report.code_bytes,
                    "total_bytes": self.report.total_bytes,
                    "budget_bytes": self.report.budget_bytes,
                    "fits": self.report.fits,
                    "codec": self.report.codec,
                    "seconds": self.report.seconds,
                }
            )
        self._share_outcome(trainer, None)
        if not self.roundtrip_eval:
            return
        # A record container holds no model config: read it with the run's (native files carry their own).
        art = read_artifact(out, None if self.config.format == "native" else pl_module.gpt_config)
        reloaded = model_from_artifact(art, str(out), pl_module.device)
        context = dataclasses.replace(pl_module.eval_context(), weights=art.weights)
        post = pl_module.evaluate(self.fit_end_method, reloaded, context)
        pl_module.log_text(format_result_line(post))
        self.results["roundtrip"] = post
        pl_module.write_summary(pre_quant=pre, roundtrip=post)
        for name, r in (("pre_quant", pre), ("roundtrip", post)):
            for logger in trainer.loggers:
                logger.log_metrics({f"{name}_val_loss": r.val_loss, f"{name}_val_bpb": r.val_bpb}, trainer.global_step)
        if self.report is not None:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {
                        "artifact_model_bytes": self.report.model_bytes,
                        "artifact_code_bytes": self.report.code_bytes,
                        "artifact_total_bytes": self.report.total_bytes,
                    },
                    trainer.global_step,
                )
                logger.save()
