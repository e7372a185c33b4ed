"""The captioner's auxiliary class loss (``class_weight``): the clip's class from the encoder's summary."""

import pytest
import torch

from pipeline.captioning import Captioner

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "a", "square", "moves", "left", "right"]


def _batch():
    tokens = torch.tensor([[1, 4, 5, 6, 7, 2], [1, 4, 5, 6, 8, 2]])
    return {"x": torch.randn(2, 4, 6), "tokens": tokens, "y": torch.tensor([0, 1])}


def test_the_class_loss_is_added_in_training_only_and_trains_the_summary():
    batch = _batch()
    torch.manual_seed(0)
    plain = Captioner(input_dim=6, vocabulary=WORDS, hidden_size=16, embed_dim=8, dropout=0.0)
    torch.manual_seed(0)
    aux = Captioner(
        input_dim=6,
        vocabulary=WORDS,
        hidden_size=16,
        embed_dim=8,
        dropout=0.0,
        num_classes=2,
        class_weight=0.5,
    )
    assert plain.classes is None and aux.classes.out_features == 2
    words = plain._loss(batch, "train")
    summary = aux.model.encode(batch["x"])[1][1]
    expected = words + 0.5 * torch.nn.functional.cross_entropy(aux.classes(summary), batch["y"])
    torch.testing.assert_close(aux._loss(batch, "train"), expected)  # same weights: words + 0.5 × class
    torch.testing.assert_close(aux._loss(batch, "val"), words)  # val/test losses stay comparable
    aux._loss(batch, "train").backward()
    assert aux.classes.weight.grad.abs().sum() > 0 and aux.model.encoder.weight_ih_l0.grad.abs().sum() > 0


def test_a_class_loss_needs_the_classes():
    with pytest.raises(ValueError, match="class_weight 0.5 needs num_classes"):
        Captioner(input_dim=6, vocabulary=WORDS, class_weight=0.5)
