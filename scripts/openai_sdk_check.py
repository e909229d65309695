"""Drive a running jaxserve server with the official openai SDK: models, completion, chat, stream.

python scripts/openai_sdk_check.py http://127.0.0.1:8000  (exits non-zero on any failure)
"""
import sys

import openai


def main(base_url: str) -> None:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="EMPTY", max_retries=0)
    model = client.models.list().data[0].id
    comp = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8,
                                     temperature=0)
    assert comp.choices[0].finish_reason == "length" and comp.usage.completion_tokens == 8, comp
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens >= 1, chat
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello!"}], max_tokens=8,
        temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat)
    try:
        client.completions.create(model=model, prompt="x", max_tokens=-1)
        raise AssertionError("a negative max_tokens was accepted")
    except openai.BadRequestError as err:
        assert err.status_code == 400
    print(f"openai SDK {openai.__version__} OK against {model}: completion, chat, streaming, 400")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000")
