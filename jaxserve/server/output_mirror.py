"""RequestMirror: the API server's copy of one engine request, rebuilt from the core's deltas.

engine core --RequestDelta (token ids)--> apply() (event loop thread) --output()--> the cumulative
RequestOutput responses.py reads. Detokenization happens in output(), i.e. when the HTTP stream is
ready to send: a client that falls behind gets the tokens of several steps detokenized at once and
sent as one SSE chunk. Text is the engine's Detokenizer run here, so it equals LLM.generate's.
"""
from __future__ import annotations

from jaxserve.detokenizer import Detokenizer, DetokenizerState
from jaxserve.logprobs import SampleLogprobs
from jaxserve.outputs import CompletionOutput, RequestOutput
from jaxserve.sampling_params import SamplingParams


class _SeqMirror:
    """One completion: its token ids, text state, logprobs and finish."""

    def __init__(self, detok: DetokenizerState, logprobs: SampleLogprobs | None):
        self.token_ids: list[int] = []
        self.detok = detok
        self.core_text = ""  # stop-string sequences: the text the core cut (it checks stops)
        self.logprobs = logprobs
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestMirror:
    """Cumulative RequestOutputs of one engine request, built on demand from its deltas."""

    def __init__(self, request_id: str, prompt: dict, params: SamplingParams,
                 detokenizer: Detokenizer, arrival: float):
        self.request_id = request_id
        self.prompt: str | None = prompt.get("prompt")
        self.prompt_token_ids: list[int] = prompt["prompt_token_ids"]
        self.params = params
        self.detokenizer = detokenizer
        self.arrival = arrival
        self.first_token_time: float | None = None
        self.num_cached_tokens = 0
        self.prompt_logprobs = None
        self.seqs = [_SeqMirror(detokenizer.start(self.prompt_token_ids),
                                SampleLogprobs(detokenizer.token_text)
                                if params.logprobs is not None else None)
                     for _ in range(params.n)]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def apply(self, seq_deltas: list[tuple], first: tuple | None) -> None:
        """Append one step's news (engine_core.RequestDelta's parts)."""
        if first is not None:
            self.num_cached_tokens, self.prompt_logprobs, _, self.first_token_time = first
        for index, token_ids, finish_reason, stop_reason, text, logprobs in seq_deltas:
            seq = self.seqs[index]
            seq.token_ids.extend(token_ids)
            seq.finish_reason, seq.stop_reason = finish_reason, stop_reason
            if text is not None:  # the core's text, cut at a stop string
                start, added = text
                seq.core_text = seq.core_text[:start] + added
            if logprobs is not None:
                for entry in zip(*logprobs):
                    seq.logprobs.append(*entry)

    def output(self) -> RequestOutput:
        """The RequestOutput LLMEngine would have streamed after the same tokens."""
        completions = [self._completion(i, seq) for i, seq in enumerate(self.seqs)]
        metrics = {"arrival_time": self.arrival, "first_token_time": self.first_token_time}
        return RequestOutput(request_id=self.request_id, prompt=self.prompt,
                             prompt_token_ids=self.prompt_token_ids, outputs=completions,
                             finished=self.finished, prompt_logprobs=self.prompt_logprobs,
                             num_cached_tokens=self.num_cached_tokens, metrics=metrics)

    def _completion(self, index: int, seq: _SeqMirror) -> CompletionOutput:
        stops = self.params.stop_strings
        if stops:
            text = seq.core_text
            if not seq.finished:  # hold back a possible stop-string prefix (as the engine does)
                text = text[:max(0, len(text) - max(map(len, stops)) + 1)]
        else:
            if seq.detok.consumed < len(seq.token_ids) or seq.finished:
                self.detokenizer.step(seq.detok, seq.token_ids[seq.detok.consumed:],
                                      self.params.skip_special_tokens, final=seq.finished)
            text = seq.detok.text
        logprobs = cumulative = None
        if seq.logprobs is not None:
            logprobs, cumulative = seq.logprobs.view(), seq.logprobs.cumulative_logprob
        return CompletionOutput(index=index, text=text, token_ids=list(seq.token_ids),
                                cumulative_logprob=cumulative, logprobs=logprobs,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
