#!/usr/bin/env bash
# Seeds the fuzz corpora (fuzz/corpus/, not committed) with valid inputs made from the
# fixtures: .tern files in each layout, the fixtures' safetensors files, and each fixture's
# config.json + 0xff + tokenizer.json. Needs a built `tern` (cargo build).
set -euo pipefail
cd "$(dirname "$0")/.."
tern=${TERN:-target/debug/tern}
corpus=fuzz/corpus
mkdir -p "$corpus"/{parse,safetensors_header,convert_config}

"$tern" convert fixtures/models/bitnet-2b4t-h64 -o "$corpus/parse/h64-tq2.tern" -q --force
"$tern" convert fixtures/models/bitnet-2b4t-h64 -o "$corpus/parse/h64-tq1-q8.tern" -q --force \
    --layout tq1 --head q8
"$tern" convert fixtures/models/llama-bitlinear -o "$corpus/parse/llama.tern" -q --force
# parse_checksummed starts from the same files.
rm -rf "$corpus/parse_checksummed"
cp -r "$corpus/parse" "$corpus/parse_checksummed"

for st in fixtures/models/*/model*.safetensors; do
    name=$(basename "$(dirname "$st")")-$(basename "$st")
    cp "$st" "$corpus/safetensors_header/$name"
done

for dir in fixtures/models/*/; do
    name=$(basename "$dir")
    { cat "$dir/config.json"; printf '\xff'; cat "$dir/tokenizer.json"; } \
        > "$corpus/convert_config/$name"
done
echo "seeded $(find "$corpus" -type f | wc -l) files under $corpus"
