#!/usr/bin/env bash
# A dummy-weight model's trunk served by `splitveil serve` (bf16, TLS, its own process) and a few tokens generated
# through it by `splitveil generate --server` (head and tail here, bf16): the functional run of issue 28 at sizes
# where offloading matters (llama-8b's trunk in bf16 is ~12 GB, its head and tail ~4 GB). Writes
# benchmarks/results/served_<model>_split-A-B_cpu_bfloat16.json: the generation's JSON, the server's peak memory
# and both processes' wall times. Dummy weights: cost and function only, never privacy figures.
#   usage: bash benchmarks/served_dummy.sh [MODEL=llama-8b] [SPLIT=2,30] [TOKENS=4]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-llama-8b}; split=${2:-2,30}; tokens=${3:-4}
SV=(.venv/bin/python -m splitveil.cli.main)
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
work=$(mktemp -d); server=""
trap '[[ -n $server ]] && pkill -P $server 2>/dev/null; rm -rf "$work"' EXIT
head -c 24 /dev/urandom | base64 | tr -d '/+=' >"$work/token"
port=$(.venv/bin/python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
start=$(date +%s.%N)
/usr/bin/time -v -o "$work/server.time" "${SV[@]}" serve --model "$model" --load-format dummy --split "$split" \
  --dtype bfloat16 --host 127.0.0.1 --port "$port" --token-file "$work/token" --ready-fd 3 3>"$work/ready" \
  >"$work/server.log" 2>&1 &
server=$!
until [[ -s $work/ready ]]; do
  kill -0 $server 2>/dev/null || { echo "serve failed: $(tail -2 "$work/server.log")" >&2; exit 1; }
  sleep 1
done
ready=$(date +%s.%N)
fingerprint=$(.venv/bin/python -c "import json,sys; print(json.loads(open(sys.argv[1]).readline())['fingerprint'])" "$work/ready")
"${SV[@]}" generate --server "wss://127.0.0.1:$port" --pin "$fingerprint" --token-file "$work/token" --model "$model" \
  --load-format dummy --split "$split" --dtype bfloat16 --prompt "The three most common causes of a headache are" \
  --max-new-tokens "$tokens" --json >"$work/generate.json"
done_at=$(date +%s.%N)
pkill -INT -P $server; wait $server || true; server=""  # the server is time's child (time ignores SIGINT)
out=benchmarks/results/served_${model}_split-${split/,/-}_cpu_bfloat16.json
.venv/bin/python - "$work" "$out" "$start" "$ready" "$done_at" <<'PY'
import json, re, sys
from splitveil.core.records import environment, run_git_state, write_json
work, out, start, ready, done = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
generation = json.loads(open(f"{work}/generate.json").read())
peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{work}/server.time").read()).group(1))
write_json(__import__("pathlib").Path(out), {
    "kind": "served-dummy", "weights_are_dummy": True, "server_load_seconds": round(ready - start, 1),
    "client_seconds": round(done - ready, 1), "server_peak_rss_bytes": peak_kb * 1024, "generation": generation,
    "git": run_git_state(), "environment": environment()})
print(f"{generation['model']} split {generation['plan']}: {len(generation['token_ids'])} tokens, decode "
      f"{generation['decode_seconds']:.1f} s, server loaded in {ready - start:.0f} s, server peak RSS "
      f"{peak_kb / 2**20:.1f} GiB, device weights {generation['weight_bytes_resident'] / 2**30:.2f} GiB; wrote {out}")
PY
