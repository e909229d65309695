"""Multi-host: one engine whose mesh spans the devices of several processes (jax.distributed).

Every process runs the same program (JAX's multi-controller SPMD): the same EngineConfig, the
same requests in the same order, the same deterministic host scheduler, and so the same Batch
each step; each process feeds its local devices and XLA's collectives (NCCL on GPUs, gloo on
CPU) join them into one computation over the global mesh. Sampled tokens come back fully
replicated, so every process sees the same tokens and its scheduler stays in step. No step's
inputs are broadcast: only the requests must reach every process (docs/multi_gpu.md).

    process i:  initialize(DistributedConfig.from_env())   # before any other JAX call
                LLM(model, tensor_parallel_size=<all devices>).generate(prompts)   # same on all

Settings, first found wins: explicit arguments (`jaxserve serve --nnodes/--node-rank/
--master-addr/--master-port`, vLLM's multi-node names) > JAXSERVE_COORDINATOR_ADDRESS,
JAXSERVE_NUM_PROCESSES, JAXSERVE_PROCESS_ID > torchrun's MASTER_ADDR, MASTER_PORT, WORLD_SIZE,
RANK (with LOCAL_RANK / LOCAL_WORLD_SIZE: one process per GPU) > none (a single process).
JAXSERVE_DISTRIBUTED=auto leaves everything to jax's cluster detection (SLURM, Open MPI, ...).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

logger = logging.getLogger("jaxserve")

AUTO = "auto"


@dataclass(frozen=True)
class DistributedConfig:
    """jax.distributed.initialize's arguments; `auto` = let jax detect the cluster."""

    coordinator_address: str | None = None  # "host:port" of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None  # None: every device the process sees
    auto: bool = False

    def __post_init__(self):
        if self.auto:
            return
        if not self.coordinator_address or ":" not in self.coordinator_address:
            raise ValueError(f"coordinator_address={self.coordinator_address!r} must be host:port")
        if self.num_processes is None or self.num_processes < 1:
            raise ValueError(f"num_processes={self.num_processes!r} must be >= 1")
        if self.process_id is None or not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id={self.process_id!r} must be in [0, "
                             f"{self.num_processes})")

    @classmethod
    def from_env(cls, environ=None, *, nnodes: int | None = None, node_rank: int | None = None,
                 master_addr: str | None = None,
                 master_port: int | None = None) -> DistributedConfig | None:
        """The settings of this process (see the module docstring), or None for one process."""
        env = os.environ if environ is None else environ
        if env.get("JAXSERVE_DISTRIBUTED", "").strip().lower() == AUTO:
            return cls(auto=True)
        if nnodes is not None or node_rank is not None or master_addr is not None:
            if nnodes is None or node_rank is None or master_addr is None:
                raise ValueError(f"multi-node needs --nnodes, --node-rank and --master-addr "
                                 f"together; got {nnodes=}, {node_rank=}, {master_addr=}")
            if nnodes == 1:
                return None
            return cls(f"{master_addr}:{master_port or 29500}", nnodes, node_rank)
        if env.get("JAXSERVE_COORDINATOR_ADDRESS"):
            num = _int(env, "JAXSERVE_NUM_PROCESSES")
            if num == 1:
                return None
            return cls(env["JAXSERVE_COORDINATOR_ADDRESS"], num, _int(env, "JAXSERVE_PROCESS_ID"))
        if env.get("MASTER_ADDR") and env.get("WORLD_SIZE"):
            num = _int(env, "WORLD_SIZE")
            if num == 1:
                return None
            local = None
            if _int(env, "LOCAL_WORLD_SIZE", 1) > 1:  # one process per GPU of the host
                local = (_int(env, "LOCAL_RANK"),)
            return cls(f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}", num,
                       _int(env, "RANK"), local)
        return None


def _int(env, name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be an integer") from None


def initialize(config: DistributedConfig | None) -> bool:
    """jax.distributed.initialize(config) before any other JAX call; False (a no-op) for None.
    On the CPU backend (tests) the cross-process collectives are gloo's."""
    if config is None:
        return False
    import jax

    if config.auto:
        jax.distributed.initialize()
    else:
        if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms.split(","):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(config.coordinator_address, config.num_processes,
                                   config.process_id, config.local_device_ids)
    logger.info("jax.distributed: process %d of %d, %d local of %d devices",
                jax.process_index(), jax.process_count(), jax.local_device_count(),
                jax.device_count())
    return True
