"""OpenAI response bodies built from the engine's cumulative RequestOutputs.

Last stop of an HTTP request: whole responses (completion, chat.completion), streaming chunks whose
deltas are cut from the cumulative text, logprobs in both OpenAI layouts, and usage.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.tool_parsers.chat import ChatOutputParser

_MIN_LOGPROB = -9999.0  # -inf is not JSON; vLLM clamps the same way


# token id -> its text alone, what logprobs call a "token": Detokenizer.token_text (cached) or
# token_id_text.
TokenDecoder = Callable[[int], str]


def token_id_text(token_id: int) -> str:
    """vLLM's `return_tokens_as_token_ids`: "token_id:42", unique where texts clash."""
    return f"token_id:{token_id}"


@dataclass
class ChoiceCursor:
    """How much of one choice a stream has sent: text chars, tokens (logprobs), text offset."""

    index: int
    num_chars: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False
    parser: ChatOutputParser | None = None  # chat: reasoning / tool calls out of the text


def usage(outs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sse(payload: dict | str) -> bytes:
    """One server-sent event; orjson: UTF-8 as is (json's ensure_ascii=False), ~10x faster."""
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def _lp(entry: dict[int, Logprob], token_id: int) -> float | None:
    found = entry.get(token_id)
    return None if found is None else max(found.logprob, _MIN_LOGPROB)


def _ranked(entry: dict[int, Logprob], k: int) -> list[tuple[int, float]]:
    top = sorted((lp.rank, t, lp.logprob) for t, lp in entry.items()
                 if lp.rank is not None and lp.rank <= k)
    return [(t, max(lp, _MIN_LOGPROB)) for _, t, lp in top]


def completion_logprobs(token_ids: list[int], entries: list, k: int, decode: TokenDecoder,
                        offset: int) -> tuple[dict, int]:
    """Legacy completions layout (tokens, token_logprobs, top_logprobs, text_offset); entries[i] is
    token_ids[i]'s {id: Logprob} or None (first prompt token). Returns it and the next offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(token_ids, entries):
        text = decode(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(_lp(entry, token_id))
        top = {decode(t): lp for t, lp in _ranked(entry, k)}
        top[text] = _lp(entry, token_id)  # always listed; wins a clash of equal texts
        out["top_logprobs"].append(top)
    return out, offset


def _chat_token(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: list, k: int, decode: TokenDecoder) -> dict:
    """Chat layout: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        item = _chat_token(decode(token_id), _lp(entry, token_id))
        item["top_logprobs"] = [_chat_token(decode(t), lp) for t, lp in _ranked(entry, k)]
        content.append(item)
    return {"content": content}


@dataclass
class ResponseMeta:
    """What every body of one HTTP request repeats, plus its logprob settings."""

    id: str
    created: int
    model: str
    logprobs: int | None  # completions: top-k; chat: top_logprobs (0 when only logprobs=true)
    decode: TokenDecoder  # Detokenizer.token_text or token_id_text
    include_usage: bool = False
    # chat: a new ChatOutputParser per choice (reasoning, tool calls); None: the text is content
    output_parser: Callable[[], ChatOutputParser] | None = None
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs (non-streamed responses)


def prompt_logprobs_json(meta: ResponseMeta, out: RequestOutput) -> list | None:
    """vLLM's layout: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}}, the top prompt_logprobs by rank plus the prompt's own token."""
    if meta.prompt_logprobs is None or out.prompt_logprobs is None:
        return None
    k, ids = meta.prompt_logprobs, out.prompt_token_ids
    result = []
    for i, entry in enumerate(out.prompt_logprobs):
        if entry is None:
            result.append(None)
            continue
        result.append({str(t): {"logprob": lp.logprob, "rank": lp.rank,
                                "decoded_token": meta.decode(t)}
                       for t, lp in entry.items()
                       if t == ids[i] or (lp.rank is not None and lp.rank <= k)})
    return result


def _choice_logprobs(meta: ResponseMeta, chat: bool, c: CompletionOutput, start: int,
                     offset: int) -> tuple[dict | None, int]:
    if meta.logprobs is None or c.logprobs is None:
        return None, offset
    ids, entries = c.token_ids[start:], c.logprobs[start:]
    if chat:
        return chat_logprobs(ids, entries, meta.logprobs, meta.decode), offset
    return completion_logprobs(ids, entries, meta.logprobs, meta.decode, offset)


def _echo_logprobs(meta: ResponseMeta, out: RequestOutput) -> tuple[dict | None, int]:
    if meta.logprobs is None or out.prompt_logprobs is None:
        return None, 0
    return completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, meta.logprobs,
                               meta.decode, 0)


def _merge(first: dict | None, second: dict | None) -> dict | None:
    if first is None or second is None:
        return second if first is None else first
    return {key: first[key] + second[key] for key in first}


def completion_body(meta: ResponseMeta, outs: list[RequestOutput], echo: list[str] | None
                    ) -> dict:
    """Non-streaming /v1/completions; outs in prompt order, echo[i] the i-th prompt's text."""
    choices = []
    n = len(outs[0].outputs)
    for p, out in enumerate(outs):
        prefix, (lp_prefix, offset) = "", (None, 0)
        if echo is not None:
            prefix, (lp_prefix, offset) = echo[p], _echo_logprobs(meta, out)
        for c in out.outputs:
            logprobs, _ = _choice_logprobs(meta, False, c, 0, offset)
            choices.append({"index": p * n + c.index, "text": prefix + c.text,
                            "logprobs": _merge(lp_prefix, logprobs),
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                            "prompt_logprobs": prompt_logprobs_json(meta, out)})
    return {"id": meta.id, "object": "text_completion", "created": meta.created,
            "model": meta.model, "choices": choices, "usage": usage(outs),
            "system_fingerprint": None}


def chat_body(meta: ResponseMeta, out: RequestOutput) -> dict:
    choices = []
    for c in out.outputs:
        logprobs, _ = _choice_logprobs(meta, True, c, 0, 0)
        message, finish = {"role": "assistant", "content": c.text}, c.finish_reason
        if meta.output_parser is not None:
            parser = meta.output_parser()
            message, called = parser.message(c.text)
            finish = parser.finish_reason(finish, called)
        choices.append({"index": c.index, "message": message, "logprobs": logprobs,
                        "finish_reason": finish, "stop_reason": c.stop_reason})
    return {"id": meta.id, "object": "chat.completion", "created": meta.created,
            "model": meta.model, "choices": choices, "usage": usage([out]),
            "system_fingerprint": None, "prompt_logprobs": prompt_logprobs_json(meta, out)}


def _chunk(meta: ResponseMeta, chat: bool, choice: dict) -> dict:
    body = {"id": meta.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": meta.created, "model": meta.model, "choices": [choice]}
    if meta.include_usage:
        body["usage"] = None
    return body


def _has_news(meta: ResponseMeta, cur: ChoiceCursor, c: CompletionOutput,
              delta: str | dict) -> bool:
    """Text, the finish, or (when logprobs are asked for) tokens whose text is still held back."""
    if cur.finished:
        return False
    cur.finished = c.finish_reason is not None
    new_tokens = meta.logprobs is not None and len(c.token_ids) > cur.num_tokens
    return bool(delta) or cur.finished or new_tokens


def completion_chunk(meta: ResponseMeta, cur: ChoiceCursor, c: CompletionOutput,
                     echo: tuple[str, RequestOutput] | None) -> dict | None:
    """The next /v1/completions chunk for one choice, or None when nothing new is sendable."""
    delta = c.text[cur.num_chars:]
    if echo is not None and not cur.started:
        delta = echo[0] + delta
    if not _has_news(meta, cur, c, delta):
        return None
    logprobs, cur.text_offset = _choice_logprobs(meta, False, c, cur.num_tokens, cur.text_offset)
    if echo is not None and not cur.started:
        lp_prefix, _ = _echo_logprobs(meta, echo[1])
        logprobs = _merge(lp_prefix, logprobs)
    cur.started, cur.num_chars, cur.num_tokens = True, len(c.text), len(c.token_ids)
    return _chunk(meta, False, {"index": cur.index, "text": delta, "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})


def chat_chunks(meta: ResponseMeta, cur: ChoiceCursor, c: CompletionOutput) -> list[dict]:
    """Chat chunks for one choice: the role first, then the delta (content, or what the cursor's
    parser makes of the text: reasoning_content, content, tool_calls), if any."""
    chunks = []
    if not cur.started:
        cur.started = True
        chunks.append(_chunk(meta, True, {"index": cur.index,
                                          "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}))
    if cur.parser is None:
        text = c.text[cur.num_chars:]
        delta, finish = ({"content": text} if text else {}), c.finish_reason
    elif cur.finished:
        delta, finish = {}, None
    else:
        delta = cur.parser.delta(c.text, final=c.finish_reason is not None)
        finish = cur.parser.finish_reason(c.finish_reason, cur.parser.streamed_calls)
    if not _has_news(meta, cur, c, delta):
        return chunks
    logprobs, _ = _choice_logprobs(meta, True, c, cur.num_tokens, 0)
    cur.num_chars, cur.num_tokens = len(c.text), len(c.token_ids)
    chunks.append(_chunk(meta, True, {"index": cur.index, "delta": delta, "logprobs": logprobs,
                                      "finish_reason": finish,
                                      "stop_reason": c.stop_reason}))
    return chunks


def usage_chunk(meta: ResponseMeta, chat: bool, outs: list[RequestOutput]) -> dict:
    return {"id": meta.id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": meta.created, "model": meta.model, "choices": [], "usage": usage(outs)}
