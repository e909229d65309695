"""Persistent cache of compiled step executables (ModelRunner's compile path, jaxserve/runner.py):
a restart loads each step shape's serialized executable from disk, with no trace, lowering or
compile. JAX's own compilation cache (startup.enable_compilation_cache) is keyed by the lowered
HLO, so it skips only the XLA compile: Llama-3-8B's 24 shapes still took ~38 s to lower on the H200.

The key is computed without lowering, from everything that changes the program: the source of
jaxserve/, models/ and kernels_pallas/ (content hashes), jax and jaxlib versions, the backend and
its devices, the mesh, XLA/JAX environment variables and jax.config, the model's graphdef (its
config, dtype, quantization and static attributes), the StepKey (kind, shapes, packed layout,
static metadata) and the abstract signature (shape, dtype, sharding) of every dynamic argument.
When in doubt a value goes into the key: a wrong hit would be a silently wrong answer.

JAXSERVE_EXECUTABLE_CACHE=0 turns it off, =1 on (also on CPU, as tests do); unset, it is on for
accelerators only. JAXSERVE_EXECUTABLE_CACHE_DIR moves it from ~/.cache/jaxserve/executables.
JAXSERVE_EXECUTABLE_CACHE_MAX_GB (default 16) caps its size: a store past it removes the least
recently used entries (a load marks an entry used).
Entries: sha256 of the payload, then the pickled (device ids, executable, in/out pytree defs);
written to a temporary file and renamed, so a reader never sees half an entry.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
import re
import sys
import tempfile
from pathlib import Path

import jax
from jax.experimental import serialize_executable

logger = logging.getLogger("jaxserve.runner")

ENV_SWITCH = "JAXSERVE_EXECUTABLE_CACHE"
ENV_DIR = "JAXSERVE_EXECUTABLE_CACHE_DIR"
ENV_MAX_GB = "JAXSERVE_EXECUTABLE_CACHE_MAX_GB"
_DEFAULT_MAX_GB = 16.0  # every source edit keys new entries: without a cap the cache only grows
_FORMAT = 1  # bump when the entry layout changes
# Environment variables read by XLA, JAX or their plugins at compile time.
_ENV_PREFIXES = ("XLA_", "JAX_", "LIBTPU_", "TPU_", "NVIDIA_", "CUDA_", "NCCL_")
# jaxserve's own that change a step's program or its devices (not the secrets and ports that
# change at every launch: they would make every restart miss).
_ENV_JAXSERVE = ("JAXSERVE_EXPORT_LAYERS", "JAXSERVE_LOCAL_DEVICE_IDS", "JAXSERVE_DISTRIBUTED",
                 "JAXSERVE_NUM_PROCESSES", "JAXSERVE_PROCESS_ID", "JAXSERVE_DP_RANK")
_PACKAGES = ("jaxserve", "models", "kernels_pallas")
_LIBRARIES = ("jax", "jaxlib", "flax", "numpy", "ml_dtypes", "jax-cuda12-plugin",
              "jax-cuda12-pjrt", "jax-cuda13-plugin", "jax-cuda13-pjrt", "libtpu")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def cache_dir() -> Path | None:
    """The cache directory, or None when the cache is off (see the module docstring)."""
    switch = os.environ.get(ENV_SWITCH, "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"{ENV_SWITCH}={switch!r} must be 0 or 1")
    if switch == "0" or (switch == "" and jax.default_backend() == "cpu"):
        return None
    default = Path.home() / ".cache" / "jaxserve" / "executables"
    return Path(os.environ.get(ENV_DIR) or default)


def stable_repr(obj) -> str:
    """repr without object addresses (a function's `at 0x7f...`), equal across processes."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):  # nnx GraphDef's repr
        obj = (type(obj).__name__, [getattr(obj, f.name) for f in dataclasses.fields(obj)])
    return _ADDRESS.sub("", repr(obj))


def signature(tree) -> str:
    """The abstract signature of a pytree of arrays (jax, numpy or ShapeDtypeStruct): its
    structure and each leaf's shape, dtype, weak type and sharding."""
    leaves, treedef = jax.tree.flatten(tree)
    parts = [stable_repr(treedef)]
    for x in leaves:
        sharding = getattr(x, "sharding", None)
        parts.append(f"{tuple(x.shape)} {x.dtype} weak={getattr(x, 'weak_type', False)} "
                     f"{stable_repr(sharding) if sharding is not None else 'host'}")
    return "\n".join(parts)


@functools.cache
def source_hash(root: Path | None = None) -> str:
    """sha256 over the path and content (not the mtime) of every file of jaxserve/, models/ and
    kernels_pallas/ under root (default: where they are imported from)."""
    digest = hashlib.sha256()
    for package in _PACKAGES:
        top = root / package if root else Path(__import__(package).__file__).parent
        for path in sorted(top.rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                digest.update(str(path.relative_to(top.parent)).encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _versions() -> list[str]:
    """Versions of the libraries that trace, lower or compile the step (absent ones skipped)."""
    found = []
    for name in _LIBRARIES:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def environment(mesh) -> str:
    """Everything outside the step's arguments that changes its compiled program."""
    devices = jax.devices()
    config = sorted((k, stable_repr(v)) for k, v in jax.config.values.items())
    env = {k: v for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES) or k in _ENV_JAXSERVE}
    mesh_desc = None
    if mesh is not None:
        mesh_desc = (dict(mesh.shape), [d.id for d in mesh.devices.flat],
                     stable_repr(getattr(mesh, "axis_types", None)))
    return "\n".join(map(str, [
        f"format {_FORMAT}", f"source {source_hash()}",
        f"python {sys.version}", f"versions {_versions()}",
        f"backend {jax.default_backend()} {devices[0].client.platform_version}",
        f"devices {[(d.id, d.device_kind, d.process_index) for d in devices]}",
        f"process {jax.process_index()} of {jax.process_count()}",
        f"mesh {mesh_desc}", f"env {sorted(env.items())}", f"config {config}"]))


def max_bytes() -> int:
    """The cache's size cap in bytes (JAXSERVE_EXECUTABLE_CACHE_MAX_GB, default 16)."""
    raw = os.environ.get(ENV_MAX_GB, "").strip() or str(_DEFAULT_MAX_GB)
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb > 0:
        raise ValueError(f"{ENV_MAX_GB}={raw!r} must be a positive number of GB")
    return int(gb * 2**30)


class ExecutableCache:
    """Serialized executables in `directory`, keyed by key(); load() and store() never raise."""

    def __init__(self, directory: Path, context: str, limit: int | None = None):
        self.directory = Path(directory)
        self.context = context  # environment() and the model's graphdef
        self.limit = max_bytes() if limit is None else limit

    def key(self, static, dynamic) -> str:
        """static: the StepKey and static args; dynamic: every array argument (or its abstract
        ShapeDtypeStruct) in the order the executable takes them."""
        digest = hashlib.sha256(self.context.encode())
        digest.update(b"\0" + stable_repr(static).encode() + b"\0" + signature(dynamic).encode())
        return digest.hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.exe"

    def load(self, key: str):
        """The executable stored under key, or None (missing; corrupt or incompatible: logged,
        and the caller compiles and stores it again)."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("executable cache: cannot read %s (%s): compiling", path, e)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # used now: the last to be evicted
        try:
            if hashlib.sha256(data[32:]).digest() != data[:32]:
                raise ValueError("checksum mismatch")
            device_ids, blob, in_tree, out_tree = pickle.loads(data[32:])
            by_id = {d.id: d for d in jax.devices()}
            return serialize_executable.deserialize_and_load(
                blob, in_tree, out_tree, backend=by_id[device_ids[0]].client,
                execution_devices=[by_id[i] for i in device_ids])
        except Exception as e:  # noqa: BLE001 (any failure: compile instead)
            logger.warning("executable cache: unusable entry %s (%s: %s): compiling", path,
                           type(e).__name__, e)
            return None

    def store(self, key: str, compiled) -> None:
        """Write compiled under key: to a temporary file, then renamed over the entry."""
        try:
            blob, in_tree, out_tree = serialize_executable.serialize(compiled)
            device_ids = [d.id for d in compiled._executable._unloaded_executable.device_list]
            payload = pickle.dumps((device_ids, blob, in_tree, out_tree))
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".exe")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(hashlib.sha256(payload).digest() + payload)
                os.replace(tmp, self._path(key))
            except BaseException:
                os.unlink(tmp)
                raise
            self._evict(keep=self._path(key))
        except Exception as e:  # noqa: BLE001 (never fatal: the next start compiles again)
            logger.warning("executable cache: cannot store %s (%s: %s)", self._path(key),
                           type(e).__name__, e)


    def _evict(self, keep: Path) -> None:
        """Remove the least recently used entries (not `keep`) until the cache fits its cap."""
        entries = []
        for path in self.directory.glob("*.exe"):
            if path.name.startswith(".tmp-"):  # another process's write in progress
                continue
            with contextlib.suppress(OSError):  # another process may remove it meanwhile
                st = path.stat()
                entries.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.limit:
                break
            if path == keep:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                total -= size
                logger.info("executable cache: removed %s (least recently used; cap %.1f GB)",
                            path.name, self.limit / 2**30)


def from_env(mesh, graphdef) -> ExecutableCache | None:
    """The cache of a runner on `mesh` with model `graphdef`, or None when turned off."""
    directory = cache_dir()
    if directory is None:
        return None
    context = environment(mesh) + "\ngraphdef " + stable_repr(graphdef)
    logger.info("executable cache: %s", directory)
    return ExecutableCache(directory, context)
