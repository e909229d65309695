"""Hugging Face hub model ids -> a local snapshot directory or .gguf file, through huggingface_hub's
cache (HF_HUB_CACHE / HF_HOME, or download_dir); checkpoint.open_checkpoint calls it for a model
that is not a local path. HF_HUB_OFFLINE=1 uses the cache only; otherwise missing files download.
"""
from __future__ import annotations

import logging
import os
import re

logger = logging.getLogger("jaxserve")

# What a safetensors checkpoint needs (vLLM downloads the same set); never *.bin, *.pth or *.gguf.
CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.json", "*.jinja"]
WEIGHT_FILES = ["*.safetensors", "model.safetensors.index.json"]

_REPO_ID = r"[A-Za-z0-9][\w.-]{0,95}(?:/[\w.-]{1,96})?"
_GGUF_QUANT_SPEC = re.compile(rf"(?P<repo>{_REPO_ID}):(?P<quant>[\w.-]+)")  # org/name:Q4_K_M
# org/name/file.gguf
_GGUF_FILE_SPEC = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)/(?P<file>[\w./-]+\.gguf)")


def is_hub_spec(model: str) -> bool:
    """True when `model` is shaped like a hub repo id (`org/name`, `name`), `org/name:QUANT` or
    `org/name/file.gguf`; callers check local paths first, as vLLM does."""
    return any(p.fullmatch(model) for p in (re.compile(_REPO_ID), _GGUF_QUANT_SPEC,
                                            _GGUF_FILE_SPEC)) and "--" not in model


def resolve_model(model: str, *, revision: str | None = None, download_dir: str | None = None,
                  weights: bool = True) -> str:
    """Hub spec -> local path: the snapshot directory of `org/name` (config, tokenizer and, with
    `weights`, the safetensors), or the .gguf file picked by `org/name:QUANT` / `org/name/f.gguf`.

    ValueError naming the repo when it is neither cached nor downloadable, or holds only GGUF
    files and no file was picked.
    """
    if (m := _GGUF_FILE_SPEC.fullmatch(model)) is not None:
        folder = _snapshot(m["repo"], [m["file"]], revision, download_dir)
        return _one_gguf(m["repo"], folder, lambda f: f == m["file"], m["file"])
    if (m := _GGUF_QUANT_SPEC.fullmatch(model)) is not None:
        quant = m["quant"]
        folder = _snapshot(m["repo"], _quant_patterns(quant), revision, download_dir)
        token = re.compile(rf"(^|[-._/]){re.escape(quant)}([-./]|$)", re.IGNORECASE)
        return _one_gguf(m["repo"], folder, lambda f: token.search(f[:-len(".gguf")]), quant)
    patterns = CONFIG_FILES + (WEIGHT_FILES if weights else [])
    folder = _snapshot(model, patterns, revision, download_dir)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        ggufs = _gguf_files(model, folder, revision)
        if ggufs:
            raise ValueError(
                f"hub repo {model!r} holds GGUF files only ({', '.join(ggufs[:8])}); pick one as "
                f"'{model}:<quant>' (e.g. '{model}:Q4_K_M') or '{model}/<file>.gguf'")
        raise ValueError(f"hub repo {model!r} has no config.json (looked in {folder!r})")
    return folder


def _quant_patterns(quant: str) -> list[str]:
    """Files named like `model-Q4_K_M.gguf`, `model.q4_k_m.gguf` or split `Q4_K_M/...-of-N.gguf`."""
    out = []
    for q in dict.fromkeys((quant, quant.upper(), quant.lower())):
        out += [f"*{sep}{q}.gguf" for sep in "-._"] + [f"{q}.gguf", f"*{q}-*-of-*.gguf",
                                                        f"{q}/*.gguf"]
    return out


def _one_gguf(repo: str, folder: str, match, what: str) -> str:
    found = sorted(f for f in _local_ggufs(folder) if match(f))
    if not found:
        available = _local_ggufs(folder) or _gguf_files(repo, folder, None)
        raise ValueError(f"hub repo {repo!r} has no .gguf file matching {what!r}"
                         + (f"; it has: {', '.join(available[:8])}" if available else ""))
    if len(found) > 1:
        raise ValueError(f"{what!r} matches several .gguf files in hub repo {repo!r} "
                         f"({', '.join(found[:8])}); split GGUF files are not supported: name "
                         f"one file as '{repo}/<file>.gguf'")
    return os.path.join(folder, found[0])


def _local_ggufs(folder: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(root, f), folder)
                  for root, _, files in os.walk(folder) for f in files if f.endswith(".gguf"))


def _gguf_files(repo: str, folder: str, revision: str | None) -> list[str]:
    """The repo's .gguf file names: from the hub when reachable, else those already cached."""
    from huggingface_hub import HfApi, constants

    if not constants.is_offline_mode():
        try:
            return sorted(f for f in HfApi().list_repo_files(repo, revision=revision)
                          if f.endswith(".gguf"))
        except Exception:  # unreachable hub: fall back to the cache
            pass
    return _local_ggufs(folder)


def _snapshot(repo: str, patterns: list[str], revision: str | None,
              download_dir: str | None) -> str:
    """snapshot_download: the hub when reachable, else (HF_HUB_OFFLINE=1, or the hub failing) the
    cache alone; huggingface_hub's errors become ValueErrors naming the repo."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = f"{repo!r}" + (f" at revision {revision!r}" if revision else "")
    kw = dict(revision=revision, cache_dir=download_dir, allow_patterns=patterns)
    why = "HF_HUB_OFFLINE=1" if constants.is_offline_mode() else None
    try:
        if why is None:
            try:
                return snapshot_download(repo, **kw)
            except (RevisionNotFoundError, GatedRepoError, RepositoryNotFoundError,
                    HFValidationError):
                raise
            except Exception as e:  # no network, hub down, proxy: the cache may still hold it
                why = f"{type(e).__name__}: {e}"
                logger.warning("hub unreachable for %s (%s); trying the local cache", where, why)
        # local_files_only: with a commit-hash revision huggingface_hub would otherwise still ask
        # the hub for the file list even under HF_HUB_OFFLINE=1.
        return snapshot_download(repo, local_files_only=True, **kw)
    except (RevisionNotFoundError, GatedRepoError, RepositoryNotFoundError) as e:
        raise ValueError(f"hub model {where} is not available: {type(e).__name__}: {e}") from e
    except HFValidationError as e:
        raise ValueError(f"model {repo!r} is neither a local path nor a valid hub repo id: "
                         f"{e}") from e
    except Exception as e:
        cache = download_dir or constants.HF_HUB_CACHE
        found = "" if isinstance(e, LocalEntryNotFoundError) else f" ({type(e).__name__}: {e})"
        raise ValueError(f"model {where} is not a local path and not in the Hugging Face cache "
                         f"({cache}){found}, and the hub was not reachable ({why})") from e
