"""Every collective in the compiled decode step at tensor parallelism N, with its shape and bytes.

Issue 19: TP=2 decode of Llama-3-8B was slower than TP=1 on two H200s. This lists what XLA's SPMD
partitioner put into the step (all-reduce, all-gather, reduce-scatter, collective-permute,
all-to-all), one row per collective with the model code it came from (op metadata), so a
weight-, page- or vocab x hidden-sized collective shows at once. Nothing is allocated: the state
and KV cache are ShapeDtypeStructs with their shardings, so the real 8B shapes compile on CPU
with fake devices in seconds:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu \
    python -m benchmarks.tp_collectives --model llama-3-8b --tensor-parallel-size 2
  python -m benchmarks.tp_collectives --model tiny --tensor-parallel-size 2 --num-tokens 8

On a GPU host (no flags) it compiles for the GPUs themselves; --dump-hlo FILE keeps the text;
--time STEPS runs the step on zero weights and prints the launch time and the time per step
(a launch as long as the step = the host waited for the device); --vocab-split-sampler
restores the sampler over vocab-split logits for an A/B.
Expected per decoder layer: 2 all-reduces of [T, D] (after o_proj and down_proj), plus for the
logits / sampler at most [B, V]-sized ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import time
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
                "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# "%name = TYPE op(" where TYPE is one array shape or a tuple of them; op may be async (-start).
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>\(.*?\)|\S+)\s+"
                   r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<suffix>-start)?\(")
_SHAPE = re.compile(r"(?P<dtype>[a-z]+\d*[a-z\d]*)\[(?P<dims>[\d,]*)\]")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 512,
        "intermediate_size": 1408, "num_hidden_layers": 2, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16"}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of the optimized HLO."""

    op: str  # all-reduce, all-gather, ...
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each result array
    op_name: str  # the JAX op path from metadata ("" when XLA made it without one)
    inside: str = ""  # "conditional" / "while" if it runs inside one's branch or body, else ""

    @property
    def nbytes(self) -> int:
        return sum(_DTYPE_BYTES.get(dt, 4) * int(np.prod(dims, dtype=np.int64))
                   for dt, dims in self.shapes)

    @property
    def num_elements(self) -> int:
        """Elements of the largest result array."""
        return max((int(np.prod(dims, dtype=np.int64)) for _, dims in self.shapes), default=0)

    @property
    def shape_text(self) -> str:
        return ", ".join(f"{dt}[{','.join(map(str, dims))}]" for dt, dims in self.shapes)


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(")
_CALLEES = re.compile(r"(?P<kind>branch_computations|calls|to_apply|body|condition|"
                      r"called_computations)=(?P<names>\{[^}]*\}|%[\w.\-]+)")


def _computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines ("__entry__" also names the ENTRY one)."""
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m is not None and line.rstrip().endswith("{"):
            current = comps.setdefault(m["name"], [])
            if line.startswith("ENTRY"):
                comps["__entry__"] = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            current.append(line)
    return comps


def _control_flow_scopes(comps: dict[str, list[str]]) -> dict[str, str]:
    """Computation -> "conditional" / "while" for every computation that runs inside a
    conditional's branch or a while loop's body/condition (transitively)."""
    edges: dict[str, list[tuple[str, str]]] = {}
    for name, lines in comps.items():
        for line in lines:
            for m in _CALLEES.finditer(line):
                kind = {"branch_computations": "conditional", "body": "while",
                        "condition": "while"}.get(m["kind"], "")
                for callee in re.findall(r"%([\w.\-]+)", m["names"]):
                    edges.setdefault(name, []).append((callee, kind))
    scope: dict[str, str] = {}
    stack = [(c, k) for lines in edges.values() for c, k in lines if k]
    while stack:
        name, kind = stack.pop()
        if name in scope:
            continue
        scope[name] = kind
        stack.extend((c, k or kind) for c, k in edges.get(name, []))
    return scope


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Every collective instruction in an HLO module's text (async pairs counted once, at -start;
    an async start's result tuple holds its operands too, so only the second half counts)."""
    comps = _computations(hlo_text)
    scopes = _control_flow_scopes(comps)
    found = []
    for name, lines in comps.items():
        if name == "__entry__":
            continue
        for line in lines:
            m = _LINE.match(line)
            if m is None:
                continue
            shapes = tuple((s["dtype"], tuple(int(d) for d in s["dims"].split(",") if d))
                           for s in _SHAPE.finditer(m["type"]))
            if m["suffix"] and len(shapes) > 1:
                shapes = shapes[len(shapes) // 2:]  # ((operands...), (results...)): results
            op_name = _OP_NAME.search(line)
            found.append(Collective(op=m["op"], shapes=shapes,
                                    op_name=op_name["op_name"] if op_name else "",
                                    inside=scopes.get(name, "")))
    return found


_COPY = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>\S+)\s+"
                   r"(?P<op>copy|transpose|fusion)\(")


def large_copies(hlo_text: str, min_bytes: int = 1 << 20) -> list[tuple[str, str, int]]:
    """(instruction, op_name, bytes) of top-level copies, transposes and copy/transpose fusions
    of >= min_bytes in the ENTRY computation: data moved every step besides the math (e.g. a
    weight re-laid out each step; on CPU jnp.einsum's "TNH,NHD->TD" contracts (H, N) and XLA
    transposes o_proj every step)."""
    found = []
    entry = _computations(hlo_text).get("__entry__", [])
    for line in entry:
        m = _COPY.match(line)
        if m is None or (m["op"] == "fusion" and not re.search(r"copy|transpose", m["name"])):
            continue
        nbytes = sum(_DTYPE_BYTES.get(x["dtype"], 4) * int(np.prod(
            [int(d) for d in x["dims"].split(",") if d], dtype=np.int64))
            for x in _SHAPE.finditer(m["type"]))
        if nbytes >= min_bytes:
            op_name = _OP_NAME.search(line)
            found.append((m["name"], op_name["op_name"] if op_name else "", nbytes))
    return found


def unexpected(collectives: list[Collective], *, tokens: int, hidden: int, rows: int,
               vocab: int, num_layers: int, max_logprobs: int = 20) -> list[str]:
    """What the step should not hold at tensor parallelism, one line each (empty = as intended):
    all-reduces only of [tokens, hidden] activations, 2 per layer + 1 for the vocab-split
    embedding lookup; at most one all-to-all, moving the [rows, vocab] logits to whole rows per
    shard for the sampler; all-gathers only of the sampler's per-row outputs (<= rows x
    max_logprobs elements); nothing else, and no collective inside a conditional or loop (XLA:GPU
    reads such a conditional's predicate on the host: the launch waits for the device). A
    gathered weight, KV page array or lm_head breaks the size rules."""
    bad = []
    reduces = [c for c in collectives if c.op == "all-reduce"]
    if len(reduces) != 2 * num_layers + 1:
        bad.append(f"{len(reduces)} all-reduces, expected 2 x {num_layers} layers + 1 (embed)")
    for c in collectives:
        sizes = [int(np.prod(dims, dtype=np.int64)) for _, dims in c.shapes]
        if c.inside:
            bad.append(f"{c.op} {c.shape_text} inside a {c.inside}: {c.op_name}")
        if c.op == "all-reduce" and any(dims != (tokens, hidden) for _, dims in c.shapes):
            bad.append(f"all-reduce {c.shape_text} is not [{tokens}, {hidden}]: {c.op_name}")
        elif c.op == "all-gather" and c.num_elements > rows * max_logprobs:
            bad.append(f"all-gather {c.shape_text} > {rows} x {max_logprobs}: {c.op_name}")
        elif c.op == "all-to-all" and sum(sizes) > rows * vocab:
            bad.append(f"all-to-all {c.shape_text} > [{rows}, {vocab}]: {c.op_name}")
        elif c.op not in ("all-reduce", "all-gather", "all-to-all"):
            bad.append(f"{c.op} {c.shape_text}: {c.op_name}")
    if sum(c.op == "all-to-all" for c in collectives) > 1:
        bad.append("more than one all-to-all")
    return bad


def abstract_runner(hf_config: dict, *, tensor_parallel_size: int, dtype: str = "bfloat16",
                    num_pages: int = 256, page_size: int = 16, max_model_len: int = 1024,
                    max_num_seqs: int = 8, attention_backend: str = "auto",
                    materialize: bool = False):
    """A ModelRunner whose state and KV cache are ShapeDtypeStructs placed as the engine places
    them (weights.abstract_model, kv_cache_sharding): it lowers and compiles, never runs.
    materialize: zero arrays on those shardings instead, so the steps can run (--time)."""
    from jaxserve.runner import ModelRunner
    from jaxserve.sharding import ShardingRules, make_mesh
    from jaxserve.startup import attention_impl_for
    from models import config_from_hf

    mesh = make_mesh(tensor_parallel_size)
    rules = ShardingRules()
    config = config_from_hf(hf_config, {}).with_kv_replication(tensor_parallel_size)
    graphdef, state, kv = common.abstract_state_and_cache(
        config, dtype, mesh, rules, num_pages=num_pages, page_size=page_size)
    if materialize:
        zeros = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (state, kv)),
                        out_shardings=jax.tree.map(lambda a: a.sharding, (state, kv)))
        state, kv = zeros()
    impl = attention_impl_for(attention_backend, jnp.dtype(dtype))
    runner = ModelRunner(graphdef, state, kv, vocab_size=config.vocab_size,
                         max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_seqs,
                         max_model_len=max_model_len, attention_impl=impl, mesh=mesh)
    return runner, config


def step_hlo(runner, num_tokens: int, full_sampler: bool = False) -> str:
    """Optimized HLO text of the runner's fused step for a num_tokens bucket (padding batch)."""
    t_pad = runner.bucket_for(num_tokens)
    args, prompt_k = runner._inputs(runner._padding_batch(t_pad), full_sampler=full_sampler)
    return runner._lower(args, prompt_k).compile().as_text()


def time_steps(runner, num_tokens: int, steps: int) -> tuple[float, float]:
    """(median ms until runner.dispatch returns, ms per step over `steps` back-to-back
    dispatches) of a padding step: a launch that takes as long as the step means the launching
    thread waited for the device (nothing overlaps the host's work then)."""
    batch = runner._padding_batch(runner.bucket_for(num_tokens))
    for _ in range(3):  # compile and warm
        runner.fetch(runner.dispatch(batch))
    launches, handles = [], []
    start = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        handles.append(runner.dispatch(batch))
        launches.append(time.perf_counter() - t)
    jax.block_until_ready([h.out for h in handles])
    total = time.perf_counter() - start
    return 1e3 * float(np.median(launches)), 1e3 * total / steps


def summarize(collectives: list[Collective]) -> list[tuple[Collective, int]]:
    """Identical rows (op, shapes, op_name) merged with their count, largest bytes first."""
    counts = Counter(collectives)
    return sorted(counts.items(), key=lambda kv: (-kv[0].nbytes, kv[0].op, kv[0].op_name))


def print_table(collectives: list[Collective], *, width: int = 100) -> None:
    rows = summarize(collectives)
    print(f"{'count':>5}  {'op':<18} {'shape':<30} {'bytes':>12}  {'inside':<11} op_name")
    for c, n in rows:
        print(f"{n:>5}  {c.op:<18} {c.shape_text:<30} {c.nbytes:>12,}  {c.inside or '-':<11} "
              f"{c.op_name[:width]}")
    total = sum(c.nbytes for c in collectives)
    by_op = Counter(c.op for c in collectives)
    in_flow = sum(bool(c.inside) for c in collectives)
    print(f"total: {len(collectives)} collectives ({dict(by_op)}), {total:,} bytes per step; "
          f"{in_flow} inside a conditional or loop")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="a models/presets.py name or 'tiny' "
                   "(Llama layout: D 512, 8 q / 2 kv heads, V 32000, 2 layers)")
    p.add_argument("--tensor-parallel-size", type=int, default=2)
    p.add_argument("--num-tokens", type=int, default=1, help="tokens in the step (decode: B)")
    p.add_argument("--num-layers", type=int, default=None, help="override the layer count")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--full-sampler", action="store_true", help="the full sampler variant")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--dump-hlo", default=None, help="write the optimized HLO text here")
    p.add_argument("--time", type=int, default=0, metavar="STEPS",
                   help="also run STEPS steps on zero weights: launch ms and ms per step")
    p.add_argument("--vocab-split-sampler", action="store_true",
                   help="A/B: sample over the vocab-split logits as before (no rows_parallel)")
    a = p.parse_args(argv)
    if a.vocab_split_sampler:
        import jaxserve.runner

        jaxserve.runner.rows_parallel = lambda fn: fn
    if a.model == "tiny":
        hf = dict(TINY)
    else:
        from models.presets import get_preset

        hf = get_preset(a.model)
        if hf is None:
            raise ValueError(f"--model {a.model!r} is neither 'tiny' nor a preset")
        hf = dict(hf)
    if a.num_layers is not None:
        hf["num_hidden_layers"] = a.num_layers
    runner, cfg = abstract_runner(hf, tensor_parallel_size=a.tensor_parallel_size, dtype=a.dtype,
                                  max_num_seqs=max(8, a.num_tokens),
                                  attention_backend=a.attention_backend,
                                  materialize=a.time > 0)
    text = step_hlo(runner, a.num_tokens, a.full_sampler)
    if a.dump_hlo:
        with open(a.dump_hlo, "w") as f:
            f.write(text)
    print(f"{a.model}: D={cfg.hidden_size} N={cfg.num_q_heads} K={cfg.num_kv_heads} "
          f"F={cfg.intermediate_size} V={cfg.vocab_size} L={cfg.num_layers}, "
          f"TP={a.tensor_parallel_size}, bucket {runner.bucket_for(a.num_tokens)} tokens, "
          f"attention={runner.attention_impl}, backend={jax.default_backend()}")
    found = parse_collectives(text)
    print_table(found)
    rows = runner._rows_for(runner.bucket_for(a.num_tokens))
    bad = unexpected(found, tokens=runner.bucket_for(a.num_tokens), hidden=cfg.hidden_size,
                     rows=rows, vocab=cfg.vocab_size, num_layers=cfg.num_layers,
                     max_logprobs=runner.max_logprobs) if a.tensor_parallel_size > 1 else [
        f"{c.op} {c.shape_text} at TP=1" for c in found]
    print("as intended" if not bad else "UNEXPECTED:\n  " + "\n  ".join(bad))
    copies = large_copies(text)
    print(f"copies/transposes >= 1 MiB per step: {len(copies)}, "
          f"{sum(b for *_, b in copies) / 2**20:.1f} MiB"
          + "".join(f"\n  {n} {b / 2**20:.1f} MiB {o}" for n, o, b in copies[:8]))
    if a.time:
        launch, step = time_steps(runner, a.num_tokens, a.time)
        print(f"launch {launch:.2f} ms (median), {step:.2f} ms per step over {a.time} steps")


if __name__ == "__main__":
    main()
