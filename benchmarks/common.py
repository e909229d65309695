"""Shared benchmark pieces: measured device ceilings, the workload roofline, JSON + PNG output."""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def abstract_state_and_cache(config, dtype, mesh, rules, *, num_pages: int, page_size: int):
    """(graphdef, state, KV cache) of a model config as ShapeDtypeStructs placed as the engine
    places them (weights.abstract_model, kv_cache_sharding): a ModelRunner built on them lowers
    and compiles its steps without any weights in memory."""
    from jaxserve.kv_cache import KVCache
    from jaxserve.sharding import kv_cache_sharding
    from jaxserve.weights import abstract_model

    graphdef, abstract, shardings = abstract_model(config, jnp.dtype(dtype), mesh, rules)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract, shardings)
    page = jax.ShapeDtypeStruct((num_pages, page_size, config.num_kv_heads, config.head_dim),
                                jnp.dtype(dtype), sharding=kv_cache_sharding(mesh, rules))
    return graphdef, state, KVCache(k=[page] * config.num_layers, v=[page] * config.num_layers)


def log_engine_progress() -> None:
    """Show jaxserve's INFO lines (start-up stages, each compile) and only warnings from others."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("jaxserve").setLevel(logging.INFO)


def busy_fraction(trace_path: str) -> dict:
    """Union of device-side op intervals over their span, from a Chrome/Perfetto trace JSON."""
    with gzip.open(trace_path, "rt") as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, name in names.items() if "/device:" in name and "CPU" not in name}
    spans, per_name, per_host = [], defaultdict(float), defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or e.get("dur", 0) <= 0:
            continue
        if e.get("pid") in device_pids:
            spans.append((e["ts"], e["ts"] + e["dur"]))
            per_name[e.get("name", "?")] += e["dur"]
        else:  # host threads: XLA's runtime events when the host tracer is on (nested: inclusive)
            per_host[e.get("name", "?")] += e["dur"]
    top_host = sorted(per_host.items(), key=lambda kv: -kv[1])[:25]
    if not spans:
        return {"busy_fraction": None, "device_processes": sorted(names.values()),
                "top_host_ms": [(n, d / 1e3) for n, d in top_host]}
    spans.sort()
    busy, (cur_start, cur_end) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > cur_end:
            busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy += cur_end - cur_start
    span = spans[-1][1] - spans[0][0]
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:25]
    return {"busy_fraction": busy / span, "span_ms": span / 1e3, "busy_ms": busy / 1e3,
            "num_device_events": len(spans), "top_ops_ms": [(n, d / 1e3) for n, d in top],
            "top_host_ms": [(n, d / 1e3) for n, d in top_host]}


def trace_device(run, trace_dir: str | None = None, host_level: int = 0) -> tuple[dict, float]:
    """(busy_fraction summary, wall seconds) of run() under jax.profiler with device activity
    only, or also XLA's host-side events at host_level 1-3 (slows the host: for finding where a
    launch spends its time, not for timing). The trace is kept in trace_dir if given."""
    out_dir = trace_dir or tempfile.mkdtemp()
    options = jax.profiler.ProfileOptions()
    options.host_tracer_level = host_level
    options.python_tracer_level = 0
    with jax.profiler.trace(out_dir, profiler_options=options):
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    traces = sorted(glob.glob(os.path.join(out_dir, "**", "*.trace.json.gz"), recursive=True))
    summary = busy_fraction(traces[-1]) if traces else {"busy_fraction": None}
    if trace_dir is None:
        shutil.rmtree(out_dir, ignore_errors=True)
    return summary, wall


def device_us(jfn, arg_sets, calls: int = 20) -> tuple[float, float]:
    """(device us per call, wall us per call) of `calls` back-to-back calls of the jitted jfn,
    rotating over arg_sets: the union of all device ops' intervals over the calls (trace_device).
    Host dispatch is not counted: in the engine an op runs inside one compiled step, queued ahead
    of the device. (Wall-clock timing with a sync per call read the H100's copy at 2.4-2.6 TB/s
    and its bf16 matmul at 620-670 TFLOP/s; this reads about 3.0 TB/s and 815 TFLOP/s.)"""
    for a in arg_sets:  # compile + warm-up; one output alive at a time (a copy's is GiBs)
        jax.block_until_ready(jfn(*a))

    def run():
        for i in range(calls):  # one stream: the last call done means all are
            out = jfn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)

    summary, wall = trace_device(run)
    if summary.get("busy_ms") is None:
        if jax.devices()[0].platform == "cpu":  # no device trace there: wall time (CPU checks)
            return wall * 1e6 / calls, wall * 1e6 / calls
        raise RuntimeError("the profiler recorded no device activity")
    return summary["busy_ms"] * 1e3 / calls, wall * 1e6 / calls


def measure_copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Bytes/s of a large device-to-device streaming op (bytes read plus bytes written), by device
    time: the best of a bf16 scale and a u32 xor over random data."""
    best = 0.0
    for dtype, op, c in [(jnp.bfloat16, jnp.multiply, 1), (jnp.uint32, jnp.bitwise_xor, 7)]:
        key = jax.random.key(5)
        n = nbytes // jnp.dtype(dtype).itemsize
        x = (jax.random.bits(key, (n,), jnp.uint32) if dtype == jnp.uint32
             else jax.random.normal(key, (n,), dtype))
        us, _ = device_us(jax.jit(op), [(x, jnp.asarray(c, dtype))], calls=10)
        best = max(best, 2 * nbytes / (us * 1e-6))
        del x
    return best


def measure_matmul_rate(n: int = 8192, dtype=jnp.bfloat16) -> float:
    """FLOP/s of an n x n x n matmul on random data, by device time."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), dtype)
    b = jax.random.normal(k2, (n, n), dtype)
    us, _ = device_us(jax.jit(lambda x, y: x @ y), [(a, b)], calls=10)
    return 2 * n**3 / (us * 1e-6)


def param_split(mc) -> tuple[int, int, int]:
    """(params every token reads, params of one expert summed over the sparse layers, sparse
    layers) of a Llama-family ModelConfig or a MoEConfig (models/moe.py: routers and shared
    experts count as read by every token); embeddings counted once if tied."""
    D, F, V, H = mc.hidden_size, mc.intermediate_size, mc.vocab_size, mc.head_dim
    kv_heads = mc.num_kv_heads // mc.kv_replication
    attn = D * H * (2 * mc.num_q_heads + 2 * kv_heads) + 2 * D
    attn += 2 * H if mc.qk_norm else 0  # Qwen3
    attn += H * (mc.num_q_heads + 2 * kv_heads) if mc.qkv_bias else 0  # Qwen2
    always, sparse = V * D * (1 if mc.tie_word_embeddings else 2) + D, 0
    for i in range(mc.num_layers):
        always += attn
        if getattr(mc, "num_experts", 0) and mc.is_sparse(i):
            sparse += 1
            always += D * mc.num_experts  # the router
            if mc.shared_expert_intermediate_size:
                always += 3 * D * mc.shared_expert_intermediate_size + D
        else:
            always += 3 * D * F
    per_expert = 3 * D * mc.moe_intermediate_size if sparse else 0
    return always, per_expert * sparse, sparse


def param_count(mc) -> int:
    """All parameters (every expert of a MoE)."""
    always, expert, _ = param_split(mc)
    return always + expert * getattr(mc, "num_experts", 0)


def active_params(mc) -> int:
    """Parameters one token computes with (its top-k experts of a MoE)."""
    always, expert, _ = param_split(mc)
    return always + expert * getattr(mc, "num_experts_per_tok", 0)


def weight_bytes_read(mc, itemsize: int, tokens: int) -> float:
    """Expected weight bytes a step of `tokens` tokens reads: everything of a dense model; of a
    MoE, the shared part plus the experts its tokens route to, E * (1 - (1 - k/E)^tokens) per
    layer under uniform routing (k at one token, all E in a large batch)."""
    always, expert, _ = param_split(mc)
    if not expert:
        return always * itemsize
    E, k = mc.num_experts, mc.num_experts_per_tok
    touched = E * (1.0 - (1.0 - k / E) ** tokens)
    return (always + expert * touched) * itemsize


def stored_bytes(engine) -> tuple[float, int]:
    """(weight ratio, KV itemsize) of a running engine, for floors of quantized runs: the bytes its
    weights take over the same parameters at 2 bytes each (fp8 ~0.5, AWQ ~0.3 of bf16 for the
    projections) and the bytes of one cached K or V element (1 for an fp8 KV cache)."""
    mc = engine.model_config
    stored = sum(leaf.nbytes for leaf in jax.tree.leaves(engine.runner.state))
    return stored / (2 * param_count(mc)), engine.runner.kv_cache.k[0].dtype.itemsize


def kv_bytes_per_token(mc, itemsize: int) -> int:
    return 2 * mc.num_layers * (mc.num_kv_heads // mc.kv_replication) * mc.head_dim * itemsize


def workload_floor(mc, itemsize: int, *, num_prompts: int, input_len: int, output_len: int,
                   batch: int, bandwidth: float, flops: float, **stored) -> dict:
    """requests_floor of num_prompts requests of one length (the issues' fixed-length workloads)."""
    return requests_floor(mc, itemsize, [(input_len, output_len)] * num_prompts, batch=batch,
                          bandwidth=bandwidth, flops=flops, **stored)


def requests_floor(mc, itemsize: int, lengths: list[tuple[int, int]], *, batch: int,
                   bandwidth: float, flops: float, weight_ratio: float | None = None,
                   kv_itemsize: int | None = None) -> dict:
    """Seconds a workload of (input_len, output_len) requests needs at best, continuously batched:
    every prompt's prefill at max(bytes / bandwidth, FLOPs / rate), then decode steps of up to
    `batch` running requests (a finished one's slot goes to the next waiting one at once), each step
    at max(bytes / bandwidth, FLOPs / rate) with bytes = the weights its tokens read + every running
    request's KV. A request decodes output_len steps (the prefill's step gives no extra token here,
    as in the issues' floors). Mixed lengths count their own tail: the last long outputs decode in
    small batches, each step still reading all the weights.

    `serial_*` is the same workload with the kernels one after another, as a step runs them: per
    step the matmuls' max(weight bytes / bandwidth, matmul FLOPs / rate) PLUS attention's KV read
    (and its FLOPs) on its own, instead of one max over both: a large decode batch is matmul-bound
    and attention-bound at once, and the first floor counts only the larger of the two.

    Quantized runs (stored_bytes): weight bytes scale by weight_ratio (of 2 bytes a parameter), KV
    bytes follow kv_itemsize; FLOPs stay at the one matmul rate measured (bf16)."""
    params, active = param_count(mc), active_params(mc)  # MoE: FLOPs follow the active ones
    kv_tok = kv_bytes_per_token(mc, kv_itemsize or itemsize)
    w_scale = 1.0 if weight_ratio is None else weight_ratio * 2 / itemsize
    attn_per_ctx = 4 * mc.num_layers * mc.num_q_heads * mc.head_dim  # FLOPs per (token, ctx) pair
    ins = np.array([i for i, _ in lengths], dtype=np.float64)
    outs = np.array([o for _, o in lengths], dtype=np.int64)
    tokens = float(ins.sum())
    attn_flops = float((attn_per_ctx * ins**2 / 2).sum())
    w_prefill = w_scale * weight_bytes_read(mc, itemsize, int(tokens))
    prefill_s = max((w_prefill + tokens * kv_tok) / bandwidth, (2 * active * tokens + attn_flops) / flops)
    serial_prefill_s = (max(w_prefill / bandwidth, 2 * active * tokens / flops)
                        + max(tokens * kv_tok / bandwidth, attn_flops / flops))
    decode_s = serial_decode_s = 0.0
    waiting = list(range(len(lengths)))[::-1]  # pop() takes the next request in order
    running_ctx, running_left = [], []
    steps = 0
    while waiting or running_ctx:
        while waiting and len(running_ctx) < batch:
            r = waiting.pop()
            if outs[r] > 0:
                running_ctx.append(ins[r])
                running_left.append(outs[r])
        if not running_ctx:
            break
        ctx, left = np.array(running_ctx), np.array(running_left)
        b = len(ctx)
        w_bytes, kv_read = w_scale * weight_bytes_read(mc, itemsize, b), float(ctx.sum()) * kv_tok
        mm_flops, at_flops = 2 * active * b, attn_per_ctx * float(ctx.sum())
        decode_s += max((w_bytes + kv_read) / bandwidth, (mm_flops + at_flops) / flops)
        serial_decode_s += (max(w_bytes / bandwidth, mm_flops / flops)
                            + max(kv_read / bandwidth, at_flops / flops))
        steps += 1
        keep = left > 1
        running_ctx, running_left = list(ctx[keep] + 1), list(left[keep] - 1)
    total, serial = prefill_s + decode_s, serial_prefill_s + serial_decode_s
    out_tokens = int(outs.sum())
    return {"seconds": total, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
            "output_tokens_per_s": out_tokens / total, "decode_steps": steps,
            "serial_seconds": serial, "serial_output_tokens_per_s": out_tokens / serial,
            "params": params, "active_params": active}


def environment() -> dict:
    # JAXSERVE_COMMIT wins: the GPU machine's copy of the tree carries the last landed .git, whose
    # HEAD is not the code that ran.
    commit = os.environ.get("JAXSERVE_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                             stderr=subprocess.DEVNULL).strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
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
