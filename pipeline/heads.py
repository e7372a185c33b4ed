"""Temporal heads: plain ``torch.nn`` modules (no Lightning) mapping a clip of features to logits.

Every head takes ``input_dim`` and ``num_classes`` first (the data module supplies them) and is
called as ``head(x, mask)``:

- ``x``: ``(B, T, D)`` float features, padded along T;
- ``mask``: ``(B, T)`` bool, True where a step is a real frame (at least one per clip);
- returns ``(B, num_classes)`` logits.

Configs name heads by import path (``class_path: pipeline.heads.GRUHead``). The forecasting cores,
which predict the next step instead of a class, are in :mod:`pipeline.cores`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


def last_valid(outputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``outputs[b, last true index of mask[b]]``: (B, T, H) → (B, H)."""
    last = mask.long().sum(1).clamp(min=1) - 1  # (B,)
    return outputs[torch.arange(outputs.shape[0], device=outputs.device), last]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid steps: (B, T, D) → (B, D)."""
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class RecurrentHead(nn.Module):
    """A recurrent network over the clip; the logits come from the last valid step.

    With ``bidirectional=True`` the backward direction's output at the first step (which has read
    the whole clip) is concatenated with the forward direction's output at the last valid step.

    Args:
        input_dim: features per step.
        num_classes: outputs.
        cell: ``rnn`` (tanh), ``lstm`` or ``gru``.
        hidden_size: units per direction.
        num_layers: stacked layers.
        bidirectional: read the clip in both directions.
        dropout: between stacked layers and before the classifier.
    """

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        cell: Literal["rnn", "lstm", "gru"] = "gru",
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(input_dim)  # cached CNN features come at arbitrary scales
        kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        extra = {"nonlinearity": "tanh"} if cell == "rnn" else {}
        self.rnn = kind(
            input_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=bidirectional,
            dropout=dropout if num_layers > 1 else 0.0,
            **extra,
        )
        self.hidden_size, self.bidirectional = hidden_size, bidirectional
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size * (2 if bidirectional else 1), num_classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.norm(x))  # (B, T, H * directions)
        summary = last_valid(out[..., : self.hidden_size], mask)
        if self.bidirectional:
            summary = torch.cat([summary, out[:, 0, self.hidden_size :]], dim=-1)
        return self.fc(self.dropout(summary))


class RNNHead(RecurrentHead):
    """Vanilla (tanh) RNN head; see :class:`RecurrentHead` for the arguments."""

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(input_dim, num_classes, "rnn", hidden_size, num_layers, bidirectional, dropout)


class LSTMHead(RecurrentHead):
    """LSTM head; see :class:`RecurrentHead` for the arguments."""

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(input_dim, num_classes, "lstm", hidden_size, num_layers, bidirectional, dropout)


class GRUHead(RecurrentHead):
    """GRU head; see :class:`RecurrentHead` for the arguments."""

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__(input_dim, num_classes, "gru", hidden_size, num_layers, bidirectional, dropout)


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """The sine/cosine position codes of Vaswani et al. (2017), ``(length, dim)``, values in [-1, 1]."""
    angle = torch.arange(length, dtype=torch.float32)[:, None] * torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    codes = torch.zeros(length, dim)
    codes[:, 0::2] = torch.sin(angle)
    codes[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return codes


class TransformerHead(nn.Module):
    """A small Transformer encoder with learned positions; masked mean of its outputs → logits.

    Args:
        input_dim: features per step.
        num_classes: outputs.
        d_model: width of the encoder.
        num_layers: encoder layers.
        nhead: attention heads.
        max_len: longest clip (positions).
        dropout: inside the encoder and before the classifier.
    """

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        d_model: int = 128,
        num_layers: int = 2,
        nhead: int = 4,
        max_len: int = 256,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.proj = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, d_model))
        # Learned positions, starting from the sine/cosine codes: order is visible from the first step
        # (a near-zero start leaves the encoder order-blind, a mean-pool, until the positions are learned).
        self.pos = nn.Parameter(sinusoidal_positions(max_len, d_model).unsqueeze(0))
        layer = nn.TransformerEncoderLayer(
            d_model, nhead, 2 * d_model, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.fc = nn.Sequential(nn.LayerNorm(d_model), nn.Dropout(dropout), nn.Linear(d_model, num_classes))

    def no_weight_decay(self) -> set[str]:
        """Parameters weight decay leaves alone (timm's convention): decay would pull the positions to zero."""
        return {"pos"}

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) + self.pos[:, : x.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.fc(masked_mean(h, mask))


class MeanPoolHead(nn.Module):
    """Order-invariant baseline: masked mean of the features over time, then an MLP.

    Args:
        input_dim: features per step.
        num_classes: outputs.
        hidden_size: width of the hidden layer (0: a linear classifier).
        dropout: before the classifier.
    """

    def __init__(self, input_dim: int, num_classes: int, hidden_size: int = 128, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(input_dim)
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden_size:
            layers += [
                nn.Linear(input_dim, hidden_size),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(hidden_size, num_classes),
            ]
        else:
            layers.append(nn.Linear(input_dim, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.mlp(masked_mean(self.norm(x), mask))


class RowLSTMEncoder(nn.Module):
    """Reads the G rows of a frame's feature grid ``(C, G, G)`` top to bottom with an LSTM, so where
    things are in the frame shapes the frame's vector: ``(B, T, C*G*G)`` → ``(B, T, hidden_size)``.

    Args:
        input_dim: ``C * G * G`` (grid features flattened, as the data module gives them).
        grid: G.
        hidden_size: the LSTM's width, which is also the output per frame.
    """

    def __init__(self, input_dim: int, grid: int, hidden_size: int = 128):
        super().__init__()
        if input_dim % (grid * grid):
            raise ValueError(f"input_dim {input_dim} is not C * {grid} * {grid}")
        self.channels, self.grid = input_dim // (grid * grid), grid
        self.norm = nn.LayerNorm(self.channels * grid)
        self.rows = nn.LSTM(self.channels * grid, hidden_size, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        grid = x.reshape(b * t, self.channels, self.grid, self.grid)  # (B*T, C, G, G)
        rows = grid.permute(0, 2, 1, 3).reshape(
            b * t, self.grid, self.channels * self.grid
        )  # (B*T, G rows, C*G)
        _, (h, _) = self.rows(self.norm(rows))
        return h[-1].reshape(b, t, -1)


class RowLSTMHead(nn.Module):
    """A :class:`RowLSTMEncoder` per frame, then any temporal head over the frame vectors.

    Args:
        input_dim: ``C * G * G``.
        num_classes: outputs.
        grid: G of the stored grid features.
        row_hidden: width of the row LSTM (the per-frame vector).
        temporal: the head over time: ``rnn``, ``lstm``, ``gru``, ``transformer`` or ``meanpool``.
        hidden_size: width of the temporal head.
        dropout: inside the temporal head.
    """

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        grid: int = 4,
        row_hidden: int = 128,
        temporal: Literal["rnn", "lstm", "gru", "transformer", "meanpool"] = "gru",
        hidden_size: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.encoder = RowLSTMEncoder(input_dim, grid, row_hidden)
        if temporal in ("rnn", "lstm", "gru"):
            self.head = RecurrentHead(row_hidden, num_classes, temporal, hidden_size, dropout=dropout)
        elif temporal == "transformer":
            self.head = TransformerHead(row_hidden, num_classes, d_model=hidden_size, dropout=dropout)
        else:
            self.head = MeanPoolHead(row_hidden, num_classes, hidden_size, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x), mask)
