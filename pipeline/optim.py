"""The optimiser every training system uses: AdamW with a linear warm-up and a cosine decay."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch


def adamw_warmup_cosine(
    module: pl.LightningModule,
    lr: float,
    weight_decay: float,
    warmup_epochs: int,
    params: list[dict] | None = None,
) -> dict:
    """AdamW with a linear warm-up over ``warmup_epochs`` then a cosine decay to zero, stepped per batch,
    over ``params`` (parameter groups, each may set its own ``lr``; default: all of ``module``'s).

    An epoch is the optimiser steps of one pass over the training loader (its batches, after
    ``limit_train_batches``, over ``accumulate_grad_batches``). The decay ends at the run's last step:
    ``max_steps`` when set, else ``max_epochs`` epochs, whichever comes first. A run of unbounded length
    (``max_epochs: -1`` without ``max_steps``, e.g. stopped by ``max_time`` or early stopping) has no
    last step to decay towards: after the warm-up the learning rate stays constant at its peak.
    """
    optimizer = torch.optim.AdamW(
        module.parameters() if params is None else params, lr=lr, weight_decay=weight_decay
    )
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

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if total == float("inf"):
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
