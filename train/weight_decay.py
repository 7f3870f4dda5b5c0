"""Which trainable parameters take weight decay: the official rule (matrices do; biases and norms do not),
shared by the training stages' optimizers and the alignment probe's."""
from __future__ import annotations

import torch

NO_DECAY_NAME_PARTS = ("bias", "ln", "bn")


def decays(name: str, param: torch.Tensor) -> bool:
    return param.ndim >= 2 and not any(part in name for part in NO_DECAY_NAME_PARTS)
