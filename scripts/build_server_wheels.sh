#!/usr/bin/env bash
# Downloads the wheels `jaxserve serve` needs beyond the GPU image (Python 3.12, manylinux x86_64)
# into .whl/, pinned to the versions installed in .venv, so the server runs there offline:
#   bash scripts/build_server_wheels.sh [--with-client]   # --with-client: also the openai SDK
#   # on the GPU machine (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
# The import closure of fastapi + uvicorn (h11 protocol, asyncio loop) + pydantic.
names=(fastapi starlette pydantic pydantic-core annotated-types annotated-doc typing-inspection
       typing-extensions opentelemetry-api anyio sniffio idna uvicorn h11 click
       llguidance  # structured outputs (a manylinux_2_31 wheel)
       orjson)  # SSE chunks and JSON bodies
if [ "${1:-}" = --with-client ]; then
  names+=(openai jiter httpx2 httpcore2 truststore httpx httpcore certifi)
fi
rm -rf .whl && mkdir -p .whl  # /.whl/ is in .gitignore
specs=()
for name in "${names[@]}"; do
  version="$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
  if [ -z "$version" ]; then echo "$name is not installed in .venv (bash scripts/setup.sh)" >&2; exit 1; fi
  specs+=("$name==$version")
done
platforms=()
for tag in manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${specs[@]}"
ls .whl
du -sh .whl
