"""Shared benchmark pieces: measured device ceilings, the workload roofline, JSON + PNG output."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _median_time(fn, *args, reps: int = 20) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    t = _median_time(jax.jit(lambda a: a * 1.0001), x, reps=10)
    return 2 * nbytes / t


def measure_matmul_rate(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """FLOP/s of an n x n x n matmul on random data."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    t = _median_time(jax.jit(lambda x, y: x @ y), a, b, reps=10)
    return 2 * n**3 / t


def param_count(mc) -> int:
    """Parameters of a Llama-family ModelConfig (embeddings counted once if tied)."""
    D, F, V, H = mc.hidden_size, mc.intermediate_size, mc.vocab_size, mc.head_dim
    kv_heads = mc.num_kv_heads // mc.kv_replication
    attn = D * H * (2 * mc.num_q_heads + 2 * kv_heads)
    layer = attn + 3 * D * F + 2 * D
    return mc.num_layers * layer + V * D * (1 if mc.tie_word_embeddings else 2) + D


def kv_bytes_per_token(mc, itemsize: int) -> int:
    return 2 * mc.num_layers * (mc.num_kv_heads // mc.kv_replication) * mc.head_dim * itemsize


def workload_floor(mc, itemsize: int, *, num_prompts: int, input_len: int, output_len: int,
                   batch: int, bandwidth: float, flops: float) -> dict:
    """Seconds the workload needs at best: per step max(bytes / bandwidth, flops / rate), summed over
    the prefill of each wave of `batch` prompts and its output_len decode steps."""
    params = param_count(mc)
    w_bytes, kv_tok = params * itemsize, kv_bytes_per_token(mc, itemsize)
    total, prefill_s, decode_s = 0.0, 0.0, 0.0
    remaining = num_prompts
    while remaining > 0:
        b = min(batch, remaining)
        remaining -= b
        tokens = b * input_len
        attn_flops = 4 * mc.num_layers * mc.num_q_heads * mc.head_dim * b * input_len**2 / 2
        prefill_s += max((w_bytes + tokens * kv_tok) / bandwidth, (2 * params * tokens + attn_flops) / flops)
        for step in range(output_len):
            ctx = input_len + step
            read = w_bytes + b * ctx * kv_tok
            step_flops = 2 * params * b + 4 * mc.num_layers * mc.num_q_heads * mc.head_dim * b * ctx
            decode_s += max(read / bandwidth, step_flops / flops)
    total = prefill_s + decode_s
    return {"seconds": total, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
            "output_tokens_per_s": num_prompts * output_len / total, "params": params}


def environment() -> dict:
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):  # a copy without .git (the GPU machine)
        commit = os.environ.get("JAXSERVE_COMMIT", "unknown")
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
            "num_devices": jax.device_count(), "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit}


def write_results(name: str, result: dict, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=float))
    print(f"wrote {path}")
    return path


def bar_plot(path: Path, title: str, labels: list[str], values: list[float], ylabel: str,
             floor: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(labels, values, color=["tab:blue"] + ["tab:gray"] * (len(values) - 1))
    if floor is not None:
        ax.axhline(floor, color="tab:red", linestyle="--", label="roofline")
        ax.legend()
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def model_tag(model: str) -> str:
    """A file-name-safe tag for a model path or preset name."""
    return model.rstrip("/").split("/")[-1]
