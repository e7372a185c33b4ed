"""An exponential moving average of the weights, evaluated as it is saved.

Lightning's :class:`~pytorch_lightning.callbacks.EMAWeightAveraging` swaps the average in for
validation during ``fit`` and saves it as the checkpoint's ``state_dict`` (the weights ``vpipe caption``,
``vpipe classify`` and served models load). Outside ``fit`` it still holds the last average of the
run: loading a checkpoint puts the current (not averaged) weights back, and validating swaps that
last average in. So ``trainer.test(ckpt_path="best")`` right after ``fit`` would score other weights
than the checkpoint file holds. :class:`EMAWeights` does all of that during ``fit`` only (resuming
included); a later validation, test or prediction runs the checkpoint's averaged weights as loaded.
"""

from __future__ import annotations

from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn


class EMAWeights(EMAWeightAveraging):
    """:class:`~pytorch_lightning.callbacks.EMAWeightAveraging` (same arguments: ``decay``, ...) whose
    swaps and checkpoint loading act during ``fit`` only."""

    @staticmethod
    def _fitting(trainer) -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self._fitting(trainer):
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._fitting(trainer):
            super().on_validation_epoch_end(trainer, pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if self._fitting(trainer):
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
