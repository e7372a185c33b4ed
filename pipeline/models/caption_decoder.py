"""The captioning head: a plain ``torch.nn`` encoder–decoder (no Lightning), S2VT-style. A recurrent
encoder reads a clip's per-frame features; an LSTM or GRU decoder writes the caption word by word from
the encoder's summary, attending over its steps (Luong's global attention); greedy and beam-search
decoding. :class:`pipeline.systems.captioner.Captioner` trains and scores it."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from pipeline.models.heads import sinusoidal_positions
from pipeline.storage.captions import Vocabulary


def _rnn(cell: str, input_size: int, hidden_size: int) -> nn.RNNBase:
    if cell not in ("gru", "lstm"):
        raise ValueError(f"cell must be gru or lstm, got {cell!r}")
    return (nn.GRU if cell == "gru" else nn.LSTM)(input_size, hidden_size, batch_first=True)


class CaptionModel(nn.Module):
    """Encoder-decoder captioning head over per-frame features ``(B, T, D)``.

    Args:
        input_dim: features per step.
        vocab_size: words, with the four specials of :class:`~pipeline.storage.captions.Vocabulary`.
        encoder: ``gru`` or ``lstm`` (reads the steps in order; the summary is the last step's output),
            ``transformer`` (two pre-norm self-attention layers over the steps with sine/cosine positions,
            as :class:`~pipeline.models.heads.TransformerHead`; the summary is the mean of its outputs), or
            ``meanpool`` (the order-blind baseline: one vector, the mean of the steps).
        decoder: ``gru`` or ``lstm``.
        hidden_size: encoder and decoder width.
        embed_dim: word embedding size.
        attention: attend over the encoder's steps at every word (Luong's global attention).
        dropout: on the projected features and before the output layer.
    """

    def __init__(
        self,
        input_dim: int,
        vocab_size: int,
        encoder: Literal["gru", "lstm", "transformer", "meanpool"] = "gru",
        decoder: Literal["gru", "lstm"] = "gru",
        hidden_size: int = 256,
        embed_dim: int = 128,
        attention: bool = True,
        dropout: float = 0.2,
        max_len: int = 256,
    ):
        super().__init__()
        self.encoder_type, self.decoder_type, self.attention = encoder, decoder, attention
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(input_dim, hidden_size), nn.GELU())
        if encoder == "transformer":
            layer = nn.TransformerEncoderLayer(
                hidden_size, 4, 2 * hidden_size, dropout, batch_first=True, norm_first=True
            )
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.register_buffer("pos", sinusoidal_positions(max_len, hidden_size)[None], persistent=False)
        else:
            self.encoder = None if encoder == "meanpool" else _rnn(encoder, hidden_size, hidden_size)
        self.init_state = nn.Linear(hidden_size, hidden_size)
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocabulary.PAD)
        self.decoder = _rnn(decoder, embed_dim + hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(2 * hidden_size if attention else hidden_size, vocab_size)

    def encode(self, x: torch.Tensor):
        """``(memory (B, S, H), (decoder state, clip summary (B, H)))`` of features ``(B, T, D)``."""
        h = self.project(x)
        if self.encoder is None:
            summary = h.mean(1)
            memory = summary[:, None]
        elif self.encoder_type == "transformer":
            memory = self.encoder(h + self.pos[:, : h.shape[1]])
            summary = memory.mean(1)
        else:
            memory, _ = self.encoder(h)
            summary = memory[:, -1]
        h0 = torch.tanh(self.init_state(summary))[None]
        state = (h0, torch.zeros_like(h0)) if self.decoder_type == "lstm" else h0
        return memory, (state, summary)

    def step(self, tokens: torch.Tensor, state, memory: torch.Tensor):
        """Logits ``(B, L, V)`` of the words after ``tokens`` ``(B, L)``, and the decoder's new state. The clip's
        summary is an input at every word, beside the previous word (as in S2VT's second layer)."""
        state, summary = state
        words = self.embed(tokens)
        y, state = self.decoder(
            torch.cat([words, summary[:, None].expand(-1, words.shape[1], -1)], -1), state
        )
        if self.attention:
            weights = (y @ memory.transpose(1, 2)) / math.sqrt(y.shape[-1])  # (B, L, S)
            y = torch.cat([y, weights.softmax(-1) @ memory], -1)
        return self.out(self.dropout(y)), (state, summary)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: logits ``(B, L, V)`` of each next word of ``tokens`` ``(B, L)`` (which start with BOS)."""
        memory, state = self.encode(x)
        return self.step(tokens, state, memory)[0]

    @torch.no_grad()
    def greedy(self, x: torch.Tensor, max_length: int) -> list[list[int]]:
        """The most likely word at every step, for a batch; at most ``max_length`` words each, without BOS/EOS."""
        memory, state = self.encode(x)
        token = torch.full((len(x), 1), Vocabulary.BOS, dtype=torch.int64, device=x.device)
        words, done = [], torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(max_length + 1):
            logits, state = self.step(token, state, memory)
            token = logits[:, -1].argmax(-1, keepdim=True)
            done |= token[:, 0] == Vocabulary.EOS
            words.append(token[:, 0])
            if done.all():
                break
        out = []
        for row in torch.stack(words, 1).tolist():
            out.append(row[: row.index(Vocabulary.EOS)] if Vocabulary.EOS in row else row[:max_length])
        return out

    @torch.no_grad()
    def beam_search(
        self,
        x: torch.Tensor,
        beam_size: int,
        max_length: int,
        length_penalty: float = 0.7,
    ) -> list[list[int]]:
        """Beam search per clip: ``beam_size`` partial captions kept at every step; a caption ends when one of
        the ``beam_size`` best candidates is EOS; the search ends when ``beam_size`` have ended (or at
        ``max_length`` words). The best by log-probability / length ** ``length_penalty`` wins. Width 1
        is greedy decoding."""
        out = []
        for i in range(len(x)):
            memory, state = self.encode(x[i : i + 1])
            beams, scores_ = [[]], torch.zeros(1, device=x.device)
            last = torch.full((1, 1), Vocabulary.BOS, dtype=torch.int64, device=x.device)
            finished: list[tuple[float, list[int]]] = []
            for length in range(max_length + 1):
                k = len(beams)
                logits, state = self.step(last, state, memory.expand(k, -1, -1))
                total = (scores_[:, None] + logits[:, -1].float().log_softmax(-1)).flatten()
                if length == max_length:  # out of words: every beam ends here
                    finished += [
                        (float(s) / max(1, len(b)) ** length_penalty, b)
                        for s, b in zip(scores_.tolist(), beams, strict=True)
                    ]
                    break
                top = total.topk(min(2 * beam_size, len(total)))
                keep = []
                for rank, (score, index) in enumerate(
                    zip(top.values.tolist(), top.indices.tolist(), strict=True)
                ):
                    beam, word = divmod(index, logits.shape[-1])
                    if word == Vocabulary.EOS:
                        if rank < beam_size:
                            finished.append((score / max(1, len(beams[beam])) ** length_penalty, beams[beam]))
                    elif len(keep) < beam_size:
                        keep.append((beam, word, score))
                if len(finished) >= beam_size or not keep:
                    break
                index = torch.tensor([b for b, _, _ in keep], device=x.device)
                rnn_state, summary = state
                rnn_state = (
                    tuple(s[:, index] for s in rnn_state)
                    if isinstance(rnn_state, tuple)
                    else rnn_state[:, index]
                )
                state = (rnn_state, summary[index])
                beams = [beams[b] + [w] for b, w, _ in keep]
                scores_ = torch.tensor([s for _, _, s in keep], device=x.device)
                last = torch.tensor([[w] for _, w, _ in keep], device=x.device)
            out.append(max(finished, key=lambda f: f[0])[1])
        return out
