#!/usr/bin/env bash
# The accelerator checks and benchmark of issue 28, on a machine with a CUDA GPU, in under 8 minutes:
#   1. the GPU tests (`pytest -m gpu tests/network/test_gpu.py`): splits on the GPU equal the unsplit model there
#      (fp32, bf16, fp16), a bf16 trunk served on the GPU over TLS, batched steps, SLIP's ring products on the GPU
#      equal the CPU's bit for bit;
#   2. `splitveil bench gpu` on the 1B-shaped dummy Llama in bf16 (weights generated there, about a minute): batch-1
#      decode against transformers' generate, trunk steps at 1/16/64 sessions, prefill, SLIP masked products
#      against the plain bf16 product, KV memory per session. JSON + PNG.
# Prepare on a machine with network first: bash benchmarks/device/prepare.sh, then carry `.device`. Results go to
# $OUT (the device tool's folder) or, without it, to benchmarks/results. SPLITVEIL_DEVICE=cpu runs the same steps
# on the CPU with tiny sizes (to check the script itself).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-benchmarks/results}
mkdir -p "$out"
device=${SPLITVEIL_DEVICE:-cuda}
PY=${PYTHON:-python3}
if [[ -d .device/whl ]] && ls .device/whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/splitveil-site \
    .device/whl/*.whl || { echo "run.sh: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="$PWD/src:/tmp/splitveil-site${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
[[ -d .device/cache ]] && export SPLITVEIL_CACHE="$PWD/.device/cache"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
$PY - <<'PYEOF' | tee "$out/device_env.txt"
import torch, transformers, sys
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda available: {torch.cuda.is_available()}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
PYEOF
status=0
if [[ $device == cpu ]]; then
  $PY -m pytest -q -p no:cacheprovider -m gpu tests/network/test_gpu.py 2>&1 | tail -3 | tee "$out/gpu_tests.txt"
  $PY -m splitveil.cli.main bench gpu --device cpu --model llama-tiny --split 1,2 --sessions 1,4 --decode-tokens 4 \
    --prompt-tokens 8 --context 8 --steps 2 --repeats 1 --out "$out" --allow-dirty || status=1
else
  timeout 240 $PY -m pytest -q -p no:cacheprovider -m gpu tests/network/test_gpu.py 2>&1 | tail -25 | tee "$out/gpu_tests.txt"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
  timeout 330 $PY -m splitveil.cli.main bench gpu --device "$device" --model llama-1b --load-format dummy \
    --dtype bfloat16 --split 2,14 --out "$out" --allow-dirty 2>&1 | tee "$out/bench_gpu.txt"
  [[ ${PIPESTATUS[0]} -eq 0 ]] || status=1
fi
exit $status
