"""Beam search: `BeamSearchDecoder` (in the one decoding loop) on a fake model against transformers, then `Pipeline.answer`
with `beams` on the exported official-tiny model (f32, exact attention) against the official
reference and against transformers' beam search on our PyTorch model.

Tolerances: token ids exact everywhere. Logits of the shared-cache beams vs a fresh single-sequence
decode of each beam's history: 5e-4 abs (fixture README's logit tolerance; measured max 2.1e-6 over
24 steps of 3 beams).
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import CausalLMOutput

from salmonn_cli.ask import embed_file
from salmonn_cli.decoding import (BeamSearchDecoder, DecodingOptions, LengthNormalisedRanker, RepetitionGuard,
                                  SuppressTokens, decode)
from salmonn_cli.errors import ModelError, SalmonnError
from salmonn_cli.llm import BeamSequences, LlamaModel
from salmonn_cli.manifest import MANIFEST_NAME, load_manifest
from salmonn_cli.pipeline import Pipeline, RuntimeOptions
from salmonn_cli.prompt import build_prompt

from conftest import OFFICIAL_TINY, REFERENCE_INPUTS, salmonn

PROMPT = "Describe the audio."
REFERENCE_STEPS = 8             # the reference ran max_new_tokens 8
LOGIT_ATOL = 5e-4

# --- a fake model: logits are a fixed random row picked by a hash of the whole history ------------

TABLE_ROWS = 997
FAKE_BOS, FAKE_EOS, FAKE_PAD = 1, 2, 0


def fake_table(seed: int, vocab: int, eos_bias: float) -> np.ndarray:
    table = (np.random.default_rng(seed).standard_normal((TABLE_ROWS, vocab)) * 2).astype(np.float32)
    table[:, FAKE_EOS] += eos_bias
    return table


def fake_logits(table: np.ndarray, history: list[int]) -> np.ndarray:
    h = 0
    for token in [FAKE_BOS, *history]:
        h = (h * 31 + int(token) + 7) % TABLE_ROWS
    return table[h]


def fake_beam_search(table, num_beams, max_tokens, length_penalty=1.0, room=10**6, stop=None):
    beams = [[]]

    def advance(step):
        nonlocal beams
        assert len(step.parents) == len(step.tokens) <= num_beams
        beams = [beams[p] + [t] for p, t in zip(step.parents, step.tokens)]
        return np.stack([fake_logits(table, b) for b in beams])

    decoder = BeamSearchDecoder(num_beams, eos_id=FAKE_EOS, max_tokens=max_tokens, room=room,
                                ranker=LengthNormalisedRanker(length_penalty), stop=stop)
    return decode(fake_logits(table, []), advance, decoder)


# (seed, vocab, beams, max_tokens, eos_bias, length_penalty) -> (tokens, stop reason), as returned
# by transformers 4.28.0 (the official pin) `generate(num_beams=..., do_sample=False,
# early_stopping=False)` on the same table model seeded with input_ids [[BOS]]. In the marked cases
# transformers 5.x answers differently: it scores beams cut at max_new_tokens by n instead of n + 1
# tokens, so there an EOS-ended hypothesis wins.
OFFICIAL_428_CASES = [
    ((6, 19, 2, 9, 2.0, 1.0), ([18, 4, 7, 15, 5, 4, 6, 13, 16], "max_tokens")),      # 5.x differs
    ((25, 24, 4, 4, 3.0, 0.5), ([18, 22, 0, 4], "max_tokens")),                      # 5.x differs
    ((34, 34, 4, 2, 2.0, 1.0), ([30, 4], "max_tokens")),                             # 5.x differs
    ((38, 24, 5, 1, 3.0, 1.0), ([13], "max_tokens")),                                # 5.x differs
    ((41, 25, 4, 10, 0.0, 1.0), ([13, 8, 14, 13, 5, 6, 4, 20, 1, 9], "max_tokens")),  # 5.x differs
    ((103, 25, 3, 8, 1.0, 1.0), ([12, 20, 22, 17, 17, 17, 5, 23], "max_tokens")),     # 5.x differs
    ((64, 15, 5, 8, 2.0, 2.0), ([7, 10, 14, 14, 13, 7, 3, 6], "max_tokens")),         # 5.x differs
    ((66, 13, 3, 7, 1.0, 1.0), ([5, 12, 4, 10], "eos")),
    ((72, 32, 3, 9, 3.0, 1.0), ([13, 18, 23, 31, 20, 30], "eos")),
    ((88, 11, 4, 6, 1.0, 1.0), ([10, 8, 8, 7, 8], "eos")),
    ((5, 18, 2, 5, 1.0, 1.0), ([], "eos")),
    ((80, 9, 2, 5, 1.0, -1.0), ([3, 4, 8], "eos")),
    ((89, 23, 4, 8, 3.0, 2.0), ([], "eos")),
]


@pytest.mark.parametrize("case, expected", OFFICIAL_428_CASES)
def test_decoder_matches_transformers_4_28_on_a_fake_model(case, expected):
    seed, vocab, beams, max_tokens, eos_bias, length_penalty = case
    g = fake_beam_search(fake_table(seed, vocab, eos_bias), beams, max_tokens, length_penalty)
    assert (g.tokens, g.stop_reason) == expected


class TableConfig(PretrainedConfig):
    model_type = "salmonn-test-table"


class TableModel(PreTrainedModel, GenerationMixin):
    """The fake model for transformers' own generate (no KV cache: the whole history every step)."""
    config_class = TableConfig

    def __init__(self, config, table):
        super().__init__(config)
        self.table = table
        self.unused = torch.nn.Linear(1, 1)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}

    def forward(self, input_ids=None, **kwargs):
        rows = [[fake_logits(self.table, row[1:t + 1].tolist()) for t in range(len(row))]
                for row in input_ids]
        return CausalLMOutput(logits=torch.from_numpy(np.array(rows)))


@pytest.mark.parametrize("seed", range(6))
def test_decoder_matches_installed_transformers_when_no_eos_is_chosen(seed):
    """Without EOS both transformers generations agree; check against the installed one too."""
    rng = np.random.default_rng(seed)
    vocab, beams, max_tokens = int(rng.integers(8, 40)), int(rng.integers(2, 6)), int(rng.integers(1, 10))
    table = fake_table(seed, vocab, eos_bias=-50.0)
    model = TableModel(TableConfig(vocab_size=vocab), table).eval()
    config = GenerationConfig(num_beams=beams, do_sample=False, max_new_tokens=max_tokens,
                              length_penalty=1.0, early_stopping=False, use_cache=False,
                              bos_token_id=FAKE_BOS, eos_token_id=FAKE_EOS, pad_token_id=FAKE_PAD)
    with torch.no_grad():
        theirs = model.generate(torch.tensor([[FAKE_BOS]]), generation_config=config)[0, 1:].tolist()
    g = fake_beam_search(table, beams, max_tokens)
    assert g.tokens == theirs and g.stop_reason == "max_tokens"


def test_decoder_steps_suppression_room_and_bad_use():
    table = fake_table(3, 20, eos_bias=-50.0)
    decoder = BeamSearchDecoder(3, eos_id=FAKE_EOS, max_tokens=4)
    step = decoder.step(SuppressTokens((5, 7))(fake_logits(table, [])))
    assert step.parents == [0, 0, 0] and len(set(step.tokens)) == 3       # one row at first
    assert not {5, 7} & set(step.tokens)
    with pytest.raises(RuntimeError):
        decoder.result()                                                  # not over yet
    with pytest.raises(ValueError):
        BeamSearchDecoder(1, eos_id=FAKE_EOS, max_tokens=4)               # 1 beam = greedy

    g = fake_beam_search(table, 3, max_tokens=10, room=4)
    assert len(g.tokens) == 4 and g.stop_reason == "context_full"
    assert fake_beam_search(table, 3, max_tokens=0).tokens == []


def test_the_repetition_guard_ends_looping_beams_too():
    """A model that loops on "5 6": the guard ends each looping beam there, as it ends greedy decoding."""
    def looping(history):
        row = np.zeros(12, dtype=np.float32)
        row[6 if history and history[-1] == 5 else 5] = 10.0
        return row

    beams = [[]]

    def advance(step):
        nonlocal beams
        beams = [beams[p] + [t] for p, t in zip(step.parents, step.tokens)]
        return np.stack([looping(b) for b in beams])

    guard = RepetitionGuard()
    g = decode(looping([]), advance, BeamSearchDecoder(3, eos_id=FAKE_EOS, max_tokens=100, stop=guard))
    assert g.stop_reason == "repetition" and g.tokens == [5, 6] * 6 and guard.trim(g.tokens) == [5, 6]
    beams = [[]]
    unguarded = decode(looping([]), advance, BeamSearchDecoder(3, eos_id=FAKE_EOS, max_tokens=100))
    assert unguarded.stop_reason == "max_tokens" and len(unguarded.tokens) == 100


# --- the exported official-tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(model_f32):
    with Pipeline(str(model_f32), RuntimeOptions(n_threads=1), DecodingOptions(max_tokens=REFERENCE_STEPS,
                                                                                beams=4)) as p:
        yield p


@pytest.fixture(scope="module")
def embeds(pipeline):
    return {name: embed_file(pipeline, str(OFFICIAL_TINY / wav), truncate=True).embeds
            for name, wav in REFERENCE_INPUTS.items()}


def answer(pipeline, embeds, beams, **options):
    options = {"max_tokens": REFERENCE_STEPS, **options}
    return pipeline.answer(embeds, PROMPT, DecodingOptions(beams=beams, **options))


@pytest.mark.parametrize("name", list(REFERENCE_INPUTS))
def test_four_beams_give_the_official_beam_tokens(pipeline, embeds, reference, name):
    out = answer(pipeline, embeds[name], beams=4)
    assert out.tokens == reference[f"{name}.beam4_ids"][0, 1:].tolist()    # exact
    assert out.stop_reason == "max_tokens"


@pytest.mark.parametrize("name", list(REFERENCE_INPUTS))
def test_one_beam_is_greedy(pipeline, model_f32, embeds, reference, name):
    greedy = reference[f"{name}.greedy_ids"][0, 1:].tolist()
    assert answer(pipeline, embeds[name], beams=1).tokens == greedy             # 4-beam context
    with Pipeline(str(model_f32), RuntimeOptions(n_threads=1),
                  DecodingOptions(max_tokens=REFERENCE_STEPS, beams=1)) as plain:
        assert answer(plain, embeds[name], beams=1).tokens == greedy


def test_four_beams_equal_transformers_beam_search_on_the_pytorch_model(pipeline, embeds):
    from train.official import load_official

    torch.set_num_threads(1)
    model, _ = load_official(OFFICIAL_TINY / "salmonn_tiny.pth", OFFICIAL_TINY / "whisper",
                             OFFICIAL_TINY / "beats.pt", OFFICIAL_TINY / "vicuna")
    prompt = build_prompt(pipeline.config, PROMPT, pipeline.llm.tokenize)
    llm = model.config.llm
    config = GenerationConfig(num_beams=4, do_sample=False, max_new_tokens=REFERENCE_STEPS,
                              length_penalty=1.0, early_stopping=False, bos_token_id=llm.bos_token_id,
                              eos_token_id=llm.eos_token_id, pad_token_id=0)
    for name, audio_embeds in embeds.items():
        with torch.no_grad():
            inputs = model.llm_input_embeds(torch.from_numpy(audio_embeds)[None],
                                            prompt.ids_before, prompt.ids_after)
            ids = model.llm.generate(inputs_embeds=inputs, attention_mask=torch.ones(inputs.shape[:2]),
                                     generation_config=config)
        assert answer(pipeline, audio_embeds, beams=4).tokens == ids[0, -REFERENCE_STEPS:].tolist(), name


def test_shared_cache_beams_see_the_same_logits_as_a_fresh_decode(pipeline, model_f32, embeds):
    """Many steps with several beams splitting and dying: every beam's logits equal a decode of its
    whole history on a context of its own."""
    beams, steps = 3, 24
    llm = pipeline.llm
    prompt = build_prompt(pipeline.config, PROMPT, llm.tokenize)
    head, audio = [llm.bos_id] + prompt.ids_before, embeds["speech"]
    n_prompt = len(head) + len(audio) + len(prompt.ids_after)

    def prefill(model):
        model.reset()
        model.decode_tokens(head)
        model.decode_embeddings(audio)
        return model.decode_tokens(prompt.ids_after)

    histories, worst, reorders = [[]], 0.0, 0
    with LlamaModel(pipeline.manifest.path(pipeline.manifest.llm), n_ctx=n_prompt + steps,
                    n_threads=1, exact=True) as fresh:
        fresh_prompt_logits = prefill(fresh)
        sequences = BeamSequences(llm, beams, next_pos=n_prompt)

        def advance(step):
            nonlocal histories, worst, reorders
            reorders += step.parents != list(range(len(step.parents)))
            histories = [histories[p] + [t] for p, t in zip(step.parents, step.tokens)]
            shared = sequences.advance(step.parents, step.tokens)
            for row, history in zip(shared, histories):
                alone = fresh.decode_tokens(history, start_pos=n_prompt)
                worst = max(worst, float(np.abs(row - alone).max()))
            return shared

        first = prefill(llm)
        assert np.abs(first - fresh_prompt_logits).max() <= LOGIT_ATOL
        g = decode(first, advance, BeamSearchDecoder(beams, eos_id=llm.eos_id, max_tokens=steps, room=steps),
                   filters=(pipeline.suppress,))
    assert len(g.tokens) == steps
    assert reorders > 1                 # beams did split and die, not just run side by side
    assert worst <= LOGIT_ATOL, worst


def test_beam_answer_text_comes_through_on_text_at_the_end(pipeline, embeds):
    pieces = []
    out = pipeline.answer(embeds["short"], PROMPT, DecodingOptions(max_tokens=REFERENCE_STEPS, beams=4),
                          on_text=pieces.append)
    assert out.text and "".join(pieces).strip() == out.text


def test_beams_fill_the_context_without_overflow(pipeline, embeds):
    """Asked for more tokens than the pipeline was sized for, the beams stop at the context."""
    out = answer(pipeline, embeds["long"], beams=4, max_tokens=10_000)
    prompt = build_prompt(pipeline.config, PROMPT, pipeline.llm.tokenize)
    n_prompt = 1 + len(prompt.ids_before) + len(embeds["long"]) + len(prompt.ids_after)
    room = (pipeline.llm.n_ctx - n_prompt) // 4
    assert out.stop_reason in ("context_full", "eos")
    if out.stop_reason == "context_full":
        assert len(out.tokens) == room
    else:                               # the EOS came within the room, and is not part of the answer
        assert 0 < len(out.tokens) < room and pipeline.llm.eos_id not in out.tokens


def test_bad_beam_options(pipeline, model_f32, embeds):
    with pytest.raises(SalmonnError, match="at most 4 beam"):
        answer(pipeline, embeds["short"], beams=5)
    with pytest.raises(SalmonnError, match="temperature 0"):
        answer(pipeline, embeds["short"], beams=2, temperature=0.7)
    with pytest.raises(SalmonnError, match="number of beams"):
        Pipeline(str(model_f32), RuntimeOptions(n_threads=1), DecodingOptions(max_tokens=8, beams=0))


# --- the model's own default decoding (the manifest's "decoding") ------------------------------------

def with_default_beams(model_dir, out, beams):
    """A copy of an exported model whose manifest names `beams` as its default decoding."""
    shutil.copytree(model_dir, out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["decoding"] = beams if isinstance(beams, dict) else {"beams": beams}
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out


def ask_json(model_dir, *extra):
    done = salmonn("ask", "--model", model_dir, "--json", "--threads", "1", "--max-tokens", REFERENCE_STEPS,
                   "--truncate", OFFICIAL_TINY / REFERENCE_INPUTS["short"], PROMPT, *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_ask_decodes_with_the_manifest_beams_unless_told_otherwise(model_f32, reference, tmp_path):
    assert load_manifest(model_f32).default_beams == 1          # exports are greedy unless told
    assert not load_manifest(model_f32).default_repetition_guard
    model = with_default_beams(model_f32, tmp_path / "four", 4)
    assert load_manifest(model).default_beams == 4
    default = ask_json(model)
    assert default["beams"] == 4
    assert default["tokens"] == reference["short.beam4_ids"][0, 1:].tolist()
    greedy = ask_json(model, "--beams", "1")
    assert greedy["beams"] == 1 and greedy["tokens"] == reference["short.greedy_ids"][0, 1:].tolist()
    assert ask_json(model, "--temperature", "0.8", "--seed", "3")["beams"] == 1     # sampling: one beam
    assert ask_json(model_f32)["beams"] == 1


@pytest.mark.parametrize("decoding", [{"beams": 0}, {"beams": 17}, {"beams": "4"}, {"beams": True}, [4],
                                      {"beams": 4, "repetition_guard": "yes"}, {"repetition_guard": 1}])
def test_a_bad_manifest_decoding_is_one_clear_error(model_f32, tmp_path, decoding):
    model = with_default_beams(model_f32, tmp_path / "bad", decoding)
    with pytest.raises(ModelError, match="malformed.*decoding"):
        load_manifest(model)
    done = salmonn("ask", "--model", model, OFFICIAL_TINY / REFERENCE_INPUTS["short"], PROMPT)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "decoding" in done.stderr


def test_export_writes_the_default_beams(tmp_path):
    out = tmp_path / "model"
    done = salmonn("export", "--official-ckpt", OFFICIAL_TINY / "salmonn_tiny.pth", "--whisper", OFFICIAL_TINY / "whisper",
                   "--beats", OFFICIAL_TINY / "beats.pt", "--llm", OFFICIAL_TINY / "vicuna", "--quant", "f16",
                   "--default-beams", "3", "--repetition-guard", "--out", out)
    assert done.returncode == 0, done.stderr
    assert load_manifest(out).default_beams == 3 and load_manifest(out).default_repetition_guard
    bad = salmonn("export", "--official-ckpt", OFFICIAL_TINY / "salmonn_tiny.pth", "--default-beams", "0",
                  "--out", tmp_path / "never")
    assert bad.returncode != 0 and not (tmp_path / "never").exists()
