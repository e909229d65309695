"""The host path of one engine step (issues 14 and 15), with the device taken out: LLMEngine's real
scheduler, batch building, runner input padding and packing, token controls (grammar masks),
update, grammar advance and output processing at 256-1,024 running sequences, per phase.

python -m benchmarks.host_step                        # 256 and 1,024 sequences, SmolLM2 tokenizer
python -m benchmarks.host_step --num-seqs 64 --steps 4 --tokenizer DIR   # a quick look

HostRunner stands in for ModelRunner: dispatch() and sample() do the runner's host work (padded
inputs, SamplingMetadata, the token controls' copy, packing) and fetch() draws each row's token
on the host (uniform over what the row's mask allows), which is the device's part and not
counted. Each phase is timed with perf_counter around the engine's own calls (exclusive of the
phases nested in it); "other" is the rest of step(). Reported: per-phase medians over the timed
steps (and the median and mean host ms per step), as the host's cores may be shared. Requests run with ignore_eos to max_tokens;
one that finishes (a grammar complete, a stop string) is replaced by the same request, so the
batch stays at --num-seqs. Timing starts once every sequence decodes (prefill done).
"""
from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from benchmarks import common
from benchmarks.structured import SCHEMA  # issue 15's run

PHASES = ("schedule", "batch", "launch", "masks", "grammar_masks", "update", "grammar_advance",
          "output", "other")
ROWS = ("greedy", "T0.7 top_p0.9", "logprobs=5", "50% JSON schema", "stop strings")


def row_params(row: str, i: int, max_tokens: int):
    """Request i's SamplingParams in `row` (LLM.generate's FINAL_ONLY outputs)."""
    from jaxserve.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    kw = dict(max_tokens=max_tokens, ignore_eos=True, temperature=0.0,
              output_kind=RequestOutputKind.FINAL_ONLY)
    if row == "T0.7 top_p0.9":
        kw.update(temperature=0.7, top_p=0.9, seed=i)
    elif row == "logprobs=5":
        kw.update(logprobs=5)
    elif row == "50% JSON schema" and i % 2 == 0:
        kw.update(structured_outputs=StructuredOutputsParams(json=SCHEMA))
    elif row == "stop strings":
        kw.update(stop=["\n\n\n\n", "</answer>", "###"])
    elif row not in ROWS:
        raise ValueError(f"{row=} is not one of {ROWS}")
    return SamplingParams(**kw)


class _Handle:
    def __init__(self, batch, mask, deferred: bool):
        self.batch, self.mask, self.deferred = batch, mask, deferred


class HostRunner:
    """ModelRunner's host half (see the module docstring); tokens drawn at fetch()."""

    def __init__(self, *, vocab_size: int, text_vocab: int, max_num_seqs: int,
                 max_num_batched_tokens: int, max_model_len: int, page_size: int, num_pages: int,
                 seed: int = 0):
        from jaxserve.runner import ModelRunner, token_buckets
        from jaxserve.sampling_inputs import SamplingInputs, pow2_at_least

        runner = ModelRunner.__new__(ModelRunner)  # only the host-input half is used
        runner.vocab_size, runner.max_num_seqs, runner.max_logprobs = vocab_size, max_num_seqs, 20
        runner.buckets = token_buckets(max(max_num_batched_tokens, max_num_seqs))
        runner.max_rows = pow2_at_least(max_num_seqs, 8)
        runner.max_pages_per_seq = -(-max_model_len // page_size)
        runner.attention_impl, runner.full_width_page_table = "pallas_gpu", True
        runner.kv_cache = SimpleNamespace(num_slots=num_pages * page_size, page_size=page_size)
        runner.sampling = SamplingInputs(vocab_size=vocab_size, max_num_seqs=max_num_seqs,
                                         max_model_len=max_model_len, max_logprobs=20,
                                         mesh_context=contextlib.nullcontext)
        self.runner, self.state = runner, None
        self.text_vocab = text_vocab
        self.deferred_ready = threading.Event()
        self.deferred_ready.set()
        self._rng = np.random.default_rng(seed)

    def start_deferred_warmup(self) -> None:
        pass

    def dispatch(self, batch, tokens=None, defer: bool = False) -> _Handle:
        from jaxserve.packed_inputs import pack

        args, _ = self.runner._inputs(batch, full_sampler=defer, tokens=None if defer else tokens)
        pack(args[:5] + args[6:] if defer else args)
        return _Handle(batch, None if defer or tokens is None else tokens.mask, defer)

    def sample(self, handle: _Handle, tokens=None) -> _Handle:
        from jaxserve.packed_inputs import pack
        from jaxserve.token_controls import TokenInputs

        b_pad = self.runner._rows_for(self.runner.bucket_for(handle.batch.num_tokens))
        pack((self.runner.sampling.metadata(handle.batch, b_pad, True, tokens or TokenInputs()),))
        handle.mask, handle.deferred = None if tokens is None else tokens.mask, False
        return handle

    def fetch(self, handle: _Handle):
        """The device's part (not counted): a token per row, one the row's mask allows."""
        from jaxserve.runner import StepOutput

        B, rng = handle.batch.num_seqs, self._rng
        tokens = rng.integers(0, self.text_vocab, B).astype(np.int32)
        if handle.mask is not None:
            for b in np.flatnonzero((handle.mask[:B] != -1).any(axis=1)):
                bits = np.unpackbits(handle.mask[b].view(np.uint8), bitorder="little")
                tokens[b] = rng.choice(np.flatnonzero(bits[:self.text_vocab]))
        top_ids = rng.integers(0, self.text_vocab, (B, 20)).astype(np.int32)
        return StepOutput(token_ids=tokens, logprobs=np.full(B, -1.5, np.float32),
                          ranks=np.ones(B, np.int32), top_ids=top_ids,
                          top_logprobs=np.full((B, 20), -2.0, np.float32))


class PhaseTimer:
    """Seconds per phase, each exclusive of the timed calls nested in it."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[phase] += elapsed - self._inner.pop()
                if self._inner:
                    self._inner[-1] += elapsed
        return timed


def build_engine(tokenizer, num_seqs: int, max_model_len: int, max_num_batched_tokens: int):
    """An LLMEngine over HostRunner (no model, no device), page pool sized to hold every seq."""
    from jaxserve.config import EngineConfig
    from jaxserve.engine import LLMEngine
    from jaxserve.startup import EngineParts

    page_size = 16
    num_pages = num_seqs * -(-max_model_len // page_size) + 64
    vocab = -(-len(tokenizer) // 128) * 128  # a model vocabulary padded past the tokenizer's
    config = EngineConfig(max_num_seqs=num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                          page_size=page_size, num_kv_pages=num_pages, max_model_len=max_model_len)
    runner = HostRunner(vocab_size=vocab, text_vocab=len(tokenizer), max_num_seqs=num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens,
                        max_model_len=max_model_len, page_size=page_size, num_pages=num_pages)
    parts = EngineParts(model_config=SimpleNamespace(vocab_size=vocab), model_name="host-only",
                        tokenizer=tokenizer, chat_template=None,
                        eos_token_ids=frozenset({tokenizer.eos_token_id}),
                        max_model_len=max_model_len, num_kv_pages=num_pages, runner=runner,
                        sampling_defaults={}, config=config)
    return LLMEngine(config, parts=parts)


def instrument(engine) -> PhaseTimer:
    timer, sched, out = PhaseTimer(), engine.scheduler, engine.output_processor
    sched.schedule = timer.wrap("schedule", sched.schedule)
    sched._build_batch = timer.wrap("batch", sched._build_batch)
    sched.update = timer.wrap("update", sched.update)
    engine.runner.dispatch = timer.wrap("launch", engine.runner.dispatch)
    engine.runner.sample = timer.wrap("launch", engine.runner.sample)
    engine.runner.fetch = timer.wrap("device", engine.runner.fetch)
    engine._token_inputs = timer.wrap("masks", engine._token_inputs)
    engine._fill_grammar_rows = timer.wrap("grammar_masks", engine._fill_grammar_rows)
    engine._advance_grammars = timer.wrap("grammar_advance", engine._advance_grammars)
    out.record_logprobs = timer.wrap("output", out.record_logprobs)
    engine._process_outputs = timer.wrap("output", engine._process_outputs)
    return timer


def run_row(tokenizer, row: str, num_seqs: int, args) -> dict:
    """Host ms per step by phase over args.steps decode steps at num_seqs running sequences."""
    engine = build_engine(tokenizer, num_seqs, args.max_prompt + args.max_tokens + 16,
                          args.max_num_batched_tokens)
    rng = np.random.default_rng(args.seed)
    text_vocab = min(len(tokenizer), 30000)
    prompts = {}
    for i in range(num_seqs):
        prompts[str(i)] = (rng.integers(0, text_vocab, rng.integers(args.min_prompt,
                                                                    args.max_prompt + 1)).tolist(),
                           row_params(row, i, args.max_tokens))
        engine.add_request(str(i), *prompts[str(i)])
    refills = [0]

    def step():
        outputs = engine.step()
        for out in outputs:  # FINAL_ONLY: finished requests; the same request again
            refills[0] += 1
            rid = f"{out.request_id.split('#')[0]}#{refills[0]}"
            engine.add_request(rid, *prompts[out.request_id.split("#")[0]])
        return outputs

    while True:  # prefill: until a step has no prompt tokens and every sequence runs
        before = engine.stats["prompt_tokens"]
        step()
        if (engine.stats["prompt_tokens"] == before and not engine.scheduler.num_waiting
                and engine.scheduler.num_running == num_seqs):
            break
    timer = instrument(engine)
    start_stats, start_refills = dict(engine.stats), refills[0]
    per_step = []  # {phase: seconds} of each timed step
    for _ in range(args.steps):
        before = dict(timer.seconds)
        start = time.perf_counter()
        step()
        took = {p: timer.seconds[p] - before.get(p, 0.0) for p in timer.seconds}
        took["other"] = time.perf_counter() - start - sum(took.values())
        took["host"] = took["other"] + sum(took[p] for p in PHASES if p in took and p != "other")
        per_step.append(took)
    # Medians: the host shares its cores; a step that lost its core is not the engine's cost.
    phases = {p: 1e3 * float(np.median([t.get(p, 0.0) for t in per_step])) for p in PHASES}
    n = args.steps
    gen = engine.stats["generation_tokens"] - start_stats["generation_tokens"]
    return {"num_seqs": num_seqs, "row": row, "steps": n,
            "host_ms_per_step": 1e3 * float(np.median([t["host"] for t in per_step])),
            "mean_host_ms_per_step": 1e3 * float(np.mean([t["host"] for t in per_step])),
            "phases_ms": phases, "tokens_per_step": gen / n,
            "prompt_tokens_per_step": (engine.stats["prompt_tokens"]
                                       - start_stats["prompt_tokens"]) / n,
            "requests_replaced": refills[0] - start_refills}


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(labels)), 4.5))
    bottom = np.zeros(len(labels))
    for phase in PHASES:
        vals = np.array([max(results[k]["phases_ms"][phase], 0.0) for k in labels])
        ax.bar(labels, vals, bottom=bottom, label=phase)
        bottom += vals
    ax.set_ylabel("host ms per step")
    ax.set_title("engine step, host path by phase (device taken out)")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokenizer", default=".gpu_assets/smollm2_tokenizer",
                   help="HF directory or .gguf; if absent: the embedded SmolLM2 (tests' tokenizer)")
    p.add_argument("--num-seqs", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per row")
    p.add_argument("--min-prompt", type=int, default=128)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result files")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    from jaxserve.checkpoint import embedded_gguf_path, load_tokenizer

    if not Path(args.tokenizer).exists():
        args.tokenizer = embedded_gguf_path()
    tokenizer = load_tokenizer(args.tokenizer)
    results = {}
    for num_seqs in args.num_seqs:
        for row in args.rows:
            r = results[f"{row} @ {num_seqs}"] = run_row(tokenizer, row, num_seqs, args)
            print(f"{row:>16} @ {num_seqs:5d}: {r['host_ms_per_step']:7.2f} ms/step  " + "  ".join(
                f"{k} {v:.2f}" for k, v in r["phases_ms"].items()), flush=True)
    name = "host_step" + (f"_{args.tag}" if args.tag else "")
    result = {"environment": common.environment(), "tokenizer": args.tokenizer,
              "tokenizer_vocab": len(tokenizer), "args": vars(args), "phases": list(PHASES),
              "rows": results}
    path = common.write_results(name, result, args.out)
    plot(path.with_suffix(".png"), results)
    return result


if __name__ == "__main__":
    main()
