"""The LLM through llama.cpp's low-level API: feed embeddings or tokens, get last-position logits.

Torch-free (numpy + llama_cpp only). Decoding strategies (greedy, sampling) live in
`salmonn_cli.decoding` and work on the logits returned here.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import llama_cpp
import numpy as np

from salmonn_cli.errors import ModelError, SalmonnError

MAX_UBATCH = 512            # physical batch; the logical batch (n_batch) is the whole context
PIECE_BUFFER_BYTES = 64
SEQ_ID = 0                  # one sequence per context


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


def _init_backend() -> None:
    global _backend_ready
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


# --- model + context -----------------------------------------------------------------------------

class LlamaModel:
    """One GGUF model with one context (one sequence) and a position counter.

    `exact=True` disables flash attention and keeps the KV cache in f32; with an f32 GGUF this
    reproduces the official PyTorch logits to ~1e-5 (see parity notes). Otherwise llama.cpp's
    defaults apply (flash attention auto, f16 KV cache): faster, ~1e-2 logit error.
    `seed` is kept for the sampler built on top; the context itself draws no random numbers.
    """

    def __init__(self, path: str | Path, *, n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
                 exact: bool = False, seed: int | None = None, verbose: bool = False):
        self._model = None
        self._ctx = None
        self.seed = seed
        self.exact = exact
        if n_ctx < 1 or n_threads < 1:
            raise ValueError("n_ctx and n_threads must be positive")
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"LLM file not found: {path}")
        set_llama_logging(verbose)
        _init_backend()

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        # Weight repacking into extra buffer types (AMX) crashes or corrupts quantized models on
        # some CPUs; the plain CPU buffers are safe everywhere.
        mparams.use_extra_bufts = False
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ModelError(f"cannot load the LLM {path}: not a valid GGUF model (truncated or corrupt?)")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx                   # a whole prompt goes in one llama_decode
        cparams.n_ubatch = min(n_ctx, MAX_UBATCH)
        cparams.n_seq_max = 1
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        if exact:
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
            cparams.type_k = llama_cpp.GGML_TYPE_F32
            cparams.type_v = llama_cpp.GGML_TYPE_F32
        self._ctx = llama_cpp.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            self.close()
            raise ModelError(f"llama.cpp could not create a {n_ctx}-token context for {path} "
                             "(out of memory?)")
        self._n_ctx = min(n_ctx, llama_cpp.llama_n_ctx(self._ctx))
        self._n_embd = llama_cpp.llama_model_n_embd(self._model)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._n_past = 0

    # --- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
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

    # --- facts ------------------------------------------------------------------------------------
    @property
    def n_embd(self) -> int:
        return self._n_embd

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

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
    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; special-token text such as "</s>" is not parsed as a special token."""
        data = text.encode("utf-8")
        capacity = len(data) + 2
        for _ in range(2):
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_bos, False)
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
        if embeds.ndim != 2 or embeds.shape[1] != self._n_embd or embeds.shape[0] == 0:
            raise ValueError(f"embeddings must have shape (n > 0, {self._n_embd}), not {embeds.shape}")
        n = embeds.shape[0]
        start = self._prepare(start_pos, n)
        batch = llama_cpp.llama_batch_init(n, self._n_embd, 1)
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

    # --- internals --------------------------------------------------------------------------------
    def _check_token(self, token_id: int) -> None:
        if not 0 <= token_id < self._n_vocab:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self._n_vocab - 1})")

    def _prepare(self, start_pos: int | None, n: int) -> int:
        start = self._n_past if start_pos is None else int(start_pos)
        if not 0 <= start <= self._n_past:
            raise ValueError(f"start_pos {start} leaves a gap: only {self._n_past} positions are cached")
        if start + n > self._n_ctx:
            raise ContextOverflowError(f"the LLM context holds {self._n_ctx} tokens, "
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
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc == 1:
            raise ContextOverflowError(f"no room left in the {self._n_ctx}-token LLM context")
        if rc != 0:
            raise ModelError(f"llama.cpp failed to decode (code {rc})")
        self._n_past = start + n
        logits = llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(logits, shape=(self._n_vocab,)).copy()
