"""The official `openai` npm client (tests/server/node/chat.mjs) against the in-process server:
chat, streaming with usage, and a 404. Skips only when node or npm is missing."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server.conftest import MODEL

NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
                       capture_output=True, timeout=300)
    return NODE_DIR / "chat.mjs"


def test_node_openai_client_chat_and_stream(node_client, served):
    proc = subprocess.run(["node", str(node_client), served.base_url + "/v1", MODEL],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    assert out["streamed"] == out["content"]
    assert out["stream_role"] == "assistant"
    assert out["stream_finish_reason"] == out["finish_reason"]
    assert out["stream_usage"] == out["usage"]
    assert out["usage"]["total_tokens"] == (out["usage"]["prompt_tokens"]
                                            + out["usage"]["completion_tokens"])
    assert out["not_found_status"] == 404
