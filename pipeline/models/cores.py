"""Forecasting cores: plain ``torch.nn`` modules (no Lightning) that predict the next step of a
sequence instead of a class. The forecasting systems (:mod:`pipeline.systems.forecaster`,
:mod:`pipeline.systems.conv_forecaster`) drive them one step at a time and own teacher forcing, rollouts and
truncated BPTT: ``step(x_t, state, forecasting)`` reads step t's input and returns the prediction of
step t + 1 and the new state (None before the first step); ``forecasting`` is True from the last
context step on.

- :class:`FeatureRecurrentCore`: a residual RNN, LSTM or GRU over feature vectors;
- :class:`ConvRecurrentCore` with :class:`ConvLSTMCell` / :class:`ConvGRUCell`: the ConvLSTM/ConvGRU
  encoder–forecaster over frames or grids.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F


def detach_state(state):
    """The recurrent state cut from the graph: tensors, LSTM ``(h, c)`` tuples and lists of them."""
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


class FeatureRecurrentCore(nn.Module):
    """Next-step predictor over feature vectors: ``(B, D)`` at step t → ``(B, D)`` at step t + 1.

    Cached CNN features barely change from one frame to the next compared with their size, so the
    core works on changes: it reads the layer-normalised features together with the change since
    the previous step, and predicts the next change, added to the input. Changes are measured in
    units of ``scale``, the root-mean-square change between steps of the first training batch (set
    once by :meth:`calibrate`, then kept in the state dict). The output layer starts at zero: an untrained core is exactly the
    copy-last-frame baseline. The state is ``(recurrent state, last input)``.

    Args:
        input_dim: features per step.
        cell: ``rnn`` (tanh), ``lstm`` or ``gru``.
        hidden_size: recurrent units.
        num_layers: stacked layers.
        dropout: between stacked layers.
    """

    def __init__(
        self,
        input_dim: int,
        cell: Literal["rnn", "lstm", "gru"] = "gru",
        hidden_size: int = 256,
        num_layers: int = 1,
        dropout: float = 0.0,
    ):
        super().__init__()
        kind = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.norm = nn.LayerNorm(input_dim)
        self.rnn = kind(
            2 * input_dim,
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.out = nn.Linear(hidden_size, input_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.register_buffer("scale", torch.zeros(()))

    def forward(self, x: torch.Tensor, state=None):
        """Steps ``(B, T, D)`` → predictions of the steps after each ``(B, T, D)``, and the state."""
        hidden, last = state if state is not None else (None, x[:, 0])
        delta = x - torch.cat([last.unsqueeze(1), x[:, :-1]], 1)  # (B, T, D); zero at a sequence's first step
        scale = self.scale.clamp(min=1e-8)
        h, hidden = self.rnn(torch.cat([self.norm(x), delta / scale], -1), hidden)
        return x + scale * self.out(h), (hidden, x[:, -1])

    def mean_square_change(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared change between consecutive steps of ``x`` (B, T, D), for :meth:`calibrate`."""
        return (x[:, 1:] - x[:, :-1]).pow(2).mean()

    def calibrate(self, mean_square_change: torch.Tensor) -> None:
        self.scale.fill_(float(mean_square_change.sqrt()))

    def step(self, x: torch.Tensor, state, forecasting: bool):
        pred, state = self(x.unsqueeze(1), state)
        return pred.squeeze(1), state


class ConvLSTMCell(nn.Module):
    """Convolutional LSTM cell (Shi et al. 2015, without peepholes): gates from one convolution over
    ``[x, h]``. State ``(h, c)``, each ``(B, hidden, H, W)``."""

    def __init__(self, in_channels: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.hidden = hidden
        self.conv = nn.Conv2d(in_channels + hidden, 4 * hidden, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None):
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden, *x.shape[2:])
            state = (zeros, zeros)
        h, c = state
        i, f, g, o = self.conv(torch.cat([x, h], 1)).chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)


class ConvGRUCell(nn.Module):
    """Convolutional GRU cell (Ballas et al. 2016): update and reset gates from ``[x, h]``, the
    candidate from ``[x, r * h]``. State ``h``, ``(B, hidden, H, W)``."""

    def __init__(self, in_channels: int, hidden: int, kernel_size: int = 3):
        super().__init__()
        self.hidden = hidden
        self.gates = nn.Conv2d(in_channels + hidden, 2 * hidden, kernel_size, padding=kernel_size // 2)
        self.candidate = nn.Conv2d(in_channels + hidden, hidden, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor, state: torch.Tensor | None):
        h = x.new_zeros(x.shape[0], self.hidden, *x.shape[2:]) if state is None else state
        z, r = torch.sigmoid(self.gates(torch.cat([x, h], 1))).chunk(2, 1)
        n = torch.tanh(self.candidate(torch.cat([x, r * h], 1)))
        h = (1 - z) * h + z * n
        return h, h


class ConvRecurrentCore(nn.Module):
    """Encoder–forecaster of stacked ConvLSTM or ConvGRU cells for next-frame prediction.

    Frames ``(B, C, H, W)`` in [0, 1] are folded into ``patch_size``² times more channels at
    ``1/patch_size`` the resolution (``pixel_unshuffle``, as OpenSTL does for Moving MNIST), which
    makes every convolution cheaper and its receptive field wider. The encoder stack reads the
    context frames; the forecaster stack, which starts from the encoder's states, reads the last
    frame (true or predicted) and produces the following ones. With ``share_weights`` one stack plays
    both roles (the OpenSTL ConvLSTM baseline). A 1×1 convolution over the top layer's output and
    ``pixel_shuffle`` give the next frame: through a sigmoid (``output="sigmoid"``, images in [0, 1]),
    or added to the frame just read (``"residual"``: the convolution starts at zero, so an untrained
    model repeats its input, the copy-last forecast, and learns the change; unbounded values such as
    traffic flows).

    ``covariates`` known channels per step (``cond`` of :meth:`step`: values such as the time of day,
    spread over the frame, or whole grids such as the historical average of the slot) are folded like
    the frame and read beside it by the first layer.

    Args:
        channels: image channels (1 for grayscale).
        cell: ``lstm`` (ConvLSTM) or ``gru`` (ConvGRU).
        hidden_channels: channels of each stacked layer (its length is the depth).
        kernel_sizes: one kernel size for every layer, or one per layer.
        patch_size: side of the square patches folded into channels (1: none).
        share_weights: one stack for encoding and forecasting instead of two.
        output: ``sigmoid`` or ``residual`` (see above).
        covariates: known channels per step read beside each frame (0: none).
    """

    def __init__(
        self,
        channels: int = 1,
        cell: Literal["lstm", "gru"] = "lstm",
        hidden_channels: list[int] | tuple[int, ...] = (64, 64),
        kernel_sizes: int | list[int] = 5,
        patch_size: int = 4,
        share_weights: bool = False,
        output: Literal["sigmoid", "residual"] = "sigmoid",
        covariates: int = 0,
    ):
        super().__init__()
        kernels = (
            [kernel_sizes] * len(hidden_channels) if isinstance(kernel_sizes, int) else list(kernel_sizes)
        )
        if len(kernels) != len(hidden_channels):
            raise ValueError(f"{len(hidden_channels)} layers but {len(kernels)} kernel sizes")
        if any(k % 2 == 0 for k in kernels):
            raise ValueError(f"kernel sizes must be odd (same padding), got {kernels}")
        if output not in ("sigmoid", "residual"):
            raise ValueError(f"output must be 'sigmoid' or 'residual', got {output!r}")
        self.patch, self.residual = patch_size, output == "residual"
        kind = {"lstm": ConvLSTMCell, "gru": ConvGRUCell}[cell]
        folded = channels * patch_size**2

        def stack() -> nn.ModuleList:
            ins = [folded + covariates * patch_size**2, *hidden_channels[:-1]]
            return nn.ModuleList(kind(i, h, k) for i, h, k in zip(ins, hidden_channels, kernels, strict=True))

        self.encoder = stack()
        self.forecaster = self.encoder if share_weights else stack()
        self.out = nn.Conv2d(hidden_channels[-1], folded, 1)
        if self.residual:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        else:
            nn.init.constant_(self.out.bias, -3.0)  # frames are mostly dark: start near black, not mid-grey

    def step(
        self, frame: torch.Tensor, state: list | None, forecasting: bool, cond: torch.Tensor | None = None
    ):
        """Frame t ``(B, C, H, W)`` (and its covariates ``cond``, ``(B, covariates)`` values or
        ``(B, covariates, H, W)`` grids) → predicted frame
        t + 1 ``(B, C, H, W)``, and the per-layer states; the forecaster stack runs from the last
        context frame on (``forecasting``), the encoder before."""
        if frame.shape[-1] % self.patch or frame.shape[-2] % self.patch:
            raise ValueError(
                f"frame size {tuple(frame.shape[-2:])} is not a multiple of patch_size {self.patch}"
            )
        cells = self.forecaster if forecasting else self.encoder
        state = state or [None] * len(cells)
        x = F.pixel_unshuffle(frame, self.patch)
        if cond is not None:
            cond = cond.to(x.dtype)
            if cond.ndim == 2:
                cond = cond[:, :, None, None].expand(-1, -1, *frame.shape[-2:])
            x = torch.cat([x, F.pixel_unshuffle(cond, self.patch)], 1)
        new = []
        for cell, s in zip(cells, state, strict=True):
            x, s = cell(x, s)
            new.append(s)
        out = F.pixel_shuffle(self.out(x), self.patch)
        return (frame + out if self.residual else torch.sigmoid(out)), new
