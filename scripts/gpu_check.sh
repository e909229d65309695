#!/usr/bin/env bash
# On the GPU machine: issue 3's checks. Where a decode call spends device time
# (scripts/profile_decode_kernel.py) and the end-to-end backend comparison (scripts/backend_check.py)
# on SmolLM2 (the GGUF at $SMOLLM2_GGUF, if present) and on a dummy Llama-3-8B.
# Needs .gpu_assets/smollm2_tokenizer and the gguf + pyyaml wheels in .whl (carried); see
# `bash scripts/prepare_gpu_assets.sh --smollm2` for getting the GGUF there.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
tok=.gpu_assets/smollm2_tokenizer
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${PART:-all}" != backends ]; then
  for cfg in "--batch 64 --ctx 1024" "--batch 64 --ctx 1024 --splits 2" "--batch 256 --ctx 1024" \
             "--batch 8 --ctx 128"; do
    echo "=== decode kernel profile $cfg"
    timeout 120 python3 scripts/profile_decode_kernel.py $cfg 2>&1 | grep -E "us/call|per call|Error"
  done
fi
if [ "${PART:-all}" != kernel ]; then
  if [ -n "${SMOLLM2_GGUF:-}" ] && [ -f "$SMOLLM2_GGUF" ]; then
    echo "=== backends: SmolLM2 ($SMOLLM2_GGUF)"
    timeout 240 python3 scripts/backend_check.py --model "$SMOLLM2_GGUF" --tokenizer $tok \
      --out "$out/backend_check_smollm2.json" 2>&1 | grep -v "it/s\]" | tail -12
  fi
  echo "=== backends: dummy Llama-3-8B"
  timeout 330 python3 scripts/backend_check.py --model llama-3-8b --load-format dummy --tokenizer $tok \
    --out "$out/backend_check_llama3_8b.json" 2>&1 | grep -v "it/s\]" | tail -12
fi
