"""LoRA over HTTP on one `jaxserve serve --enable-lora` process: --lora-modules (name=path and the
JSON form), /v1/models listing adapters with their parent, `model=<adapter>` giving
transformers+PEFT's greedy text, vLLM's load/unload routes behind the API key, and errors (unknown
adapter 404, bad path or rank 400) naming the bad value."""
from __future__ import annotations

import json

import httpx
import pytest

from jaxserve.cli import main
from tests.engine.test_lora_engine import ALL, ATTN, make_adapter
from tests.fixtures import hf_greedy
from tests.server.conftest import start_cli

KEY = "lora-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def lora_server(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("lora_server")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok.encode(PROMPT)
    models = {None: base}
    for name, r, seed, targets in [("a8", 8, 1, ALL), ("b16", 16, 2, ATTN), ("c8", 8, 3, ALL),
                                   ("r32", 32, 4, ATTN)]:
        models[name] = make_adapter(base, root / name, r=r, seed=seed, targets=targets)
    texts = {name: tok.decode(hf_greedy(m, ids, 5)) for name, m in models.items() if name != "r32"}
    assert len(set(texts.values())) == len(texts), "adapters should change the greedy text"
    proc, url = start_cli(tiny_model_dir, "--enable-lora", "--max-loras", "2",
                          "--max-lora-rank", "16", "--served-model-name", "tiny",
                          "--lora-modules", f"a8={root / 'a8'}",
                          json.dumps({"name": "b16", "path": str(root / "b16")}),
                          "--api-key", KEY)
    client = httpx.Client(base_url=url, headers=AUTH, timeout=60)
    yield client, root, texts
    client.close()
    proc.kill()
    proc.wait(10)


def _complete(client, model: str) -> httpx.Response:
    return client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 5,
                                                "temperature": 0, "ignore_eos": True})


def test_models_and_selection(lora_server):
    client, root, texts = lora_server
    cards = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert set(cards) == {"tiny", "a8", "b16"}
    assert cards["a8"]["parent"] == "tiny" and cards["a8"]["root"] == str(root / "a8")
    for model, name in [("a8", "a8"), ("tiny", None), ("b16", "b16")]:
        body = _complete(client, model).json()
        assert body["model"] == model
        assert body["choices"][0]["text"] == texts[name], model
    chats = {}
    for model in ("a8", "tiny"):
        body = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5,
            "temperature": 0, "ignore_eos": True}).json()
        assert body["model"] == model
        chats[model] = body["choices"][0]["message"]["content"]
    assert chats["a8"] != chats["tiny"]  # the adapter runs for chat requests too
    missing = _complete(client, "nope")
    assert missing.status_code == 404 and "`nope`" in missing.json()["error"]["message"]


def test_load_and_unload_at_run_time(lora_server):
    client, root, texts = lora_server
    load = {"lora_name": "c8", "lora_path": str(root / "c8")}
    assert httpx.post(str(client.base_url) + "/v1/load_lora_adapter", json=load).status_code == 401
    ok = client.post("/v1/load_lora_adapter", json=load)
    assert ok.status_code == 200 and "c8" in ok.text
    assert _complete(client, "c8").json()["choices"][0]["text"] == texts["c8"]
    again = client.post("/v1/load_lora_adapter", json=load)
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    bad = client.post("/v1/load_lora_adapter",
                      json={"lora_name": "x", "lora_path": str(root / "nowhere")})
    assert bad.status_code == 400 and "nowhere" in bad.json()["error"]["message"]
    big = client.post("/v1/load_lora_adapter",
                      json={"lora_name": "r32", "lora_path": str(root / "r32")})
    assert big.status_code == 400 and "rank 32 exceeds max_lora_rank=16" in big.text
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "c8"}).status_code == 200
    assert _complete(client, "c8").status_code == 404
    gone = client.post("/v1/unload_lora_adapter", json={"lora_name": "c8"})
    assert gone.status_code == 404 and "'c8'" in gone.json()["error"]["message"]


def test_lora_modules_need_enable_lora(capsys):
    assert main(["serve", "--lora-modules", "a=/x"]) == 2
    assert "needs --enable-lora" in capsys.readouterr().err
    assert main(["serve", "--enable-lora", "--lora-modules", "a"]) == 2
    assert "is not name=path" in capsys.readouterr().err
