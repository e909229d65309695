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
                 master_port: int | None = None,
                 torchrun: bool = True) -> DistributedConfig | None:
        """The settings of this process (see the module docstring), or None for one process;
        torchrun=False ignores torchrun's variables (the engine core reads JAXSERVE_* only)."""
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
            local = env.get("JAXSERVE_LOCAL_DEVICE_IDS")
            return cls(env["JAXSERVE_COORDINATOR_ADDRESS"], num, _int(env, "JAXSERVE_PROCESS_ID"),
                       tuple(int(i) for i in local.split(",")) if local else None)
        if torchrun and env.get("MASTER_ADDR") and env.get("WORLD_SIZE"):
            num = _int(env, "WORLD_SIZE")
            if num == 1:
                return None
            local = None
            if _int(env, "LOCAL_WORLD_SIZE", 1) > 1:  # one process per GPU of the host
                local = (_int(env, "LOCAL_RANK"),)
            return cls(f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}", num,
                       _int(env, "RANK"), local)
        return None


    def to_env(self) -> dict[str, str]:
        """The JAXSERVE_* variables that from_env() reads back (for the engine core process)."""
        if self.auto:
            return {"JAXSERVE_DISTRIBUTED": AUTO}
        env = {"JAXSERVE_COORDINATOR_ADDRESS": self.coordinator_address,
               "JAXSERVE_NUM_PROCESSES": str(self.num_processes),
               "JAXSERVE_PROCESS_ID": str(self.process_id)}
        if self.local_device_ids is not None:
            env["JAXSERVE_LOCAL_DEVICE_IDS"] = ",".join(map(str, self.local_device_ids))
        return env


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


# ---- serving over several processes: the followers replay the leader's engine-core commands ----
# Process 0 runs the API server and its engine core (engine_core.EngineCore); before applying
# each command ("add", "abort", "reset", "watchdog") and before each step it sends the same to
# every follower (CommandFanout), whose EngineCore applies it and steps in the same order, so all
# schedulers produce the same Batch and every process enters the same jitted step. The
# connection is multiprocessing's (pickle) with an HMAC handshake on JAXSERVE_COMMAND_AUTHKEY:
# run it on a private network, as the jax coordination service itself.
COMMAND_PORT_OFFSET = 1  # the command channel listens on the coordinator's port + 1
STEP = ("step",)


def _command_address(config: DistributedConfig) -> tuple[str, int]:
    host, port = config.coordinator_address.rsplit(":", 1)
    return host, int(port) + COMMAND_PORT_OFFSET


def _authkey(environ=None) -> bytes:
    env = os.environ if environ is None else environ
    return env.get("JAXSERVE_COMMAND_AUTHKEY", "jaxserve-multihost").encode()


class CommandFanout:
    """The leader's side: one connection per follower; send() each command to all of them."""

    def __init__(self, connections: list):
        self.connections = connections

    @classmethod
    def accept(cls, config: DistributedConfig, timeout: float = 600.0) -> CommandFanout:
        """Wait for the num_processes - 1 followers to connect (each after building its engine)."""
        import socket
        from multiprocessing.connection import Listener

        if config.auto:
            raise ValueError("serving over several processes needs an explicit coordinator "
                             "address (JAXSERVE_DISTRIBUTED=auto is for offline runs)")
        listener = Listener(_command_address(config), backlog=config.num_processes,
                            authkey=_authkey())
        listener._listener._socket.settimeout(timeout)  # noqa: SLF001 - no public timeout
        try:
            connections = [listener.accept() for _ in range(config.num_processes - 1)]
        except socket.timeout:
            raise RuntimeError(f"the followers did not connect to {_command_address(config)} in "
                               f"{timeout}s") from None
        finally:
            listener.close()
        logger.info("multi-host: %d follower(s) connected", len(connections))
        return cls(connections)

    def send(self, command: tuple) -> None:
        for connection in self.connections:
            connection.send(command)

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


class _NoReplies:
    """A follower's output pipe: the leader alone answers the API server."""

    def send(self, message) -> None:
        pass


def follow(engine_config, config: DistributedConfig, connect_timeout: float = 600.0) -> int:
    """A follower process (`jaxserve serve --headless --node-rank N`): build the same engine,
    then apply the leader's commands and step when it steps, until it goes away; returns 0."""
    import time
    from multiprocessing.connection import Client

    from jaxserve.engine_core import CoreEngine, EngineCore

    initialize(config)
    engine = CoreEngine(engine_config)
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            connection = Client(_command_address(config), authkey=_authkey())
            break
        except (ConnectionRefusedError, OSError):
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot reach the leader at {_command_address(config)}")
            time.sleep(0.2)
    core = EngineCore(engine, None, _NoReplies())
    logger.info("multi-host follower %d: replaying the leader's commands", config.process_id)
    try:
        while True:
            command = connection.recv()
            if command == STEP:
                core._step()  # noqa: SLF001 - the leader's loop body, without its pipe
            else:
                core._apply(command)  # noqa: SLF001
    except (EOFError, OSError):
        logger.info("the leader is gone; follower %d stops", config.process_id)
    shutdown(None)
    return 0


def shutdown(fanout: CommandFanout | None) -> None:
    """Close the command channel (the followers see EOF) and leave jax.distributed: a barrier
    that every process must reach, or the others abort when the coordinator (process 0) exits
    (they also abort, by design, when a process dies: a supervisor restarts the group)."""
    import jax

    if fanout is not None:
        fanout.close()
    jax.distributed.shutdown()
