"""A window Q-Former made of Whisper's text decoder, read without recurrence (salmonn-nano; not official).

Each window of fused frames is read by Whisper's decoder blocks as if the decoder were about to write
the first word of a transcript of just those frames: the query tokens are the decoder's prompt
(<|startoftranscript|> ... <|notimestamps|> embeddings plus their positions), cross-attention sees
only the window, and the last prompt position's final hidden state is the window's one token. Whisper's
decoder already turns encoder frames into words, so this connector starts out carrying what was said
(train/nano/README.md measures it) where a randomly initialised BERT Q-Former has to learn it from
hours of speech.

Blocks are pre-LN as Whisper's: causal self-attention over the prompt, cross-attention onto the window,
a GELU MLP; a final LayerNorm. The frames are fused Whisper + BEATs frames, brought to the decoder's
width by one linear map (`frames_in`) that starts as "take the Whisper half": BEATs adds to the reading
only as far as training asks, and the blocks' key/value projections read 384 columns, not 1152.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from salmonn_cli.config import QFormerDims, WHISPER_DECODER_QFORMER
from train.qformer import DROPOUT, MultiHeadAttention

DECODER_QFORMER_LN_EPS = 1e-5   # Whisper's LayerNorms


class Attention(MultiHeadAttention):
    """The Q-Former's attention core plus Whisper's output projection; key/value read `context_width`-wide inputs."""

    def __init__(self, hidden: int, n_heads: int, context_width: int):
        super().__init__(hidden, n_heads, context_width)
        self.out = nn.Linear(hidden, hidden)

    def attend(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """`hidden` (N, T, hidden) onto projected `keys`, `values` (N, S, hidden)."""
        q = self._split_heads(self.query(hidden))
        k, v = self._split_heads(keys), self._split_heads(values)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        probs = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(probs, v).transpose(1, 2)
        n, t = out.shape[:2]
        return self.out(out.reshape(n, t, self.n_heads * self.head_dim))

    def windows(self, frames: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames (B, T, C), window frame indices (L, k) -> keys, values (B * L, k, hidden).

        Each frame is projected once and then cut: windows overlap (salmonn-nano reads 0.38 s every 0.12 s),
        and projecting every window's frames anew cost 3x the Q-Former's time."""
        b, (n_windows, kernel) = frames.shape[0], index.shape
        keys, values = self.key(frames)[:, index], self.value(frames)[:, index]
        return keys.reshape(b * n_windows, kernel, -1), values.reshape(b * n_windows, kernel, -1)


class DecoderBlock(nn.Module):
    def __init__(self, dims: QFormerDims, frame_width: int):
        super().__init__()
        eps = dims.layer_norm_eps
        self.self_attn_ln = nn.LayerNorm(dims.hidden, eps=eps)
        self.self_attn = Attention(dims.hidden, dims.n_heads, dims.hidden)
        self.cross_attn_ln = nn.LayerNorm(dims.hidden, eps=eps)
        self.cross_attn = Attention(dims.hidden, dims.n_heads, frame_width)
        self.mlp_ln = nn.LayerNorm(dims.hidden, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(dims.hidden, dims.intermediate), nn.GELU(),
                                 nn.Linear(dims.intermediate, dims.hidden))
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, hidden: torch.Tensor, frames: torch.Tensor, index: torch.Tensor,
                causal: torch.Tensor) -> torch.Tensor:
        x = self.self_attn_ln(hidden)
        hidden = hidden + self.dropout(self.self_attn.attend(x, self.self_attn.key(x), self.self_attn.value(x), causal))
        keys, values = self.cross_attn.windows(frames, index)
        hidden = hidden + self.dropout(self.cross_attn.attend(self.cross_attn_ln(hidden), keys, values))
        return hidden + self.dropout(self.mlp(self.mlp_ln(hidden)))


class WhisperDecoderQFormer(nn.Module):
    """read(query tokens (1, P, hidden), frames (B, T, frame_width), window frame indices (L, k))
    -> (B * L, 1, hidden): for each window, the last prompt position's final hidden state."""

    def __init__(self, dims: QFormerDims, frame_width: int):
        super().__init__()
        if dims.kind != WHISPER_DECODER_QFORMER:
            raise ValueError(f"WhisperDecoderQFormer needs kind {WHISPER_DECODER_QFORMER!r}, not {dims.kind!r}")
        self.dims = dims
        self.frames_in = nn.Linear(frame_width, dims.hidden)
        self.blocks = nn.ModuleList(DecoderBlock(dims, dims.hidden) for _ in range(dims.n_layers))
        self.ln = nn.LayerNorm(dims.hidden, eps=dims.layer_norm_eps)
        n = dims.num_query_tokens
        # additive mask: each prompt position sees itself and those before it, as when Whisper decodes
        self.register_buffer("causal", torch.full((n, n), float("-inf")).triu(1), persistent=False)

    def read(self, queries: torch.Tensor, frames: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        hidden = queries.expand(frames.shape[0] * index.shape[0], -1, -1)
        frames = self.frames_in(frames)
        for block in self.blocks:
            hidden = block(hidden, frames, index, self.causal)
        return self.ln(hidden[:, -1:])

    forward = read


# --- Whisper's decoder weights ---------------------------------------------------------------------

@dataclass
class WhisperDecoderWeights:
    """Whisper's text decoder as plain tensors (read by train/ct2_whisper.py), with the prompt to read by.

    `layers[i]` holds q/k/v/out weights and biases of `self` and `cross` attention (k without bias in
    Whisper: zeros), `fc1`/`fc2`, and the three LayerNorms (`*_ln_weight`, `*_ln_bias`)."""
    token_embedding: torch.Tensor      # (vocab, d)
    positions: torch.Tensor            # (n_text_ctx, d)
    layers: list[dict[str, torch.Tensor]]
    ln_weight: torch.Tensor
    ln_bias: torch.Tensor
    n_heads: int
    prompt_ids: tuple[int, ...]
    encoder_ln_weight: torch.Tensor    # Whisper's encoder final LayerNorm (what the fused frames carry)
    encoder_ln_bias: torch.Tensor
    vocabulary: tuple[str, ...] = ()   # each token id's byte-level BPE spelling (vocabulary.txt)

    def qformer_dims(self) -> QFormerDims:
        return QFormerDims(kind=WHISPER_DECODER_QFORMER, hidden=self.token_embedding.shape[1],
                           n_layers=len(self.layers), n_heads=self.n_heads,
                           intermediate=self.layers[0]["fc1_weight"].shape[0], layer_norm_eps=DECODER_QFORMER_LN_EPS,
                           num_query_tokens=len(self.prompt_ids))

    def query_tokens(self) -> torch.Tensor:
        """(1, P, d): the prompt's token embeddings plus their positions."""
        ids = torch.tensor(self.prompt_ids)
        return (self.token_embedding[ids] + self.positions[: len(ids)]).unsqueeze(0)


def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    if param.shape != value.shape:
        raise ValueError(f"Whisper decoder tensor {tuple(value.shape)} does not fit {tuple(param.shape)}")
    param.copy_(value)


def _load_attention(attention: Attention, w: dict[str, torch.Tensor], prefix: str) -> None:
    for name in ("query", "key", "value", "out"):
        layer = getattr(attention, name)
        _copy(layer.weight, w[f"{prefix}_{name}_weight"])
        _copy(layer.bias, w[f"{prefix}_{name}_bias"])


@torch.no_grad()
def load_whisper_decoder(qformer: WhisperDecoderQFormer, query_tokens: nn.Parameter, ln_speech: nn.LayerNorm,
                         weights: WhisperDecoderWeights) -> None:
    """Start the connector as Whisper's decoder: blocks, final LayerNorm, the prompt as query tokens, and
    `frames_in` taking the Whisper half of each fused frame (the BEATs half starts unread), and
    `ln_speech` set so that the Whisper half of each fused frame is close to what the decoder was trained on.

    `ln_speech` re-normalises Whisper's output y = g * z + b (z standardised); per frame y has mean ~mean(b)
    and standard deviation ~sqrt(mean(g^2) + var(b)), nearly constant across frames, so scaling by that
    deviation and shifting by that mean gives y back up to a few per cent."""
    d = qformer.dims.hidden
    qformer.frames_in.weight.zero_()
    qformer.frames_in.weight[:, :d] = torch.eye(d)
    qformer.frames_in.bias.zero_()
    for block, w in zip(qformer.blocks, weights.layers, strict=True):
        _load_attention(block.self_attn, w, "self")
        _load_attention(block.cross_attn, w, "cross")
        for ln in ("self_attn_ln", "cross_attn_ln", "mlp_ln"):
            _copy(getattr(block, ln).weight, w[f"{ln}_weight"])
            _copy(getattr(block, ln).bias, w[f"{ln}_bias"])
        _copy(block.mlp[0].weight, w["fc1_weight"])
        _copy(block.mlp[0].bias, w["fc1_bias"])
        _copy(block.mlp[2].weight, w["fc2_weight"])
        _copy(block.mlp[2].bias, w["fc2_bias"])
    _copy(qformer.ln.weight, weights.ln_weight)
    _copy(qformer.ln.bias, weights.ln_bias)
    _copy(query_tokens, weights.query_tokens())
    g, b = weights.encoder_ln_weight.float(), weights.encoder_ln_bias.float()
    ln_speech.weight.fill_(float((g.pow(2).mean() + b.var(unbiased=False)).sqrt()))
    ln_speech.bias.fill_(float(b.mean()))
