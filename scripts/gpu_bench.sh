#!/usr/bin/env bash
# On the GPU machine: issue #5's offline benchmarks. PART=throughput | latency (default both).
# Dummy bf16 weights; the SmolLM2 tokenizer from .gpu_assets (carried) stands in for the real ones.
set -uo pipefail
out=${OUT:-/tmp/out}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
tok=.gpu_assets/smollm2_tokenizer
keep="jaxserve:|compiled step|KV cache|roofline|start-up|vs transformers|transformers batch|batch +[0-9]+:|warm-up:|busy_fraction|busy_of_wall|wall_s|output_tok_s|Error|error"
run() { local name=$1 limit=$2; shift 2; echo "=== $name"
  timeout "$limit" python3 "$@" 2>&1 | grep -v "it/s]" > "$out/$name.log"; grep -E "$keep" "$out/$name.log"; }
if [ "${PART:-throughput}" = throughput ] || [ -z "${PART:-}" ]; then
  run workload_b 330 -m benchmarks.throughput --model llama-3-8b --tokenizer $tok --num-prompts 1000 \
    --input-len 512 --output-len 256 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --baseline hf --hf-batches 1,64 --hf-num-prompts 64 --out "$out" --name workload_b_llama3_8b
  run workload_a 230 -m benchmarks.throughput --model qwen2-7b --tokenizer $tok --num-prompts 1000 \
    --input-len 100 --output-len 200 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --out "$out" --name workload_a_qwen2_7b
fi
if [ "${PART:-}" = latency ] || [ "${PART:-}" = latency_only ]; then
  run latency 200 -m benchmarks.latency --model llama-3-8b --tokenizer $tok --batch-sizes 1,16 \
    --input-len 128 --output-len 128 --out "$out"
fi
if [ "${PART:-}" = latency ]; then
  run profile 200 -m benchmarks.profile_busy --model llama-3-8b --tokenizer $tok --num-prompts 256 \
    --input-len 128 --output-len 128 --out "$out"
fi
if [ "${PART:-}" = verify ]; then  # after host-path changes: busy fraction and workload B again
  run profile_128 200 -m benchmarks.profile_busy --model llama-3-8b --tokenizer $tok \
    --num-prompts 256 --input-len 128 --output-len 128 --out "$out"
  mv "$out/profile_busy_llama-3-8b.json" "$out/profile_busy_llama-3-8b_128_128.json"
  run profile_512 200 -m benchmarks.profile_busy --model llama-3-8b --tokenizer $tok \
    --num-prompts 256 --input-len 512 --output-len 256 --out "$out"
  mv "$out/profile_busy_llama-3-8b.json" "$out/profile_busy_llama-3-8b_512_256.json"
  rm -rf "$out/profile_trace"
fi
if [ "${PART:-}" = restart ]; then  # workload B cold, then again over the persistent compilation cache
  for i in cold warm; do
    run workload_b_$i 330 -m benchmarks.throughput --model llama-3-8b --tokenizer $tok \
      --num-prompts 1000 --input-len 512 --output-len 256 --max-num-seqs 256 \
      --max-num-batched-tokens 8192 --out "$out" --name workload_b_llama3_8b_$i
  done
fi
if [ "${PART:-}" = hf ]; then  # transformers at larger static batches (workload B's lengths)
  for b in ${HF_BATCHES:-128 256}; do
    echo "=== transformers batch $b"
    timeout 240 python3 -m benchmarks.hf_baseline --model llama-3-8b --batch "$b" --num-prompts "$b" \
      --input-len 512 --output-len 256 2>&1 | tail -1 | tee "$out/hf_batch$b.json"
  done
fi
