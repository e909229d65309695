"""LLMEngine: add_request / step / abort_request over the scheduler and the model runner.

step() is schedule -> dispatch -> (schedule and dispatch the next step) -> fetch -> update, then
the output processor (jaxserve/output_processor.py: logprobs, detokenization, stop strings,
RequestOutputs).
"""
from __future__ import annotations

import logging
import time

import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.detokenizer import Detokenizer
from jaxserve.input_processor import InputLimits, InputProcessor
from jaxserve import structured_outputs
from jaxserve.logprobs import SampleLogprobs
from jaxserve.lora import LoRAManager, LoRARequest
from jaxserve.output_processor import OutputProcessor, RequestState
from jaxserve.outputs import RequestOutput
from jaxserve.request import Sequence
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduler import Scheduler
from jaxserve.token_controls import RequestControls, step_inputs

logger = logging.getLogger("jaxserve")


class LLMEngine:
    supports_structured_outputs = True  # read by the server: constrained requests reach the engine
    def __init__(self, config: EngineConfig, parts=None):
        """parts: startup.EngineParts already built (benchmarks/host_step.py passes a runner
        without a device); default: built from `config`."""
        from jaxserve.startup import build_engine_parts  # imports jax; keeps this module light

        start = time.perf_counter()
        parts = parts or build_engine_parts(config)
        self.config = config = parts.config  # batch limits left to the device are filled in
        self.model_config = parts.model_config
        self.model_name = parts.model_name
        self.tokenizer = parts.tokenizer
        self.chat_template = parts.chat_template
        self.eos_token_ids = parts.eos_token_ids
        self.max_model_len = parts.max_model_len
        self.runner = parts.runner
        self.num_kv_pages = parts.num_kv_pages
        self.scheduler = Scheduler(
            num_pages=parts.num_kv_pages, page_size=config.page_size,
            max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, enable_prefix_caching=config.enable_prefix_caching,
            max_loras=config.max_loras if config.enable_lora else 0)
        self.lora = LoRAManager(self.model_config, max_cpu_loras=config.max_cpu_loras
                                or config.max_loras) if config.enable_lora else None
        self.detokenizer = Detokenizer(self.tokenizer)
        self.input_processor = InputProcessor(self.tokenizer, self.chat_template, InputLimits(
            vocab_size=self.model_config.vocab_size, max_model_len=self.max_model_len,
            page_size=config.page_size, num_kv_pages=self.num_kv_pages,
            max_logprobs=config.max_logprobs), defaults=parts.sampling_defaults)
        self.output_processor = OutputProcessor(self.detokenizer, self.scheduler.finish)
        self._rng = np.random.default_rng(config.seed)
        self._inflight = None  # the step dispatched ahead (StepHandle), if any
        self.async_scheduling = True
        self.startup_seconds = time.perf_counter() - start
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "steps": 0}

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    params: SamplingParams | None = None, arrival_time: float | None = None,
                    lora_request: LoRARequest | None = None) -> None:
        """Validate and queue a request; raises ValueError (and queues nothing) on bad input."""
        if request_id in self.output_processor.requests:
            raise ValueError(f"{request_id=} is already in use")
        if lora_request is None and isinstance(prompt, dict):
            lora_request = prompt.get("lora_request")  # the server's prompts carry their adapter
        if lora_request is not None:
            if self.lora is None:
                raise ValueError(f"lora_request {lora_request!r} needs enable_lora=True")
            self.lora.check(lora_request)
        processed = self.input_processor.process_prompt(prompt)
        ids = processed.token_ids
        params = self.input_processor.check_params(params or SamplingParams(), len(ids))
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        controls = self._controls(params)
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id=request_id, index=i, prompt_token_ids=list(ids), params=params,
                           eos_token_ids=self.eos_token_ids, arrival_time=arrival,
                           parent=seqs[0] if seqs else None, lora_request=lora_request)
            seq.sampling_seed = self._sampling_seed(params, i)
            seq.controls = controls
            if seq.mask_follows_tokens:
                self.runner.start_deferred_warmup()
            if controls is not None and controls.grammar is not None:
                seq.matcher = controls.grammar.matcher()
            if params.logprobs is not None:
                seq.logprobs = SampleLogprobs(self.detokenizer.token_text)
            seqs.append(seq)
        state = RequestState(request_id, processed.text, list(ids), params, seqs,
                              [self.detokenizer.start(ids) for _ in seqs], arrival)
        self.output_processor.requests[request_id] = state
        for seq in seqs:
            self.scheduler.add(seq)

    def _sampling_seed(self, params: SamplingParams, index: int) -> int:
        if params.seed is None:
            return int(self._rng.integers(0, 2**32))
        return int(np.random.default_rng([params.seed & 0xFFFFFFFF, index]).integers(0, 2**32))

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            if self.output_processor.requests.pop(rid, None) is not None:
                self.scheduler.abort(rid)

    def has_unfinished_requests(self) -> bool:
        """True while requests run, or a step dispatched ahead has not been read yet."""
        return bool(self.output_processor.requests) or self._inflight is not None

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests)

    def reset_prefix_cache(self) -> bool:
        """Forget the cached pages of finished requests (vLLM's name). Refused (False) while
        requests run, so a benchmark's warm-up cannot leave the timed prompts cached."""
        if self.has_unfinished_requests():
            return False
        self.scheduler.allocator.reset_prefix_cache()
        return True

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step and return the outputs of the requests it advanced.

        Async scheduling: step n+1 is scheduled and dispatched before step n's tokens are read
        (its pending tokens are fed on device), so the host's bookkeeping for step n overlaps the
        device's work on step n+1. A sequence that step n finishes wastes one token of step n+1,
        which update() drops.
        """
        handle, self._inflight = self._inflight, None
        if handle is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return []
            handle = self._dispatch(batch)
        if self._can_schedule_ahead(handle.batch):
            ahead = self.scheduler.schedule()
            if ahead is not None:
                self._inflight = self._dispatch(ahead, ahead=True)
        out = self.runner.fetch(handle)
        batch = handle.batch
        touched = self.scheduler.update(batch, out.token_ids)
        self._advance_grammars(touched)
        if self._inflight is not None and self._inflight.deferred:
            # Its masks follow the tokens just read: fill them while its forward pass runs.
            self._inflight = self.runner.sample(self._inflight, self._token_inputs(
                self._inflight.batch))
        self.stats["steps"] += 1
        self.stats["prompt_tokens"] += batch.num_prefill_tokens
        self.output_processor.record_logprobs(batch, out)
        return self._process_outputs(touched)

    def _dispatch(self, batch, ahead: bool = False):
        """Dispatch a step. One scheduled ahead of the tokens in flight is deferred (forward now,
        sampling after the next update) if a row's mask depends on its token in flight."""
        if self.lora is not None:  # adapters newly given a device slot by the scheduler
            self.lora.write_slots(self.scheduler.lora_slots, self.runner.state)
        if ahead and any(s.num_pending and s.mask_follows_tokens for s in batch.seqs):
            return self.runner.dispatch(batch, defer=True)
        return self.runner.dispatch(batch, self._token_inputs(batch))

    def _token_inputs(self, batch):
        return step_inputs(batch.seqs, self.model_config.vocab_size, self._fill_grammar_rows)

    @staticmethod
    def _fill_grammar_rows(rows, mask) -> None:
        """Grammar rows of the step's mask, filled in parallel at the tokenizer's width (the
        model's vocabulary may be padded past it: those tokens stay forbidden)."""
        words = rows[0][0].num_words
        if words == mask.shape[1]:  # no padded vocabulary: straight into the mask's rows
            structured_outputs.fill_bitmasks(rows, mask)
            return
        tmp = np.empty((len(rows), words), np.int32)
        structured_outputs.fill_bitmasks([(m, i) for i, (m, _) in enumerate(rows)], tmp)
        for i, (_, b) in enumerate(rows):
            mask[b, :words] = tmp[i]
            mask[b, words:] = 0

    def _advance_grammars(self, touched: list[Sequence]) -> None:
        """Feed each constrained sequence's new token to its grammar (all of them in one parallel
        call); a grammar that is complete (nothing but EOS may follow) finishes the sequence."""
        seqs = [seq for seq in touched if seq.matcher is not None]
        if not seqs:
            return
        accepted = structured_outputs.accept_tokens(
            [(seq.matcher, seq.output_token_ids[-1]) for seq in seqs])
        for seq, ok in zip(seqs, accepted):
            if not ok:  # the mask forbade it: a bug, not the request's
                logger.error("request %s: token %d outside its grammar; finishing it",
                             seq.request_id, seq.output_token_ids[-1])
                self.scheduler.finish(seq, "abort")
            elif seq.matcher.is_terminated() and not seq.is_finished:
                self.scheduler.finish(seq, "stop")

    def _controls(self, params: SamplingParams) -> RequestControls | None:
        """The request's token controls (a grammar compiled here: a bad spec is a ValueError
        naming its field), or None when it has none."""
        if not (params.logit_bias or params.allowed_token_ids or params.bad_words
                or params.structured_outputs):
            return None
        grammar = None
        if params.structured_outputs is not None:
            grammar = structured_outputs.compiler_for(
                self.tokenizer, self._grammar_eos_ids()).compile(params.structured_outputs)
        return RequestControls(params, self.model_config.vocab_size, tokenizer=self.tokenizer,
                               grammar=grammar)

    def _grammar_eos_ids(self) -> list[int] | None:
        """The model's EOS ids that its tokenizer knows (a grammar ends on one of them); None (the
        tokenizer's own EOS) when none does, e.g. a dummy model served with another tokenizer."""
        known = sorted(t for t in self.eos_token_ids if t < len(self.tokenizer))
        return known or None

    def _can_schedule_ahead(self, batch) -> bool:
        """Always, unless turned off (penalties read the runner's device token history, which the
        step in flight updates on device), or while a row's mask follows its token in flight and
        the deferred kind of step is still compiling in the background."""
        if not self.async_scheduling:
            return False
        return (self.runner.deferred_ready.is_set()
                or not any(s.mask_follows_tokens for s in batch.seqs))

    def _process_outputs(self, touched: list[Sequence]) -> list[RequestOutput]:
        """The RequestOutputs of the requests this step advanced (the output processor)."""
        self.stats["generation_tokens"] += len(touched)
        return self.output_processor.process(touched)
