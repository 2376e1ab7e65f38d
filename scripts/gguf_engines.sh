#!/usr/bin/env bash
# Checks that GGUF files exported by tern run in the real engines exactly like the files the
# engines' own converters made: same greedy token ids for the same prompt ids, and the logits
# beside them. Not run in CI (it builds C++ code bases: ~20-40 min on 2 cores). docs/gguf.md §9.
#
# usage: scripts/gguf_engines.sh WORK_DIR
#   WORK_DIR   scratch folder: exported files, greedy runs (JSON), logs; the mainline build when
#              LLAMA_CPP is not given.
# inputs (environment):
#   VECTORS    test-vector folder: a checkpoint (bf16/ masters or packed/) and the engines' files
#              made from it: bitnet-i2_s.gguf, mainline-tq2_0-f16emb.gguf, mainline-tq1_0-f16emb.gguf.
#              Default: fixtures/gguf (packed/ only).
#   RECORDED   the engines' recorded prompts (text and ids) and outputs for those files.
#              Default: fixtures/gguf/engines_greedy.json.
#   SOURCE     which checkpoint of VECTORS tern exports: bf16 (the masters the engines' files
#              were made from; default when present) or packed.
#   LLAMA_CPP  mainline llama.cpp source tree (0c1e570, e.g. the llama-cpp-python 0.3.36 sdist's
#              vendor/llama.cpp), built in LLAMA_CPP/build if its tools are missing. Default:
#              downloaded with pip into WORK_DIR and built there.
#   BITNET     bitnet.cpp source tree with 3rdparty/llama.cpp filled in (docs/gguf.md §9 says how
#              to assemble it), built in BITNET/build-i2s if missing. Unset: bitnet.cpp skipped.
#   TERN       tern binary. Default: this repo's, built with cargo --release.
# needs: cmake, gcc/g++ (mainline), clang-19 (bitnet.cpp), python3, pip (without LLAMA_CPP).
# Exit status 0 when every engine gives the same ids from tern's file as from its own.
set -euo pipefail
WORK=$(realpath -m "${1:?usage: $0 WORK_DIR   (inputs in env: VECTORS SOURCE LLAMA_CPP BITNET TERN)}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
VECTORS=$(realpath "${VECTORS:-$REPO/fixtures/gguf}")
RECORDED=$(realpath "${RECORDED:-$REPO/fixtures/gguf/engines_greedy.json}")
if [ -z "${SOURCE:-}" ]; then
    if [ -d "$VECTORS/bf16" ]; then SOURCE=bf16; else SOURCE=packed; fi
fi
mkdir -p "$WORK/out" "$WORK/runs"
if [ -z "${TERN:-}" ]; then
    (cd "$REPO" && cargo build --release --quiet)
    TERN="$REPO/target/release/tern"
fi
N_NEW=16

# 1. tern's files, from the checkpoint the engines' files were made from.
for ty in i2_s tq2_0 tq1_0; do
    "$TERN" export "$VECTORS/$SOURCE" -o "$WORK/out/tern-$ty.gguf" --type "$ty" --force --quiet
done

# 2. Mainline llama.cpp (TQ2_0, TQ1_0).
if [ -z "${LLAMA_CPP:-}" ]; then
    LLAMA_CPP="$WORK/llama.cpp"
    if [ ! -d "$LLAMA_CPP" ]; then
        pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d "$WORK"
        tar -xzf "$WORK"/llama_cpp_python-0.3.36.tar.gz -C "$WORK"
        mv "$WORK/llama_cpp_python-0.3.36/vendor/llama.cpp" "$LLAMA_CPP"
    fi
fi
if [ ! -x "$LLAMA_CPP/build/bin/llama-completion" ]; then
    cmake -S "$LLAMA_CPP" -B "$LLAMA_CPP/build" -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_BUILD_SERVER=OFF
    cmake --build "$LLAMA_CPP/build" -j2 --target llama-completion
fi
ML="$LLAMA_CPP/build/bin"
g++ -O2 -std=c++17 -I"$LLAMA_CPP/include" -I"$LLAMA_CPP/ggml/include" \
    "$REPO/scripts/gguf_greedy_ids.cpp" -o "$WORK/greedy_ids_mainline" \
    -L"$ML" -lllama -lggml -lggml-base -Wl,-rpath,"$ML"

# 3. bitnet.cpp (I2_S), its x86 build (the layout tern writes by default).
if [ -n "${BITNET:-}" ]; then
    BITNET=$(realpath "$BITNET")
    if [ ! -x "$BITNET/build-i2s/bin/llama-cli" ]; then
        (cd "$BITNET" && python3 utils/codegen_tl2.py --model bitnet_b1_58-3B \
            --BM 160,320,320 --BK 96,96,96 --bm 32,32,32)
        cmake -S "$BITNET" -B "$BITNET/build-i2s" -DBITNET_X86_TL2=OFF -DCMAKE_C_COMPILER=clang-19 \
            -DCMAKE_CXX_COMPILER=clang++-19 -DCMAKE_BUILD_TYPE=Release
        cmake --build "$BITNET/build-i2s" -j2 --target llama-cli
    fi
    F="$BITNET/3rdparty/llama.cpp"
    FB="$BITNET/build-i2s/3rdparty/llama.cpp"
    clang++-19 -O2 -std=c++17 -DFORK_API -I"$F/include" -I"$F/ggml/include" \
        "$REPO/scripts/gguf_greedy_ids.cpp" -o "$WORK/greedy_ids_bitnet" \
        -L"$FB/src" -L"$FB/ggml/src" -lllama -lggml -Wl,-rpath,"$FB/src:$FB/ggml/src"
fi

# 4. Greedy runs: the engine's own file and tern's, the recorded prompt ids, 1 thread.
prompt_ids() { # recorded-key prompt-index
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1]))[sys.argv[2]]["prompts"][int(sys.argv[3])]
print(",".join(map(str, d["prompt_ids"])))' "$RECORDED" "$1" "$2"
}
fail=0
check() { # label tool recorded-key engine-file tern-file
    local label=$1 tool=$2 key=$3 theirs=$4 ours=$5
    for i in 0 1; do
        ids=$(prompt_ids "$key" "$i")
        "$tool" "$theirs" "$N_NEW" "$ids" > "$WORK/runs/$key.p$i.engine.json" 2> "$WORK/runs/$key.p$i.engine.log"
        "$tool" "$ours" "$N_NEW" "$ids" > "$WORK/runs/$key.p$i.tern.json" 2> "$WORK/runs/$key.p$i.tern.log"
        python3 - "$label" "$i" "$RECORDED" "$key" \
            "$WORK/runs/$key.p$i.engine.json" "$WORK/runs/$key.p$i.tern.json" <<'EOF' || fail=1
import json, sys
label, i, recorded, key, theirs, ours = sys.argv[1:]
rec = json.load(open(recorded))[key]["prompts"][int(i)]
a, b = json.load(open(theirs)), json.load(open(ours))
same = a["greedy_ids"] == b["greedy_ids"]
d0 = max(abs(x - y) for x, y in zip(a["step0_logits"], b["step0_logits"]))
top = max(abs(x[1] - y[1]) for s, t in zip(a["top5_per_step"], b["top5_per_step"]) for x, y in zip(s, t))
moved = sum([x[0] for x in s] != [y[0] for y in t] for s, t in zip(a["top5_per_step"], b["top5_per_step"]))
print(f"{'SAME  ' if same else 'DIFFER'} {label} prompt {i}: engine's file {a['greedy_ids']}")
print(f"       tern's file {b['greedy_ids']}; recorded {rec['greedy_ids']}"
      f"{' (this build reproduces it)' if a['greedy_ids'] == rec['greedy_ids'] else ' (THIS BUILD DIFFERS)'}")
print(f"       logits, tern's vs engine's file: step-0 max |diff| {d0:.3g} over the vocabulary;"
      f" top-5 ids in a different order at {moved} of {len(a['top5_per_step'])} steps,"
      f" top-5 logits max |diff| {top:.3g}")
sys.exit(0 if same else 1)
EOF
    done
}
check "llama.cpp TQ2_0" "$WORK/greedy_ids_mainline" mainline-tq2_0-f16emb \
    "$VECTORS/mainline-tq2_0-f16emb.gguf" "$WORK/out/tern-tq2_0.gguf"
check "llama.cpp TQ1_0" "$WORK/greedy_ids_mainline" mainline-tq1_0-f16emb \
    "$VECTORS/mainline-tq1_0-f16emb.gguf" "$WORK/out/tern-tq1_0.gguf"
if [ -n "${BITNET:-}" ]; then
    check "bitnet.cpp I2_S" "$WORK/greedy_ids_bitnet" bitnet-i2_s \
        "$VECTORS/bitnet-i2_s.gguf" "$WORK/out/tern-i2_s.gguf"
else
    echo "SKIPPED bitnet.cpp (BITNET not set)"
fi

# 5. The engines' CLIs on text: each file's tokenizer metadata must give the same prompt tokens
# (--verbose-prompt) as the engine's own file. The generated text is shown, not judged: the ids
# above are the check, and mainline's CLI prints through an asynchronous log that now and then
# loses the end of its output.
cli() { # bin model prompt extra...  -> the prompt's tokens, one per line, then a line of text
    local bin=$1 model=$2 prompt=$3 err out; shift 3
    err=$(mktemp)
    out=$("$bin" -m "$model" -p "$prompt" -n "$N_NEW" --temp 0 --seed 0 -t 1 -tb 1 -c 256 \
        --ignore-eos --verbose-prompt "$@" 2> "$err") || echo "exit status $?"
    grep -oE "[0-9]+ -> '.*'$" "$err" || true
    printf '%s\n' "$out" | tr '\n' ' '
    rm -f "$err"
}
text() { # label bin key theirs ours extra...
    local label=$1 bin=$2 key=$3 theirs=$4 ours=$5; shift 5
    for i in 0 1; do
        p=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]["prompts"][int(sys.argv[3])]["text"])' \
            "$RECORDED" "$key" "$i")
        a=$(cli "$bin" "$theirs" "$p" "$@")
        b=$(cli "$bin" "$ours" "$p" "$@")
        ta=$(printf '%s\n' "$a" | grep -E "^[0-9]+ -> '" || true)
        tb=$(printf '%s\n' "$b" | grep -E "^[0-9]+ -> '" || true)
        if [ -n "$ta" ] && [ "$ta" == "$tb" ]; then
            echo "SAME   $label prompt $i tokenized from the file: $(echo "$ta" | cut -d' ' -f1 | tr '\n' ' ')"
        else echo "DIFFER $label prompt $i tokenized from the file"; diff <(echo "$ta") <(echo "$tb") || true; fail=1; fi
        echo "       text, engine's file: $(printf '%s\n' "$a" | tail -n 1)"
        echo "       text, tern's file:   $(printf '%s\n' "$b" | tail -n 1)"
    done
}
text "llama.cpp TQ2_0" "$ML/llama-completion" mainline-tq2_0-f16emb \
    "$VECTORS/mainline-tq2_0-f16emb.gguf" "$WORK/out/tern-tq2_0.gguf" -no-cnv
if [ -n "${BITNET:-}" ]; then
    text "bitnet.cpp I2_S" "$BITNET/build-i2s/bin/llama-cli" bitnet-i2_s \
        "$VECTORS/bitnet-i2_s.gguf" "$WORK/out/tern-i2_s.gguf"
fi
exit $fail
