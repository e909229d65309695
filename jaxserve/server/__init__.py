"""OpenAI-compatible HTTP server (`jaxserve serve`): FastAPI routes over an engine thread.

HTTP request -> protocol.py (validate) -> async_engine.py (thread handoff) -> LLMEngine.step()
-> per-request asyncio queue -> responses.py (OpenAI JSON / SSE chunks).
"""
