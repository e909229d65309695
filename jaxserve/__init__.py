"""jaxserve: a JAX LLM inference engine. `from jaxserve import LLM, SamplingParams`.

Exports resolve lazily so host-only modules (scheduler, pages) import without JAX.
"""
from jaxserve.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "StructuredOutputsParams",
           "RequestOutput", "CompletionOutput",
           "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "LoRARequest"]
__version__ = "0.1.0"


def __getattr__(name):
    if name == "LLM":
        from jaxserve.llm import LLM
        return LLM
    if name == "LLMEngine":
        from jaxserve.engine import LLMEngine
        return LLMEngine
    if name == "EngineConfig":
        from jaxserve.config import EngineConfig
        return EngineConfig
    if name in ("RequestOutput", "CompletionOutput"):
        from jaxserve import outputs
        return getattr(outputs, name)
    if name in ("BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence"):
        from jaxserve import beam_search
        return getattr(beam_search, name)
    if name == "LoRARequest":
        from jaxserve.lora import LoRARequest
        return LoRARequest
    raise AttributeError(name)
