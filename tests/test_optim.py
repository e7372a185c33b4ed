"""The optimiser set-up without timm: the same parameter groups and learning rates as timm's, and no
``import timm`` for a model over cached features."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_ema_weights_are_what_a_test_after_fit_scores_and_what_the_checkpoint_holds(tmp_path):
    """After ``fit``, ``trainer.test(ckpt_path="best")`` scores the checkpoint's averaged weights, and
    so does a fresh trainer's test of that file (as ``vpipe test`` and the DDP test compare); Lightning's
    own callback would put the current weights back when the checkpoint is loaded."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EMAWeightAveraging, ModelCheckpoint
    from torch.utils.data import DataLoader, TensorDataset

    from conftest import quiet_trainer
    from pipeline.systems.averaging import EMAWeights

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 1)
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.layer(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val/loss", torch.nn.functional.mse_loss(self.layer(x), y))

        def test_step(self, batch, _):
            self.seen.append(self.layer.weight.detach().clone())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(32, 3), torch.randn(32, 1)), batch_size=8)

    def run(callback) -> tuple[torch.Tensor, torch.Tensor, Path]:
        torch.manual_seed(1)
        model, folder = Tiny(), tmp_path / type(callback).__name__
        checkpoint = ModelCheckpoint(dirpath=folder, monitor="val/loss", save_last=False)
        trainer = quiet_trainer(max_epochs=3, callbacks=[callback, checkpoint], enable_checkpointing=True)
        trainer.fit(model, data, data)
        trainer.test(model, data, ckpt_path="best", verbose=False)
        saved = torch.load(checkpoint.best_model_path, weights_only=True)["state_dict"]["layer.weight"]
        return model.seen[0], saved, Path(checkpoint.best_model_path)

    tested, saved, path = run(EMAWeights(decay=0.5))
    assert torch.equal(tested, saved)  # the test scored the averaged weights the file holds
    current = torch.load(path, weights_only=True)["current_model_state"]["layer.weight"]
    assert not torch.equal(saved, current)  # and they are not the current ones
    fresh = Tiny()
    quiet_trainer(callbacks=[EMAWeights(decay=0.5)]).test(fresh, data, ckpt_path=str(path), verbose=False)
    assert torch.equal(fresh.seen[0], saved)
    # Lightning's callback alone scores the current weights after fit: what EMAWeights is for.
    tested, saved, _ = run(EMAWeightAveraging(decay=0.5))
    assert not torch.equal(tested, saved)
