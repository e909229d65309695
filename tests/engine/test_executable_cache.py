"""The executable cache (jaxserve/executable_cache.py): a restarted engine loads every step it
compiled before from disk, lowering and compiling none, and generates the same tokens; a changed
key input (XLA_FLAGS, a model config value that keeps every shape) misses; a
corrupt entry is compiled again and rewritten. Each engine runs in a fresh process, as a restart,
on a snapshot of the sources (the key covers them: an edit elsewhere in the tree would miss)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxserve.executable_cache import environment, source_hash
from tests.engine.tiny import build_tiny_llama

ROOT = Path(__file__).resolve().parents[2]

# argv: model dir, then options: {"probe": [LLM kwargs, ...]} reports for each engine how many
# of its warm-up shapes have an entry (nothing compiled); {} warms one engine up, generates greedy
# tokens, compiles the deferred kind and reports the runner's counters.
CHILD = """
import json, sys
from jaxserve import LLM, SamplingParams
import jaxserve

def engine(**kw):
    kw = {"max_num_seqs": 8, **kw}
    return LLM(sys.argv[1], dtype="float32", page_size=4, num_kv_pages=64, max_model_len=64,
               max_num_batched_tokens=8, **kw)  # one token bucket

def hits(runner):
    keys = []
    for t_pad, full in runner.warmup_shapes():
        args, prompt_k = runner._inputs(runner._padding_batch(t_pad), full_sampler=full)
        keys.append(runner._disk_key(runner._key(args, prompt_k), args))
    return sum((runner.executable_cache.directory / f"{k}.exe").exists() for k in keys)

opts = json.loads(sys.argv[2])
out = {"package": jaxserve.__file__}
if "probe" in opts:
    runners = [engine(**kw).llm_engine.runner for kw in opts["probe"]]
    out["hits"] = [(hits(r), len(r.warmup_shapes())) for r in runners]
else:
    llm = engine()
    runner = llm.llm_engine.runner
    out["shapes"] = len(runner.warmup_shapes())
    runner.warmup()
    out["warmup"] = [runner.num_lowerings, runner.num_compiles, runner.num_cache_loads]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outs = llm.generate([[5, 6, 7, 8, 9], [10, 11, 12], [40, 41]], greedy, use_tqdm=False)
    out["tokens"] = [o.outputs[0].token_ids for o in outs]
    runner.start_deferred_warmup()
    assert runner.deferred_ready.wait(timeout=300)
    out["total"] = [runner.num_lowerings, runner.num_compiles, runner.num_cache_loads]
print("RESULT " + json.dumps(out))
"""


def _engine(model_dir: Path, cache: Path, sources: Path, xla_flags: str | None = None,
            **opts) -> dict:
    """Run CHILD with options `opts` in a fresh process on the cache directory `cache`, importing
    jaxserve, models and kernels_pallas from `sources`."""
    env = {**os.environ, "JAXSERVE_EXECUTABLE_CACHE": "1",
           "JAXSERVE_EXECUTABLE_CACHE_DIR": str(cache)}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), json.dumps(opts)],
                          cwd=sources, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ")[-1])
    result["log"] = proc.stderr
    return result


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A copy of the three packages, which other edits to the tree leave alone."""
    root = tmp_path_factory.mktemp("sources")
    for package in ("jaxserve", "models", "kernels_pallas"):
        shutil.copytree(ROOT / package, root / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    return root


@pytest.fixture(scope="module")
def cold(model_dir, sources, tmp_path_factory):
    """A first engine's run on an empty cache: (cache dir, its result)."""
    cache = tmp_path_factory.mktemp("executables")
    result = _engine(model_dir, cache, sources)
    assert Path(result["package"]).is_relative_to(sources)
    lowered, compiled, loaded = result["total"]
    assert loaded == 0 and lowered == compiled == len(list(cache.glob("*.exe"))) > 0
    return cache, result


def test_restart_loads_every_step_from_the_cache(model_dir, sources, cold):
    cache, first = cold
    second = _engine(model_dir, cache, sources)
    assert second["warmup"] == [0, 0, second["shapes"]]  # nothing lowered or compiled
    assert second["total"] == [0, 0, first["total"][1]]  # the deferred kind as well
    assert second["tokens"] == first["tokens"]


def test_changed_key_inputs_miss(model_dir, sources, cold, tmp_path):
    cache, first = cold
    # the unchanged engine (the control: it finds every shape); a model config value that keeps
    # every shape but changes the program (the key covers the graphdef)
    result = _engine(model_dir, cache, sources,
                     probe=[{}, {"hf_overrides": {"rms_norm_eps": 1e-3}}])
    (same, shapes), (eps, _) = result["hits"]
    assert same == shapes > 0 and eps == 0
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_fast_min_max=false"
    assert _engine(model_dir, cache, sources, xla_flags=flags, probe=[{}])["hits"][0][0] == 0


def test_the_key_covers_the_sources_and_the_environment(sources, tmp_path, monkeypatch):
    same, edited = tmp_path / "same", tmp_path / "edited"
    shutil.copytree(sources, same)
    shutil.copytree(sources, edited)
    with open(edited / "models" / "llama.py", "a") as f:  # a comment: other code, another key
        f.write("# edited\n")
    assert source_hash(same) == source_hash(sources) != source_hash(edited)  # content, not place
    before = environment(None)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_dump_to=/tmp/x")
    flags = environment(None)
    monkeypatch.setenv("JAXSERVE_EXPORT_LAYERS", "0")  # jaxserve's switch of the layers' lowering
    layers = environment(None)
    monkeypatch.setenv("JAXSERVE_COMMAND_AUTHKEY", "new at every launch")  # not in the key
    assert len({before, flags, layers}) == 3 and environment(None) == layers


def _entry_is_valid(path: Path) -> bool:
    data = path.read_bytes()
    return hashlib.sha256(data[32:]).digest() == data[:32]


def test_corrupt_entries_are_compiled_again(model_dir, sources, cold, tmp_path):
    cache, first = tmp_path / "executables", cold[1]
    shutil.copytree(cold[0], cache)
    flipped, truncated = sorted(cache.glob("*.exe"))[:2]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:1000])
    result = _engine(model_dir, cache, sources)
    assert "unusable entry" in result["log"]
    lowered, compiled, loaded = result["total"]
    assert lowered == compiled == 2 and loaded == first["total"][1] - 2
    assert result["tokens"] == first["tokens"]
    assert _entry_is_valid(flipped) and _entry_is_valid(truncated)  # rewritten


def test_the_cache_evicts_least_recently_used_entries_past_its_cap(tmp_path, monkeypatch):
    """Every source edit keys new entries: past JAXSERVE_EXECUTABLE_CACHE_MAX_GB a store removes
    the entries used longest ago (a load counts as a use), never the one just written."""
    import jax
    import jax.numpy as jnp

    from jaxserve.executable_cache import ENV_MAX_GB, ExecutableCache, max_bytes

    compiled = [jax.jit(lambda x, k=k: x * 2 + k).lower(jnp.ones(3)).compile() for k in (1, 2, 3)]
    cache = ExecutableCache(tmp_path / "c", "ctx", limit=1 << 40)
    cache.store("a", compiled[0])
    cache.store("b", compiled[1])
    sizes = {p.name: p.stat().st_size for p in (tmp_path / "c").glob("*.exe")}
    cache.limit = sizes["a.exe"] + 2 * sizes["b.exe"] - 1  # room for two entries, not three
    os.utime(tmp_path / "c" / "a.exe", (1000, 1000))
    os.utime(tmp_path / "c" / "b.exe", (2000, 2000))
    assert cache.load("a") is not None  # a is now the most recently used
    cache.store("c", compiled[2])
    assert sorted(p.name for p in (tmp_path / "c").glob("*.exe")) == ["a.exe", "c.exe"]
    assert int(cache.load("c")(jnp.ones(3))[0]) == 5
    monkeypatch.setenv(ENV_MAX_GB, "0.5")
    assert max_bytes() == 2**29
    monkeypatch.setenv(ENV_MAX_GB, "lots")
    with pytest.raises(ValueError, match="JAXSERVE_EXECUTABLE_CACHE_MAX_GB='lots'"):
        max_bytes()
