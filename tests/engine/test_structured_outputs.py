"""jaxserve.structured_outputs on the real SmolLM2 tokenizer (CPU, no model): random walks that
sample only allowed tokens always end in text that validates / matches / is a choice; forbidden
tokens are refused and leave the matcher as it was; masks agree with per-token validation."""
import json
import random
import re

import jsonschema
import numpy as np
import pytest

from jaxserve import structured_outputs as so
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams as S

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "score": {"type": "number", "minimum": -1.5, "maximum": 2.5},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 10},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
     "required": ["name", "age", "address"], "additionalProperties": False},
    {"type": "array", "items": {"type": "object", "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer", "exclusiveMinimum": 3,
                                         "maximum": 9}},
        "required": ["ok", "n"], "additionalProperties": False}, "minItems": 1, "maxItems": 3},
    {"anyOf": [{"type": "string", "enum": ["a\"b", "日本", "\\"]}, {"type": "null"}]},
]
REGEXES = [r"[a-z]{2,6}@[a-z]{3,5}\.(com|org)", r"-?(0|[1-9][0-9]{0,3})(\.[0-9]{1,2})?",
           r"(yes|no|maybe)( because [a-z ]{1,10})?"]
CHOICES = ["Paris", "London", "New York", "日本語", "a\nb"]


@pytest.fixture(scope="module")
def tok():
    from jaxserve.checkpoint import embedded_gguf_path, load_tokenizer

    return load_tokenizer(embedded_gguf_path())


def _structural(tok, vocab: int) -> np.ndarray:
    """Token ids of one-character JSON punctuation: the walk prefers them so strings close."""
    ids = [i for i in range(vocab) if tok.decode([i]) in set('"}],:') | set("0123456789")]
    return np.array(ids)


def walk(matcher, tok, rng: random.Random, structural=None, max_steps: int = 400,
         check_forbidden: bool = True) -> list[int]:
    """Sample allowed tokens until the grammar terminates or EOS is drawn; every 4th step also
    tries a forbidden token, which must be refused without changing the mask."""
    row = so.allocate_bitmask(1, matcher.vocab_size)[0]
    out = []
    for step in range(max_steps):
        matcher.fill_bitmask(row)
        allowed = so.allowed_tokens(row, matcher.vocab_size)
        assert len(allowed), "empty mask"
        if matcher.is_terminated():
            assert set(allowed.tolist()) == {tok.eos_token_id}
            return out
        if check_forbidden and step % 4 == 0:
            forbidden = rng.randrange(matcher.vocab_size)
            if forbidden not in set(allowed.tolist()):
                assert not matcher.accept(forbidden)
                again = row.copy()
                matcher.fill_bitmask(again)
                np.testing.assert_array_equal(again, row)
        pick = allowed
        if tok.eos_token_id in allowed and rng.random() < 0.3:
            pick = np.array([tok.eos_token_id])
        elif structural is not None and rng.random() < 0.5:
            pick = np.intersect1d(allowed, structural) if np.intersect1d(
                allowed, structural).size else allowed
        token = int(rng.choice(pick.tolist()))
        assert matcher.accept(token)
        if token == tok.eos_token_id:
            assert matcher.is_terminated()
            return out
        out.append(token)
    raise AssertionError(f"no end after {max_steps} steps: {tok.decode(out)!r}")


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "array", "anyof"])
@pytest.mark.parametrize("compact", [False, True], ids=["ws", "compact"])
def test_json_walks_validate(tok, schema, compact):
    grammar = so.compile(S(json=schema, disable_any_whitespace=compact), tok)
    structural = _structural(tok, grammar.vocab_size)
    rng = random.Random(0)
    for _ in range(6):
        text = tok.decode(walk(grammar.matcher(), tok, rng, structural))
        jsonschema.validate(json.loads(text), schema)
        if compact:
            assert not re.search(r"\s", re.sub(r'"(\\.|[^"\\])*"', '""', text)), text


def test_json_object_and_schema_as_text(tok):
    rng = random.Random(1)
    structural = _structural(tok, len(tok))
    for params in (S(json_object=True), S(json=json.dumps(SCHEMAS[1]))):
        grammar = so.compile(params, tok)
        for _ in range(4):
            value = json.loads(tok.decode(walk(grammar.matcher(), tok, rng, structural)))
            assert isinstance(value, dict if params.json_object else list)


@pytest.mark.parametrize("regex", REGEXES)
def test_regex_walks_match(tok, regex):
    grammar = so.compile(S(regex=regex), tok)
    rng = random.Random(2)
    for _ in range(8):
        text = tok.decode(walk(grammar.matcher(), tok, rng))
        assert re.fullmatch(regex, text), (regex, text)


def test_choice_walks_are_choices(tok):
    grammar = so.compile(S(choice=CHOICES), tok)
    rng = random.Random(3)
    seen = {tok.decode(walk(grammar.matcher(), tok, rng)) for _ in range(40)}
    assert seen <= set(CHOICES) and len(seen) >= 3, seen


def test_lark_and_gbnf_grammars(tok):
    lark = 'start: "(" expr ")"\nexpr: NUM | NUM "+" expr\nNUM: /[0-9]{1,2}/'
    gbnf = 'root ::= "(" expr ")"\nexpr ::= num | num "+" expr\nnum ::= [0-9] [0-9]?'
    rng = random.Random(4)
    for text_grammar in (lark, gbnf):
        grammar = so.compile(S(grammar=text_grammar), tok)
        for _ in range(5):
            text = tok.decode(walk(grammar.matcher(), tok, rng))
            assert re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})*\)", text), text


def test_mask_matches_per_token_validation(tok):
    """Fast path (the packed mask) against the slow one: validate_tokens on every vocab id."""
    grammar = so.compile(S(json=SCHEMAS[0]), tok)
    m = grammar.matcher()
    text = '{"name": "Ada", "age": 3'
    for t in tok.encode(text, add_special_tokens=False):
        assert m.accept(t)
    row = so.allocate_bitmask(1, grammar.vocab_size)[0]
    m.fill_bitmask(row)
    slow = [t for t in range(grammar.vocab_size) if m.validate_tokens([t]) == 1]
    assert so.allowed_tokens(row, grammar.vocab_size).tolist() == slow
    assert 0 < len(slow) < grammar.vocab_size


def test_batched_fill_equals_single_rows_and_padding(tok):
    grammars = [so.compile(S(json=SCHEMAS[0]), tok), so.compile(S(regex=REGEXES[0]), tok),
                so.compile(S(choice=CHOICES), tok)]
    prefixes = ['{"name": "A', "ab@", "New"]
    matchers = []
    for g, p in zip(grammars, prefixes):
        m = g.matcher()
        assert all(m.accept(t) for t in tok.encode(p, add_special_tokens=False))
        matchers.append(m)
    batch = so.allocate_bitmask(5, len(tok))
    so.fill_bitmasks([(m, i + 1) for i, m in enumerate(matchers)], batch)
    assert (batch[0] == -1).all() and (batch[4] == -1).all()  # free rows untouched
    for i, m in enumerate(matchers):
        row = np.zeros(so.num_words(len(tok)) + 2, np.int32)  # a padded model vocabulary
        m.fill_bitmask(row)
        np.testing.assert_array_equal(row[:-2], batch[i + 1])
        assert (row[-2:] == 0).all()


def test_apply_bitmask_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 70)).astype(np.float32)
    bitmask = rng.integers(-2**31, 2**31, size=(3, so.num_words(70)), dtype=np.int64).astype(
        np.int32)
    masked = so.apply_bitmask_reference(logits, bitmask)
    for b in range(3):
        allowed = so.allowed_tokens(bitmask[b], 70)
        assert np.isfinite(masked[b]).nonzero()[0].tolist() == allowed.tolist()
        np.testing.assert_array_equal(masked[b, allowed], logits[b, allowed])
    with pytest.raises(ValueError, match="words"):
        so.apply_bitmask_reference(logits, bitmask[:, :2])


def test_eos_rollback_and_termination(tok):
    eos = tok.eos_token_id
    m = so.compile(S(choice=["no way", "no"]), tok).matcher()
    no, way = tok.encode("no way", add_special_tokens=False)
    assert m.accept(no) and m.is_accepting() and not m.is_terminated()
    assert m.validate_tokens([way, eos, eos]) == 3
    assert m.accept(way) and m.is_terminated()
    assert not m.accept(no)  # after the end only EOS
    assert m.accept(eos) and m.is_terminated()
    m.rollback(2)  # the EOS and " way": back to "no", which may go on or end
    assert m.is_accepting() and not m.is_terminated()
    row = so.allocate_bitmask(1, len(tok))[0]
    m.fill_bitmask(row)
    allowed = set(so.allowed_tokens(row, len(tok)).tolist())
    assert {way, eos} <= allowed  # and the shorter pieces of " way" (" ", " w", ...)
    assert all(" way".startswith(tok.decode([t])) for t in allowed - {eos})
    m.reset()
    assert not m.is_accepting()


def test_several_eos_ids(tok):
    eos_ids = [tok.eos_token_id, 0]  # e.g. Llama 3's <|eot_id|> beside <|end_of_text|>
    m = so.compile(S(regex="ab"), tok, eos_token_ids=eos_ids).matcher()
    assert all(m.accept(t) for t in tok.encode("ab", add_special_tokens=False))
    row = so.allocate_bitmask(1, len(tok))[0]
    m.fill_bitmask(row)
    assert sorted(so.allowed_tokens(row, len(tok)).tolist()) == sorted(eos_ids)
    assert m.accept(0)


def test_compile_is_cached_per_spec(tok):
    a = so.compile(S(json={"type": "object", "properties": {"b": {}, "a": {}}}), tok)
    assert so.compile(S(json={"type": "object", "properties": {"b": {}, "a": {}}}), tok) is a
    assert so.compile(S(json={"type": "object", "properties": {"a": {}, "b": {}}}), tok) is not a
    assert so.compile(S(json={"type": "object", "properties": {"b": {}, "a": {}}},
                        disable_any_whitespace=True), tok) is not a


@pytest.mark.parametrize("params, field, words", [
    (S(json="{not json"), "json", "not JSON"),
    (S(json={"type": "strange"}), "json", "strange"),
    (S(json={"type": "object", "properties": {"a": {"$ref": "#/nope"}}}), "json", "nope"),
    (S(regex="[a-"), "regex", "unclosed"),
    (S(grammar="start: missing_rule"), "grammar", "missing_rule"),
    (S(grammar="root ::= undefined-rule"), "grammar", "undefined-rule"),
])
def test_bad_specs_name_the_field(tok, params, field, words):
    with pytest.raises(ValueError, match=words) as e:
        so.compile(params, tok)
    assert e.value.field == field and f"structured_outputs.{field}" in str(e.value)


def test_params_validation():
    assert S(regex="a").kind == "regex" and S(json_object=True).kind == "json_object"
    for bad, words in [({}, "exactly one"), (dict(regex="a", choice=["b"]), "exactly one"),
                       (dict(choice=[]), "choice"), (dict(choice=["a", 1]), "choice"),
                       (dict(json=3), "json"), (dict(grammar=" "), "grammar"),
                       (dict(structural_tag="{}"), "structural_tag")]:
        with pytest.raises(ValueError, match=words):
            S(**bad)
    assert SamplingParams(structured_outputs=S(regex="a")).structured_outputs.regex == "a"
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})
