"""The shape contract of the temporal heads (see pipeline.models.heads)."""

import pytest
import torch

from pipeline.models import heads

HEADS = [
    heads.RNNHead,
    heads.LSTMHead,
    heads.GRUHead,
    heads.TransformerHead,
    heads.MeanPoolHead,
    lambda d, c: heads.RowLSTMHead(d, c, grid=2, row_hidden=8, temporal="lstm"),
]


@pytest.mark.parametrize("cls", HEADS)
def test_shapes(cls):
    head = cls(16, 5)
    assert head(torch.randn(3, 7, 16)).shape == (3, 5)


@pytest.mark.parametrize("cls", [heads.RNNHead, heads.LSTMHead, heads.GRUHead])
def test_recurrent_heads_see_order(cls):
    torch.manual_seed(0)
    head = cls(8, 3).eval()
    x = torch.randn(1, 6, 8)
    assert not torch.allclose(head(x), head(x.flip(1)))


def test_transformer_sees_order_from_the_start():
    """Positions start as the sine/cosine codes (distinct, order-revealing), not near zero: an untrained
    Transformer head already tells a clip from its reverse (a near-zero start changes its logits ~1%)."""
    codes = heads.sinusoidal_positions(4, 6)
    torch.testing.assert_close(codes[0], torch.tensor([0.0, 1, 0, 1, 0, 1]))
    torch.testing.assert_close(codes[:, 0], torch.sin(torch.arange(4.0)))
    torch.manual_seed(0)
    head = heads.TransformerHead(64, 10).eval()
    assert torch.cdist(head.pos[0, :16], head.pos[0, :16]).add(torch.eye(16) * 10).min() > 1.0
    x = torch.randn(16, 8, 64)
    forward, reverse = head(x), head(x.flip(1))
    assert ((forward - reverse).norm(dim=1) / forward.norm(dim=1)).mean() > 0.04


def test_mean_pool_ignores_order():
    head = heads.MeanPoolHead(8, 3).eval()
    x = torch.randn(1, 6, 8)
    torch.testing.assert_close(head(x), head(x.flip(1)))


def test_bidirectional_gru():
    head = heads.GRUHead(8, 3, hidden_size=4, num_layers=2, bidirectional=True, dropout=0.1)
    assert head(torch.randn(2, 5, 8)).shape == (2, 3)


def test_row_lstm_reads_rows_in_order():
    """Swapping two rows of the grid changes the frame vector; the encoder sees where things are."""
    torch.manual_seed(0)
    encoder = heads.RowLSTMEncoder(3 * 4 * 4, grid=4, hidden_size=6).eval()
    grid = torch.randn(2, 5, 3, 4, 4)
    swapped = grid[:, :, :, [1, 0, 2, 3], :]
    out = encoder(grid.flatten(2))
    assert out.shape == (2, 5, 6)
    assert not torch.allclose(out, encoder(swapped.flatten(2)))
    with pytest.raises(ValueError, match="not C"):
        heads.RowLSTMEncoder(10, grid=4)


@pytest.mark.parametrize("temporal", ["rnn", "lstm", "gru", "transformer", "meanpool"])
def test_row_lstm_in_front_of_any_head(temporal):
    head = heads.RowLSTMHead(8 * 2 * 2, 4, grid=2, row_hidden=8, temporal=temporal, hidden_size=8)
    assert head(torch.randn(3, 6, 32)).shape == (3, 4)


def test_weight_decay_spares_biases_norms_and_positions():
    """AdamW's groups (timm's param_groups_weight_decay): decay on weight matrices only; the Transformer
    head's learned positions, the biases and the LayerNorm scales are left alone."""
    from pipeline.systems.optim import decay_groups

    head = heads.TransformerHead(16, 4, d_model=32, num_layers=1, nhead=2)
    names = {id(p): n for n, p in head.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in decay_groups(head, 0.05)}
    assert set(groups) == {0.0, 0.05}
    assert {"pos", "proj.0.weight", "proj.0.bias", "fc.0.weight", "fc.2.bias"} <= groups[0.0]
    assert {"proj.1.weight", "fc.2.weight"} <= groups[0.05]
    assert all(head.get_parameter(n).ndim >= 2 for n in groups[0.05])
    assert groups[0.0] | groups[0.05] == set(names.values()) and not groups[0.0] & groups[0.05]
    assert {g["lr_scale"] for g in decay_groups(head, 0.05, lr_scale=0.1)} == {0.1}
