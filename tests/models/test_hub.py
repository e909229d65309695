"""Hub repo ids resolve through huggingface_hub's cache, offline: a tiny random Llama written into a
cache laid out as the hub's (models--org--name/refs/<ref>, snapshots/<commit>/...)."""
import os
import subprocess
import sys

import huggingface_hub.constants
import jax
import numpy as np
import pytest
from fixtures import Driver, save_numpy_llama

from jaxserve.hub import resolve_model
from jaxserve.weights import load_model

REV_A, REV_B = "a" * 40, "b" * 40


def write_snapshot(cache, repo: str, commit: str, refs=("main",), files=None, seed: int = 0):
    """One snapshot of `repo` in a hub cache: a tiny Llama (or the given {name: bytes})."""
    storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(storage, "snapshots", commit)
    if files is None:
        save_numpy_llama(snapshot, seed=seed)
    else:
        os.makedirs(snapshot, exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(snapshot, name), "wb") as f:
                f.write(data)
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    for ref in refs:
        with open(os.path.join(storage, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """HF_HOME/HF_HUB_CACHE at a tmp dir, HF_HUB_OFFLINE=1 (huggingface_hub reads both at import,
    so its constants are patched too). Holds org/tiny: main -> seed 0, v2 -> seed 1."""
    cache = str(tmp_path / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    write_snapshot(cache, "org/tiny", REV_A, seed=0)
    write_snapshot(cache, "org/tiny", REV_B, refs=("v2",), seed=1)
    return cache


def _params(loaded) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(loaded.state)]


def _logits(loaded) -> np.ndarray:
    return Driver(loaded, 1).step([[3, 17, 42, 5]])[0]


def test_repo_id_loads_the_cached_snapshot(hub_cache):
    snapshot = os.path.join(hub_cache, "models--org--tiny", "snapshots", REV_A)
    from_hub = load_model("org/tiny", dtype="float32")
    direct = load_model(snapshot, dtype="float32")
    assert from_hub.model_name == "org/tiny"
    for a, b in zip(_params(from_hub), _params(direct), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(_logits(from_hub), _logits(direct))
    assert from_hub.tokenizer("t5 t7")["input_ids"] == [5, 7]


def test_revision_picks_the_snapshot(hub_cache):
    main = _params(load_model("org/tiny", dtype="float32"))
    v2 = _params(load_model("org/tiny", dtype="float32", revision="v2"))
    by_commit = _params(load_model("org/tiny", dtype="float32", revision=REV_B))
    direct_b = _params(load_model(os.path.join(hub_cache, "models--org--tiny", "snapshots",
                                               REV_B), dtype="float32"))
    for x, y, z in zip(v2, by_commit, direct_b, strict=True):
        np.testing.assert_array_equal(x, z)
        np.testing.assert_array_equal(y, z)
    assert not np.array_equal(main[0], v2[0])


def test_download_dir_is_the_cache(hub_cache, tmp_path):
    other = str(tmp_path / "elsewhere")
    write_snapshot(other, "org/only-there", REV_A, seed=2)
    with pytest.raises(ValueError, match="org/only-there"):
        resolve_model("org/only-there")
    path = resolve_model("org/only-there", download_dir=other)
    assert path == os.path.join(os.path.realpath(other), "models--org--only-there", "snapshots",
                                REV_A)


def test_engine_passes_revision_and_download_dir(hub_cache, tmp_path):
    from jaxserve import LLM

    other = str(tmp_path / "dl")
    write_snapshot(other, "org/tiny", REV_B, seed=1)
    llm = LLM("org/tiny", download_dir=other, revision=REV_B, dtype="float32", num_kv_pages=8,
              max_model_len=32, max_num_seqs=2, max_num_batched_tokens=16)
    expected = _params(load_model(os.path.join(other, "models--org--tiny", "snapshots", REV_B),
                                  dtype="float32"))
    got = [np.asarray(x) for x in jax.tree.leaves(llm.llm_engine.runner.state)]
    np.testing.assert_array_equal(got[0], expected[0])
    assert llm.llm_engine.model_name == "org/tiny"


def test_missing_repo_offline_is_a_clear_error(hub_cache):
    with pytest.raises(ValueError, match=r"'org/absent'.*not in the Hugging Face cache.*hub was "
                                         r"not reachable \(HF_HUB_OFFLINE=1\)"):
        load_model("org/absent")


def test_preset_repo_id_with_auto_goes_to_the_hub(hub_cache):
    """Before: "Qwen/Qwen2-7B" with load_format="auto" silently built random weights."""
    with pytest.raises(ValueError, match=r"'Qwen/Qwen2-7B'.*not in the Hugging Face cache.*"
                                         r"load_format='dummy'"):
        load_model("Qwen/Qwen2-7B")
    with pytest.raises(ValueError, match=r"'llama-3-8b'.*load_format='dummy'"):
        load_model("llama-3-8b", load_format="auto")


def test_gguf_only_repo_needs_a_file_spec(hub_cache):
    files = {"tiny-Q4_K_M.gguf": b"GGUF", "tiny-Q4_K_S.gguf": b"GGUF", "tiny.Q8_0.gguf": b"GGUF",
             "split/tiny-F16-00001-of-00002.gguf": b"", "split/tiny-F16-00002-of-00002.gguf": b""}
    os.makedirs(os.path.join(hub_cache, "models--org--tiny-GGUF", "snapshots", REV_A, "split"))
    snapshot = write_snapshot(hub_cache, "org/tiny-GGUF", REV_A, files=files)
    with pytest.raises(ValueError, match=r"GGUF files only.*tiny-Q4_K_M\.gguf.*'org/tiny-GGUF:"):
        resolve_model("org/tiny-GGUF")
    assert resolve_model("org/tiny-GGUF:Q4_K_M") == os.path.join(snapshot, "tiny-Q4_K_M.gguf")
    assert resolve_model("org/tiny-GGUF:q8_0") == os.path.join(snapshot, "tiny.Q8_0.gguf")
    assert (resolve_model("org/tiny-GGUF/tiny-Q4_K_S.gguf")
            == os.path.join(snapshot, "tiny-Q4_K_S.gguf"))
    with pytest.raises(ValueError, match=r"no \.gguf file matching 'Q4_K'"):
        resolve_model("org/tiny-GGUF:Q4_K")
    with pytest.raises(ValueError, match="split GGUF"):
        resolve_model("org/tiny-GGUF:F16")


def test_environment_variables_alone(hub_cache, tmp_path):
    """HF_HOME and HF_HUB_OFFLINE=1 set before huggingface_hub is imported, as a user sets them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path), HF_HUB_OFFLINE="1")  # the cache is $HF_HOME/hub
    code = "from jaxserve.hub import resolve_model; print(resolve_model('org/tiny', revision='v2'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__)))))
    assert out.stdout.strip().endswith(os.path.join("models--org--tiny", "snapshots", REV_B))


def test_tokenizer_repo_id_resolves_through_the_cache(hub_cache, tmp_path):
    from jaxserve.weights import _tokenizer_path

    snapshot = os.path.join(hub_cache, "models--org--tiny", "snapshots", REV_A)
    assert os.path.samefile(_tokenizer_path("org/tiny", None), snapshot)
    assert _tokenizer_path(str(tmp_path), None) == str(tmp_path)  # local paths pass through
    with pytest.raises(ValueError, match="'org/absent'"):
        _tokenizer_path("org/absent", None)
