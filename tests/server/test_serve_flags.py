"""vLLM's HTTP-layer flags on one `jaxserve serve` process: CORS (--allowed-origins ...),
--root-path, --ssl-keyfile/--ssl-certfile (HTTPS), --enable-log-requests, and the API key from
$VLLM_API_KEY."""
from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.server.conftest import start_cli

KEY = "env-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def flagged(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tls")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    proc, base = start_cli(
        tiny_model_dir, "--ssl-keyfile", str(key), "--ssl-certfile", str(cert),
        "--root-path", "/api", "--allowed-origins", '["https://app.example"]',
        "--allowed-methods", '["GET", "POST"]', "--allowed-headers", '["authorization"]',
        "--allow-credentials", "--enable-log-requests", "--uvicorn-log-level", "info",
        env={"VLLM_API_KEY": KEY}, scheme="https")
    client = httpx.Client(base_url=base, verify=False, timeout=60)
    yield proc, client
    client.close()
    proc.kill()
    proc.wait(10)


def test_https_root_path_and_env_api_key(flagged):
    proc, client = flagged
    assert str(client.base_url).startswith("https://")
    assert client.get("/v1/models").status_code == 401  # the key came from $VLLM_API_KEY
    for path in ("/v1/models", "/api/v1/models"):  # with and without the proxy's prefix
        assert client.get(path, headers=AUTH).status_code == 200, path
    assert client.get("/api/v1/models").status_code == 401
    assert client.get("/api/health").status_code == 200
    spec = client.get("/openapi.json", headers=AUTH).json()
    assert spec["servers"] == [{"url": "/api"}]


def test_cors_preflight_and_headers(flagged):
    _, client = flagged
    pre = client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert pre.headers["access-control-allow-credentials"] == "true"
    assert "POST" in pre.headers["access-control-allow-methods"]
    other = client.options("/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    got = client.get("/v1/models", headers={**AUTH, "Origin": "https://app.example"})
    assert got.headers["access-control-allow-origin"] == "https://app.example"


def test_log_requests(flagged):
    proc, client = flagged
    resp = client.post("/v1/completions", headers=AUTH,
                       json={"prompt": "hello there", "max_tokens": 2, "temperature": 0})
    assert resp.status_code == 200
    request_id = resp.json()["id"]
    proc.kill()  # the log is read to its end
    proc.wait(10)
    output = proc.stdout.read()
    line = next(x for x in output.splitlines() if f"Received request {request_id}" in x)
    assert "'max_tokens': 2" in line and "hello there" not in line  # no prompt text logged


def test_flag_parsing_errors():
    import argparse

    from jaxserve.server.cli import _json_list, http_options

    assert _json_list('["*"]') == ["*"]
    with pytest.raises(argparse.ArgumentTypeError, match="JSON list"):
        _json_list("*")
    args = argparse.Namespace(ssl_keyfile="k.pem", ssl_certfile=None)
    with pytest.raises(ValueError, match="ssl"):
        http_options(args)
