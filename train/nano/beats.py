"""A random small BEATs for salmonn-nano, saved as an official BEATs `.pt` ({'cfg', 'model'}).

No BEATs weights exist offline, so nano's BEATs is either kept frozen at this seeded random
initialisation or trained with the rest (`[model] train_beats`). Shapes: `smollm2_nano().beats`.

    python -m train.nano.beats OUT.pt --seed 0
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, replace
from pathlib import Path

import torch

from salmonn_cli.config import BeatsDims
from train.presets import smollm2_nano
from train.beats import BEATs

# official BEATsConfig keys that BeatsDims does not model (training-only); written so the file is
# complete in the official format. Layer drop is 0: the nano BEATs may be trained.
TRAINING_CFG = {"layer_wise_gradient_decay_ratio": 1.0, "dropout": 0.0, "attention_dropout": 0.0,
                "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0,
                "predictor_dropout": 0.0}


def nano_beats_dims() -> BeatsDims:
    # no AudioSet classifier head: SALMONN uses the encoder output only
    return replace(smollm2_nano().beats, finetuned_model=False)


def write_random_beats(out: str | Path, seed: int = 0, dims: BeatsDims | None = None) -> Path:
    """Seeded torch default initialisation of BEATs(dims) -> `out` (official layout)."""
    dims = dims or nano_beats_dims()
    generator_state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = BEATs(dims)
    finally:
        torch.set_rng_state(generator_state)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {key: tensor.detach().clone().contiguous() for key, tensor in model.state_dict().items()}
    torch.save({"cfg": {**asdict(dims), **TRAINING_CFG}, "model": state}, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.nano.beats", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the .pt file to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_random_beats(args.out, args.seed))


def beats_state_digest(path: str | Path) -> str:
    """sha256 over a BEATs .pt's tensors (names, shapes, float32 bytes): equal files hold equal weights."""
    import hashlib

    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to(torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    main()
