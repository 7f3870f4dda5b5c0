"""The projection through Whisper's vocabulary (train/vocab_projection.py; salmonn-nano's connector).

A small random CTranslate2 Whisper whose vocabulary spells words in GPT-2's byte alphabet, and the
official-tiny LLM given a byte-level BPE tokenizer.json that spells the same words differently. A fresh
projection writes, for a window whose next word Whisper is sure of, the LLM's embedding of that word's
text (the mean of the LLM tokens spelling it); <|endoftext|> writes the LLM's end-of-text embedding; the
LLM's table is saved but not trained; the checkpoint round trip is exact and the ONNX export matches
PyTorch to 1e-4 (as tests/test_export.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import OFFICIAL_TINY
from salmonn_cli.config import WHISPER_DECODER_QFORMER, LoraDims, QFormerDims
from salmonn_cli.errors import ModelError
from test_decoder_qformer import PROMPT, assert_onnx_export_matches, clip_features, small_ct2_whisper
from train.align import WhisperVocabCtcHead, ctc_log_probs, ctc_loss, target_classes, whisper_pieces
from train.official import build_from_parts, load_official, rebuild_llm_word_table, save_official_format
from train.vocab_projection import VocabProjection, kept_whisper_ids, split_into

EXACT_ATOL = 0.0
SURE = 200.0                    # logit scale at which the softmax is one-hot to float32 precision

BYTES = [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "."]
WORDS = ["Ġfront", "Ġcenter", "Ġleft", "Ġrear", "."]
WHISPER_VOCAB = [*BYTES, *WORDS, "<|endoftext|>", *PROMPT]
LLM_END_OF_TEXT = 7
# the LLM spells "Ġfront" as Ġfr + ont, "Ġcenter" whole, "Ġleft"/"Ġrear" letter by letter after Ġ
LLM_VOCAB = {**{b: 100 + i for i, b in enumerate(BYTES)}, "Ġfr": 300, "ont": 301, "Ġcenter": 302}
AUDIO_VOCAB = len(BYTES) + len(WORDS) + 1


@pytest.fixture(scope="module", autouse=True)
def few_threads():
    torch.set_num_threads(2)


def llm_with_byte_level_tokenizer(folder: Path) -> Path:
    folder.mkdir()
    for name in os.listdir(OFFICIAL_TINY / "vicuna"):
        if name != "tokenizer.model":
            (folder / name).symlink_to(OFFICIAL_TINY / "vicuna" / name)
    tokenizer = {"model": {"type": "BPE", "vocab": LLM_VOCAB, "merges": []},
                 "added_tokens": [{"id": LLM_END_OF_TEXT, "content": "<|endoftext|>", "special": True}]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.fixture(scope="module")
def vocab_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab")
    whisper = small_ct2_whisper(root / "whisper", seed=5, vocab=WHISPER_VOCAB)
    llm = llm_with_byte_level_tokenizer(root / "llm")
    model, config = build_from_parts(whisper, OFFICIAL_TINY / "beats.pt", llm,
                                     qformer=QFormerDims(kind=WHISPER_DECODER_QFORMER), lora=LoraDims(r=4),
                                     second_per_window=0.38, second_stride=0.12, trim_windows=True,
                                     audio_vocab=AUDIO_VOCAB)
    return whisper, llm, model, config


def test_split_into_takes_the_longest_known_piece_first():
    assert split_into("Ġfront", LLM_VOCAB) == [300, 301]
    assert split_into("Ġleft", LLM_VOCAB) == [LLM_VOCAB[c] for c in "Ġleft"]
    assert split_into("Ġhi!", LLM_VOCAB) == [LLM_VOCAB[c] for c in "Ġhi"]      # a byte it never saw: skipped


def test_kept_ids_are_the_first_text_tokens_then_end_of_text():
    end = WHISPER_VOCAB.index("<|endoftext|>")
    assert kept_whisper_ids(WHISPER_VOCAB, 3) == [0, 1, 2, end]
    with pytest.raises(ValueError, match="must keep between 1 and"):
        kept_whisper_ids(WHISPER_VOCAB, end + 1)


def test_a_sure_window_writes_the_llm_embedding_of_the_word(vocab_model):
    _, _, model, config = vocab_model
    projection = model.speech_llama_proj
    assert isinstance(projection, VocabProjection) and config.audio_vocab == AUDIO_VOCAB
    table = model.llm.get_input_embeddings().weight.detach()
    expected = {"Ġfront": table[[300, 301]].mean(0), "Ġcenter": table[302],
                "Ġleft": table[[LLM_VOCAB[c] for c in "Ġleft"]].mean(0), "<|endoftext|>": table[LLM_END_OF_TEXT]}
    rows = projection.logits.weight.detach()
    for word, embedding in expected.items():
        row = kept_whisper_ids(WHISPER_VOCAB, AUDIO_VOCAB - 1).index(WHISPER_VOCAB.index(word))
        # a hidden state whose logits single this word out (pseudo-inverse of the rows kept)
        target = torch.full((AUDIO_VOCAB,), -SURE)
        target[row] = SURE
        hidden = torch.linalg.lstsq(rows, target[:, None]).solution[:, 0]
        assert int(projection.logits(hidden).argmax()) == row
        with torch.no_grad():
            torch.testing.assert_close(projection(hidden[None]), embedding[None], rtol=0, atol=1e-5)


def test_the_llm_table_is_saved_but_not_trained(vocab_model):
    _, _, model, _ = vocab_model
    assert not model.speech_llama_proj.embeddings.requires_grad
    assert model.speech_llama_proj.logits.weight.requires_grad and model.speech_llama_proj.direct.weight.requires_grad
    assert "speech_llama_proj.embeddings" in model.trainable_state_dict()
    assert torch.count_nonzero(model.speech_llama_proj.direct.weight) == 0


def test_checkpoint_round_trip_keeps_the_vocabulary(vocab_model, tmp_path):
    whisper, llm, model, config = vocab_model
    with torch.no_grad():
        for p in model.speech_llama_proj.parameters():     # as after training: every trained weight its own
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    save_official_format(model, tmp_path / "ckpt.pth")
    loaded, loaded_config = load_official(tmp_path / "ckpt.pth", whisper, OFFICIAL_TINY / "beats.pt", llm)
    assert loaded_config.audio_vocab == AUDIO_VOCAB and isinstance(loaded.speech_llama_proj, VocabProjection)
    mel, fbank = clip_features(4.0, config, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_audio(mel, fbank), model.encode_audio(mel, fbank),
                                   rtol=0, atol=EXACT_ATOL)


def test_onnx_export_matches_pytorch(vocab_model, tmp_path):
    _, _, model, config = vocab_model
    assert_onnx_export_matches(model, config, tmp_path, ((1.5, 3), (6.0, 4)))


def test_clear_errors(vocab_model, tmp_path):
    whisper, llm, _, _ = vocab_model
    with pytest.raises(ModelError, match="audio_vocab needs the Whisper-decoder Q-Former"):
        build_from_parts(OFFICIAL_TINY / "whisper", OFFICIAL_TINY / "beats.pt", llm, qformer=QFormerDims(),
                         lora=LoraDims(r=4), audio_vocab=8)
    with pytest.raises(ModelError, match="not a byte-level BPE tokenizer"):
        (tmp_path / "spm").mkdir()
        for name in os.listdir(OFFICIAL_TINY / "vicuna"):
            (tmp_path / "spm" / name).symlink_to(OFFICIAL_TINY / "vicuna" / name)
        (tmp_path / "spm" / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
        build_from_parts(whisper, OFFICIAL_TINY / "beats.pt", tmp_path / "spm",
                         qformer=QFormerDims(kind=WHISPER_DECODER_QFORMER), lora=LoraDims(r=4), audio_vocab=8)
    with pytest.raises(ModelError, match="audio_vocab: .*must keep between 1 and"):
        build_from_parts(whisper, OFFICIAL_TINY / "beats.pt", llm, qformer=QFormerDims(kind=WHISPER_DECODER_QFORMER),
                         lora=LoraDims(r=4), audio_vocab=len(WHISPER_VOCAB))


def test_the_window_path_gets_its_own_learning_rate(vocab_model):
    from train.loop import param_groups
    _, _, model, _ = vocab_model
    window = {name for name, p in model.named_parameters() if p.requires_grad and model.in_window_path(name)}
    assert {"speech_llama_proj.logits.weight", "speech_llama_proj.direct.weight", "speech_query_tokens",
            "ln_audio.weight", "ln_speech.bias"} <= window
    assert any(name.startswith("speech_Qformer.blocks.") for name in window)
    assert not any(name.startswith(("llama_model.", "clip_token_head")) for name in window)
    ids = {id(p) for name, p in model.named_parameters() if name in window}
    groups = param_groups(model, 0.05, window_lr_scale=0.1)
    assert {id(p) for g in groups if g["lr_scale"] == 0.1 for p in g["params"]} == ids
    assert {g["lr_scale"] for g in groups} == {0.1, 1.0}
    assert {g["lr_scale"] for g in param_groups(model, 0.05)} == {1.0}


# --- [align] whisper_vocab: CTC over the Whisper tokens the projection reads ----------------------------

def test_whisper_vocab_ctc_head_spells_transcripts_in_kept_pieces(vocab_model):
    _, _, model, _ = vocab_model
    head = WhisperVocabCtcHead(whisper_pieces(model))
    pieces = [WHISPER_VOCAB[i] for i in kept_whisper_ids(WHISPER_VOCAB, AUDIO_VOCAB - 1)]
    target = head.target("front center.")               # after a space, as Whisper writes a first word
    assert [pieces[c - 1] for c in target] == ["Ġfront", "Ġcenter", "."]
    assert [pieces[c - 1] for c in head.target("fronts!")] == ["Ġfront", "s"]      # "!" is no kept piece
    assert head.target("  ") == []                      # nothing said: all blank
    path = [0, target[0], target[0], 0, target[1], 0, 0, target[2]]
    log_probs = torch.full((len(path), AUDIO_VOCAB), -9.0)
    log_probs[torch.arange(len(path)), torch.tensor(path)] = 0.0
    assert head.transcript(log_probs) == "front center."
    logits = torch.randn(2, 3, AUDIO_VOCAB)             # the blank is the last column, <|endoftext|>
    torch.testing.assert_close(head(logits)[..., 0], logits.log_softmax(-1)[..., -1])
    torch.testing.assert_close(head(logits)[..., 1:], logits.log_softmax(-1)[..., :-1])


def test_whisper_vocab_ctc_scores_the_logits_that_made_each_clips_tokens(vocab_model):
    """`ctc_log_probs` catches the projection's Whisper logits on the way: per clip of a batch, the softmax
    of what it returns, times the LLM table, is the clip's own window tokens (the linear path at 0)."""
    _, _, model, config = vocab_model
    head = WhisperVocabCtcHead(whisper_pieces(model))
    clips = [clip_features(seconds, config, seed) for seconds, seed in ((1.5, 3), (4.0, 4))]
    batch = SimpleNamespace(mel=torch.cat([mel for mel, _ in clips]), fbanks=[fbank[0] for _, fbank in clips],
                            clips=[("a",), ("b",)])
    direct = model.speech_llama_proj.direct
    state = {k: v.clone() for k, v in direct.state_dict().items()}
    model.eval()
    with torch.no_grad():
        for p in direct.parameters():                  # another test may have moved it
            p.zero_()
        tokens, log_probs, counts = ctc_log_probs(model, head, batch, None)
        direct.load_state_dict(state)
        assert counts[0] < counts[1] and log_probs.shape[:2] == (2, counts[1])
        for k, n in enumerate(counts):
            words = torch.cat([log_probs[k, :n, 1:], log_probs[k, :n, :1]], dim=-1).exp()
            torch.testing.assert_close(words @ model.speech_llama_proj.embeddings, tokens[k, :n], rtol=0, atol=1e-5)


def test_whisper_vocab_targets_are_transcripts_only():
    from train.data import Sample

    head = WhisperVocabCtcHead(tuple(WHISPER_VOCAB[i] for i in kept_whisper_ids(WHISPER_VOCAB, AUDIO_VOCAB - 1)))
    samples = [Sample("speech.wav", "front left.", "asr"), Sample("bell.wav", "", "asr"),
               Sample("dog.wav", "A dog barks.", "audiocaption")]
    targets = target_classes(SimpleNamespace(samples=samples), head, eos_token_id=0)
    assert targets == {("speech.wav",): head.target("front left."), ("bell.wav",): []}


def test_whisper_vocab_ctc_teaches_the_decoder_where_the_words_are(vocab_model):
    """A few CTC steps on the window path alone and greedy decoding of the projection's own Whisper logits
    spells the clip's transcript (the random small decoder starts far from it)."""
    _, _, model, config = vocab_model
    head = WhisperVocabCtcHead(whisper_pieces(model))
    mel, fbank = clip_features(3.0, config, seed=7)
    batch = SimpleNamespace(mel=mel, fbanks=[fbank[0]], clips=[("a",)])
    target = head.target("front center.")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for n, p in model.named_parameters() if p.requires_grad and model.in_window_path(n)]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    torch.manual_seed(0)
    model.eval()                                        # no dropout: the test is about the gradient path
    with torch.no_grad():
        _, log_probs, counts = ctc_log_probs(model, head, batch, None)
    assert head.transcript(log_probs[0, :counts[0]]) != "front center."
    try:
        for _ in range(60):
            _, log_probs, counts = ctc_log_probs(model, head, batch, None)
            loss = ctc_loss(log_probs, [target], counts, "mean")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            _, log_probs, counts = ctc_log_probs(model, head, batch, None)
        assert head.transcript(log_probs[0, :counts[0]]) == "front center."
    finally:
        model.load_state_dict(state)


def test_whisper_vocab_needs_the_vocabulary_projection():
    with pytest.raises(ValueError, match="whisper_vocab needs a model built with"):
        whisper_pieces(SimpleNamespace(speech_llama_proj=torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="must end with <\\|endoftext\\|>"):
        WhisperVocabCtcHead(("Ġa", "b"))


def test_the_llm_table_is_rebuilt_exactly_from_the_base_models(vocab_model):
    # packaging leaves the frozen table out and the default model's build makes it again (export/nano.py)
    whisper, llm, model, _ = vocab_model
    table = rebuild_llm_word_table(whisper, llm, AUDIO_VOCAB)
    assert torch.equal(table, model.speech_llama_proj.embeddings)
