"""Incremental detokenization never emits half a UTF-8 character and adds up to the full decode."""
from __future__ import annotations

import pytest

from jaxserve.detokenizer import Detokenizer
from tests.engine.tiny import build_tokenizer

TEXTS = ["你好，请介绍一下人工智能。人工智能是计算机科学的一个分支。",
         "The capital of France is Paris. 😀 naïve café — done.", "def add(a, b):\n    return a + b\n"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=320)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_add_up(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = [tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert len(ids) > len(text) / 3, "the tiny BPE should split characters into byte tokens"
    detok = Detokenizer(tokenizer)
    state = detok.start([])
    deltas = [detok.step(state, [i], skip_special_tokens=True) for i in ids]
    assert all("\ufffd" not in d for d in deltas), (pieces, deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    if any(ord(c) > 127 for c in text):
        assert "" in deltas  # some token ended mid-character and had to wait


def test_final_flush_keeps_an_incomplete_tail(tokenizer):
    ids = tokenizer.encode("你好", add_special_tokens=False)
    detok = Detokenizer(tokenizer)
    state = detok.start([])
    partial = ids[:-1] if len(ids) > 1 else ids
    text = detok.step(state, partial, skip_special_tokens=True, final=True)
    assert text == tokenizer.decode(partial)  # flushed at the end, U+FFFD included if any
