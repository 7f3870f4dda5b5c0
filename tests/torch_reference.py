"""Greedy decoding with our PyTorch model: the reference the exported runtime must reproduce."""
from __future__ import annotations

import numpy as np
import torch


def greedy(model, embeds: torch.Tensor, steps: int) -> tuple[list[int], list[float], np.ndarray]:
    """HF greedy decoding over the full vocabulary (nothing suppressed), with a KV cache.

    Returns the tokens, the top-1/top-2 logit gap at each step (a test asserts these are not
    near-ties) and the prompt's last-position logits.
    """
    tokens, gaps = [], []
    with torch.no_grad():
        out = model.llama_model(inputs_embeds=embeds, use_cache=True)
        first_logits = out.logits[0, -1].numpy().copy()
        for step in range(steps):
            top = torch.topk(out.logits[0, -1], 2)
            tokens.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            if step + 1 < steps:
                out = model.llama_model(inputs_embeds=model.embed_ids([tokens[-1]]),
                                        past_key_values=out.past_key_values, use_cache=True)
    return tokens, gaps, first_logits
