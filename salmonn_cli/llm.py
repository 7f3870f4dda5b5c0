"""The LLM through llama.cpp's low-level API: feed embeddings or tokens, get last-position logits.

Torch-free (numpy + llama_cpp only). Decoding strategies (greedy, sampling) live in
`salmonn_cli.decoding` and work on the logits returned here.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from salmonn_cli.cuda_libraries import preload_cuda_libraries

preload_cuda_libraries()    # before llama_cpp: its CUDA build must bind to the CUDA libraries ORT uses

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from salmonn_cli.errors import ModelError, SalmonnError, quoted  # noqa: E402

MAX_UBATCH = 512            # physical batch; the logical batch (n_batch) is the whole context
PIECE_BUFFER_BYTES = 64
SEQ_ID = 0                  # the sequence decode_tokens/decode_embeddings work on
MAX_SEQUENCES = 256         # llama.cpp's LLAMA_MAX_SEQ


class ContextOverflowError(SalmonnError):
    """The prompt plus the generated tokens do not fit in the LLM context."""


# --- llama.cpp logging (process-wide; the callbacks must outlive every call into llama.cpp) -------

@llama_cpp.llama_log_callback
def _silent_log(level, text, user_data):
    pass


@llama_cpp.llama_log_callback
def _stderr_log(level, text, user_data):
    sys.stderr.write(text.decode("utf-8", errors="replace"))


def set_llama_logging(verbose: bool) -> None:
    """Show llama.cpp's (and ggml's) log on stderr, or silence it."""
    llama_cpp.llama_log_set(_stderr_log if verbose else _silent_log, ctypes.c_void_p(0))


_backend_ready = False


def init_backend(verbose: bool = False) -> None:
    global _backend_ready
    if not _backend_ready:
        set_llama_logging(verbose)
        llama_cpp.llama_backend_init()
        _backend_ready = True


# --- model + context -----------------------------------------------------------------------------

class LlamaModel:
    """One GGUF model with one context (one sequence) and a position counter.

    `exact=True` disables flash attention and keeps the KV cache in f32; with an f32 GGUF this
    reproduces the official PyTorch logits to ~1e-5 (see parity notes). Otherwise llama.cpp's
    defaults apply (flash attention auto, f16 KV cache): faster, ~1e-2 logit error.
    `n_seq_max > 1` allows that many sequences (beam search) in one unified KV cache of `n_ctx`
    cells, so sequences copied from one another share their common prefix's cells.
    """

    def __init__(self, path: str | Path, *, n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
                 exact: bool = False, verbose: bool = False,
                 n_seq_max: int = 1):
        self._model = None
        self._ctx = None
        self._lora = None           # llama.cpp adapter handle, owned here
        self._lora_scale = 0.0
        self.exact = exact
        if n_ctx < 1 or n_threads < 1:
            raise ValueError("n_ctx and n_threads must be positive")
        if not 1 <= n_seq_max <= MAX_SEQUENCES:
            raise ValueError(f"n_seq_max must be in 1..{MAX_SEQUENCES}")
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"LLM file not found: {quoted(path)}")
        init_backend(verbose)
        set_llama_logging(verbose)

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # Weight repacking into extra buffer types (AMX) crashes or corrupts quantized models on
        # some CPUs; the plain CPU buffers are safe everywhere.
        mparams.use_extra_bufts = False
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ModelError(f"cannot load the LLM {quoted(path)}: not a valid GGUF model (truncated or corrupt?)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx                   # a whole prompt goes in one llama_decode
        cparams.n_ubatch = min(n_ctx, MAX_UBATCH)
        cparams.n_seq_max = n_seq_max
        if n_seq_max > 1:
            cparams.kv_unified = True     # else llama.cpp splits n_ctx into n_seq_max parts
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        if exact:
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.type_k = llama_cpp.GGML_TYPE_F32
            cparams.type_v = llama_cpp.GGML_TYPE_F32
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelError(f"llama.cpp could not create a {n_ctx}-token context for {quoted(path)} "
                             "(out of memory?)")
        self.n_ctx = min(n_ctx, llama_cpp.llama_n_ctx(self._ctx))
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._n_past = 0
        self.resets = 0             # how often the cache was cleared: what a caller cached is gone

    # --- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        if self._lora:
            llama_cpp.llama_adapter_lora_free(self._lora)
            self._lora = None
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "LlamaModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:     # interpreter shutdown: llama_cpp may already be gone
            pass

    # --- LoRA adapter -----------------------------------------------------------------------------
    def load_lora_adapter(self, path: str | Path) -> None:
        """Load a llama.cpp LoRA adapter GGUF for this model (replacing any loaded one); it has no
        effect until `set_lora_scale` gives it a non-zero scale."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"LoRA adapter file not found: {quoted(path)}")
        adapter = llama_cpp.llama_adapter_lora_init(self._model, str(path).encode())
        if not adapter:
            raise ModelError(f"cannot load the LoRA adapter {quoted(path)}: not a llama.cpp LoRA GGUF "
                             "that fits this model")
        if self._lora:
            self.set_lora_scale(0.0)
            llama_cpp.llama_adapter_lora_free(self._lora)
        self._lora = adapter

    def set_lora_scale(self, scale: float) -> None:
        """Add `scale` * B @ A of the loaded adapter to its weights (times alpha/r if the adapter
        file states an alpha). Clears the KV cache: cached positions were computed without it."""
        scale = float(scale)
        if scale != 0.0 and not self._lora:
            raise ValueError("no LoRA adapter is loaded")
        if self._lora:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self._lora)
            scales = (ctypes.c_float * 1)(scale)
            llama_cpp.llama_set_adapters_lora(self._ctx, adapters, 1, scales)
        self._lora_scale = scale
        self.reset()

    @property
    def lora_scale(self) -> float:
        """The scale the loaded adapter is applied with (0: not applied)."""
        return self._lora_scale

    # --- facts ------------------------------------------------------------------------------------
    @property
    def n_layer(self) -> int:
        """Repeating layers (llama.cpp offloads these and the output layer)."""
        return llama_cpp.llama_model_n_layer(self._model)

    @property
    def n_past(self) -> int:
        """Positions already in the KV cache (the next position to be decoded)."""
        return self._n_past

    @property
    def bos_id(self) -> int:
        return llama_cpp.llama_vocab_bos(self._vocab)

    @property
    def eos_id(self) -> int:
        return llama_cpp.llama_vocab_eos(self._vocab)

    # --- tokenizer --------------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        """Token ids of `text`. Special-token text such as "</s>" or "<|im_end|>" is plain text
        unless `special` (then it becomes that special token)."""
        data = text.encode("utf-8")
        capacity = len(data) + 2
        for _ in range(2):
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            capacity = -n
        raise ModelError("llama.cpp could not tokenize the prompt")

    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 character). Control tokens render empty
        unless `special`."""
        self._check_token(token_id)
        size = PIECE_BUFFER_BYTES
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(self._vocab, token_id, buf, size, 0, special)
            if n >= 0:
                return buf.raw[:n]
            size = -n
        raise ModelError(f"llama.cpp could not render token {token_id}")

    # --- decoding ---------------------------------------------------------------------------------
    def decode_embeddings(self, embeds: np.ndarray, start_pos: int | None = None) -> np.ndarray:
        """Run (n, n_embd) input embeddings at positions start_pos.. ; returns the last row's logits.

        start_pos defaults to `n_past`; a smaller value first drops the cached positions >= it.
        """
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if embeds.ndim != 2 or embeds.shape[1] != self.n_embd or embeds.shape[0] == 0:
            raise ValueError(f"embeddings must have shape (n > 0, {self.n_embd}), not {embeds.shape}")
        n = embeds.shape[0]
        start = self._prepare(start_pos, n)
        batch = llama_cpp.llama_batch_init(n, self.n_embd, 1)
        try:
            ctypes.memmove(batch.embd, embeds.ctypes.data, embeds.nbytes)
            return self._run(batch, n, start)
        finally:
            llama_cpp.llama_batch_free(batch)

    def decode_tokens(self, ids, start_pos: int | None = None) -> np.ndarray:
        """Run token ids at positions start_pos.. ; returns the last token's logits."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("no tokens to decode")
        for i in ids:
            self._check_token(i)
        n = len(ids)
        start = self._prepare(start_pos, n)
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            for i, token in enumerate(ids):
                batch.token[i] = token
            return self._run(batch, n, start)
        finally:
            llama_cpp.llama_batch_free(batch)

    def reset(self) -> None:
        """Forget everything decoded so far (clears the KV cache)."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        self._n_past = 0
        self.resets += 1

    # --- several sequences (beam search) ----------------------------------------------------------
    # These work on any sequence and leave `n_past` (sequence 0's counter) alone: callers that
    # rearrange sequences track positions themselves and `reset()` before using decode_tokens again.
    @property
    def n_seq_max(self) -> int:
        return llama_cpp.llama_n_seq_max(self._ctx)

    def copy_sequence(self, src: int, dst: int) -> None:
        """Make `dst` also hold every cached position of `src` (the cells are shared, not copied)."""
        self._check_seq(src)
        self._check_seq(dst)
        llama_cpp.llama_memory_seq_cp(llama_cpp.llama_get_memory(self._ctx), src, dst, -1, -1)

    def remove_sequence(self, seq_id: int) -> None:
        """Forget sequence `seq_id`; cells no other sequence holds become free."""
        self._check_seq(seq_id)
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), seq_id, -1, -1)

    def decode_batch(self, tokens, seq_ids, positions) -> np.ndarray:
        """Decode row i = token `tokens[i]` of sequence `seq_ids[i]` at position `positions[i]`, all
        in one llama_decode; returns the logits of every row, (n_rows, n_vocab)."""
        tokens, seq_ids, positions = list(tokens), list(seq_ids), list(positions)
        n = len(tokens)
        if n == 0 or len(seq_ids) != n or len(positions) != n:
            raise ValueError("tokens, seq_ids and positions must be non-empty and of equal length")
        for token, seq_id in zip(tokens, seq_ids):
            self._check_token(int(token))
            self._check_seq(int(seq_id))
        batch = llama_cpp.llama_batch_init(n, 0, 1)
        try:
            batch.n_tokens = n
            for i in range(n):
                batch.token[i] = int(tokens[i])
                batch.pos[i] = int(positions[i])
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = int(seq_ids[i])
                batch.logits[i] = True
            self._decode(batch)
            rows = [np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, i),
                                          shape=(self.n_vocab,)) for i in range(n)]
            return np.stack(rows).astype(np.float32, copy=True)
        finally:
            llama_cpp.llama_batch_free(batch)

    # --- internals --------------------------------------------------------------------------------
    def _check_token(self, token_id: int) -> None:
        if not 0 <= token_id < self.n_vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})")

    def _check_seq(self, seq_id: int) -> None:
        if not 0 <= seq_id < self.n_seq_max:
            raise ValueError(f"sequence id {seq_id} is outside 0..{self.n_seq_max - 1}")

    def _decode(self, batch) -> None:
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc == 1:
            raise ContextOverflowError(f"no room left in the {self.n_ctx}-token LLM context")
        if rc != 0:
            raise ModelError(f"llama.cpp failed to decode (code {rc})")

    def _prepare(self, start_pos: int | None, n: int) -> int:
        start = self._n_past if start_pos is None else int(start_pos)
        if not 0 <= start <= self._n_past:
            raise ValueError(f"start_pos {start} leaves a gap: only {self._n_past} positions are cached")
        if start + n > self.n_ctx:
            raise ContextOverflowError(f"the LLM context holds {self.n_ctx} tokens, "
                                       f"but {start + n} are needed")
        if start < self._n_past:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self._ctx), SEQ_ID, start, -1)
            self._n_past = start
        return start

    def _run(self, batch, n: int, start: int) -> np.ndarray:
        batch.n_tokens = n
        for i in range(n):
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = SEQ_ID
            batch.logits[i] = i == n - 1
        self._decode(batch)
        self._n_past = start + n
        logits = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()


class BeamSequences:
    """Keeps each live beam's KV cache in its own llama.cpp sequence while beams split and die.

    The prompt is decoded once on sequence 0, which keeps it: a next question about the same audio
    continues from there (`release` frees the beams' own cells). Two banks of `num_beams` sequence
    ids after it are used in turn: each step copies every new beam's parent into the idle bank
    (cells are shared, so this costs no compute), drops the old bank, and decodes one token per new
    beam in a single batch. Needs `llm.n_seq_max >= 2 * num_beams + 1`.
    """

    def __init__(self, llm: LlamaModel, num_beams: int, next_pos: int):
        if llm.n_seq_max < sequences_for_beams(num_beams):
            raise ValueError(f"{num_beams} beams need a context with n_seq_max >= {sequences_for_beams(num_beams)}")
        self.llm = llm
        self.num_beams = num_beams
        self.next_pos = next_pos            # where the beams' next tokens go
        self.live = [SEQ_ID]                # sequence id of each live beam
        self.bank = 0                       # bank of `live`; bank b holds ids 1+b*N .. b*N+N

    def advance(self, parents: list[int], tokens: list[int]) -> np.ndarray:
        """New beam i = live beam `parents[i]` + `tokens[i]`; returns (len(tokens), n_vocab) logits."""
        if not tokens or len(parents) != len(tokens) or len(tokens) > self.num_beams:
            raise ValueError(f"need 1..{self.num_beams} (parent, token) pairs")
        self.bank = 1 - self.bank
        new = [1 + self.bank * self.num_beams + i for i in range(len(tokens))]
        for seq_id, parent in zip(new, parents):
            self.llm.copy_sequence(self.live[parent], seq_id)
        self.release()
        self.live = new
        logits = self.llm.decode_batch(tokens, new, [self.next_pos] * len(tokens))
        self.next_pos += 1
        return logits

    def release(self) -> None:
        """Drop the live beams; sequence 0 keeps the prompt."""
        for seq_id in self.live:
            if seq_id != SEQ_ID:
                self.llm.remove_sequence(seq_id)
        self.live = [SEQ_ID]


def sequences_for_beams(num_beams: int) -> int:
    """llama.cpp sequences a context needs for beam search: the prompt's, and two banks of beams."""
    return 2 * num_beams + 1 if num_beams > 1 else 1
