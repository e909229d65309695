"""Per-request token controls on the host (no jax): what the sampler may pick and how it is biased.

logit_bias, allowed_token_ids, bad_words, min_tokens' banned stop tokens and structured outputs become
two per-row sampler inputs, built by the engine for the rows that need them and applied on device:
- a packed bitmask of allowed tokens, i32[B, W] with W = ceil(V / 32): token t is allowed iff bit
  t % 32 of word t // 32 is set (jaxserve.structured_outputs fills grammar rows in this layout);
- a sparse additive bias, i32[B, MAX_LOGIT_BIAS] ids (pad = V) and f32 values.
Masks that depend on the tokens so far (a grammar, a multi-token bad word) are `dynamic`: the
scheduler does not run such a sequence ahead of its pending token (see Scheduler._schedule_running).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxserve.sampling_params import MAX_LOGIT_BIAS, SamplingParams

ALL = np.int32(-1)  # a word with every bit set


def num_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def mask_row(token_ids, vocab_size: int) -> np.ndarray:
    """i32[W] with the bits of token_ids set."""
    row = np.zeros(num_words(vocab_size), np.uint32)
    ids = np.asarray(list(token_ids), np.int64)
    np.bitwise_or.at(row, ids // 32, np.left_shift(np.uint32(1), (ids % 32).astype(np.uint32)))
    return row.view(np.int32)


def clear_bits(row: np.ndarray, token_ids) -> None:
    """Clear the bits of token_ids in the i32[W] row (in place)."""
    words = row.view(np.uint32)
    for t in token_ids:
        words[t // 32] &= np.uint32(~(1 << (t % 32)) & 0xFFFFFFFF)


def bad_words_token_ids(words: list[str], tokenizer) -> list[list[int]]:
    """vLLM's rule: each word as encoded alone, plus its leading-space form when that is a
    different token sequence of the same length (the word mid-sentence)."""
    out = []
    for word in words:
        alone = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if alone:
            out.append(alone)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if spaced and alone and spaced[0] != alone[0] and len(spaced) == len(alone):
            out.append(spaced)
    return out


class RequestControls:
    """The controls of one request, prepared once at add_request (shared by its n sequences)."""

    def __init__(self, params: SamplingParams, vocab_size: int, *, tokenizer=None, grammar=None):
        self.vocab_size = vocab_size
        self.grammar = grammar  # jaxserve.structured_outputs.Grammar or None
        self.static_row = None  # i32[W]: allowed tokens that do not change (or None: all)
        if params.allowed_token_ids is not None:
            self.static_row = mask_row(params.allowed_token_ids, vocab_size)
        self.bad_sequences: list[tuple[tuple[int, ...], int]] = []  # (prefix, last) multi-token
        single = []
        for ids in bad_words_token_ids(params.bad_words or [], tokenizer):
            if len(ids) == 1:
                single.append(ids[0])
            else:
                self.bad_sequences.append((tuple(ids[:-1]), ids[-1]))
        if single:
            if self.static_row is None:
                self.static_row = np.full(num_words(vocab_size), ALL)
            clear_bits(self.static_row, single)
        self.bias = None
        if params.logit_bias:
            self.bias = (np.fromiter(params.logit_bias, np.int32),
                         np.fromiter(params.logit_bias.values(), np.float32))

    @property
    def dynamic(self) -> bool:
        """The mask depends on the tokens generated so far."""
        return self.grammar is not None or bool(self.bad_sequences)

    @property
    def masks(self) -> bool:
        return self.static_row is not None or self.dynamic


@dataclass
class TokenInputs:
    """A step's token controls for the runner; None = no row has one (the runner passes a
    device-resident neutral input instead of copying one)."""

    mask: np.ndarray | None = None  # i32[B, W] allowed-token bits
    bias_ids: np.ndarray | None = None  # i32[B, MAX_LOGIT_BIAS] (pad = V)
    bias_values: np.ndarray | None = None  # f32[B, MAX_LOGIT_BIAS]


def step_inputs(seqs, vocab_size: int, fill_grammar_rows) -> TokenInputs:
    """The token controls of a step's sequences (row b = seqs[b]). A sequence's mask: its grammar
    row (fill_grammar_rows([(matcher, b)], mask) fills those), AND its static row, minus the last
    tokens of bad words whose prefix ends its output, minus stop tokens while under min_tokens
    (counting the token in flight, which the step's sample follows)."""
    mask = bias_ids = bias_values = None
    grammar_rows, todo = [], []  # todo: the rows with controls or under min_tokens
    for b, seq in enumerate(seqs):
        c = seq.controls
        under_min = len(seq.output_token_ids) + seq.num_pending < seq.params.min_tokens
        if c is None and not under_min:
            continue
        todo.append((b, seq, c, under_min))
        if (c is None or not c.masks) and not under_min:
            continue
        if mask is None:
            mask = np.full((len(seqs), num_words(vocab_size)), ALL)
        if c is not None and c.grammar is not None and seq.matcher is not None:
            grammar_rows.append((seq.matcher, b))
    if grammar_rows:
        fill_grammar_rows(grammar_rows, mask)
    for b, seq, c, under_min in todo:
        if mask is not None:
            if c is not None and c.static_row is not None:
                mask[b] &= c.static_row
            if c is not None and c.bad_sequences:
                out = seq.output_token_ids
                clear_bits(mask[b], [last for prefix, last in c.bad_sequences
                                     if len(prefix) <= len(out)
                                     and tuple(out[len(out) - len(prefix):]) == prefix])
            if under_min:
                clear_bits(mask[b], seq.eos_token_ids | set(seq.params.stop_token_ids))
        if c is not None and c.bias is not None:
            if bias_ids is None:
                bias_ids = np.full((len(seqs), MAX_LOGIT_BIAS), vocab_size, np.int32)
                bias_values = np.zeros((len(seqs), MAX_LOGIT_BIAS), np.float32)
            ids, values = c.bias
            bias_ids[b, :len(ids)], bias_values[b, :len(ids)] = ids, values
    return TokenInputs(mask, bias_ids, bias_values)
