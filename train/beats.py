"""BEATs audio encoder (microsoft/unilm `beats`, as SALMONN uses it), inference only.

Input is the already normalised kaldi fbank (B, F, 128); output is the last layer's features
(B, T, encoder_embed_dim) with T = (F // patch) * (128 // patch), i.e. `extract_features(...,
feature_only=True)[0]` of the official class with an all-False padding mask. Module and parameter
names follow the official checkpoint so that its state dict loads strictly:

    patch_embedding, layer_norm, post_extract_proj, encoder.pos_conv.0.{weight_g,weight_v,bias},
    encoder.layer_norm, encoder.layers.N.{self_attn.*, self_attn_layer_norm, fc1, fc2, final_layer_norm},
    predictor (fine-tuned checkpoints; unused here)

`self_attn.relative_attention_bias` is one module shared by every layer (it appears in the state dict
under each layer index, as in the official file).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from salmonn_cli.config import BeatsDims
from salmonn_cli.errors import ModelError

# `BEATsConfig.__init__` defaults of the official code (microsoft/unilm beats/BEATs.py).
OFFICIAL_BEATS_CONFIG_DEFAULTS = {
    "input_patch_size": -1, "embed_dim": 512, "conv_bias": False, "encoder_layers": 12,
    "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072, "encoder_attention_heads": 12,
    "activation_fn": "gelu", "layer_norm_first": False, "deep_norm": False, "conv_pos": 128,
    "conv_pos_groups": 16, "relative_position_embedding": False, "num_buckets": 320,
    "max_distance": 1280, "gru_rel_pos": False, "finetuned_model": False, "predictor_class": 527,
}


def dims_from_official_cfg(cfg: dict) -> BeatsDims:
    """Keys missing from a checkpoint's cfg take the official `BEATsConfig` defaults, which differ
    from BeatsDims' (cpt2) defaults."""
    names = {f.name for f in dataclasses.fields(BeatsDims)}
    merged = {**OFFICIAL_BEATS_CONFIG_DEFAULTS, **cfg}
    return BeatsDims(**{k: v for k, v in merged.items() if k in names})

FBANK_BINS = 128                # kaldi fbank mel bins the patch embedding sees
ATTN_GATES = 8                  # grep_linear output: 2 gates x 4 summed terms
ACTIVATIONS = {
    # the official "gelu" runs in float32 whatever the input dtype
    "gelu": lambda x: F.gelu(x.float()).type_as(x),
    "gelu_accurate": lambda x: F.gelu(x.float(), approximate="tanh").type_as(x),
    "relu": F.relu,
}
MAX_KEYS_IN_ERROR = 5


# --- relative position bias ------------------------------------------------------------------------

def relative_position_buckets(relative_position: Tensor, num_buckets: int, max_distance: int) -> Tensor:
    """T5 bidirectional buckets: half the buckets per sign, exact below num_buckets // 4, log-spaced
    up to max_distance. Same operation order as the official code so float rounding gives the same ids."""
    half = num_buckets // 2
    buckets = (relative_position > 0).to(torch.long) * half
    distance = relative_position.abs()
    max_exact = half // 2
    is_small = distance < max_exact
    # clamp keeps log() away from 0; every clamped entry is small and taken from `distance` below
    log_ratio = (torch.log(distance.clamp(min=max_exact).float() / max_exact)
                 / math.log(max_distance / max_exact))
    if_large = max_exact + (log_ratio * (half - max_exact)).to(torch.long)
    if_large = torch.clamp(if_large, max=half - 1)
    return buckets + torch.where(is_small, distance, if_large)


# --- attention ----------------------------------------------------------------------------------------

class MultiheadAttention(nn.Module):
    """Self-attention with an optional (gated) relative position bias added to the scores.

    The official code scales q by 1/32 and subtracts the row max before multiplying back by 32
    (fp16 safety); that equals plain scaled dot-product attention, which is what runs here.
    """

    def __init__(self, dims: BeatsDims, has_relative_attention_bias: bool):
        super().__init__()
        width, heads = dims.encoder_embed_dim, dims.encoder_attention_heads
        self.num_heads = heads
        self.head_dim = width // heads
        self.scaling = self.head_dim ** -0.5
        self.num_buckets = dims.num_buckets
        self.max_distance = dims.max_distance
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(dims.num_buckets, heads)
        self.gru_rel_pos = dims.gru_rel_pos
        if dims.gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, ATTN_GATES)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def position_bias(self, length: int, device: torch.device) -> Tensor:
        """(H, T, T) bias from the bucketed key-minus-query distance."""
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]
        buckets = relative_position_buckets(relative, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)

    def _split_heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)   # (B, H, T, Dh)

    def forward(self, x: Tensor, position_bias: Tensor | None) -> Tensor:
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        scores = torch.matmul(q * self.scaling, k.transpose(-1, -2))       # (B, H, T, T)
        if position_bias is not None:
            bias = position_bias.unsqueeze(0)
            if self.gru_rel_pos:
                # per-query gate from the unscaled query: a * (b * grep_a - 1) + 2
                gates = self.grep_linear(q).unflatten(-1, (2, ATTN_GATES // 2)).sum(-1)
                gate_a, gate_b = torch.sigmoid(gates).chunk(2, dim=-1)        # (B, H, T, 1) each
                bias = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * bias
            scores = scores + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
        out = torch.matmul(probs, v).transpose(1, 2).flatten(2)              # (B, T, C)
        return self.out_proj(out)


# --- encoder ------------------------------------------------------------------------------------------

class EncoderLayer(nn.Module):
    """Post-LN (optionally DeepNorm-scaled residual) or pre-LN transformer layer."""

    def __init__(self, dims: BeatsDims, has_relative_attention_bias: bool):
        super().__init__()
        width = dims.encoder_embed_dim
        self.layer_norm_first = dims.layer_norm_first
        self.deep_norm_alpha = (2 * dims.encoder_layers) ** 0.25 if dims.deep_norm else 1.0
        self.activation = ACTIVATIONS[dims.activation_fn]
        self.self_attn = MultiheadAttention(dims, has_relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, dims.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(dims.encoder_ffn_embed_dim, width)
        self.final_layer_norm = nn.LayerNorm(width)

    def _ffn(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x: Tensor, position_bias: Tensor | None) -> Tensor:
        if self.layer_norm_first:
            x = x + self.self_attn(self.self_attn_layer_norm(x), position_bias)
            return x + self._ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.deep_norm_alpha + self.self_attn(x, position_bias))
        return self.final_layer_norm(x * self.deep_norm_alpha + self._ffn(x))


class ConvPositionalEmbedding(nn.Module):
    """Grouped Conv1d with weight norm over dim 2, last frame dropped for even kernels, then GELU.

    Holds the weight-norm parameters under the official names (`weight_g`, `weight_v`) and builds
    the weight in forward, which exports to ONNX without the legacy weight_norm hook.
    """

    def __init__(self, width: int, kernel: int, groups: int):
        super().__init__()
        self.kernel = kernel
        self.groups = groups
        self.weight_g = nn.Parameter(torch.ones(1, 1, kernel))
        self.weight_v = nn.Parameter(torch.empty(width, width // groups, kernel))
        self.bias = nn.Parameter(torch.zeros(width))
        nn.init.normal_(self.weight_v, std=math.sqrt(4.0 / (kernel * width)))

    def forward(self, x: Tensor) -> Tensor:                                  # (B, C, T) -> (B, C, T)
        norm = torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True)
        weight = self.weight_v * (self.weight_g / norm)
        y = F.conv1d(x, weight, self.bias, padding=self.kernel // 2, groups=self.groups)
        if self.kernel % 2 == 0:
            y = y[:, :, :-1]
        return F.gelu(y)


class TransformerEncoder(nn.Module):
    def __init__(self, dims: BeatsDims):
        super().__init__()
        width = dims.encoder_embed_dim
        # a Sequential so the checkpoint names read `pos_conv.0.*`
        self.pos_conv = nn.Sequential(ConvPositionalEmbedding(width, dims.conv_pos, dims.conv_pos_groups))
        self.relative_position_embedding = dims.relative_position_embedding
        self.layers = nn.ModuleList(
            EncoderLayer(dims, has_relative_attention_bias=dims.relative_position_embedding and i == 0)
            for i in range(dims.encoder_layers))
        if dims.relative_position_embedding:
            shared = self.layers[0].self_attn.relative_attention_bias
            for layer in self.layers[1:]:
                layer.self_attn.relative_attention_bias = shared
        self.layer_norm_first = dims.layer_norm_first
        self.layer_norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:                                  # (B, T, C)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        position_bias = None
        if self.relative_position_embedding:
            position_bias = self.layers[0].self_attn.position_bias(x.size(1), x.device)
        for layer in self.layers:
            x = layer(x, position_bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x


# --- BEATs --------------------------------------------------------------------------------------------

def check_supported(dims: BeatsDims) -> None:
    """Raise ModelError for configurations this implementation does not reproduce."""
    problems = []
    if dims.input_patch_size <= 0 or dims.input_patch_size > FBANK_BINS:
        problems.append(f"input_patch_size {dims.input_patch_size} (need 1..{FBANK_BINS})")
    if dims.activation_fn not in ACTIVATIONS:
        problems.append(f"activation_fn {dims.activation_fn!r} (supported: {', '.join(ACTIVATIONS)})")
    if dims.deep_norm and dims.layer_norm_first:
        problems.append("deep_norm together with layer_norm_first")
    if dims.encoder_embed_dim % dims.encoder_attention_heads:
        problems.append(f"encoder_embed_dim {dims.encoder_embed_dim} not divisible by "
                        f"{dims.encoder_attention_heads} heads")
    if dims.encoder_embed_dim % dims.conv_pos_groups:
        problems.append(f"encoder_embed_dim {dims.encoder_embed_dim} not divisible by "
                        f"conv_pos_groups {dims.conv_pos_groups}")
    if problems:
        raise ModelError("unsupported BEATs configuration: " + "; ".join(problems))


class BEATs(nn.Module):
    def __init__(self, dims: BeatsDims):
        super().__init__()
        check_supported(dims)
        self.dims = dims
        patch = dims.input_patch_size
        self.patch_embedding = nn.Conv2d(1, dims.embed_dim, kernel_size=patch, stride=patch,
                                         bias=dims.conv_bias)
        self.layer_norm = nn.LayerNorm(dims.embed_dim)
        # the official model has no projection when the widths already agree
        self.post_extract_proj = (nn.Linear(dims.embed_dim, dims.encoder_embed_dim)
                                  if dims.embed_dim != dims.encoder_embed_dim else None)
        self.encoder = TransformerEncoder(dims)
        self.predictor = (nn.Linear(dims.encoder_embed_dim, dims.predictor_class)
                          if dims.finetuned_model else None)

    def forward(self, fbank: Tensor) -> Tensor:
        """Normalised fbank (B, F, 128) -> features (B, (F // patch) * (128 // patch), C)."""
        patches = self.patch_embedding(fbank.unsqueeze(1))                   # (B, D, F/p, 128/p)
        x = patches.flatten(2).transpose(1, 2)                               # time-major tokens
        x = self.layer_norm(x)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        return self.encoder(x)


# --- loading ------------------------------------------------------------------------------------------

def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_KEYS_IN_ERROR])
    more = f", ... ({len(keys) - MAX_KEYS_IN_ERROR} more)" if len(keys) > MAX_KEYS_IN_ERROR else ""
    return f"{len(keys)} {'key' if len(keys) == 1 else 'keys'} ({shown}{more})"


def load_beats_state_dict(model: BEATs, state_dict: dict[str, Tensor], source: str = "state dict") -> None:
    """Strict load; a key or shape mismatch raises ModelError naming the first offending keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append("missing " + _key_list(missing))
        if unexpected:
            parts.append("unexpected " + _key_list(unexpected))
        raise ModelError(f"{source} does not match the BEATs layout: " + "; ".join(parts))
    wrong_shape = [f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}"
                   for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong_shape:
        raise ModelError(f"{source} has BEATs tensors of the wrong shape: " + _key_list(wrong_shape))
    model.load_state_dict(state_dict, strict=True)


def load_beats(path: str | Path) -> BEATs:
    """An official BEATs checkpoint `{'cfg': dict, 'model': state_dict}` as an eval-mode BEATs."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"BEATs checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt/foreign files
        raise ModelError(f"cannot read BEATs checkpoint {path}: {exc}") from exc
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("cfg"), dict)
            and isinstance(checkpoint.get("model"), dict)):
        raise ModelError(f"{path} is not an official BEATs checkpoint (expected keys 'cfg' and 'model')")
    model = BEATs(dims_from_official_cfg(checkpoint["cfg"]))
    load_beats_state_dict(model, checkpoint["model"], source=str(path))
    return model.eval()
