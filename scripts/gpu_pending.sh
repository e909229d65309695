#!/usr/bin/env bash
# On an nvidia-h200-x2 (one part) or -x4 (two parts side by side, PART="a b") machine: the GPU bars still unmeasured after 2026-11-29's sessions, batched
# as two lanes (one per GPU) or one two-GPU job per call, each call under ~9 minutes.
#   PART=launch    the ~9 ms launch of each step (issues 13/15/20): XLA's host events per step
#                  (--profile-host) on GPU 0; Mosaic GPU custom calls kept out of XLA's command
#                  buffers on GPU 1 (A/B of dispatch ms); then issue 15's structured cost (GPU 1)
#   PART=skiptemp  XLA's command-buffer update mode ALWAYS_UPDATE vs SKIP_TEMP (A/B, one per GPU)
#   PART=skiptemp2 the same A/B at batch 1, workload B at the defaults, fp8 batch 1
#   PART=launch2   command buffers off vs on (batch 1); Llama-3-8B at 16 req/s; fp8 batch 1 profiled
#   PART=verify    enterprise x4 API servers + fp8 workload B (A); offline ratio, cold/warm restart, structured (B)
#   PART=final     structured A/B of the host-path cuts (.old carried), start-up stages cold/warm
#   PART=next      fp8 batch-1 profile + 16 x 16k prefill (A); Qwen3-30B-A3B profiled (B)
#   PART=serve     issue 20's enterprise serving (GPU 0); fp8 batch-1 with a long start-up limit, AWQ
#                  batch-1 profiled (GPU 1)
#   PART=moe1      issue 18 in under 8 minutes (both MoE models, one GPU each)
#   PART=servestruct  enterprise serving (A); structured outputs, then AWQ batch-1 SKIP_TEMP (B)
#   PART=servemoe  enterprise serving (A); grouped matmul GPU tests + Mixtral-8x7B (B)
#   PART=sampling  issue 13's four sampling tables (met at 9b86482 / 531d3ba: re-run after sampler work)
#   PART=tp        issue 19: TP=1 vs TP=2 launch/step A/B, TP=2 tokens + batch-1 TPOT (both GPUs)
#   PART=quant     issue 16: batch-1 decode bf16 / fp8 / AWQ (GPU 0), workload B with fp8 weights
#                  (GPU 1; bf16 is PART=scale's)
#   PART=moe       issue 18: Mixtral-8x7B (GPU 0) and Qwen3-30B-A3B (GPU 1), 256 x (512 / 256)
#   PART=scale     issue 14: workload B under the profiler (where its prefill time goes), then A at
#                  the device defaults (GPU 0); the mixed lognormal workload (GPU 1)
# Carry .gpu_assets (smollm2_tokenizer) and .whl (bash scripts/build_server_wheels.sh). Results and
# logs are packed into $OUT/results.tgz (a call brings back only a few files). Record them in
# benchmarks/RESULTS.md with the commit (JAXSERVE_COMMIT) and these commands.
set -uo pipefail
final=${OUT:-/tmp/out}
out=/tmp/results
mkdir -p "$out" "$final"
trap 'tar czf "$final/results.tgz" -C "$out" .' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
tok=$PWD/.gpu_assets/smollm2_tokenizer
quiet='it/s\]\|cuda_timer'
job() {  # job GPUS NAME LIMIT ARGS...: one job on the given GPUs, its log in $out/NAME.log
  local gpus=$1 name=$2 limit=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" python3 "$@" 2>&1 | grep -v "$quiet" > "$out/$name.log"
  echo "=== $name (exit ${PIPESTATUS[0]})"; tail -16 "$out/$name.log"
}
sampling() {  # GPU MODEL
  job "$1" "sampling_$2_512" 285 -m benchmarks.sampling --model "$2" --load-format dummy \
    --num-seqs 512 --profile --tokenizer "$tok" --out "$out"
  job "$1" "sampling_$2_1024" 285 -m benchmarks.sampling --model "$2" --load-format dummy \
    --num-seqs 1024 --num-prompts 1024 --tokenizer "$tok" --out "$out"
}
part() {  # PART A B: one part on the GPU pair A, B
  local A=$2 B=$3
  case "$1" in
  launch)
    # This machine's cost of one kernel launch and of one CUDA-graph replay of 600 kernels
    # (torch, in the image): is a ~9 ms step launch the runtime's price per driver call?
    CUDA_VISIBLE_DEVICES=$A python3 - <<'PY' 2>&1 | tee "$out/launch_cost.log"
import time, torch
x = torch.zeros(1, device="cuda"); torch.cuda.synchronize()
for n in (1000, 10000):
    t = time.perf_counter(); [x.add_(1) for _ in range(n)]; launch = time.perf_counter() - t
    torch.cuda.synchronize(); total = time.perf_counter() - t
    print(f"{n} launches: {launch / n * 1e6:.1f} us each to enqueue, {total / n * 1e6:.1f} us each done")
g = torch.cuda.CUDAGraph(); s = torch.cuda.Stream()
with torch.cuda.stream(s):
    with torch.cuda.graph(g):
        for _ in range(600): x.add_(1)
torch.cuda.synchronize()
for _ in range(3):
    t = time.perf_counter(); g.replay(); enq = time.perf_counter() - t; torch.cuda.synchronize()
    print(f"graph of 600 kernels: replay enqueued in {enq * 1e3:.2f} ms, done in {(time.perf_counter() - t) * 1e3:.2f} ms")
PY
    rows="greedy,T0.7 top_p 0.9"
    job $A launch_host_events 280 -m benchmarks.sampling --model llama-3-8b --num-seqs 512 \
      --rows "$rows" --profile-host --tokenizer "$tok" --out "$out" --name launch_host_events &
    { XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUDNN,CONDITIONAL \
        job $B launch_no_custom_call_graphs 250 -m benchmarks.sampling --model llama-3-8b \
        --num-seqs 512 --rows "$rows" --profile --tokenizer "$tok" --out "$out" \
        --name launch_no_custom_call_graphs
      job $B structured 250 -m benchmarks.structured --model llama-3-8b --load-format dummy \
        --num-prompts 256 --tokenizer "$tok" --out "$out"; } &
    wait ;;
  skiptemp)
    # XLA's command-buffer update mode: ALWAYS_UPDATE (default) on A, SKIP_TEMP (temporaries at
    # stable virtual addresses, so CUDA graphs are not re-patched each step) on B, side by side:
    # batch-1 decode, then greedy / top_p at 512 sequences with the host's per-step events.
    for lane in "$A ALWAYS_UPDATE" "$B SKIP_TEMP"; do
      set -- $lane
      { XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$2 job $1 "latency_$2" 160 \
          -m benchmarks.latency --model llama-3-8b --load-format dummy --tokenizer "$tok" \
          --batch-sizes 1 --input-len 128 --output-len 128 --out "$out" --name "latency_$2"
        XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$2 job $1 "update_mode_$2" 250 \
          -m benchmarks.sampling --model llama-3-8b --num-seqs 512 --rows "greedy,T0.7 top_p 0.9" \
          --profile-host --tokenizer "$tok" --out "$out" --name "update_mode_$2"; } &
    done
    wait ;;
  skiptemp2)
    # The update-mode A/B where it matters for the defaults (issue 14): batch-1 bf16 decode,
    # workload B at the device defaults (1,000 x 512 / 256), fp8 batch-1 (issue 16); ALWAYS_UPDATE
    # on A, SKIP_TEMP on B, side by side (the KV pool under SKIP_TEMP sized from nvidia-smi).
    for lane in "$A ALWAYS_UPDATE" "$B SKIP_TEMP"; do
      set -- $lane
      { export XLA_FLAGS=--xla_gpu_command_buffer_update_mode=$2
        job $1 "latency_$2" 160 -m benchmarks.latency --model llama-3-8b --load-format dummy \
          --tokenizer "$tok" --batch-sizes 1 --input-len 128 --output-len 128 --out "$out" \
          --name "latency_$2"
        job $1 "workload_b_$2" 250 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
          --num-prompts 1000 --input-len 512 --output-len 256 --out "$out" --name "workload_b_$2"
        job $1 "latency_fp8_$2" 230 -m benchmarks.latency --model llama-3-8b --load-format dummy \
          --tokenizer "$tok" --batch-sizes 1 --input-len 128 --output-len 128 \
          --quantization fp8 --out "$out" --name "latency_fp8_$2"; } &
    done
    wait ;;
  launch2)
    # XLA command buffers off (every kernel launched on its own) vs on, batch-1 bf16 decode side
    # by side; then issue 20's Llama-3-8B at 16 req/s (A) and fp8 batch 1 under the profiler (B)
    { XLA_FLAGS=--xla_gpu_enable_command_buffer= job $A latency_no_command_buffers 160 \
        -m benchmarks.latency --model llama-3-8b --load-format dummy --tokenizer "$tok" \
        --batch-sizes 1 --input-len 128 --output-len 128 --out "$out" \
        --name latency_no_command_buffers
      job $A serving_16rps 300 -m benchmarks.serving --num-prompts 400 --random-input-len 512 \
        --random-output-len 256 --ignore-eos --vocab-size 128256 --num-warmups 64 \
        --sweep-rates 16 --out "$out" --name serving_llama3_8b_16rps \
        --launch "llama-3-8b --load-format dummy --tokenizer $tok --max-model-len 1024"; } &
    { job $B latency_command_buffers 160 -m benchmarks.latency --model llama-3-8b \
        --load-format dummy --tokenizer "$tok" --batch-sizes 1 --input-len 128 --output-len 128 \
        --out "$out" --name latency_command_buffers
      job $B fp8_batch1_profile 260 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
        --num-prompts 4 --input-len 128 --output-len 128 --max-num-seqs 1 --quantization fp8 \
        --profile --out "$out" --name fp8_batch1_profile; } &
    wait ;;
  verify)
    # Session 9's last call. A: issue 20's enterprise serving with 4 API-server processes, then
    # issue 16's workload B with fp8 weights. B: the same engine offline on the enterprise prompts
    # (the served/offline ratio), workload B cold then restarted over the executable cache
    # (issue 14's warm restart), structured outputs (issue 15).
    { job $A enterprise_api4 330 -m benchmarks.serving --preset enterprise --vocab-size 151936 \
        --sweep-concurrency 250,1000 --out "$out" --name enterprise_api4 --launch "qwen2-7b \
        --load-format dummy --tokenizer $tok --max-model-len 1024 --max-num-seqs 1024 \
        --max-num-batched-tokens 8192 --api-server-count 4"
      job $A workload_b_fp8 250 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
        --num-prompts 1000 --input-len 512 --output-len 256 --quantization fp8 --out "$out" \
        --name workload_b_fp8; } &
    { job $B enterprise_offline 200 -m benchmarks.throughput --model qwen2-7b --tokenizer "$tok" \
        --num-prompts 2000 --input-len 100 --output-len 200 --max-model-len 1024 \
        --max-num-seqs 1024 --max-num-batched-tokens 8192 --temperature 0.7 --top-p 0.9 \
        --out "$out" --name enterprise_offline
      for run in cold warm; do
        job $B "workload_b_$run" 170 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
          --num-prompts 1000 --input-len 512 --output-len 256 --out "$out" --name "workload_b_$run"
      done
      job $B structured 200 -m benchmarks.structured --model llama-3-8b --load-format dummy \
        --num-prompts 256 --tokenizer "$tok" --out "$out"; } &
    wait ;;
  final)
    # Session 9's last call: issue 15's structured outputs side by side, the host-path cuts
    # (e6997c5, this tree, A) against the tree before them (.old = git archive 70111e2, B); then
    # workload B started twice on A (64 prompts: the start-up's stages, cold then warm restart).
    job $A structured 200 -m benchmarks.structured --model llama-3-8b --load-format dummy \
      --num-prompts 256 --tokenizer "$tok" --out "$out" &
    ( cd .old && PYTHONPATH=$PWD:/tmp/site job $B structured_before 200 -m benchmarks.structured \
        --model llama-3-8b --load-format dummy --num-prompts 256 --tokenizer "$tok" \
        --out "$out/before" ) &
    wait
    for run in cold warm; do
      job $A "restart_$run" 130 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
        --num-prompts 64 --input-len 512 --output-len 256 --out "$out" --name "restart_$run"
    done ;;
  next)
    # Left by session 9 for the next: fp8 batch 1 under the profiler with few buckets (issue 16),
    # 16 x 16k-token prompts after start-up (issue 14) on A; Qwen3-30B-A3B profiled (its decode
    # share of the floor, issue 18) on B.
    { job $A fp8_batch1_profile 250 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
        --num-prompts 4 --input-len 128 --output-len 128 --max-num-seqs 1 \
        --max-num-batched-tokens 256 --quantization fp8 --profile --out "$out" \
        --name fp8_batch1_profile
      job $A long_prefill 250 -m benchmarks.throughput --model llama-3.1-8b --tokenizer "$tok" \
        --num-prompts 16 --input-len 16000 --output-len 128 --max-model-len 16384 --out "$out" \
        --name long_prefill_16x16k; } &
    job $B qwen3_30b_profile 500 -m benchmarks.throughput --model qwen3-30b-a3b --tokenizer "$tok" \
      --num-prompts 256 --input-len 512 --output-len 256 --max-num-seqs 256 --profile \
      --out "$out" --name qwen3_30b_profile &
    wait ;;
  serve)
    # issue 20's enterprise scenario (A), then issue 16's fp8 batch-1 decode with room for its
    # start-up and AWQ batch-1 under the device profiler (B)
    job $A enterprise 560 -m benchmarks.serving --preset enterprise --vocab-size 151936 \
      --out "$out" --launch "qwen2-7b --load-format dummy --tokenizer $tok --max-model-len 1024 \
      --max-num-seqs 1024 --max-num-batched-tokens 8192" &
    { job $B latency_fp8_long 330 -m benchmarks.latency --model llama-3-8b --load-format dummy \
        --tokenizer "$tok" --batch-sizes 1 --input-len 128 --output-len 128 --quantization fp8 \
        --out "$out" --name latency_fp8_long
      job $B awq_batch1_profile 220 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
        --num-prompts 4 --input-len 128 --output-len 128 --max-num-seqs 1 --quantization awq \
        --profile --out "$out" --name awq_batch1_profile; } &
    wait ;;
  moe1)  # issue 18 with the grouped matmul kernel, each model on its own GPU, under ~8 minutes
    # (run_layer's export off here: unverified on GPU, it is tried on the structured lane)
    export JAXSERVE_EXPORT_LAYERS=0
    { JAXSERVE_TEST_GPU=1 job $A grouped_matmul_tests 80 -m pytest -q -p no:cacheprovider \
        tests/kernels/test_grouped_matmul.py
      job $A moe_mixtral 370 -m benchmarks.throughput --model mixtral-8x7b --tokenizer "$tok" \
        --num-prompts 256 --input-len 512 --output-len 256 --max-num-seqs 256 --out "$out"; } &
    { job $B grouped_matmul_bench 80 -m benchmarks.grouped_matmul --out "$out" \
        --tiles auto,16,32,64,128,16x64
      job $B moe_qwen3_30b 370 -m benchmarks.throughput --model qwen3-30b-a3b --tokenizer "$tok" \
        --num-prompts 256 --input-len 512 --output-len 256 --max-num-seqs 256 --out "$out"; } &
    wait ;;
  servestruct)  # issue 20 enterprise serving (A); issue 15 structured, then AWQ batch-1 with
    # XLA's SKIP_TEMP command-buffer mode (the KV pool sized from nvidia-smi under VMM) (B)
    JAXSERVE_EXPORT_LAYERS=0 job $A enterprise 460 -m benchmarks.serving --preset enterprise --vocab-size 151936 \
      --out "$out" --launch "qwen2-7b --load-format dummy --tokenizer $tok --max-model-len 1024 \
      --max-num-seqs 1024 --max-num-batched-tokens 8192" &
    { job $B structured 250 -m benchmarks.structured --model llama-3-8b --load-format dummy \
        --num-prompts 256 --tokenizer "$tok" --out "$out"
      JAXSERVE_EXPORT_LAYERS=0 XLA_FLAGS=--xla_gpu_command_buffer_update_mode=SKIP_TEMP \
        job $B latency_awq_skip_temp 160 \
        -m benchmarks.latency --model llama-3-8b --load-format dummy --tokenizer "$tok" \
        --batch-sizes 1 --input-len 128 --output-len 128 --quantization awq --out "$out" \
        --name latency_awq_skip_temp; } &
    wait ;;
  servemoe)  # a 2-GPU machine's last call: enterprise serving (A, issue 20); the grouped matmul's
    # GPU tests, then Mixtral-8x7B (B, issue 18). Layer export off (not yet run on a GPU).
    export JAXSERVE_EXPORT_LAYERS=0
    job $A enterprise 460 -m benchmarks.serving --preset enterprise --vocab-size 151936 \
      --out "$out" --launch "qwen2-7b --load-format dummy --tokenizer $tok --max-model-len 1024 \
      --max-num-seqs 1024 --max-num-batched-tokens 8192" &
    { JAXSERVE_TEST_GPU=1 job $B grouped_matmul_tests 80 -m pytest -q -p no:cacheprovider \
        tests/kernels/test_grouped_matmul.py
      job $B moe_mixtral 370 -m benchmarks.throughput --model mixtral-8x7b --tokenizer "$tok" \
        --num-prompts 256 --input-len 512 --output-len 256 --max-num-seqs 256 --out "$out"; } &
    wait ;;
  sampling)
    sampling $A qwen2-7b & sampling $B llama-3-8b & wait ;;
  tp)
    for args in "1" "2" "2 --vocab-split-sampler"; do
      set -- $args
      job $A,$B "tp_collectives_tp$1${2:+_old}" 60 -m benchmarks.tp_collectives --model llama-3-8b \
        --tensor-parallel-size "$@" --time 200
    done
    export JAXSERVE_TEST_GPU=1 JAXSERVE_TEST_TOKENIZER=$tok
    job $A,$B tp_tokens_tpot 240 -m pytest \
      tests/test_distributed.py -k gpu -s -q -p no:cacheprovider ;;
  quant)
    for q in none fp8 awq; do
      job $A "latency_$q" 160 -m benchmarks.latency --model llama-3-8b --load-format dummy \
        --tokenizer "$tok" --batch-sizes 1 --input-len 128 --output-len 128 \
        $([ $q = none ] || echo --quantization $q) --out "$out" --name "latency_$q"
    done &
    job $B workload_b_fp8 400 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
      --num-prompts 1000 --input-len 512 --output-len 256 --quantization fp8 --out "$out" \
      --name workload_b_fp8 &
    wait ;;
  moe)
    job $A moe_mixtral 540 -m benchmarks.throughput --model mixtral-8x7b --tokenizer "$tok" \
      --num-prompts 256 --input-len 512 --output-len 256 --max-num-seqs 256 --out "$out" &
    job $B moe_qwen3_30b 540 -m benchmarks.throughput --model qwen3-30b-a3b --tokenizer "$tok" \
      --num-prompts 256 --input-len 512 --output-len 256 --max-num-seqs 256 --out "$out" &
    wait ;;
  scale)
    { job $A workload_b_profile 270 -m benchmarks.throughput --model llama-3-8b --tokenizer "$tok" \
        --num-prompts 1000 --input-len 512 --output-len 256 --profile --out "$out" \
        --name workload_b_profile
      job $A workload_a_defaults 250 -m benchmarks.throughput --model qwen2-7b --tokenizer "$tok" \
        --num-prompts 1000 --input-len 100 --output-len 200 --out "$out" --name workload_a_defaults
    } &
    job $B mixed_lognormal 400 -m benchmarks.throughput --model qwen2-7b --tokenizer "$tok" \
      --num-prompts 1000 --length-dist lognormal --input-len 280 --output-len 190 \
      --temperature 0.8 --top-p 0.95 --out "$out" --name mixed_lognormal_qwen2_7b &
    wait ;;
    *) echo "PART=launch|skiptemp|skiptemp2|launch2|verify|final|next|serve|moe1|servestruct|servemoe|sampling|tp|quant|moe|scale" >&2; exit 2 ;;
  esac
}
# PART may name several parts ("launch scale"): each gets the next GPU pair (a 4-GPU machine runs two).
gpu=0
for p in ${PART:-launch}; do
  part "$p" $gpu $((gpu + 1)) > "$out/part_$p.out" 2>&1 &
  gpu=$((gpu + 2))
done
wait
cat "$out"/part_*.out
