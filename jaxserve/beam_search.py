"""Beam search (vLLM's `LLM.beam_search`, `BeamSearchParams`, `BeamSearchOutput`) over an LLMEngine.

Sits beside llm.py, above the engine: every step, each live beam of every prompt is one engine
request (its tokens as the prompt, max_tokens=1, logprobs=2*beam_width), all of them queued
together (one engine step when they fit max_num_batched_tokens); the candidates they report are
scored on the host and the best beam_width kept per prompt.

KV sharing: the beams' requests go through the engine's prefix cache (enable_prefix_caching, on
by default). A beam's request finds every full page its parent computed one step earlier (the
prompt's and the generated tokens', registered in pages.py and kept while unreferenced), so each
step recomputes only the tokens after the last full page: `len(tokens) - page_size *
((len(tokens) - 1) // page_size)` tokens, 1 to page_size per beam. That recompute plays the role
of copy-on-write of the last partial page: full pages are shared through their ref counts and
never written, the partial page is rebuilt in a page of the beam's own. Without prefix caching
every beam recomputes its whole sequence every step (correct, slow).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from jaxserve.outputs import Logprob, RequestOutput
from jaxserve.sampling_params import RequestOutputKind, SamplingParams


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's fields and defaults. include_stop_str_in_output is accepted for compatibility:
    beam search has no stop strings (vLLM ignores it too)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0  # > 0 adds a sampled token to each beam's candidates (vLLM's rule)
    length_penalty: float = 1.0  # score = cum_logprob / len(tokens) ** length_penalty
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        checks = [
            (_is_int(self.beam_width) and self.beam_width >= 1,
             f"beam_width must be an int >= 1, got {self.beam_width=}"),
            (_is_int(self.max_tokens) and self.max_tokens >= 1,
             f"max_tokens must be an int >= 1, got {self.max_tokens=}"),
            (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
             and self.temperature >= 0.0,
             f"temperature must be a finite number >= 0, got {self.temperature=}"),
            (isinstance(self.length_penalty, (int, float)) and math.isfinite(self.length_penalty),
             f"length_penalty must be a finite number, got {self.length_penalty=}"),
            (isinstance(self.ignore_eos, bool),
             f"ignore_eos must be a bool, got {self.ignore_eos=}"),
            (isinstance(self.include_stop_str_in_output, bool),
             f"include_stop_str_in_output must be a bool, got {self.include_stop_str_in_output=}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class BeamSearchSequence:
    """One beam. As in vLLM, `tokens` holds the prompt and the generated ids, and `text` decodes
    all of them (special tokens kept); it is filled only on the returned beams."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]  # per generated token: the candidates its step reported
    cum_logprob: float = 0.0  # sum of the generated tokens' logprobs (raw model distribution)
    text: str | None = None
    finish_reason: str | None = None  # "stop" (EOS) | "length" (max_tokens or max_model_len)
    stop_reason: int | str | None = None  # always None: EOS is not a stop reason (vLLM)


@dataclass
class BeamSearchOutput:
    """The best beams of one prompt, best first: at most beam_width of them."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Instance:
    """One prompt's search: the live beams and those that ended."""

    beams: list[BeamSearchSequence]
    completed: list[BeamSearchSequence] = field(default_factory=list)


def beam_search_score(tokens: list[int], cum_logprob: float, eos_token_ids, length_penalty: float
                      ) -> float:
    """vLLM's score (after transformers' BeamHypotheses): cum_logprob / length ** length_penalty,
    where length counts the prompt and the generated tokens, a final EOS excluded."""
    length = len(tokens) - (tokens[-1] in eos_token_ids)
    return cum_logprob / (length ** length_penalty)


def beam_search(engine, prompts, params: BeamSearchParams, request_ids: Iterator[str],
                use_tqdm: bool = False, concurrency_limit: int | None = None
                ) -> list[BeamSearchOutput]:
    """Beam search for each prompt (forms as generate() takes them); outputs in prompt order.

    Runs at most max_tokens steps (vLLM's loop: no early stop while any beam is live). Each step
    every live beam proposes its 2*beam_width best next tokens (plus the sampled one when
    temperature > 0); candidates ending in EOS (unless ignore_eos) are kept aside as finished,
    the best beam_width others by score live on. The answer is the best beam_width of the
    finished and the live beams. request_ids: fresh ids for the engine requests.

    Where this (vLLM's rule) differs from transformers' num_beams search: the score's length
    counts the prompt (transformers': the output only), every EOS candidate is kept as finished
    (transformers': only those ranked within num_beams of all candidates), and no early-stopping
    heuristic ends the search. Without EOS among the candidates both give the same beams. EOS is
    any of the engine's eos_token_ids (vLLM: the tokenizer's one eos_token_id).
    """
    if not isinstance(params, BeamSearchParams):
        raise TypeError(f"params must be BeamSearchParams, got {type(params).__name__}")
    if concurrency_limit is not None and (not _is_int(concurrency_limit) or concurrency_limit < 1):
        raise ValueError(f"concurrency_limit must be an int >= 1, got {concurrency_limit=}")
    ip = engine.input_processor
    max_logprobs = ip.limits.max_logprobs
    if 2 * params.beam_width > max_logprobs:
        raise ValueError(f"beam_width={params.beam_width} asks the engine for "
                         f"{2 * params.beam_width} logprobs per step, above {max_logprobs=} "
                         f"(raise the engine's max_logprobs)")
    step_params = SamplingParams(temperature=params.temperature, max_tokens=1,
                                 logprobs=2 * params.beam_width, ignore_eos=True,
                                 output_kind=RequestOutputKind.FINAL_ONLY)
    instances = []
    whole = dataclasses.replace(step_params, max_tokens=params.max_tokens)
    for prompt in ip.prompt_list(prompts):  # every prompt checked before any work starts
        ids = ip.process_prompt(prompt).token_ids
        ip.check_params(whole, len(ids))  # a beam of max_tokens (capped at the context) fits
        instances.append(_Instance([BeamSearchSequence(tokens=ids, logprobs=[])]))
    limit = concurrency_limit or len(instances)
    for start in range(0, len(instances), limit):
        _search(engine, instances[start:start + limit], params, step_params, request_ids,
                use_tqdm)
    return [_best(engine, inst, params) for inst in instances]


def _search(engine, instances: list[_Instance], params: BeamSearchParams,
            step_params: SamplingParams, request_ids: Iterator[str], use_tqdm: bool) -> None:
    """Advance `instances` until max_tokens steps ran or no beam is live."""
    eos = frozenset() if params.ignore_eos else engine.eos_token_ids
    for _ in tqdm(range(params.max_tokens), desc="Beam search", unit="step",
                  disable=not use_tqdm, dynamic_ncols=True):
        for inst in instances:  # a beam at the context limit cannot grow: it ends here
            full = [b for b in inst.beams if len(b.tokens) >= engine.max_model_len]
            for beam in full:
                beam.finish_reason = "length"
            inst.completed += full
            inst.beams = [b for b in inst.beams if len(b.tokens) < engine.max_model_len]
        live = [beam for inst in instances for beam in inst.beams]
        if not live:
            return
        outputs = iter(_run_step(engine, [b.tokens for b in live], step_params, request_ids))
        for inst in instances:
            candidates = []
            for beam in inst.beams:
                entry = next(outputs).outputs[0].logprobs[0]  # {token: Logprob}, rank order
                for token, lp in entry.items():
                    child = BeamSearchSequence(tokens=beam.tokens + [token],
                                               logprobs=beam.logprobs + [entry],
                                               cum_logprob=beam.cum_logprob + lp.logprob)
                    if token in eos:
                        child.finish_reason = "stop"
                        inst.completed.append(child)
                    else:
                        candidates.append(child)
            candidates.sort(key=lambda b: _score(b, engine.eos_token_ids, params), reverse=True)
            inst.beams = candidates[:params.beam_width]


def _run_step(engine, token_lists: list[list[int]], step_params: SamplingParams,
              request_ids: Iterator[str]) -> list[RequestOutput]:
    """One engine request per beam, stepped until all finished; outputs in input order."""
    ids: list[str] = []
    results: dict[str, RequestOutput] = {}
    try:
        for tokens in token_lists:
            rid = next(request_ids)
            engine.add_request(rid, {"prompt_token_ids": tokens}, step_params)
            ids.append(rid)
        while len(results) < len(ids):
            if not engine.has_unfinished_requests():
                missing = sorted(set(ids) - set(results))
                raise RuntimeError(f"the engine dropped beam requests {missing}")
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
    except BaseException:  # a failed (or interrupted) search leaves nothing queued behind it
        engine.abort_request([rid for rid in ids if rid not in results])
        raise
    return [results[rid] for rid in ids]


def _score(beam: BeamSearchSequence, eos, params: BeamSearchParams) -> float:
    return beam_search_score(beam.tokens, beam.cum_logprob, eos, params.length_penalty)


def _best(engine, inst: _Instance, params: BeamSearchParams) -> BeamSearchOutput:
    for beam in inst.beams:
        beam.finish_reason = "length"
    # As in vLLM the score drops a final EOS from the length even under ignore_eos.
    ranked = sorted(inst.completed + inst.beams,
                    key=lambda b: _score(b, engine.eos_token_ids, params),
                    reverse=True)[:params.beam_width]
    for beam in ranked:
        beam.text = engine.detokenizer.decode(beam.tokens, skip_special_tokens=False)
    return BeamSearchOutput(sequences=ranked)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
