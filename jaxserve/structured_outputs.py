"""Structured outputs on the host: StructuredOutputsParams -> Grammar (llguidance, cached per spec)
-> one Matcher per sequence, which fills that sequence's row of the packed token bitmask each step
and accepts the token the sampler drew.

Bitmask layout (what the device sampler reads): i32[B, W] with W >= num_words(V) = ceil(V / 32);
token t is allowed iff (row[t // 32] >> (t % 32)) & 1. Free rows are all ones (-1); words past the
tokenizer's vocabulary (a padded model vocab) are zero. No JAX here: this module runs beside the
scheduler, on the host.
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from jaxserve.sampling_params import StructuredOutputsParams

_CACHE_SIZE = 256  # compiled grammars kept per tokenizer (LRU)


class GrammarError(ValueError):
    """A spec that does not compile; `field` names it (json, regex, choice, grammar)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"structured_outputs.{field} is invalid: {message}")
        self.field = field


def num_words(vocab_size: int) -> int:
    """W: i32 words per bitmask row for a vocabulary of `vocab_size` tokens."""
    return (vocab_size + 31) // 32


def allocate_bitmask(batch: int, vocab_size: int) -> np.ndarray:
    """i32[batch, num_words(vocab_size)], all tokens allowed (-1 = 32 set bits)."""
    return np.full((batch, num_words(vocab_size)), -1, dtype=np.int32)


def allowed_tokens(row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The ids whose bit is set in one row i32[W] (slow and obvious: for tests and debugging)."""
    bits = np.unpackbits(np.ascontiguousarray(row, dtype=np.int32).view(np.uint8),
                         bitorder="little")
    return np.flatnonzero(bits[:vocab_size])


def apply_bitmask_reference(logits: np.ndarray, bitmask: np.ndarray) -> np.ndarray:
    """The device op's slow, obvious oracle: logits f32[B, V] with -inf where token t's bit in
    bitmask[b] (i32[B, W], W * 32 >= V) is 0."""
    vocab = logits.shape[1]
    if bitmask.shape[1] * 32 < vocab:
        raise ValueError(f"bitmask has {bitmask.shape[1]} words, {vocab=} needs {num_words(vocab)}")
    bits = np.unpackbits(np.ascontiguousarray(bitmask, dtype=np.int32).view(np.uint8), axis=1,
                         bitorder="little")[:, :vocab].astype(bool)
    return np.where(bits, logits, -np.inf)


def _no_additional_properties(schema):
    """vLLM's disable_additional_properties: every object schema that does not say otherwise
    gets additionalProperties false (recursively)."""
    if isinstance(schema, list):
        return [_no_additional_properties(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _no_additional_properties(v) for k, v in schema.items()}
    if ("properties" in out or out.get("type") == "object") and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar for one spec (not yet checked against a tokenizer)."""
    import llguidance

    kind = params.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(kind, f"not JSON: {e}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(kind, f"a JSON Schema is an object, got {type(schema).__name__}")
        if params.disable_additional_properties:
            schema = _no_additional_properties(schema)
        options = {"whitespace_flexible": not params.disable_any_whitespace}
        if params.whitespace_pattern is not None:
            options["whitespace_pattern"] = params.whitespace_pattern
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        except ValueError as e:
            raise GrammarError(kind, str(e)) from None
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(params.regex)
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(
            "start: " + " | ".join(json.dumps(c) for c in params.choice))
    try:  # GBNF is converted to Lark; Lark passes through
        return llguidance.grammar_from("grammar", params.grammar)
    except ValueError as e:
        raise GrammarError(kind, str(e)) from None


def _cache_key(params: StructuredOutputsParams) -> str:
    # Not sort_keys: a schema's property order is the order the output writes them in.
    return json.dumps([params.kind, getattr(params, params.kind), params.disable_any_whitespace,
                       params.disable_additional_properties, params.whitespace_pattern])


class Grammar:
    """A compiled spec; `matcher()` starts one sequence on it (a copy of a ready matcher)."""

    def __init__(self, template, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._template = template  # an llguidance.LLMatcher at the start, never advanced
        self.vocab_size = vocab_size  # V of the tokenizer; bits at and past V are zero
        self.eos_token_ids = eos_token_ids

    def matcher(self) -> Matcher:
        return Matcher(self._template.deep_copy(), self.vocab_size, self.eos_token_ids)


class Matcher:
    """One sequence's position in a Grammar. Not thread-safe: one owner (the engine loop)."""

    def __init__(self, ll_matcher, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._m = ll_matcher
        self.vocab_size = vocab_size
        self.num_words = num_words(vocab_size)
        self.eos_token_ids = frozenset(eos_token_ids)
        # EOS accepted after the grammar terminated: llguidance takes it as a no-op that its own
        # rollback does not count, so rollback() has to.
        self._eos_after_stop = 0

    def fill_bitmask(self, row: np.ndarray) -> None:
        """Write the allowed next tokens into `row`, i32[W >= num_words(V)], C-contiguous (a row
        of a [B, W] array is). EOS ids are set once the grammar accepts; only they once it is
        terminated. Words past num_words(V) are zeroed."""
        if row.dtype != np.int32 or row.ndim != 1 or not row.flags.c_contiguous:
            raise ValueError(f"row must be a contiguous i32[W], got {row.dtype=}, {row.shape=}")
        if row.shape[0] < self.num_words:
            raise ValueError(f"row has {row.shape[0]} words, the vocabulary needs "
                             f"{self.num_words}")
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, self.num_words * 4)
        row[self.num_words:] = 0

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and the matcher stays unchanged) if the grammar
        does not allow it."""
        token_id = int(token_id)
        if self._m.is_stopped():
            if token_id not in self.eos_token_ids:
                return False
            self._eos_after_stop += 1
            return True
        return self._m.try_consume_tokens([token_id]) == 1  # all or nothing for one token

    def validate_tokens(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids`, in order, accept() would take from here (no change)."""
        ids = [int(t) for t in token_ids]
        if self._m.is_stopped():
            return next((i for i, t in enumerate(ids) if t not in self.eos_token_ids), len(ids))
        n = self._m.validate_tokens(ids)
        if n < len(ids) and n > 0 and ids[n] in self.eos_token_ids:
            # the prefix may end the grammar, after which EOS is accepted: check on a copy
            probe = Matcher(self._m.deep_copy(), self.vocab_size, tuple(self.eos_token_ids))
            if probe._m.consume_tokens(ids[:n]) and probe._m.is_stopped():
                return n + probe.validate_tokens(ids[n:])
        return n

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (speculative or pending tokens)."""
        undo_eos = min(num_tokens, self._eos_after_stop)
        self._eos_after_stop -= undo_eos
        num_tokens -= undo_eos
        if num_tokens and not self._m.rollback(num_tokens):
            raise ValueError(f"cannot roll back {num_tokens=}: {self._m.get_error()}")

    def is_terminated(self) -> bool:
        """Nothing but EOS may follow (or EOS was accepted): the sequence should finish."""
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        """The text so far is a complete match (EOS is allowed now)."""
        return self._m.is_accepting()

    def reset(self) -> None:
        self._eos_after_stop = 0
        self._m.reset()


class GrammarCompiler:
    """Compiles specs for one tokenizer; an LRU of Grammars keyed by spec. Thread-safe."""

    def __init__(self, tokenizer, eos_token_ids: Sequence[int] | None = None,
                 cache_size: int = _CACHE_SIZE):
        import llguidance.hf

        eos = list(eos_token_ids or [tokenizer.eos_token_id])
        # ~0.4 s for a 49k vocabulary: done once per tokenizer (module-level compile() caches it)
        self._ll_tokenizer = llguidance.hf.from_tokenizer(
            tokenizer, eos_token=None if None in eos else [int(t) for t in eos])
        self.eos_token_ids = tuple(self._ll_tokenizer.eos_tokens)
        self.vocab_size = self._ll_tokenizer.vocab_size
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> Grammar:
        """The Grammar for `params`; GrammarError (a ValueError naming the field) if it does not
        compile."""
        import llguidance

        key = _cache_key(params)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        template = llguidance.LLMatcher(self._ll_tokenizer, grammar_text(params), log_level=0)
        if template.is_error():
            raise GrammarError(params.kind, template.get_error())
        grammar = Grammar(template, self.vocab_size, self.eos_token_ids)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar


_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer, eos_token_ids: Sequence[int] | None = None) -> GrammarCompiler:
    """The GrammarCompiler of `tokenizer` (built on first use, kept while the tokenizer lives)."""
    key = tuple(sorted({int(t) for t in eos_token_ids})) if eos_token_ids else None
    with _compilers_lock:
        per_eos = _compilers.setdefault(tokenizer, {})
        if key not in per_eos:
            per_eos[key] = GrammarCompiler(tokenizer, key)
        return per_eos[key]


def compile(params: StructuredOutputsParams, tokenizer,  # noqa: A001 - vLLM-like verb
            eos_token_ids: Sequence[int] | None = None) -> Grammar:
    """StructuredOutputsParams -> Grammar for `tokenizer` (a HF fast tokenizer), cached per spec.
    eos_token_ids: the ids that end a sequence (default: the tokenizer's eos_token_id)."""
    return compiler_for(tokenizer, eos_token_ids).compile(params)


def fill_bitmasks(rows: Sequence[tuple[Matcher, int]], bitmask: np.ndarray) -> None:
    """Fill bitmask[i] for each (matcher, i), in parallel on llguidance's threads (the GIL is
    released). bitmask: i32[B, W], C-contiguous, W == the matchers' num_words; rows not named
    are left as they are."""
    if not rows:
        return
    words = rows[0][0].num_words
    if bitmask.dtype != np.int32 or bitmask.ndim != 2 or not bitmask.flags.c_contiguous \
            or bitmask.shape[1] != words:
        raise ValueError(f"bitmask must be a contiguous i32[B, {words}], got {bitmask.dtype=}, "
                         f"{bitmask.shape=}")
    batch = bitmask.shape[0]
    bad = [i for _, i in rows if not 0 <= i < batch]
    if bad:
        raise ValueError(f"row indices {bad[:5]} are outside the bitmask's {batch} rows")
    _executor().unsafe_compute_mask_ptr([(m._m, i) for m, i in rows], bitmask.ctypes.data,
                                        words * 4, batch)


def accept_tokens(rows: Sequence[tuple[Matcher, int]]) -> list[bool]:
    """Matcher.accept(token) for each (matcher, token), the running grammars advanced in parallel
    on llguidance's threads (one call for the step: 512 matchers took 1.9 ms one by one on 2
    cores, 0.5 ms so). Unlike accept(), a matcher that refuses its token is left in llguidance's
    error state: the engine ends that sequence (its mask forbade the token: a bug)."""
    ok = [True] * len(rows)
    batch, where = [], []
    for i, (m, token) in enumerate(rows):
        if m._m.is_stopped():  # only EOS follows: accept() counts it
            ok[i] = m.accept(token)
        else:
            batch.append((m._m, int(token)))
            where.append(i)
    if batch:
        for i, accepted in zip(where, _executor().consume_token_par(batch)):
            ok[i] = accepted
    return ok


_executor_instance = None


def _executor():
    """llguidance's thread pool for fill_bitmasks (created on first use)."""
    global _executor_instance
    with _compilers_lock:
        if _executor_instance is None:
            import llguidance

            _executor_instance = llguidance.LLExecutor()
    return _executor_instance
