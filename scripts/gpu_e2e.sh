#!/usr/bin/env bash
# On the GPU machine: the engine-core check of issue 2 (and the backend comparison of issue 3).
# Llama-3-8B architecture, dummy bf16 weights, 256 prompts x (512 in, 256 out), ignore_eos, for each
# attention backend named in $BACKENDS. Logs and JSON land in ${OUT:-/tmp/out}.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
for backend in ${BACKENDS:-reference pallas}; do
  echo "=== attention_backend=$backend"
  timeout "${PER_RUN_TIMEOUT:-280}" python3 -m benchmarks.throughput --model llama-3-8b \
    --load-format dummy --dtype bfloat16 --tokenizer .gpu_assets/smollm2_tokenizer \
    --num-prompts "${NUM_PROMPTS:-256}" --input-len 512 --output-len 256 \
    --max-num-seqs 256 --max-num-batched-tokens 8192 --attention-backend "$backend" \
    --out "$out" --name "e2e_llama3_8b_$backend" 2>&1 | grep -v "it/s]" | tee "$out/e2e_$backend.log" \
    | grep -E "jaxserve:|roofline|start-up|compiled step|KV cache|Error|error" 
done
