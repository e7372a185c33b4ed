"""The optimiser every training system uses: AdamW with a linear warm-up and a cosine decay, stepped per
batch; weight decay on weight matrices and kernels only. :class:`WarmupCosineAdamW` gives a
LightningModule both.

The parameter groups and the schedule follow timm's (``param_groups_weight_decay``; ``CosineLRScheduler``
and ``StepLRScheduler`` with ``warmup_prefix``, stepped per update) value for value, but are written out
here: ``import timm`` loads every model definition it has (a few tenths of a second per training process),
and only the end-to-end models (:mod:`pipeline.models.backbone`) need those.
"""

from __future__ import annotations

import fnmatch
import math

import pytorch_lightning as pl
import torch

from pipeline import compat


def decay_groups(module: torch.nn.Module, weight_decay: float, lr_scale: float | None = None) -> list[dict]:
    """``module``'s parameters as AdamW groups (the rule of timm's ``param_groups_weight_decay``): biases,
    norm scales and other 1-D parameters, and every name a submodule lists in its ``no_weight_decay()``
    (such as the Transformer head's positions), get no weight decay; ``lr_scale``, when given, scales the
    groups' learning rate at every step of the schedule (the ``lr_scale`` group key, as in timm)."""
    skip = {
        f"{prefix}.{name}" if prefix else name
        for prefix, child in module.named_modules()
        if hasattr(child, "no_weight_decay")
        for name in child.no_weight_decay()
    }
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        excluded = param.ndim <= 1 or name.endswith(".bias") or any(fnmatch.fnmatch(name, p) for p in skip)
        (no_decay if not weight_decay or excluded else decay).append(param)
    groups = [
        g
        for g in ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay})
        if g["params"]
    ]
    return [{**g, "lr_scale": lr_scale} for g in groups] if lr_scale is not None else groups


class WarmupCosine:
    """The learning rate per optimiser update ``t`` (:meth:`step_update`): ``warmup_lr_init + t * step``
    for ``t < warmup_t`` (a linear warm-up to each group's peak), then a half cosine from the peak down to
    ``lr_min`` over ``t_initial`` updates, ``lr_min`` after; with ``t_initial=None``, the peak for good.
    A group's ``lr_scale`` scales its rate. timm's ``CosineLRScheduler`` (``StepLRScheduler`` without
    decay for ``t_initial=None``) with ``warmup_prefix=True, t_in_epochs=False``, the same arithmetic and
    the same state: a checkpoint saved with either resumes with the other."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        t_initial: int | None,
        warmup_t: int = 0,
        warmup_lr_init: float = 0.0,
        lr_min: float = 0.0,
    ):
        self.optimizer = optimizer
        self.param_group_field = "lr"
        self._initial_param_group_field = "initial_lr"
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_values = [group["initial_lr"] for group in optimizer.param_groups]
        self.t_in_epochs = False
        self.warmup_prefix = True
        self.t_initial = t_initial
        self.lr_min = lr_min
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        self.update_groups(self.base_values)
        if warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in self.base_values]
            self.update_groups(warmup_lr_init)
        else:
            self.warmup_steps = [1 for _ in self.base_values]

    def lrs(self, t: int) -> list[float]:
        """Each group's peak-relative rate at update ``t`` (before its ``lr_scale``)."""
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        t = t - self.warmup_t
        if self.t_initial is None:
            return list(self.base_values)
        if t // self.t_initial >= 1:  # past the one cycle
            return [self.lr_min for _ in self.base_values]
        return [
            self.lr_min + 0.5 * (peak - self.lr_min) * (1 + math.cos(math.pi * t**1.0 / self.t_initial**1.0))
            for peak in self.base_values
        ]

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        self.update_groups(self.lrs(num_updates))

    def step(self, epoch: int, metric: float | None = None) -> None:
        """Per epoch: nothing (the rate changes per update)."""

    def update_groups(self, values: float | list[float]) -> None:
        if not isinstance(values, list | tuple):
            values = [values] * len(self.optimizer.param_groups)
        for group, value in zip(self.optimizer.param_groups, values, strict=True):
            group["lr"] = value * group["lr_scale"] if "lr_scale" in group else value

    def state_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "optimizer"}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
        if "t_initial" not in state_dict and "decay_t" in state_dict:  # timm's StepLRScheduler: no decay
            self.t_initial = None


def adamw_warmup_cosine(
    module: pl.LightningModule,
    lr: float,
    weight_decay: float,
    warmup_epochs: int,
    params: list[dict] | None = None,
) -> dict:
    """AdamW with a linear warm-up over ``warmup_epochs`` then a cosine decay to zero, stepped per batch,
    over ``params`` (parameter groups, each may scale the rate by its ``lr_scale``; default:
    :func:`decay_groups` of ``module``). The scheduler is a :class:`WarmupCosine`: step it with
    ``scheduler.step_update(batches done)`` (:class:`WarmupCosineAdamW` does).

    An epoch is the optimiser steps of one pass over the training loader (its batches, after
    ``limit_train_batches``, over ``accumulate_grad_batches``). The decay ends at the run's last step:
    ``max_steps`` when set, else ``max_epochs`` epochs, whichever comes first. A run of unbounded length
    (``max_epochs: -1`` without ``max_steps``, e.g. stopped by ``max_time`` or early stopping) has no
    last step to decay towards: after the warm-up the learning rate stays constant at its peak.
    """
    groups = decay_groups(module, weight_decay) if params is None else params
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    trainer = module.trainer
    # The epoch length needs the training loader now (estimated_stepping_batches skips it for max_epochs -1).
    compat.setup_train_data(trainer)
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
    scheduler = WarmupCosine(
        optimizer,
        None if total == float("inf") else max(1, total - warmup),  # unbounded: constant after the warm-up
        warmup_t=warmup,
        warmup_lr_init=lr / (warmup + 1),
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class WarmupCosineAdamW:
    """A LightningModule mixin (listed before ``pl.LightningModule``): :func:`adamw_warmup_cosine` from
    the ``lr``, ``weight_decay`` and ``warmup_epochs`` hyperparameters over :meth:`param_groups`, and the
    per-step update of its :class:`WarmupCosine` scheduler."""

    def param_groups(self) -> list[dict]:
        """AdamW's parameter groups; override to give parts of the model their own rate."""
        return decay_groups(self, self.hparams.weight_decay)

    def configure_optimizers(self) -> dict:
        hparams = self.hparams
        return adamw_warmup_cosine(
            self, hparams.lr, hparams.weight_decay, hparams.warmup_epochs, self.param_groups()
        )

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(self.global_step)  # optimiser steps done (the schedule counts updates)
