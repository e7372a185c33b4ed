"""Temporal heads: plain ``torch.nn`` modules (no Lightning) mapping a clip of features to logits.

Every head takes ``input_dim`` and ``num_classes`` first (the data module supplies them) and is
called as ``head(x)``: ``x`` is ``(B, T, D)`` float features (every clip has the same T, its TSN
segments); it returns ``(B, num_classes)`` logits.

Configs name heads by import path (``class_path: pipeline.models.heads.GRUHead``). The forecasting cores,
which predict the next step instead of a class, are in :mod:`pipeline.models.cores`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn


class RecurrentHead(nn.Module):
    """A recurrent network over the clip; the logits come from the last step. The subclasses
    :class:`RNNHead`, :class:`LSTMHead` and :class:`GRUHead` choose the cell (``cell``, a class attribute).

    With ``bidirectional=True`` the backward direction's output at the first step (which has read
    the whole clip) is concatenated with the forward direction's output at the last step.

    Args:
        input_dim: features per step.
        num_classes: outputs.
        hidden_size: units per direction.
        num_layers: stacked layers.
        bidirectional: read the clip in both directions.
        dropout: between stacked layers and before the classifier.
    """

    cell: Literal["rnn", "lstm", "gru"] = "gru"

    def __init__(
        self,
        input_dim: int,
        num_classes: int,
        hidden_size: int = 128,
        num_layers: int = 1,
        bidirectional: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.norm = nn.LayerNorm(input_dim)  # cached CNN features come at arbitrary scales
        kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[self.cell]
        extra = {"nonlinearity": "tanh"} if self.cell == "rnn" else {}
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.norm(x))  # (B, T, H * directions)
        summary = out[:, -1, : self.hidden_size]
        if self.bidirectional:
            summary = torch.cat([summary, out[:, 0, self.hidden_size :]], dim=-1)
        return self.fc(self.dropout(summary))


class RNNHead(RecurrentHead):
    """Vanilla (tanh) RNN head; see :class:`RecurrentHead` for the arguments."""

    cell = "rnn"


class LSTMHead(RecurrentHead):
    """LSTM head; see :class:`RecurrentHead` for the arguments."""

    cell = "lstm"


class GRUHead(RecurrentHead):
    """GRU head; see :class:`RecurrentHead` for the arguments."""

    cell = "gru"


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
    """A small Transformer encoder with learned positions; the mean of its outputs → logits.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.proj(x) + self.pos[:, : x.shape[1]])
        return self.fc(h.mean(1))


class MeanPoolHead(nn.Module):
    """Order-invariant baseline: the mean of the features over time, then an MLP.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x).mean(1))


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
            cls = {"rnn": RNNHead, "lstm": LSTMHead, "gru": GRUHead}[temporal]
            self.head = cls(row_hidden, num_classes, hidden_size, dropout=dropout)
        elif temporal == "transformer":
            self.head = TransformerHead(row_hidden, num_classes, d_model=hidden_size, dropout=dropout)
        else:
            self.head = MeanPoolHead(row_hidden, num_classes, hidden_size, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))
