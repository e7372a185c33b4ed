"""The optimiser set-up without timm: the same parameter groups and learning rates as timm's, and no
``import timm`` for a model over cached features."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pipeline.models import heads
from pipeline.systems.optim import WarmupCosine, decay_groups


def _names(module: torch.nn.Module, groups: list[dict]) -> list[tuple[float, set[str]]]:
    names = {id(p): n for n, p in module.named_parameters()}
    return [(g["weight_decay"], {names[id(p)] for p in g["params"]}) for g in groups]


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_decay_groups_are_timms(weight_decay):
    from timm.optim import param_groups_weight_decay

    head = heads.TransformerHead(16, 4, d_model=32, num_layers=1, nhead=2)
    head.fc[0].weight.requires_grad_(False)  # frozen parameters are left out
    ours = decay_groups(head, weight_decay)
    timms = param_groups_weight_decay(head, weight_decay, no_weight_decay_list=head.no_weight_decay())
    assert _names(head, ours) == _names(head, timms)


def _lrs(scheduler, optimizer, steps: int) -> list[list[float]]:
    seen = [[g["lr"] for g in optimizer.param_groups]]
    for t in range(1, steps):
        scheduler.step_update(t)
        seen.append([g["lr"] for g in optimizer.param_groups])
    return seen


def _optimizer() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=2e-3)


@pytest.mark.parametrize(("total", "warmup"), [(40, 8), (40, 0), (5, 4), (1, 0), (None, 6)])
def test_schedule_is_timms_value_for_value(total, warmup):
    from timm.scheduler import CosineLRScheduler, StepLRScheduler

    common = {"warmup_t": warmup, "warmup_lr_init": 2e-3 / (warmup + 1), "warmup_prefix": True}
    ours, theirs = _optimizer(), _optimizer()
    mine = WarmupCosine(
        ours, None if total is None else max(1, total - warmup), warmup, common["warmup_lr_init"]
    )
    if total is None:
        timm = StepLRScheduler(theirs, decay_t=1, decay_rate=1.0, t_in_epochs=False, **common)
    else:
        timm = CosineLRScheduler(
            theirs, t_initial=max(1, total - warmup), lr_min=0.0, t_in_epochs=False, **common
        )
    steps = (total or 30) + 5  # past the end too
    assert _lrs(mine, ours, steps) == _lrs(timm, theirs, steps)  # exactly: the same arithmetic

    # A checkpoint's scheduler state from either resumes with the other.
    resumed, state = WarmupCosine(_optimizer(), 1), timm.state_dict()
    resumed.load_state_dict(state)
    assert resumed.lrs(3) == timm._get_lr(3)


def test_a_model_over_cached_features_does_not_import_timm():
    code = (
        "import sys, torch; from pipeline.systems.classifier import Classifier; from pipeline.models.heads import GRUHead;"
        "m = Classifier(lambda d, c: GRUHead(d, c, hidden_size=8), input_dim=4, num_classes=2);"
        "from pipeline.systems.optim import decay_groups; decay_groups(m, 0.01);"
        "assert 'timm' not in sys.modules, 'timm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
