"""The server's LoRA adapters by name: `--lora-modules` at start-up, vLLM's
/v1/load_lora_adapter and /v1/unload_lora_adapter at run time (behind --enable-lora and the API
key, like every /v1 route). A request's `model` naming an adapter runs it (OpenAIServing puts the
LoRARequest in its prompts); /v1/models lists each adapter with the base model as `parent`.
"""
from __future__ import annotations

import itertools
import json
import os

from pydantic import BaseModel

from jaxserve.lora import LoRARequest, read_adapter_config
from jaxserve.server.protocol import APIError


def parse_lora_module(text: str) -> tuple[str, str]:
    """vLLM's --lora-modules item: `name=path` or `{"name": ..., "path": ...}` -> (name, path)."""
    if text.lstrip().startswith("{"):
        try:
            item = json.loads(text)
            return str(item["name"]), str(item["path"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"--lora-modules {text!r}: a JSON item needs 'name' and 'path' "
                             f"({e})") from None
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules {text!r} is not name=path")
    return name, path


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


class LoRAAdapters:
    """name -> LoRARequest; ids count up and are never reused (they key the prefix cache)."""

    def __init__(self, *, enabled: bool, max_lora_rank: int, base_model: str):
        self.enabled, self.max_lora_rank, self.base_model = enabled, max_lora_rank, base_model
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def add(self, name: str, path: str) -> LoRARequest:
        """Register an adapter after checking its directory and rank; ValueError naming them.
        Shapes are checked by the engine when a request first uses it (a 400 then)."""
        if not self.enabled:
            raise ValueError(f"LoRA adapter {name!r}: start the server with --enable-lora")
        if name in self.by_name or name == self.base_model:
            raise ValueError(f"The lora adapter '{name}' has already been loaded.")
        cfg = read_adapter_config(path)
        if not os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
            raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors")
        rank = max([cfg.get("r", 8), *(cfg.get("rank_pattern") or {}).values()])
        if rank > self.max_lora_rank:
            raise ValueError(f"LoRA adapter {path!r}: rank {rank} exceeds "
                             f"max_lora_rank={self.max_lora_rank}")
        lora = self.by_name[name] = LoRARequest(name, next(self._ids), path)
        return lora

    def remove(self, name: str) -> None:
        if self.by_name.pop(name, None) is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           type="NotFoundError", code="model_not_found")

    def model_cards(self, created: int, max_model_len: int) -> list[dict]:
        return [{"id": name, "object": "model", "created": created, "owned_by": "jaxserve",
                 "root": lora.lora_path, "parent": self.base_model,
                 "max_model_len": max_model_len} for name, lora in self.by_name.items()]


def _refuse_with_several_api_servers(api_server_count: int) -> None:
    """Each API server process keeps its own adapter table: one that changed at run time would
    disagree with the others (and their adapter ids would collide in the prefix cache)."""
    if api_server_count > 1:
        raise APIError(400, f"runtime LoRA loading is not supported with --api-server-count "
                            f"{api_server_count}: each API server process holds its own adapter "
                            "table; start the server with --lora-modules instead",
                       code="unsupported_with_api_server_count")


def add_lora_routes(app, adapters: LoRAAdapters, api_server_count: int = 1) -> None:
    """vLLM's runtime adapter routes; registered only under --enable-lora, refused (400) with
    several API server processes."""
    from fastapi.responses import PlainTextResponse

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        _refuse_with_several_api_servers(api_server_count)
        try:
            adapters.add(body.lora_name, body.lora_path)
        except ValueError as e:
            raise APIError(400, str(e), param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        _refuse_with_several_api_servers(api_server_count)
        adapters.remove(body.lora_name)
        return PlainTextResponse(
            f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
