"""Window-level Q-Former: the BLIP-2 BERT variant SALMONN uses, query branch only (spec §4).

Module names follow the official checkpoint: held as `speech_Qformer`, the state keys are
`speech_Qformer.bert.embeddings.*` and `speech_Qformer.bert.encoder.layer.{i}.*`. The text branch
(word/position embeddings, `intermediate`, `output`, MLM head) is deleted by the official code, so
it does not exist here. Every layer is post-LN: self-attention, cross-attention onto the window
frames, then the query feed-forward.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from salmonn_cli.config import QFormerDims

DROPOUT = 0.1  # bert-base hidden and attention dropout; only active in train mode


class MultiHeadAttention(nn.Module):
    """BERT attention core (`*.self`): query from `hidden`, key/value from `context` (width `context_width`)."""

    def __init__(self, hidden: int, n_heads: int, context_width: int):
        super().__init__()
        if hidden % n_heads:
            raise ValueError(f"Q-Former hidden {hidden} is not divisible by {n_heads} heads")
        self.n_heads = n_heads
        self.head_dim = hidden // n_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(context_width, hidden)
        self.value = nn.Linear(context_width, hidden)
        self.dropout = nn.Dropout(DROPOUT)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self._split_heads(self.query(hidden))
        k = self._split_heads(self.key(context))
        v = self._split_heads(self.value(context))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(probs, v).transpose(1, 2)
        b, t = out.shape[:2]
        return out.reshape(b, t, self.n_heads * self.head_dim)


class ResidualOutput(nn.Module):
    """BERT `*.output`: LayerNorm(input + dropout(dense(x)))."""

    def __init__(self, in_features: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(in_features, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class AttentionBlock(nn.Module):
    """`attention` / `crossattention`: `self` (the attention core) followed by `output`."""

    def __init__(self, dims: QFormerDims, context_width: int):
        super().__init__()
        self.self = MultiHeadAttention(dims.hidden, dims.n_heads, context_width)
        self.output = ResidualOutput(dims.hidden, dims.hidden, dims.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, context), hidden)


class Intermediate(nn.Module):
    """`intermediate_query`: dense + exact-erf GELU."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, dims: QFormerDims, frame_width: int):
        super().__init__()
        self.attention = AttentionBlock(dims, dims.hidden)
        self.crossattention = AttentionBlock(dims, frame_width)
        self.intermediate_query = Intermediate(dims.hidden, dims.intermediate)
        self.output_query = ResidualOutput(dims.intermediate, dims.hidden, dims.layer_norm_eps)

    def forward(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        hidden = self.attention(hidden, hidden)
        hidden = self.crossattention(hidden, frames)
        return self.output_query(self.intermediate_query(hidden), hidden)


class QueryEmbeddings(nn.Module):
    """LayerNorm + dropout on the query tokens. `position_ids` is unused but part of the official state."""

    def __init__(self, dims: QFormerDims):
        super().__init__()
        self.LayerNorm = nn.LayerNorm(dims.hidden, eps=dims.layer_norm_eps)
        self.dropout = nn.Dropout(DROPOUT)
        self.register_buffer("position_ids", torch.arange(dims.max_position_embeddings).unsqueeze(0),
                             persistent=True)

    def forward(self, queries: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.LayerNorm(queries))


class QFormerEncoder(nn.Module):
    def __init__(self, dims: QFormerDims, frame_width: int):
        super().__init__()
        self.layer = nn.ModuleList(QFormerLayer(dims, frame_width) for _ in range(dims.n_layers))

    def forward(self, hidden: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, frames)
        return hidden


class QFormerBert(nn.Module):
    def __init__(self, dims: QFormerDims, frame_width: int):
        super().__init__()
        self.embeddings = QueryEmbeddings(dims)
        self.encoder = QFormerEncoder(dims, frame_width)

    def forward(self, queries: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embeddings(queries), frames)


class QFormer(nn.Module):
    """forward(queries (B, Q, hidden), frames (B, k, frame_width)) -> last hidden state (B, Q, hidden).

    The official masks are all ones (every frame of every window is attended), so there is no mask.
    """

    def __init__(self, dims: QFormerDims, frame_width: int):
        super().__init__()
        self.dims = dims
        self.bert = QFormerBert(dims, frame_width)
        self.apply(_init_bert_weights)

    def forward(self, queries: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        return self.bert(queries, frames)

    def read(self, queries: torch.Tensor, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Query tokens (1, Q, hidden), frames (B, T, C), windows' frame indices (L, k) -> (B * L, Q, hidden)."""
        windows = frames[:, index]
        b, n_windows, kernel, width = windows.shape
        windows = windows.reshape(b * n_windows, kernel, width)
        return self(queries.expand(windows.shape[0], -1, -1), windows)


def _init_bert_weights(module: nn.Module) -> None:
    """BERT init (normal 0.02, zero bias, LayerNorm 1/0), as the official Q-Former starts from."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
