#!/usr/bin/env bash
# On the GPU machine (carry .whl from `bash scripts/build_server_wheels.sh --with-client` and
# .gpu_assets): serve a dummy Llama-3-8B, answer the openai SDK, then the serving benchmark.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m jaxserve.cli serve llama-3-8b --load-format dummy --dtype bfloat16 \
  --tokenizer .gpu_assets/smollm2_tokenizer --max-model-len 1024 --max-num-seqs 256 \
  --max-num-batched-tokens 8192 --port 8000 --disable-uvicorn-access-log > "$out/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 200); do
  python3 -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:8000/health').status_code != 200)" \
    2>/dev/null && break
  sleep 2
done
grep -E "KV cache|warm-up|startup|Uvicorn running" "$out/server.log"
python3 scripts/openai_sdk_check.py http://127.0.0.1:8000
python3 -m benchmarks.serving --base-url http://127.0.0.1:8000 --num-prompts "${NUM_PROMPTS:-400}" \
  --random-input-len 512 --random-output-len 256 --ignore-eos --vocab-size 128256 \
  --num-warmups 64 --sweep-rates "${RATES:-16}" --out "$out" --name serving_llama3_8b 2>&1 \
  | grep -v "it/s]" | tail -40
kill -TERM $pid; wait $pid
