#!/usr/bin/env bash
# Checks that GGUF files exported by tern run in the real engines exactly like the files the
# engines' own converters made (fixtures/gguf): same greedy tokens for the same prompts.
# Not run in CI (it builds two C++ code bases: ~20 min on 2 cores). See docs/gguf.md.
#
# usage: scripts/gguf_engines.sh WORK_DIR [BITNET_SRC]
#   WORK_DIR    scratch folder (sources, builds, exported files, logs)
#   BITNET_SRC  a bitnet.cpp source tree with its 3rdparty/llama.cpp filled in (microsoft/BitNet
#               01eb415 + the vendored fork; docs/gguf.md "Engines" says how to assemble it).
#               Without it only mainline llama.cpp (TQ2_0, TQ1_0) is checked.
# needs: cmake, gcc/g++ (mainline), clang-19 (bitnet.cpp), pip (the llama-cpp-python sdist).
set -euo pipefail
WORK=$(realpath -m "${1:?usage: $0 WORK_DIR [BITNET_SRC]}")
BITNET_SRC=${2:-}
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK/out"
cd "$REPO"
cargo build --release --quiet
TERN="$REPO/target/release/tern"
FIX="$REPO/fixtures/gguf"
PROMPTS=("The quick brown fox jumps over the lazy dog." "In Python, a list is a")

# 1. tern's files, from the checkpoint the engines' files were made from.
for ty in i2_s tq2_0 tq1_0; do
    "$TERN" export "$FIX/packed" -o "$WORK/out/tern-$ty.gguf" --type "$ty" --force --quiet
done

# 2. Mainline llama.cpp from the llama-cpp-python sdist (vendor/llama.cpp = ggml-org 0c1e57098).
MAIN="$WORK/llama.cpp"
if [ ! -x "$MAIN/build/bin/llama-completion" ]; then
    pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$WORK"
    tar -xzf "$WORK"/llama_cpp_python-0.3.36.tar.gz -C "$WORK"
    rm -rf "$MAIN" && mv "$WORK/llama_cpp_python-0.3.36/vendor/llama.cpp" "$MAIN"
    cmake -S "$MAIN" -B "$MAIN/build" -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build "$MAIN/build" -j2 --target llama-completion
fi

# Greedy text of a model for a prompt (the engines print the prompt, then 16 tokens).
greedy() { # bin model prompt extra...
    local bin=$1 model=$2 prompt=$3; shift 3
    "$bin" -m "$model" -p "$prompt" -n 16 --temp 0 --seed 0 -t 1 -tb 1 -c 256 --ignore-eos "$@" 2>/dev/null
}
fail=0
check() { # label bin theirs ours extra...
    local label=$1 bin=$2 theirs=$3 ours=$4; shift 4
    for p in "${PROMPTS[@]}"; do
        a=$(greedy "$bin" "$theirs" "$p" "$@")
        b=$(greedy "$bin" "$ours" "$p" "$@")
        if [ "$a" == "$b" ]; then echo "SAME   $label: $p -> ${a#"$p"}"
        else echo "DIFFER $label: $p"; echo "  engine's file: $a"; echo "  tern's file:   $b"; fail=1; fi
    done
}
check "llama.cpp TQ2_0" "$MAIN/build/bin/llama-completion" "$FIX/mainline-tq2_0-f16emb.gguf" "$WORK/out/tern-tq2_0.gguf" -no-cnv
check "llama.cpp TQ1_0" "$MAIN/build/bin/llama-completion" "$FIX/mainline-tq1_0-f16emb.gguf" "$WORK/out/tern-tq1_0.gguf" -no-cnv

# 3. bitnet.cpp (I2_S), x86 build: the recipe of docs/gguf.md.
if [ -n "$BITNET_SRC" ]; then
    B="$WORK/BitNet"
    if [ ! -x "$B/build-i2s/bin/llama-cli" ]; then
        rm -rf "$B" && cp -r "$BITNET_SRC" "$B"
        (cd "$B" && python3 utils/codegen_tl2.py --model bitnet_b1_58-3B --BM 160,320,320 --BK 96,96,96 --bm 32,32,32)
        cmake -S "$B" -B "$B/build-i2s" -DBITNET_X86_TL2=OFF -DCMAKE_C_COMPILER=clang-19 \
            -DCMAKE_CXX_COMPILER=clang++-19 -DCMAKE_BUILD_TYPE=Release
        cmake --build "$B/build-i2s" -j2 --target llama-cli
    fi
    check "bitnet.cpp I2_S" "$B/build-i2s/bin/llama-cli" "$FIX/bitnet-i2_s.gguf" "$WORK/out/tern-i2_s.gguf"
else
    echo "SKIPPED bitnet.cpp (no BITNET_SRC given)"
fi
exit $fail
