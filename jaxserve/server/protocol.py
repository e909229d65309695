"""OpenAI request bodies (pydantic), their translation into SamplingParams, and the error type.

First stop of an HTTP request: field types and ranges are checked here; checks that need the
tokenizer or the engine's limits (prompt length, n, logprobs) happen in openai.py.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from jaxserve.input_processor import InvalidRequest
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


def structured_from_response_format(response_format: dict) -> StructuredOutputsParams | None:
    """OpenAI's response_format -> StructuredOutputsParams (None for "text"); ValueError naming
    the bad part. json_schema's strict=true also closes objects that leave additionalProperties
    unsaid (OpenAI's strict mode requires them closed)."""
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ValueError("response_format.json_schema.schema must be a JSON Schema object, "
                             f"got {spec!r:.200}")
        return StructuredOutputsParams(json=spec["schema"],
                                       disable_additional_properties=spec.get("strict") is True)
    raise ValueError("response_format.type must be 'text', 'json_object' or 'json_schema', got "
                     f"{kind!r:.100}")


# OpenAI / vLLM request fields jaxserve does not implement yet: a request that sets one (to anything
# but null, false or empty) gets a 400 naming it. Other unknown fields are ignored, as vLLM does.
NOT_IMPLEMENTED_FIELDS = {
    "functions": "function calling is not implemented yet",
    "function_call": "function calling is not implemented yet",
    "logits_processors": "custom logits processors are not supported",
    "truncate_prompt_tokens": "prompt truncation is not implemented yet",
    "use_beam_search": "beam search is offline only (LLM.beam_search), not served yet",
    "length_penalty": "beam search is offline only (LLM.beam_search), not served yet",
    "best_of": "best_of is not implemented (use n)",
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "reasoning_effort": "reasoning controls are not implemented yet",
    "mm_processor_kwargs": "multimodal inputs are not supported",
    "prompt_embeds": "prompt embeddings are not supported",
    "priority": "request priorities are not implemented yet",
    "kv_transfer_params": "KV transfer is not supported",
    "vllm_xargs": "vllm_xargs is not supported",
    "cache_salt": "cache_salt is not implemented yet",
}


class _SamplingRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI's plus vLLM's extras)."""

    model_config = ConfigDict(extra="allow")  # unknown fields kept in model_extra, then checked

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_tokens_as_token_ids: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older
    # guided_* fields; at most one of them (structured_outputs_params()).
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None
    # Token controls (vLLM's names; OpenAI's logit_bias maps token-id strings to [-100, 100]).
    logit_bias: dict[str, float] | None = None
    prompt_logprobs: int | None = Field(None, ge=0)  # vLLM's: logprobs of the prompt tokens
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None

    def logit_bias_ids(self) -> dict[int, float] | None:
        """OpenAI's {"token id": bias} -> {id: bias clamped to [-100, 100]} (as vLLM does)."""
        if self.logit_bias is None:
            return None
        try:
            return {int(t): max(-100.0, min(100.0, float(v))) for t, v in self.logit_bias.items()}
        except ValueError:
            raise InvalidRequest("logit_bias keys must be token ids, got "
                                 f"{list(self.logit_bias)[:5]}", "logit_bias") from None

    def sampling_params(self, *, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None, defaults: dict | None = None,
                        structured_outputs: StructuredOutputsParams | None = None
                        ) -> SamplingParams:
        """SamplingParams for one prompt; raises ValueError (-> 400) on inconsistent values.
        defaults: the model's generation_config.json fields, for those the request leaves unset."""
        fields = dict(
            n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, repetition_penalty=self.repetition_penalty,
            seed=self.seed, max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop,
            stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=self.skip_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            structured_outputs=structured_outputs, logit_bias=self.logit_bias_ids(),
            allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words)
        given = self.model_fields_set
        for name, value in (defaults or {}).items():
            unset = not ({"max_tokens", "max_completion_tokens"} & given) if name == "max_tokens" \
                else name not in given
            if unset:
                fields[name] = value
        return SamplingParams(**fields)

    def structured_outputs_params(self) -> tuple[StructuredOutputsParams | None, str | None]:
        """The request's output constraint and the field it came from; APIError(400) naming the
        field when it is malformed or more than one field sets one."""
        guided = {k: getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")
                  if getattr(self, f"guided_{k}") is not None}
        sources = [name for name, given in (
            ("response_format", self.response_format is not None
             and self.response_format.get("type") != "text"),
            ("structured_outputs", bool(self.structured_outputs)),
            *((f"guided_{k}", True) for k in guided)) if given]
        if len(sources) > 1:
            raise APIError(400, f"give one output constraint, got {sources}", param=sources[1])
        if not sources:  # response_format {"type": "text"} included
            return None, None
        field = sources[0]
        try:
            if field == "response_format":
                return structured_from_response_format(self.response_format), field
            if field == "structured_outputs":
                return StructuredOutputsParams(**self.structured_outputs), field
            return StructuredOutputsParams(
                **guided, whitespace_pattern=self.guided_whitespace_pattern), field
        except (TypeError, ValueError) as e:
            raise APIError(400, f"{field}: {e}", param=field) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def refuse_unimplemented(self) -> list[str]:
        """Raise APIError(400) for a set NOT_IMPLEMENTED_FIELDS field; return the ignored ones."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in NOT_IMPLEMENTED_FIELDS and value not in (None, False, {}, [], ""):
                raise APIError(400, f"{name} is not supported by jaxserve: "
                                    f"{NOT_IMPLEMENTED_FIELDS[name]}", param=name,
                               code="unsupported_field")
        if self.stream_options and self.stream_options.continuous_usage_stats:
            raise APIError(400, "stream_options.continuous_usage_stats is not implemented yet",
                           param="stream_options", code="unsupported_field")
        return sorted(set(extra) - set(NOT_IMPLEMENTED_FIELDS))


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    suffix: str | None = None


class ChatMessage(BaseModel):
    """Checked further (content parts, Unicode) by the shared InputProcessor."""

    model_config = ConfigDict(extra="allow")  # name, tool_call_id, ... go to the template as-is

    role: str
    content: str | list[dict] | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # vLLM's default for chat: the template adds them
    chat_template: str | None = None
    chat_template_kwargs: dict | None = None
    documents: list[dict] | None = None
    # Tools reach the chat template; serving.py's tool plan decides how the output is read.
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
