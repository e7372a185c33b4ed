"""The optimiser every training system uses: AdamW with a linear warm-up and a cosine decay; weight
decay on weight matrices and kernels only (timm's parameter groups)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch


def decay_groups(module: torch.nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """``module``'s parameters as AdamW groups (timm's ``param_groups_weight_decay``): biases, norm scales
    and other 1-D parameters, and every name a submodule lists in its ``no_weight_decay()`` (such as the
    Transformer head's positions), get no weight decay; ``lr``, when given, is the groups' own rate."""
    from timm.optim import param_groups_weight_decay

    skip = {
        f"{prefix}.{name}" if prefix else name
        for prefix, child in module.named_modules()
        if hasattr(child, "no_weight_decay")
        for name in child.no_weight_decay()
    }
    groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    return [{**g, "lr": lr} for g in groups] if lr is not None else groups


def adamw_warmup_cosine(
    module: pl.LightningModule,
    lr: float,
    weight_decay: float,
    warmup_epochs: int,
    params: list[dict] | None = None,
) -> dict:
    """AdamW with a linear warm-up over ``warmup_epochs`` then a cosine decay to zero, stepped per batch,
    over ``params`` (parameter groups, each may set its own ``lr``; default: :func:`decay_groups` of
    ``module``).

    An epoch is the optimiser steps of one pass over the training loader (its batches, after
    ``limit_train_batches``, over ``accumulate_grad_batches``). The decay ends at the run's last step:
    ``max_steps`` when set, else ``max_epochs`` epochs, whichever comes first. A run of unbounded length
    (``max_epochs: -1`` without ``max_steps``, e.g. stopped by ``max_time`` or early stopping) has no
    last step to decay towards: after the warm-up the learning rate stays constant at its peak.
    """
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

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if total == float("inf"):
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
