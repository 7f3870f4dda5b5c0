"""Build a complete official-format SALMONN model (Whisper folder, BEATs .pt, LLaMA folder,
SALMONN .pth) with shapes of our choosing and random seeded weights.

The files follow the formats of the official-tiny fixture (its README describes them); the
weights are moved away from their initialisers the same way, so that a wrong shape or a dropped
piece changes the outputs measurably.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig, WhisperModel

from salmonn_cli.config import BeatsDims, LlmDims, LoraDims, QFormerDims, SalmonnConfig, WhisperDims
from train.beats import BEATs
from train.model import Salmonn

OFFICIAL_TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
WHISPER_DIR = "whisper"
BEATS_FILE = "beats.pt"
LLM_DIR = "vicuna"
CKPT_FILE = "salmonn.pth"
# the fixture's shrunk Whisper decoder (SALMONN never uses it)
WHISPER_DECODER_VOCAB = 1000
WHISPER_DECODER_POSITIONS = 64
QFORMER_POSITION_IDS = 512
ROPE_THETA = 10000.0
LLM_PREFIX = "llama_model.base_model.model."
# official BEATs cfg keys that our BeatsDims does not model (training-only)
BEATS_TRAINING_CFG = {"layer_wise_gradient_decay_ratio": 0.6, "dropout": 0.0, "attention_dropout": 0.0,
                      "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.0,
                      "predictor_dropout": 0.0}


@dataclass
class OtherShapes:
    """Every shape of the second model; defaults differ from the shipped fixture in each part."""
    whisper: WhisperDims = field(default_factory=lambda: WhisperDims(
        n_mels=80, d_model=48, n_layers=3, n_heads=6, ffn_dim=96, max_source_positions=1500))
    beats: BeatsDims = field(default_factory=lambda: BeatsDims(
        embed_dim=40, encoder_layers=3, encoder_embed_dim=64, encoder_ffn_embed_dim=80,
        encoder_attention_heads=8, conv_pos_groups=16))
    qformer: QFormerDims = field(default_factory=lambda: QFormerDims(
        hidden=128, n_layers=3, n_heads=2, intermediate=256, num_query_tokens=2))
    llm: LlmDims = field(default_factory=lambda: LlmDims(
        hidden_size=96, n_layers=3, n_heads=6, n_kv_heads=2, intermediate_size=160, vocab_size=32000))
    lora: LoraDims = field(default_factory=lambda: LoraDims(
        r=4, alpha=16.0, dropout=0.1, targets=("q_proj", "k_proj", "v_proj")))
    second_per_window: float = 0.5
    second_stride: float = 0.5

    def config(self) -> SalmonnConfig:
        return SalmonnConfig(whisper=self.whisper, beats=self.beats, qformer=self.qformer, llm=self.llm,
                             lora=self.lora, second_per_window=self.second_per_window,
                             second_stride=self.second_stride)


@dataclass
class OfficialFiles:
    root: Path
    whisper: Path
    beats: Path
    llm: Path
    ckpt: Path


# --- randomisation (fixture README, "Weight randomisation") --------------------------------------

class Randomiser:
    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, like: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(like.shape, generator=self.gen, dtype=torch.float32)

    def layer_norm(self, module: torch.nn.Module) -> None:
        module.weight.copy_(self.normal(module.weight, 0.1, 1.0))
        module.bias.copy_(self.normal(module.bias, 0.1))

    def encoder(self, model: torch.nn.Module, special: dict[str, tuple[float, float]] | None = None) -> None:
        """Every parameter N(0, 0.05), LayerNorms 1 + N(0, 0.1) / N(0, 0.1); `special` maps a
        name fragment to (mean, std)."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                spec = next((v for k, v in (special or {}).items() if k in name), None)
                if spec is not None:
                    param.copy_(self.normal(param, spec[1], spec[0]))
                elif "layer_norm" in name.lower() and name.endswith("weight"):
                    param.copy_(self.normal(param, 0.1, 1.0))
                elif "layer_norm" in name.lower():
                    param.copy_(self.normal(param, 0.1))
                else:
                    param.copy_(self.normal(param, 0.05))


# --- the four parts ------------------------------------------------------------------------------

def write_whisper(out: Path, dims: WhisperDims, rand: Randomiser) -> None:
    config = WhisperConfig(
        num_mel_bins=dims.n_mels, d_model=dims.d_model, encoder_layers=dims.n_layers,
        encoder_attention_heads=dims.n_heads, encoder_ffn_dim=dims.ffn_dim,
        max_source_positions=dims.max_source_positions,
        decoder_layers=1, decoder_attention_heads=dims.n_heads, decoder_ffn_dim=dims.ffn_dim,
        vocab_size=WHISPER_DECODER_VOCAB, max_target_positions=WHISPER_DECODER_POSITIONS,
        eos_token_id=998, pad_token_id=998, bos_token_id=999, decoder_start_token_id=999,
        begin_suppress_tokens=[220, 998], suppress_tokens=None,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
    )
    model = WhisperModel(config)
    rand.encoder(model)
    model.save_pretrained(out, safe_serialization=True)


def write_beats(out: Path, dims: BeatsDims, rand: Randomiser) -> BEATs:
    model = BEATs(dims)
    rand.encoder(model, special={"weight_g": (0.0, 1.0), "relative_attention_bias": (0.0, 1.5),
                                 "grep_linear": (0.0, 0.5), "grep_a": (1.0, 0.3)})
    cfg = {**asdict(dims), **BEATS_TRAINING_CFG}
    torch.save({"cfg": cfg, "model": model.state_dict()}, out)
    return model.eval()


def llama_hf_config(dims: LlmDims) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=dims.vocab_size, hidden_size=dims.hidden_size, intermediate_size=dims.intermediate_size,
        num_hidden_layers=dims.n_layers, num_attention_heads=dims.n_heads,
        num_key_value_heads=dims.n_kv_heads, max_position_embeddings=dims.max_position_embeddings,
        rms_norm_eps=dims.rms_norm_eps, tie_word_embeddings=False,
        bos_token_id=dims.bos_token_id, eos_token_id=dims.eos_token_id, pad_token_id=0,
    )


def write_llama(out: Path, dims: LlmDims, rand: Randomiser, tokenizer_dir: Path) -> None:
    model = LlamaForCausalLM(llama_hf_config(dims))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                value = rand.normal(param, 0.1, 1.0)
            elif "embed_tokens" in name or "lm_head" in name:
                value = rand.normal(param, 0.2)
            else:
                value = rand.normal(param, 0.1)
            # fp16-exact values, like the fixture (the official code loads the LLM in fp16)
            param.copy_(value.half().float())
    model.save_pretrained(out, safe_serialization=True)
    for name in OFFICIAL_TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": dims.bos_token_id, "eos_token_id": dims.eos_token_id, "pad_token_id": 0}))


def trained_state(config: SalmonnConfig, rand: Randomiser) -> dict[str, torch.Tensor]:
    """Random trained tensors under their official names (current peft spelling)."""
    model = Salmonn(config)
    with torch.no_grad():
        for name, param in model.trainable_state_dict().items():
            if name == "speech_query_tokens":
                value = rand.normal(param, 1.0)
            elif name.startswith("speech_llama_proj."):
                value = rand.normal(param, 0.02 if name.endswith("weight") else 0.05)
            elif ".lora_" in name:
                value = rand.normal(param, 0.1)
            elif "LayerNorm" in name or name.startswith(("ln_speech.", "ln_audio.")):
                value = rand.normal(param, 0.1, 1.0 if name.endswith("weight") else 0.0)
            else:
                value = rand.normal(param, 0.05)
            param.copy_(value)
        return {name: t.clone() for name, t in model.trainable_state_dict().items()}


def official_quirks(config: SalmonnConfig, beats: BEATs) -> dict[str, torch.Tensor]:
    """Tensors the official save filter keeps besides the trained ones."""
    quirks = {"speech_Qformer.bert.embeddings.position_ids":
              torch.arange(QFORMER_POSITION_IDS, dtype=torch.long).unsqueeze(0)}
    head_dim = config.llm.head_dim
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    for n in range(config.llm.n_layers):
        quirks[f"{LLM_PREFIX}model.layers.{n}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    table = beats.encoder.layers[0].self_attn.relative_attention_bias.weight.detach()
    for n in range(1, config.beats.encoder_layers):
        quirks[f"beats.encoder.layers.{n}.self_attn.relative_attention_bias.weight"] = table.clone()
    return quirks


def old_lora_spelling(key: str) -> str:
    """peft <= 0.2 names: `...q_proj.lora_A.weight` (no adapter segment)."""
    return key.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight",
                                                                          ".lora_B.weight")


def official_model_cfg(config: SalmonnConfig) -> dict:
    """`ckpt['config']['model']` as the official runner writes it (paths relative to the .pth)."""
    return {
        "llama_path": LLM_DIR, "whisper_path": WHISPER_DIR, "beats_path": BEATS_FILE, "ckpt": "",
        "freeze_whisper": True, "freeze_beats": True, "use_speech_Qformer": True,
        "freeze_speech_QFormer": False, "window_level_Qformer": True,
        "num_speech_query_token": config.qformer.num_query_tokens,
        "second_per_window": config.second_per_window, "second_stride": config.second_stride,
        "speech_llama_proj_model": "", "freeze_speech_llama_proj": False,
        "lora": True, "lora_rank": config.lora.r, "lora_alpha": config.lora.alpha,
        "lora_dropout": config.lora.dropout, "multi_prompt": True,
        "prompt_template": config.prompt_template, "prompt_path": "", "test_prompt_path": "",
        "max_txt_len": 300, "end_sym": "</s>",
    }


def build_official_model(root: Path, shapes: OtherShapes, tokenizer_dir: Path, seed: int = 0,
                         old_lora_keys: bool = True) -> OfficialFiles:
    """Write the four official-format parts of a SALMONN model of `shapes` into `root`.

    `old_lora_keys` writes the LoRA tensors as peft <= 0.2 named them (`...lora_A.weight`),
    otherwise in the current form (`...lora_A.default.weight`).
    """
    root.mkdir(parents=True, exist_ok=True)
    config = shapes.config()
    files = OfficialFiles(root, root / WHISPER_DIR, root / BEATS_FILE, root / LLM_DIR, root / CKPT_FILE)
    torch.manual_seed(seed)        # module initialisers run before every value is overwritten
    rand = Randomiser(seed)
    write_whisper(files.whisper, config.whisper, rand)
    beats = write_beats(files.beats, config.beats, rand)
    write_llama(files.llm, config.llm, rand, tokenizer_dir)
    rename = old_lora_spelling if old_lora_keys else (lambda key: key)
    state = {rename(k): v for k, v in trained_state(config, rand).items()}
    state.update(official_quirks(config, beats))
    torch.save({"model": state, "optimizer": {}, "config": {"model": official_model_cfg(config)},
                "scaler": None, "epoch": 0}, files.ckpt)
    return files


@dataclass
class ExportedVariant:
    """An official-format model with non-default settings: loaded in PyTorch and exported by `salmonn export`."""
    model: Salmonn
    config: SalmonnConfig
    model_dir: Path
    prompt_ids: tuple[list[int], list[int]]
    files: OfficialFiles


def export_variant(root: Path, settings: dict, prompt: str, tokenizer_dir: Path,
                   extra_state: dict[str, torch.Tensor] | None = None) -> ExportedVariant:
    """Build an `OtherShapes` official-format model (seed 3) whose checkpoint config also says `settings`
    (and holds `extra_state`), export it as f32, load it in PyTorch; `prompt` split around the audio."""
    import sentencepiece
    from conftest import salmonn
    from train.official import load_official

    files = build_official_model(root / "official", OtherShapes(), tokenizer_dir, seed=3, old_lora_keys=False)
    ckpt = torch.load(files.ckpt, map_location="cpu", weights_only=True)
    ckpt["config"]["model"].update(settings)
    ckpt["model"].update(extra_state or {})
    torch.save(ckpt, files.ckpt)
    out = root / "model-f32"
    r = salmonn("export", "--official-ckpt", files.ckpt, "--whisper", files.whisper, "--beats", files.beats,
                "--llm", files.llm, "--quant", "f32", "--out", out)
    assert r.returncode == 0, r.stderr
    torch.set_num_threads(2)
    model, config = load_official(files.ckpt, files.whisper, files.beats, files.llm)
    spm = sentencepiece.SentencePieceProcessor(model_file=str(files.llm / "tokenizer.model"))
    before, after = config.prompt_pieces(prompt)
    return ExportedVariant(model, config, out, (spm.encode(before), spm.encode(after)), files)
