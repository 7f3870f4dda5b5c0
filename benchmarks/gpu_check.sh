#!/usr/bin/env bash
# The GPU check of issue 20 on a bare CUDA machine without network (one NVIDIA GPU, nvcc, cmake and a
# Python with torch, onnx and transformers, as the lent H200 machines have): it installs what it needs
# from a kit made here, builds llama-cpp-python with CUDA there (`make llama-cuda`, one architecture),
# builds random-weight real-shape models with the project's own tools, runs benchmarks/gpu_bench.py and
# leaves a Markdown section for BENCHMARKS.md.
#
#   benchmarks/gpu_check.sh kit KIT              # here, with network: fill KIT (wheels, sources, fixtures,
#                                                # the official-tiny f32 export) and split its big part
#   benchmarks/gpu_check.sh prepare KIT          # there: install, then build llama.cpp and the models in
#                                                # the background (setsid: they outlive the command)
#   benchmarks/gpu_check.sh add PART...          # there: parts of the kit's blob, when it travels in parts
#   benchmarks/gpu_check.sh run OUT [ARGS...]    # there: unpack the blob, wait for the background jobs,
#                                                # measure; OUT gets section.md, section.json and the logs
#   benchmarks/gpu_check.sh all KIT OUT          # prepare, add KIT/blob.part*, run
#
# Every step keeps going past a failure of another (it is written into the section), and the section is
# rewritten after each measurement, so a run cut short still leaves what it measured.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$HERE")"
STATE=${GPU_CHECK_STATE:-/tmp/gpu-check}
SITE=$STATE/site
ARCH=${CUDA_ARCHITECTURES:-90-real}
PY=${PYTHON:-python3}
PART_MIB=${PART_MIB:-50}
ORT_VERSION=1.31.1
LLAMA_VERSION=0.3.36
export PATH="$PATH:/usr/local/cuda/bin"

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" >&2; }

kit() {   # on a machine with network and the project's .venv
    local kit=$1 shared=${SALMONN_SHARED:-$REPO/../shared} py=$REPO/.venv/bin/python
    local tiny=$shared/fixtures/official-tiny
    mkdir -p "$kit/wheels" "$kit/shared/fixtures/official-tiny/vicuna" "$kit/build"
    # the Python packages the runtime and the export need that the GPU machine lacks (cp312)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        -d "$kit/build" "onnxruntime-gpu==$ORT_VERSION" diskcache==5.6.3 soundfile cffi soxr gguf==0.19.0
    mv "$kit"/build/{diskcache,soundfile,cffi,soxr,gguf}-*.whl "$kit/wheels/"
    # llama-cpp-python's source without what its build does not read (models, docs, tests, tools)
    if [ ! -f "$kit/llsrc.tar.xz" ]; then
        "$py" -m pip download -q --no-deps --no-binary=:all: -d "$kit/build" "llama-cpp-python==$LLAMA_VERSION"
        tar xzf "$kit/build/llama_cpp_python-$LLAMA_VERSION.tar.gz" -C "$kit/build"
        local src=$kit/build/llama_cpp_python-$LLAMA_VERSION
        rm -rf "$src"/.git "$src"/examples "$src"/docker \
            "$src"/vendor/llama.cpp/{models,docs,tests,benches,examples,tools,conversion,pocs,app,.github}
        mv "$src" "$kit/build/llsrc" && tar cJf "$kit/llsrc.tar.xz" -C "$kit/build" llsrc
    fi
    # the fixture files the check reads (reference tokens, clips, the tokenizer) and the 30 s clip's sources
    cp "$tiny"/reference.json "$tiny"/speech_2p5s.wav "$tiny"/long_40s.wav "$tiny"/short_0p4s.wav \
        "$kit/shared/fixtures/official-tiny/"
    (cd "$tiny/vicuna" && cp $(ls | grep -v safetensors) "$kit/shared/fixtures/official-tiny/vicuna/")
    cp -r "$shared/fixtures/audio" "$kit/shared/fixtures/"
    # the blob, two gzip members of one tar stream each: onnxruntime-gpu unpacked (without the C API
    # library and TensorRT, which the Python package does not load) and the official-tiny fixture
    # exported as f32
    if [ ! -f "$kit/blob.tar.gz" ]; then
        mkdir -p "$kit/build/ort"
        (cd "$kit/build/ort" && unzip -q -o "$kit"/build/onnxruntime_gpu-*.whl \
            && rm -f onnxruntime/capi/libonnxruntime.so.* onnxruntime/capi/libonnxruntime_providers_tensorrt.so)
        [ -f "$kit/build/tiny-f32/salmonn.json" ] || "$REPO/.venv/bin/salmonn" export \
            --official-ckpt "$tiny/salmonn_tiny.pth" --whisper "$tiny/whisper" --beats "$tiny/beats.pt" \
            --llm "$tiny/vicuna" --quant f32 --out "$kit/build/tiny-f32"
        (cd "$kit/build/ort" && tar cf - .) | gzip -1 > "$kit/blob.tar.gz.tmp"
        tar cf - -C "$kit/build" tiny-f32 | gzip -1 >> "$kit/blob.tar.gz.tmp"
        mv "$kit/blob.tar.gz.tmp" "$kit/blob.tar.gz"
    fi
    rm -f "$kit"/blob.part*
    split -b "${PART_MIB}M" -d "$kit/blob.tar.gz" "$kit/blob.part"
    ls -la "$kit" "$kit"/wheels
}

prepare() {
    local kit=$1
    mkdir -p "$STATE/log" "$SITE" "$STATE/parts"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$kit"/wheels/*.whl \
        || say "wheel install failed"
    cp -r "$kit/shared" "$STATE/shared"
    tar xJf "$kit/llsrc.tar.xz" -C "$STATE"
    # a copy of the repository: the background jobs must not see later calls' copies
    rm -rf "$STATE/repo" && mkdir -p "$STATE/repo" \
        && (cd "$REPO" && tar cf - --exclude=./.gpu --exclude=./.venv --exclude=./.git .) | tar xf - -C "$STATE/repo"
    say "building llama-cpp-python with CUDA ($ARCH) and the models, in the background"
    setsid nohup bash -c "cd '$STATE/repo' && time make llama-cuda PY='$PY' CUDA_ARCHITECTURES='$ARCH' \
        LLAMA_CPP_SOURCE='$STATE/llsrc' LLAMA_PIP_FLAGS='--no-build-isolation --target $STATE/llama' \
        > '$STATE/log/build.log' 2>&1; echo \$? > '$STATE/build.rc'" > /dev/null 2>&1 < /dev/null &
    setsid nohup bash -c "cd '$STATE/repo' && export PYTHONPATH='$SITE:$STATE/repo' SALMONN_SHARED='$STATE/shared' \
        && time '$PY' benchmarks/gpu_bench.py prepare --work '$STATE/work' > '$STATE/log/prepare.log' 2>&1; \
        echo \$? > '$STATE/prepare.rc'" > /dev/null 2>&1 < /dev/null &
}

add() {
    mkdir -p "$STATE/parts"
    for part in "$@"; do cp "$part" "$STATE/parts/"; done
    ls "$STATE/parts" | tr '\n' ' ' >&2; echo >&2
}

wait_for() {   # wait_for NAME SECONDS: until $STATE/NAME.rc exists
    local name=$1 limit=$2 waited=0
    while [ ! -f "$STATE/$name.rc" ] && [ "$waited" -lt "$limit" ]; do sleep 2; waited=$((waited + 2)); done
    if [ -f "$STATE/$name.rc" ]; then say "$name finished with exit code $(cat "$STATE/$name.rc") (waited ${waited} s)"
    else say "$name still running after ${limit} s"; fi
}

run() {
    local out=$1; shift
    mkdir -p "$out"
    {
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm --format=csv || true
        nvcc --version | tail -2 || true
        "$PY" -c 'import torch, onnx, transformers; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "onnx", onnx.__version__, "transformers", transformers.__version__)' || true
    } > "$out/probe.txt" 2>&1
    if [ ! -f "$STATE/blob/tiny-f32/salmonn.json" ]; then
        mkdir -p "$STATE/blob" && cat "$STATE"/parts/* | tar xzif - -C "$STATE/blob" || say "blob incomplete"
    fi
    # onnxruntime-gpu beside the NVIDIA wheels of this Python (preload_dlls looks for nvidia/ next to it)
    cp -r "$STATE"/blob/onnxruntime "$STATE"/blob/onnxruntime_gpu-*.dist-info "$SITE/" 2>/dev/null
    local nvidia
    nvidia=$("$PY" -c 'import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]) + "/nvidia")' 2>/dev/null)
    [ -n "$nvidia" ] && [ ! -e "$SITE/nvidia" ] && ln -s "$nvidia" "$SITE/nvidia"
    wait_for build "${BUILD_WAIT_S:-420}"
    tail -5 "$STATE/log/build.log" >&2
    wait_for prepare "${PREPARE_WAIT_S:-300}"
    tail -5 "$STATE/log/prepare.log" >&2
    (cd "$STATE/repo" && PYTHONPATH="$STATE/llama:$SITE:$STATE/repo" SALMONN_SHARED="$STATE/shared" PYTHONUNBUFFERED=1 \
        "$PY" -X faulthandler benchmarks/gpu_bench.py run --work "$STATE/work" --out "$out/section.md" \
        --tiny-model "$STATE/blob/tiny-f32" --fixture "$STATE/shared/fixtures/official-tiny" "$@") \
        > "$out/run.log" 2>&1
    say "gpu_bench.py exited with code $? (139: a crash; run.log has its stack)"
    grep -v '^\[gpu\]' "$out/run.log" >&2
    cp "$STATE"/log/*.log "$out/" 2>/dev/null
    true
}

case "${1:-}" in
    kit) kit "$2" ;;
    prepare) prepare "$2" ;;
    add) shift; add "$@" ;;
    run) shift; run "$@" ;;
    all) prepare "$2"; add "$2"/blob.part*; run "$3" ;;
    *) echo "usage: $0 kit KIT | prepare KIT | add PART... | run OUT [gpu_bench run options] | all KIT OUT" >&2; exit 2 ;;
esac
