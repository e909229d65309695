#!/usr/bin/env bash
# On the GPU machine: issue 3's checks. The Nsight Compute view of the decode kernel
# (scripts/profile_decode_kernel.py) and the end-to-end backend comparison (scripts/backend_check.py)
# on SmolLM2 (the GGUF at $SMOLLM2_GGUF, if present) and on a dummy Llama-3-8B.
# Needs .gpu_assets/smollm2_tokenizer and the gguf + pyyaml wheels in .whl (carried).
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
tok=.gpu_assets/smollm2_tokenizer
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "${PART:-all}" != backends ]; then
  i=0
  for cfg in "--batch 64 --ctx 1024" "--batch 64 --ctx 1024 --splits 2" "--batch 256 --ctx 1024"; do
    i=$((i + 1)); echo "=== ncu $cfg"
    timeout 150 ncu --profile-from-start off --clock-control none --section SpeedOfLight \
      --section Occupancy --section LaunchStats python3 scripts/profile_decode_kernel.py $cfg \
      > "$out/ncu_$i.txt" 2>&1
    grep -E "Context 1|per call|  Duration|DRAM Throughput|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Block Limit (Shared|Registers)|Grid Size|Error|error" "$out/ncu_$i.txt" | head -80
  done
fi
if [ "${PART:-all}" != ncu ]; then
  if [ -n "${SMOLLM2_GGUF:-}" ] && [ -f "$SMOLLM2_GGUF" ]; then
    echo "=== backends: SmolLM2 ($SMOLLM2_GGUF)"
    timeout 240 python3 scripts/backend_check.py --model "$SMOLLM2_GGUF" --tokenizer $tok \
      --out "$out/backend_check_smollm2.json" 2>&1 | grep -v "it/s\]" | tail -12
  fi
  echo "=== backends: dummy Llama-3-8B"
  timeout 330 python3 scripts/backend_check.py --model llama-3-8b --load-format dummy --tokenizer $tok \
    --out "$out/backend_check_llama3_8b.json" 2>&1 | grep -v "it/s\]" | tail -12
fi
