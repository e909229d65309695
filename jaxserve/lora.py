"""LoRA adapters on the host: LoRARequest (vLLM's), PEFT adapter reading into our param layout,
the host LRU of loaded adapters (max_cpu_loras) and the device-slot table the scheduler keeps.

No jax at import (the scheduler uses LoRASlots). The engine validates an adapter at add_request
(LoRAManager.check), the scheduler pins a slot per running adapter (LoRASlots), and before each
dispatch LoRAManager.write_slots puts newly assigned adapters into the device slots
(models/lora.py holds the device side).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Callable
import dataclasses
from dataclasses import dataclass

import numpy as np

from jaxserve.config import ModelConfig

NO_LORA_SLOT = 2**31 - 1  # Batch.lora_slots value of base-model tokens and of padding
# PEFT module name -> (our LoRA module under layers.{i}, A transform, B transform); transforms
# take the HF tensor (A [r, in], B [out, r]) to our layouts a [*in, r], b [r, *out].
_TARGETS = {"q_proj": ("attn.q_lora", "T", "q"), "k_proj": ("attn.k_lora", "T", "kv"),
            "v_proj": ("attn.v_lora", "T", "kv"), "o_proj": ("attn.o_lora", "o", "T"),
            "gate_proj": ("mlp.gate_lora", "T", "T"), "up_proj": ("mlp.up_lora", "T", "T"),
            "down_proj": ("mlp.down_lora", "T", "T")}
_TENSOR = re.compile(r"(?:.*\.)?(layers\.(\d+)\.(?:self_attn|mlp)\.(\w+))\.lora_([AB])"
                     r"(?:\.\w+)?\.weight")
LORA_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                      "Qwen3ForCausalLM")


@dataclass(frozen=True)
class LoRARequest:
    """vLLM's LoRARequest: a name, a unique positive integer id, and the PEFT adapter directory
    (adapter_config.json + adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self):
        if not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest {self.lora_name!r}: lora_int_id={self.lora_int_id!r} "
                             f"must be an integer >= 1")
        if not self.lora_path:
            raise ValueError(f"LoRARequest {self.lora_name!r} needs lora_path")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: the first key matching the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


def _layout(kind: str, w: np.ndarray, shape: ModelConfig) -> np.ndarray:
    """HF [out, in] (A [r, in] or B [out, r]) -> our layout: "T" transpose, "q" [r, N, H],
    "kv" [r, K, H] with kv heads repeated, "o" [N, H, r]."""
    H = shape.head_dim
    if kind == "T":
        return w.T
    if kind == "q":
        return w.T.reshape(w.shape[1], shape.num_q_heads, H)
    if kind == "kv":
        out = w.T.reshape(w.shape[1], -1, H)
        return np.repeat(out, shape.kv_replication, axis=1) if shape.kv_replication > 1 else out
    return w.reshape(w.shape[0], shape.num_q_heads, H).transpose(1, 2, 0)  # "o"


def _expected(proj: str, shape: ModelConfig) -> tuple[int, int]:
    """(in, out) features of an HF projection of the base model."""
    D, F, H = shape.hidden_size, shape.intermediate_size, shape.head_dim
    qo, kv = shape.num_q_heads * H, shape.num_kv_heads // shape.kv_replication * H
    return {"q_proj": (D, qo), "k_proj": (D, kv), "v_proj": (D, kv), "o_proj": (qo, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}[proj]


def read_adapter_config(path: str) -> dict:
    """adapter_config.json of a PEFT LoRA directory; ValueError naming what is wrong with it."""
    cfg_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_config.json")
    with open(cfg_file) as f:
        cfg = json.load(f)
    unsupported = {"peft_type": (cfg.get("peft_type", "LORA"), "LORA"),
                   "use_dora": (cfg.get("use_dora", False), False),
                   "bias": (cfg.get("bias", "none"), "none"),
                   "fan_in_fan_out": (cfg.get("fan_in_fan_out", False), False),
                   "modules_to_save": (cfg.get("modules_to_save") or None, None)}
    for key, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"LoRA adapter {path!r}: {key}={value!r} is not supported "
                             f"(only {wanted!r})")
    return cfg


def lora_scale(cfg: dict, module: str, r: int) -> float:
    """PEFT's scale of one module's B @ A: lora_alpha / r, or / sqrt(r) for rsLoRA, with
    alpha_pattern overriding lora_alpha per module."""
    alpha = _pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8))
    return alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)


def read_adapter_tensors(path: str, split: Callable[[str], tuple[str, str]]
                         ) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(adapter_config, {module: (A f32[r, in], B f32[out, r])}) of a PEFT LoRA directory.

    `split(tensor name)` -> (module name, "A" or "B"); it raises the ValueError for a tensor its
    caller cannot use. ValueError names a missing file or a module without both lora_A and lora_B.
    Shared by the engine (load_peft_adapter) and merge-lora (merge_lora.adapter_deltas)."""
    import ml_dtypes  # noqa: F401  registers bfloat16 with numpy (bf16 adapters are common)
    from safetensors.numpy import load_file

    cfg = read_adapter_config(path)
    weights_file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(weights_file):
        raise ValueError(f"LoRA adapter {path!r} has no adapter_model.safetensors")
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in load_file(weights_file).items():
        module, ab = split(name)
        pairs.setdefault(module, {})[ab] = tensor.astype(np.float32)
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r}: {module} lacks "
                             f"lora_{({'A', 'B'} - set(ab)).pop()}")
    return cfg, {module: (ab["A"], ab["B"]) for module, ab in pairs.items()}


def load_peft_adapter(path: str, shape: ModelConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT LoRA directory -> {"layers.{i}.attn.q_lora": (a f32[*in, R], b f32[R, *out])} with
    ranks zero-padded to max_lora_rank and PEFT's scale (lora_alpha / r, or / sqrt(r) for rsLoRA;
    rank_pattern / alpha_pattern per module) folded into b. ValueError names a bad path, rank,
    module or shape."""

    def split(name: str) -> tuple[str, str]:
        m = _TENSOR.fullmatch(name)
        if m is None or m.group(3) not in _TARGETS:
            raise ValueError(f"LoRA adapter {path!r}: tensor {name!r} targets a module jaxserve "
                             f"does not adapt (only {sorted(_TARGETS)} of decoder layers)")
        if int(m.group(2)) >= shape.num_layers:
            raise ValueError(f"LoRA adapter {path!r}: {name!r} is past the base model's "
                             f"{shape.num_layers} layers")
        return m.group(1), m.group(4)

    cfg, pairs = read_adapter_tensors(path, split)
    return {_our_path(module): _convert(path, module, A, B, cfg, shape)
            for module, (A, B) in pairs.items()}


def _our_path(module: str) -> str:
    layer, proj = re.fullmatch(r"layers\.(\d+)\.\w+\.(\w+)", module).groups()
    return f"layers.{layer}.{_TARGETS[proj][0]}"


def _convert(path: str, module: str, A: np.ndarray, B: np.ndarray, cfg: dict, shape: ModelConfig):
    r, proj = A.shape[0], module.rsplit(".", 1)[1]
    if r > shape.max_lora_rank:
        raise ValueError(f"LoRA adapter {path!r}: rank {r} of {module} exceeds "
                         f"max_lora_rank={shape.max_lora_rank}")
    fan_in, fan_out = _expected(proj, shape)
    if A.shape != (r, fan_in) or B.shape != (fan_out, r):
        raise ValueError(f"LoRA adapter {path!r}: {module} has A {A.shape}, B {B.shape}; the base "
                         f"model needs A ({r}, {fan_in}), B ({fan_out}, {r}): another base model?")
    scale = lora_scale(cfg, module, r)
    pad = shape.max_lora_rank - r
    A = np.pad(A, ((0, pad), (0, 0)))
    B = np.pad(B * scale, ((0, 0), (0, pad)))
    _, a_kind, b_kind = _TARGETS[proj]
    return _layout(a_kind, A, shape), _layout(b_kind, B, shape)


class LoRASlots:
    """Which adapter each of the `max_loras` device slots holds (host bookkeeping, like pages).

    A slot is pinned while running sequences use its adapter (acquire / release count them); an
    unpinned slot keeps its adapter, so a later request for it needs no reload, until the least
    recently released one is taken for another adapter. A sequence whose adapter finds no slot
    waits (can_acquire). Slots assigned since the last take_stale() must be written to the device.
    """

    def __init__(self, max_loras: int):
        if max_loras < 1:
            raise ValueError(f"{max_loras=} must be >= 1")
        self.max_loras = max_loras
        self._adapter: list[LoRARequest | None] = [None] * max_loras
        self._users = [0] * max_loras
        self._slot_of: dict[int, int] = {}  # lora_int_id -> slot
        self._idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(max_loras))  # LRU first
        self._stale: dict[int, LoRARequest] = {}

    def can_acquire(self, lora_int_id: int) -> bool:
        return lora_int_id in self._slot_of or bool(self._idle)

    def acquire(self, lora: LoRARequest) -> int:
        """Pin a slot for one more sequence of `lora`; assigns one (evicting LRU) if needed."""
        slot = self._slot_of.get(lora.lora_int_id)
        if slot is None:
            slot, _ = self._idle.popitem(last=False)
            old = self._adapter[slot]
            if old is not None:
                del self._slot_of[old.lora_int_id]
            self._adapter[slot], self._slot_of[lora.lora_int_id] = lora, slot
            self._stale[slot] = lora
        elif self._users[slot] == 0:
            del self._idle[slot]
        self._users[slot] += 1
        return slot

    def release(self, lora_int_id: int) -> None:
        slot = self._slot_of[lora_int_id]
        assert self._users[slot] > 0, f"release of unpinned LoRA slot {slot}"
        self._users[slot] -= 1
        if self._users[slot] == 0:
            self._idle[slot] = None

    def slot_of(self, lora_int_id: int) -> int:
        return self._slot_of[lora_int_id]

    def forget(self, lora_int_id: int) -> bool:
        """Drop an unpinned adapter from its slot (unload); False if sequences still use it."""
        slot = self._slot_of.get(lora_int_id)
        if slot is None:
            return True
        if self._users[slot]:
            return False
        del self._slot_of[lora_int_id]
        self._adapter[slot] = None
        self._stale.pop(slot, None)
        self._idle.move_to_end(slot, last=False)
        return True

    def take_stale(self) -> list[tuple[int, LoRARequest]]:
        stale, self._stale = list(self._stale.items()), {}
        return stale

    def check_integrity(self) -> None:
        assert all(u >= 0 for u in self._users), self._users
        assert set(self._idle) == {s for s in range(self.max_loras) if self._users[s] == 0}
        assert all(self._adapter[s].lora_int_id == i for i, s in self._slot_of.items())


class LoRAManager:
    """The engine's adapters: validated at add_request, host copies in an LRU of max_cpu_loras
    (reread from disk when evicted), written to the device slots the scheduler assigned."""

    def __init__(self, shape: ModelConfig, *, max_cpu_loras: int):
        self.shape = shape
        self.max_cpu_loras = max_cpu_loras
        self._cache: OrderedDict[tuple[int, str], dict] = OrderedDict()  # LRU first
        self._names: dict[int, str] = {}  # lora_int_id -> lora_name, one name per id

    def get(self, lora: LoRARequest) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """The adapter's host weights (load_peft_adapter), through the LRU."""
        key = (lora.lora_int_id, lora.lora_path)
        weights = self._cache.get(key)
        if weights is None:
            if not os.path.isdir(lora.lora_path):
                raise ValueError(f"LoRA adapter {lora.lora_name!r}: {lora.lora_path=} is not a "
                                 f"directory")
            weights = self._cache[key] = load_peft_adapter(lora.lora_path, self.shape)
            while len(self._cache) > self.max_cpu_loras:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return weights

    def check(self, lora: LoRARequest) -> None:
        """ValueError if the adapter cannot serve this model; it is then in the host cache."""
        if not isinstance(lora, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(lora).__name__}")
        known = self._names.get(lora.lora_int_id)
        if known is not None and known != lora.lora_name:
            raise ValueError(f"lora_int_id={lora.lora_int_id} is already adapter {known!r}, "
                             f"not {lora.lora_name!r}")
        self.get(lora)
        self._names[lora.lora_int_id] = lora.lora_name

    def write_slots(self, slots: LoRASlots, state) -> None:
        """Write the adapters newly assigned to device slots into the model state."""
        stale = slots.take_stale()
        if not stale:
            return
        from models.lora import write_lora_slot  # jax: only when there is something to write

        for slot, lora in stale:
            write_lora_slot(state, slot, self.get(lora))


def lora_model_config(cfg: ModelConfig, *, max_loras: int, max_lora_rank: int) -> ModelConfig:
    """The model config with LoRA slots; ValueError for an architecture without LoRA support."""
    if cfg.architecture not in LORA_ARCHITECTURES:
        raise ValueError(f"enable_lora: LoRA adapters are supported for {LORA_ARCHITECTURES}, "
                         f"not {cfg.architecture!r}")
    return dataclasses.replace(cfg, max_loras=max_loras, max_lora_rank=max_lora_rank)
