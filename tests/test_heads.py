"""The batch and shape contract of the temporal heads (see pipeline.heads)."""

import pytest
import torch

from pipeline import heads

HEADS = [heads.RNNHead, heads.LSTMHead, heads.GRUHead, heads.TransformerHead, heads.MeanPoolHead]


@pytest.mark.parametrize("cls", HEADS)
def test_shapes(cls):
    head = cls(16, 5)
    x, mask = torch.randn(3, 7, 16), torch.ones(3, 7, dtype=torch.bool)
    assert head(x, mask).shape == (3, 5)


@pytest.mark.parametrize("cls", HEADS)
def test_padding_is_ignored(cls):
    torch.manual_seed(0)
    head = cls(16, 5).eval()
    x = torch.randn(2, 4, 16)
    padded = torch.cat([x, torch.randn(2, 3, 16) * 100], dim=1)
    mask = torch.tensor([[True] * 4 + [False] * 3] * 2)
    torch.testing.assert_close(head(padded, mask), head(x, torch.ones(2, 4, dtype=torch.bool)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cls", [heads.RNNHead, heads.LSTMHead, heads.GRUHead])
def test_recurrent_heads_see_order(cls):
    torch.manual_seed(0)
    head = cls(8, 3).eval()
    x, mask = torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.bool)
    assert not torch.allclose(head(x, mask), head(x.flip(1), mask))


def test_mean_pool_ignores_order():
    head = heads.MeanPoolHead(8, 3).eval()
    x, mask = torch.randn(1, 6, 8), torch.ones(1, 6, dtype=torch.bool)
    torch.testing.assert_close(head(x, mask), head(x.flip(1), mask))


def test_bidirectional_gru():
    head = heads.GRUHead(8, 3, hidden_size=4, num_layers=2, bidirectional=True, dropout=0.1)
    assert head(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.bool)).shape == (2, 3)
