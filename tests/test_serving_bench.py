"""benchmarks/serving.py: the metrics on synthetic records, and whole runs against a real
`jaxserve serve` subprocess on the tiny Llama, started through the benchmark's --launch code."""
from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import orjson
import pytest

from benchmarks import server_times, serving, serving_client
from benchmarks.serving import RequestRecord
from tests.engine.tiny import build_tiny_llama

SERVE_ARGS = ("--dtype float32 --max-model-len 128 --max-num-seqs 32 --num-kv-pages 512 "
              "--max-num-batched-tokens 256 --disable-uvicorn-access-log")
NUM_PROMPTS, OUTPUT_LEN = 12, 8


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    model = build_tiny_llama(tmp_path_factory.mktemp("serving_bench_llama"))
    log = tmp_path_factory.mktemp("serving_bench_log") / "server.log"
    with serving.launched_server(f"{model} {SERVE_ARGS}", log, timeout=120) as url:
        yield url


def _args(base_url: str, out: Path, *extra: str):
    # logprobs=0: the tiny tokenizer holds back most tokens' text (partial UTF-8), so only with
    # logprobs does every chunk count its tokens (a client behind gets several in one: issue 20)
    return serving.parse_args([
        "--base-url", base_url, "--num-prompts", str(NUM_PROMPTS), "--random-input-len", "16",
        "--random-output-len", str(OUTPUT_LEN), "--random-range-ratio", "0.5", "--vocab-size",
        "384", "--ignore-eos", "--logprobs", "0", "--save-detailed", "--out", str(out),
        "--num-warmups", "4", *extra])


def _record(ttft: float, e2el: float, tokens: int, itl: list[float] | None = None,
            ok: bool = True) -> RequestRecord:
    return RequestRecord(prompt_len=10, success=ok, error="" if ok else "boom", ttft=ttft,
                         e2el=e2el, itl=itl or [], output_tokens=tokens)


def test_summarize_synthetic():
    records = [_record(0.1, 1.1, 11, [0.1] * 10), _record(0.3, 0.7, 5, [0.1, 0.1, 0.1, 0.1]),
               _record(0.2, 0.2, 1), _record(9.0, 9.0, 0, ok=False)]
    s = serving.summarize(records, duration=2.0)
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, ["boom"])
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 17)
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 8.5
    assert s["total_token_throughput"] == 23.5
    ttft = np.array([100.0, 300.0, 200.0])
    assert s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["median_ttft_ms"] == pytest.approx(200.0)
    assert s["p99_ttft_ms"] == pytest.approx(np.percentile(ttft, 99))
    assert s["std_ttft_ms"] == pytest.approx(ttft.std())
    # TPOT skips the 1-token request: (1.1-0.1)/10 and (0.7-0.3)/4, both 100 ms
    assert s["mean_tpot_ms"] == pytest.approx(100.0) and s["p99_tpot_ms"] == pytest.approx(100.0)
    assert s["median_itl_ms"] == pytest.approx(100.0)
    assert s["median_e2el_ms"] == pytest.approx(700.0)
    assert s["tokens_per_chunk"] == pytest.approx(17 / 17)


def test_summarize_all_failed():
    s = serving.summarize([_record(0, 0, 0, ok=False)], duration=1.0)
    assert s["completed"] == 0 and s["output_throughput"] == 0 and s["mean_ttft_ms"] == 0


def test_server_time_means_from_two_scrapes():
    before = server_times.parse_sums(
        '# TYPE vllm:request_queue_time_seconds histogram\n'
        'vllm:request_queue_time_seconds_bucket{le="0.1"} 1\n'
        'vllm:request_queue_time_seconds_sum{model_name="m"} 0.5\n'
        'vllm:request_queue_time_seconds_count{model_name="m"} 2\n')
    after = server_times.parse_sums(
        'vllm:request_queue_time_seconds_sum{model_name="m"} 1.5\n'
        'vllm:request_queue_time_seconds_count{model_name="m"} 6\n'
        'vllm:request_queue_time_seconds_sum{model_name="m",replica="1"} 0.5\n'
        'vllm:request_queue_time_seconds_count{model_name="m",replica="1"} 1\n'
        'vllm:time_to_first_token_seconds_sum{model_name="m"} 0\n')
    # (1.5 + 0.5 - 0.5) s over (6 + 1 - 2) requests; a histogram without new requests is left out
    assert server_times.mean_times_ms(before, after) == {"queue": 300.0}


def test_workload_helpers():
    args = serving.parse_args(["--num-prompts", "50", "--random-input-len", "20",
                               "--random-output-len", "10", "--random-range-ratio", "0.5"])
    reqs = serving.random_requests(args, vocab_size=100)
    assert len(reqs) == 50 and all(10 <= r.prompt_len <= 30 for r in reqs)
    assert all(5 <= r.output_len <= 15 and len(r.prompt) == r.prompt_len for r in reqs)
    assert all(0 <= t < 100 for r in reqs for t in r.prompt)
    assert [r.prompt for r in serving.random_requests(args, 100)] == [r.prompt for r in reqs]
    assert not serving.arrival_gaps(5, math.inf, 0).any()
    assert serving.arrival_gaps(20000, 4.0, 0).mean() == pytest.approx(0.25, rel=0.05)
    chunk_tokens = serving_client.chunk_tokens
    assert chunk_tokens({"choices": [{"text": "a", "logprobs": None}]}) == 1
    assert chunk_tokens({"choices": [{"text": "", "logprobs": {"tokens": ["x", "y"]}}]}) == 2
    assert chunk_tokens({"choices": [{"delta": {"role": "assistant", "content": ""}}]}) == 0
    assert chunk_tokens({"choices": [], "usage": {"completion_tokens": 3}}) == 0


def test_split_deals_each_request_once():
    bodies, lens, offsets = [b"%d" % i for i in range(11)], list(range(11)), [0.0] * 11
    shares = serving_client.split(bodies, lens, offsets, max_concurrency=5, num_clients=3)
    assert sorted(i for s in shares for i in s.indices) == list(range(11))
    assert [s.max_concurrency for s in shares] == [2, 2, 1]
    assert all(s.bodies == [bodies[i] for i in s.indices] for s in shares)
    # never more processes than streams; the default is one per 250 streams
    assert len(serving_client.split(bodies, lens, offsets, 2, 8)) == 2
    assert serving_client.default_num_clients(1000, 2000) == 4
    assert serving_client.default_num_clients(None, 12) == 1
    with pytest.raises(ValueError, match="num_clients=0"):
        serving_client.split(bodies, lens, offsets, None, 0)


def test_send_request_reads_chunked_sse():
    """The raw client against a canned server: HTTP/1.1 chunks that cut an event in two, and
    text with U+2028 / U+0085, which orjson leaves unescaped and only LF may end a line at
    (httpx's splitlines() cut such chunks and failed their requests)."""
    events = [{"choices": [{"text": "a\u2028b\x85"}]}, {"choices": [{"text": "c"}]},
              {"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 3}}]
    stream = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    pieces = [stream[:9], stream[9:40], stream[40:]]

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        assert orjson.loads(await reader.readexactly(length)) == {"max_tokens": 2}
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        writer.close()

    async def run() -> RequestRecord:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        target = serving_client.Target.of(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}",
                                          "/v1/completions")
        rec = RequestRecord(prompt_len=0)
        async with server:
            await serving_client.send_request(target, b'{"max_tokens":2}', rec)
        return rec

    rec = asyncio.run(run())
    assert rec.success, rec.error
    assert (rec.output_tokens, rec.prompt_len, len(rec.itl)) == (2, 3, 1)
    assert 0 < rec.ttft <= rec.e2el
    with pytest.raises(ValueError, match="https://x"):
        serving_client.Target.of("https://x", "/v1/completions")


def _check_run(run: dict, requests: list) -> None:
    assert run["completed"] == NUM_PROMPTS and run["failed"] == 0, run["errors"]
    assert len(run["client_cpu_s"]) == run["num_clients"]
    wanted = [r.output_len for r in requests]
    assert [r["output_tokens"] for r in run["requests"]] == wanted  # ignore_eos
    assert run["total_output_tokens"] == sum(wanted)
    assert run["total_input_tokens"] == sum(r.prompt_len for r in requests)
    for r in run["requests"]:
        assert r["success"] and 0 < r["ttft"] <= r["e2el"]
        assert len(r["itl"]) <= r["output_tokens"] - 1  # a chunk may carry several tokens
        assert r["ttft"] + sum(r["itl"]) <= r["e2el"]
    for name in serving.METRICS:
        assert 0 < run[f"median_{name}_ms"] <= run[f"p99_{name}_ms"]
    assert run["median_ttft_ms"] <= run["median_e2el_ms"] and run["tokens_per_chunk"] >= 1.0


@pytest.mark.parametrize("flags", [("--request-rate", "inf"),
                                   ("--request-rate", "20", "--max-concurrency", "4")])
def test_benchmark_against_server(base_url, tmp_path, flags):
    args = _args(base_url, tmp_path, *flags)
    result = asyncio.run(serving.amain(args))
    (run,) = result["runs"]
    assert run["request_rate"] == float(flags[1]) and run["prefix_cache_reset"]
    _check_run(run, serving.random_requests(args, args.vocab_size))
    saved = json.loads(Path(result["json_path"]).read_text())
    assert saved["runs"][0]["completed"] == NUM_PROMPTS and saved["env"]["python"]
    assert Path(result["png_path"]).stat().st_size > 1000
    # The server's own split of the time (from /metrics, this run only): queueing in the engine
    # core + prefill end where the server's TTFT ends, which the client's TTFT contains.
    times = run["server_mean_ms"]
    assert set(times) == {"queue", "prefill", "ttft", "decode"}
    assert 0 <= times["queue"] and 0 < times["prefill"] and 0 < times["decode"]
    assert times["queue"] + times["prefill"] <= times["ttft"] + 1.0
    assert times["ttft"] <= run["mean_ttft_ms"] + 1.0


def test_main_sweep_and_failures(base_url, tmp_path):
    result = serving.main(["--base-url", base_url, "--num-prompts", "6", "--random-input-len",
                           "8", "--random-output-len", "4", "--vocab-size", "384",
                           "--sweep-rates", "50,inf", "--out", str(tmp_path), "--name", "sweep",
                           "--num-warmups", "0"])
    assert [r["request_rate"] for r in result["runs"]] == [50.0, math.inf]
    assert all(r["completed"] == 6 and r["prefix_cache_reset"] for r in result["runs"])
    assert (tmp_path / "sweep.json").exists() and (tmp_path / "sweep.png").exists()
    bad = serving.main(["--base-url", base_url, "--model", "nope", "--num-prompts", "3",
                        "--random-input-len", "4", "--random-output-len", "2", "--vocab-size",
                        "384", "--out", str(tmp_path), "--name", "bad", "--num-warmups", "0"])
    (run,) = bad["runs"]
    assert run["completed"] == 0 and run["failed"] == 3
    assert "404" in run["errors"][0] and "nope" in run["errors"][0]


def test_two_client_processes_merge_every_request_once(base_url, tmp_path):
    """--num-clients 2: each process sends half; the merged records are every request exactly
    once, in request order (each has its own output length, checked per position)."""
    args = _args(base_url, tmp_path, "--num-clients", "2", "--max-concurrency", "6")
    result = asyncio.run(serving.amain(args))
    (run,) = result["runs"]
    assert run["num_clients"] == 2 and len(run["requests"]) == NUM_PROMPTS
    assert len(run["client_cpu_s"]) == 2 and all(c > 0 for c in run["client_cpu_s"])
    requests = serving.random_requests(args, args.vocab_size)
    assert len({r.output_len for r in requests}) > 1  # a misplaced record would show
    _check_run(run, requests)
    assert run["duration"] >= max(r["e2el"] for r in run["requests"])
