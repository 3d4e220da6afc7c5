#!/usr/bin/env bash
# Prepares, on this machine, what benchmarks/device/run.sh needs on a GPU machine that cannot reach the internet:
#   .device/whl/    cp312 wheels of our pinned packages that the GPU image lacks (websockets, cryptography, cffi,
#                   pycparser) or holds in another version (transformers, tokenizers: our cache and attention code
#                   follows the pinned ones);
#   .device/cache/  a splitveil cache holding SmolLM2's config and tokenizer only (no weights, a few MB): the dummy
#                   shapes borrow its tokenizer, and run.sh generates llama-1b's random weights there.
# Both are ignored by git; pass `.device` in the device tool's carry list. Run from the repository root after
# `make setup` (needs .venv and network access for pip).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
[[ -x $PY ]] || { echo "prepare.sh: no .venv here: run 'make setup' first" >&2; exit 2; }
rm -rf .device && mkdir -p .device/whl .device/cache/models/smollm2-135m
pins=()
for name in websockets cryptography cffi pycparser transformers tokenizers; do
  pin=$(grep -i "^${name}==" constraints.txt) || { echo "prepare.sh: constraints.txt pins no $name" >&2; exit 2; }
  pins+=("$pin")
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_34_x86_64 -d .device/whl "${pins[@]}"
model_dir=$(HF_HUB_OFFLINE=1 $PY -c "from splitveil.models.loading import resolve_model_dir; print(resolve_model_dir('smollm2-135m'))")
for file in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json \
            chat_template.jinja; do
  [[ -f $model_dir/$file ]] && cp "$model_dir/$file" .device/cache/models/smollm2-135m/
done
echo "prepare.sh: .device holds $(ls .device/whl | wc -l) wheels and SmolLM2's tokenizer ($(du -sh .device | cut -f1));" \
     "run on a GPU machine: bash benchmarks/device/run.sh (carry .device)"
