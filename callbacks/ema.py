"""EMA of the weights, as the records keep it (``ema_state`` in PR #1263 ``main``, PR #1334/#1394 ``train_model``).

Built on Lightning's ``WeightAveraging`` (an ``AveragedModel`` updated after every optimizer step, stored in
checkpoints, copied into the model at the end of training). Lightning's ``EMAWeightAveraging`` differs from
the records in three ways, handled here: the shadow starts from the initial weights (not from the weights after
the first step); mid-run validation sees the raw weights unless ``swap_for_validation``; and the shadow is fp32
for every parameter, as the records' ``ema_state`` is — Lightning would keep it in the parameter dtype, which
under the records' dtype policy (``GolfModule(record_dtypes=True)`` with bf16 precision) is bf16 for the token
tables. Buffers are constants (RoPE tables, byte LUTs) and are not averaged.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from pgolf_lit.errors import ConfigError


class EMA(WeightAveraging):
    def __init__(self, decay: float = 0.997, swap_for_validation: bool = False):
        """
        Args:
            decay: shadow ← decay·shadow + (1 − decay)·weights after every step (0.997; PR #1421 uses 0.9965).
            swap_for_validation: validate with the EMA weights (the records validate on the raw weights).
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise ConfigError(f"EMA.decay: must be a number in [0, 1] (the records use 0.997), got {decay!r}")
        super().__init__(use_buffers=False, multi_avg_fn=get_ema_multi_avg_fn(decay))  # used for the first copy
        self.decay = decay
        self.swap_for_validation = swap_for_validation

    def on_fit_start(self, trainer, pl_module) -> None:
        # WeightAveraging.setup copied the module before the strategy moved it: keep the shadow on its device.
        self._average_model.to(pl_module.device)

    def on_train_start(self, trainer, pl_module) -> None:
        # The records start the shadow from the weights training starts from; priming restores those exactly,
        # so the order against CompilePriming does not matter. A resumed run keeps its restored shadow.
        if trainer.global_step == 0:
            # Buffers set after WeightAveraging.setup copied the module (a CaseOps val byte sidecar) have other
            # shapes in the copy; update_parameters copies buffers in place, so give the copy the new shapes first.
            for copy, live in zip(self._average_model.module.buffers(), pl_module.buffers()):
                if copy.shape != live.shape:
                    copy.data = live.detach().to(copy.device).clone()
            self._average_model.update_parameters(pl_module)  # the first update copies

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # The same lerp as get_ema_multi_avg_fn, without update_parameters' two host reads of n_averaged.
        avg = self._average_model
        shadow = list(avg.module.parameters())
        # the shadow stays fp32 (as the records keep it) when the records' dtypes make a table bf16
        live = [p if p.dtype == s.dtype else p.to(s.dtype) for s, p in zip(shadow, pl_module.parameters())]
        torch._foreach_lerp_(shadow, live, 1.0 - self.decay)
        avg.n_averaged += 1
        self._latest_update_step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        pl_module.mark_weights("post-ema")
        pl_module.log_text(f"ema:applying EMA weights decay:{self.decay}")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        if self._average_model is not None:  # the checkpoint's state_dict now holds the EMA weights
            checkpoint.setdefault("pgolf", {})["weights_note"] = "post-ema"

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.swap_for_validation:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.swap_for_validation:
            super().on_validation_epoch_end(trainer, pl_module)

    @torch.no_grad()
    def shadow_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights under the LightningModule's parameter names (for tests and inspection)."""
        assert self._average_model is not None
        return {name: p.detach().clone() for name, p in self._average_model.module.named_parameters()}
