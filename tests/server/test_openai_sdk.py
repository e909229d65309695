"""The official `openai` Python SDK against the in-process server: chat, completions, streaming,
n, logprobs, stop, echo, usage, and the non-OpenAI routes (models, tokenize, metrics, version)."""
from __future__ import annotations

from tests.server.conftest import LOAD_MAX_TOKENS, LOAD_PROMPTS, MODEL

PROMPT = LOAD_PROMPTS[0]


def test_completion_matches_offline_and_usage(client, served):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LOAD_MAX_TOKENS,
                                     temperature=0)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-") and resp.created > 0
    assert resp.model == MODEL
    choice = resp.choices[0]
    assert choice.index == 0 and choice.text == served.reference[PROMPT]
    num_prompt = len(served.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"])
    assert resp.usage.prompt_tokens == num_prompt
    assert resp.usage.total_tokens == num_prompt + resp.usage.completion_tokens
    assert choice.finish_reason in ("length", "stop")
    if choice.finish_reason == "length":
        assert resp.usage.completion_tokens == LOAD_MAX_TOKENS


def test_completion_prompt_forms_and_n(client, served):
    ids = served.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    for prompt in (PROMPT, ids):
        text = client.completions.create(model=MODEL, prompt=prompt, max_tokens=LOAD_MAX_TOKENS,
                                         temperature=0).choices[0].text
        assert text == served.reference[PROMPT]
    resp = client.completions.create(model=MODEL, prompt=[PROMPT, LOAD_PROMPTS[1]], n=2,
                                     max_tokens=LOAD_MAX_TOKENS, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    texts = [c.text for c in resp.choices]
    assert texts == [served.reference[PROMPT]] * 2 + [served.reference[LOAD_PROMPTS[1]]] * 2


def test_sampled_n2_seeded(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=3,
              extra_body={"ignore_eos": True})
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.completion_tokens == 16


def test_chat_and_chat_stream_agree(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                          temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    message = resp.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == resp.choices[0].finish_reason and not any(finishes[:-1])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_completion_stream_deltas_rebuild_text(client, served):
    stream = client.completions.create(model=MODEL, prompt=[PROMPT, LOAD_PROMPTS[2]], n=2,
                                       max_tokens=LOAD_MAX_TOKENS, temperature=0, stream=True)
    texts: dict[int, str] = {}
    finished = set()
    for chunk in stream:
        assert chunk.object == "text_completion" and len(chunk.choices) == 1
        c = chunk.choices[0]
        texts[c.index] = texts.get(c.index, "") + c.text
        if c.finish_reason:
            assert c.index not in finished
            finished.add(c.index)
    assert finished == {0, 1, 2, 3}
    assert texts == {0: served.reference[PROMPT], 1: served.reference[PROMPT],
                     2: served.reference[LOAD_PROMPTS[2]], 3: served.reference[LOAD_PROMPTS[2]]}


def test_completion_logprobs_and_echo(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                     logprobs=3, extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    # tokens are decoded one by one (byte-level pieces may be U+FFFD), offsets run over them
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(5)]
    # byte-level pieces often decode to the same U+FFFD: ask for "token_id:N" keys to compare
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                     logprobs=3, extra_body={"ignore_eos": True,
                                                             "return_tokens_as_token_ids": True})
    lp = resp.choices[0].logprobs
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and token in top and 3 <= len(top) <= 4
        assert value == max(top.values())  # greedy: the sampled token is the most likely
    echoed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0,
                                       echo=True, logprobs=1, extra_body={"ignore_eos": True})
    choice = echoed.choices[0]
    assert choice.text == PROMPT + resp.choices[0].text
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.token_logprobs[-5:] == lp.token_logprobs


def test_chat_logprobs(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2 and item.logprob == item.top_logprobs[0].logprob
        assert item.bytes == list(item.token.encode())


def test_stop_string(client, served):
    full = served.reference[PROMPT]
    stop = full[3:5]
    assert stop.strip(), "the reference text should have a usable stop string"
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LOAD_MAX_TOKENS,
                                     temperature=0, stop=[stop])
    assert resp.choices[0].finish_reason == "stop"
    assert resp.choices[0].text == full[:full.index(stop)]
    chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LOAD_MAX_TOKENS,
                                       temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]


def test_info_routes(client, served):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert served.get("/health").status_code == 200
    assert served.get("/version").json()["version"]
    ids = served.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    assert served.post("/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPT
    chat = served.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]})
    assert chat.json()["count"] == len(chat.json()["tokens"]) > 3
    text = served.get("/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:prompt_tokens_total",
                 "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_count"):
        assert f"{name}{{" in text, name
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
