"""The optimiser every training system uses: AdamW with a linear warm-up and a cosine decay (timm's
schedulers, stepped per batch); weight decay on weight matrices and kernels only (timm's parameter
groups). :class:`WarmupCosineAdamW` gives a LightningModule both."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch


def decay_groups(module: torch.nn.Module, weight_decay: float, lr_scale: float | None = None) -> list[dict]:
    """``module``'s parameters as AdamW groups (timm's ``param_groups_weight_decay``): biases, norm scales
    and other 1-D parameters, and every name a submodule lists in its ``no_weight_decay()`` (such as the
    Transformer head's positions), get no weight decay; ``lr_scale``, when given, scales the groups'
    learning rate at every step of the schedule (timm's ``lr_scale`` group key)."""
    from timm.optim import param_groups_weight_decay

    skip = {
        f"{prefix}.{name}" if prefix else name
        for prefix, child in module.named_modules()
        if hasattr(child, "no_weight_decay")
        for name in child.no_weight_decay()
    }
    groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    return [{**g, "lr_scale": lr_scale} for g in groups] if lr_scale is not None else groups


def adamw_warmup_cosine(
    module: pl.LightningModule,
    lr: float,
    weight_decay: float,
    warmup_epochs: int,
    params: list[dict] | None = None,
) -> dict:
    """AdamW with a linear warm-up over ``warmup_epochs`` then a cosine decay to zero, stepped per batch,
    over ``params`` (parameter groups, each may scale the rate by its ``lr_scale``; default:
    :func:`decay_groups` of ``module``). The scheduler is timm's: step it with
    ``scheduler.step_update(batches done)`` (:class:`WarmupCosineAdamW` does).

    An epoch is the optimiser steps of one pass over the training loader (its batches, after
    ``limit_train_batches``, over ``accumulate_grad_batches``). The decay ends at the run's last step:
    ``max_steps`` when set, else ``max_epochs`` epochs, whichever comes first. A run of unbounded length
    (``max_epochs: -1`` without ``max_steps``, e.g. stopped by ``max_time`` or early stopping) has no
    last step to decay towards: after the warm-up the learning rate stays constant at its peak.
    """
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    groups = decay_groups(module, weight_decay) if params is None else params
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    trainer = module.trainer
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # what estimated_stepping_batches does; needed for the epoch length
    if trainer.num_training_batches == float("inf"):
        raise ValueError(
            "warmup_epochs needs a training loader with a length (an iterable dataset has none); "
            "set warmup_epochs: 0"
        )
    steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
    total = trainer.estimated_stepping_batches  # max_steps, or epochs × steps_per_epoch; inf when unbounded
    warmup = warmup_epochs * steps_per_epoch
    if total != float("inf"):
        total = max(1, int(total))
        warmup = min(total - 1, warmup)
    # Step k of the warm-up runs at (k + 1) / (warmup + 1) of the peak: never a step at zero.
    common = {
        "warmup_t": warmup,
        "warmup_lr_init": lr / (warmup + 1),
        "warmup_prefix": True,
        "t_in_epochs": False,
    }
    if total == float("inf"):  # a step schedule that never steps down: constant after the warm-up
        scheduler = StepLRScheduler(optimizer, decay_t=1, decay_rate=1.0, **common)
    else:
        scheduler = CosineLRScheduler(optimizer, t_initial=max(1, total - warmup), lr_min=0.0, **common)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class WarmupCosineAdamW:
    """A LightningModule mixin (listed before ``pl.LightningModule``): :func:`adamw_warmup_cosine` from
    the ``lr``, ``weight_decay`` and ``warmup_epochs`` hyperparameters over :meth:`param_groups`, and the
    per-step update of its timm scheduler."""

    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups; override to give parts of the model their own rate."""
        return decay_groups(self, self.hparams.weight_decay)

    def configure_optimizers(self) -> dict:
        hparams = self.hparams
        return adamw_warmup_cosine(
            self, hparams.lr, hparams.weight_decay, hparams.warmup_epochs, self.param_groups()
        )

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(self.global_step)  # optimiser steps done (timm's schedulers count updates)
