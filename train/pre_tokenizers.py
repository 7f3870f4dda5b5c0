"""BPE pre-tokenizers: an HF `tokenizer.json` pre-tokenizer and the name llama.cpp knows the same
splitting under (`tokenizer.ggml.pre`), both ways: export writes the name into a GGUF, train rebuilds
an HF tokenizer from a GGUF."""
from __future__ import annotations

import json

from salmonn_cli.errors import ModelError

# HF tokenizers pre-tokenizers that split text exactly like a llama.cpp BPE pre-tokenizer, by the
# name llama.cpp knows it under (`tokenizer.ggml.pre`). `trim_offsets` only affects offsets.
BYTE_LEVEL_PRE_TOKENIZER = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                            "use_regex": True}
BPE_PRE_TOKENIZERS = {
    "gpt-2": BYTE_LEVEL_PRE_TOKENIZER,
    # SmolLM / StarCoder: every digit on its own, then GPT-2's regex
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     BYTE_LEVEL_PRE_TOKENIZER]},
}
PRE_TOKENIZER_IGNORED_KEYS = ("trim_offsets",)


def pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for an HF `tokenizer.json` pre-tokenizer (see BPE_PRE_TOKENIZERS)."""
    def canonical(node):
        if isinstance(node, dict):
            return {k: canonical(v) for k, v in node.items() if k not in PRE_TOKENIZER_IGNORED_KEYS}
        if isinstance(node, list):
            return [canonical(v) for v in node]
        return node

    for name, known in BPE_PRE_TOKENIZERS.items():
        if canonical(pre_tokenizer) == canonical(known):
            return name
    raise ModelError(f"the BPE pre-tokenizer {json.dumps(pre_tokenizer)} is not one this exporter knows "
                     f"how llama.cpp reproduces (known: {', '.join(BPE_PRE_TOKENIZERS)})")
