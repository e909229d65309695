"""The load generator of benchmarks/serving.py: streaming POSTs over raw HTTP/1.1 on asyncio
streams, spread over client processes that share one clock; their records merge back in order.

Why not httpx: at 1,000 streams one httpx process spent ~200 us of CPU per SSE chunk (anyio
cancel scopes, a connection pool scanned per request) and became the bottleneck it measured:
its TTFT grew by seconds the server never saw (issue 20). Here a chunk costs a readline, a
readexactly and one orjson.loads, and --num-clients processes split the streams between them.
"""
from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

STREAMS_PER_CLIENT = 250  # default --num-clients: one process per this many concurrent streams
MAX_DEFAULT_CLIENTS = 16


@dataclass
class RequestRecord:
    """One request's outcome; times in seconds from perf_counter."""

    prompt_len: int
    success: bool = False
    error: str = ""
    ttft: float = 0.0  # request sent -> first chunk carrying a token
    e2el: float = 0.0  # request sent -> end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between chunks that carry tokens
    output_tokens: int = 0  # usage.completion_tokens (fallback: tokens counted in chunks)


@dataclass(frozen=True)
class Target:
    """Where the streaming requests go: http://host:port + endpoint."""

    host: str
    port: int
    path: str

    @classmethod
    def of(cls, base_url: str, endpoint: str) -> Target:
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"{base_url=} must be http://host[:port] (the client speaks plain "
                             "HTTP/1.1)")
        return cls(url.hostname, url.port or 80, url.path.rstrip("/") + endpoint)

    def head(self, body_len: int) -> bytes:
        return (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
                f"Content-Length: {body_len}\r\nConnection: close\r\n\r\n").encode()


@dataclass
class Share:
    """One client process's requests: their indices in the run, bodies and send times."""

    indices: list[int]
    bodies: list[bytes]  # JSON, as POSTed
    prompt_lens: list[int]
    offsets: list[float]  # seconds after the shared start
    max_concurrency: int | None  # this process's part of --max-concurrency


def chunk_tokens(chunk: dict) -> int:
    """Tokens a completions or chat chunk carries: its logprobs entries when asked for (then held-
    back text still sends one chunk per token), else 1 if it has text; 0 for role/usage chunks."""
    choice = (chunk.get("choices") or [{}])[0]
    logprobs = choice.get("logprobs") or {}
    if entries := logprobs.get("tokens") or logprobs.get("content"):
        return len(entries)
    text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
    return 1 if text else 0


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    status = int((await reader.readuntil(b"\r\n")).split(None, 2)[1])
    headers = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().lower()
    return status, headers


async def _pieces(reader: asyncio.StreamReader, headers: dict[bytes, bytes]):
    """The response body as it arrives: HTTP/1.1 chunks, else reads until the length or EOF."""
    if headers.get(b"transfer-encoding") == b"chunked":
        while size := int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16):
            yield (await reader.readexactly(size + 2))[:-2]
        return
    if (length := headers.get(b"content-length")) is not None:
        yield await reader.readexactly(int(length))
        return
    while piece := await reader.read(1 << 16):
        yield piece


async def _body(reader: asyncio.StreamReader, headers: dict[bytes, bytes]) -> bytes:
    return b"".join([piece async for piece in _pieces(reader, headers)])


def _on_chunk(rec: RequestRecord, chunk: dict, state: list) -> None:
    """Fold one SSE chunk into `rec`; state = [start, last, num_chunks, num_tokens]."""
    if (tokens := chunk_tokens(chunk)) > 0:
        now = time.perf_counter()
        if state[2] == 0:
            rec.ttft = now - state[0]
        else:
            rec.itl.append(now - state[1])
        state[1], state[2], state[3] = now, state[2] + 1, state[3] + tokens
    if chunk.get("usage"):
        rec.output_tokens = chunk["usage"]["completion_tokens"]
        rec.prompt_len = chunk["usage"]["prompt_tokens"]


async def send_request(target: Target, body: bytes, rec: RequestRecord) -> None:
    """POST one streaming request on a new connection; fill `rec` from its SSE `data:` lines."""
    state = [time.perf_counter()] * 2 + [0, 0]  # start, last token chunk, chunks, tokens
    done, writer = False, None
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        writer.write(target.head(len(body)) + body)
        status, headers = await _read_head(reader)
        if status != 200:
            text = (await _body(reader, headers)).decode(errors="replace")
            rec.error = f"HTTP {status}: {text[:300]}"
            return
        buf = b""
        async for piece in _pieces(reader, headers):
            *lines, buf = (buf + piece).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                chunk = orjson.loads(data)
                if "error" in chunk:
                    rec.error = str(chunk["error"].get("message", chunk["error"]))[:300]
                    return
                _on_chunk(rec, chunk, state)
            if done:
                break
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
            KeyError, IndexError) as e:  # orjson.JSONDecodeError is a ValueError
        rec.error = f"{type(e).__name__}: {e}"[:300]
        return
    finally:
        if writer is not None:
            writer.close()
    rec.e2el = time.perf_counter() - state[0]
    rec.ttft = rec.ttft or rec.e2el  # no text at all: the first "token" is the whole response
    rec.output_tokens = rec.output_tokens or state[3]
    rec.success, rec.error = done, "" if done else "the stream ended without [DONE]"


async def run_share(target: Target, share: Share, start: float
                    ) -> tuple[list[RequestRecord], float, float]:
    """Send the share's requests at start + offset (perf_counter, shared by every process of
    the machine), at most share.max_concurrency in flight; returns its records, end time and
    the CPU seconds this process spent meanwhile (near the duration: the client is the limit)."""
    cpu = time.process_time()
    limit = asyncio.Semaphore(share.max_concurrency) if share.max_concurrency else None
    records = [RequestRecord(prompt_len=n) for n in share.prompt_lens]

    async def one(body: bytes, rec: RequestRecord) -> None:
        async with limit or contextlib.nullcontext():
            await send_request(target, body, rec)

    tasks = []
    for body, rec, offset in zip(share.bodies, records, share.offsets):
        if (delay := start + offset - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(body, rec)))
    await asyncio.gather(*tasks)
    return records, time.perf_counter(), time.process_time() - cpu


def default_num_clients(max_concurrency: int | None, num_requests: int) -> int:
    streams = min(max_concurrency or num_requests, num_requests)
    return max(1, min(MAX_DEFAULT_CLIENTS, -(-streams // STREAMS_PER_CLIENT)))


def split(bodies: list[bytes], prompt_lens: list[int], offsets: list[float],
          max_concurrency: int | None, num_clients: int) -> list[Share]:
    """Deal the requests round-robin over num_clients processes (fewer if there are fewer
    requests or streams); each gets its part of max_concurrency, the first ones the remainder."""
    if num_clients < 1:
        raise ValueError(f"{num_clients=} must be >= 1")
    n = min(num_clients, len(bodies), max_concurrency or len(bodies)) or 1
    shares = []
    for k in range(n):
        idx = list(range(k, len(bodies), n))
        limit = None if not max_concurrency else \
            max_concurrency // n + (k < max_concurrency % n)
        shares.append(Share(idx, [bodies[i] for i in idx], [prompt_lens[i] for i in idx],
                            [offsets[i] for i in idx], limit))
    return shares


def loop_factory():
    """uvloop's event loop where installed (orbax-checkpoint brings it), else asyncio's."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return None


def _client_process(target: Target, share: Share, conn) -> None:
    conn.send("ready")
    start = conn.recv()
    conn.send(asyncio.run(run_share(target, share, start), loop_factory=loop_factory()))
    conn.close()


def _run_processes(target: Target, shares: list[Share]
                   ) -> tuple[float, list[tuple[list[RequestRecord], float, float]]]:
    """One spawned process per share; all start at one perf_counter instant once every process
    is up. Returns that start and each share's run_share() result."""
    ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no inherited event loop
    procs, conns = [], []
    try:
        for share in shares:
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_client_process, args=(target, share, theirs),
                               name="serving-client", daemon=True)
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        try:
            for conn in conns:
                conn.recv()  # "ready"
            start = time.perf_counter() + 0.05
            for conn in conns:
                conn.send(start)
            return start, [conn.recv() for conn in conns]
        except EOFError:
            codes = [proc.join(5) or proc.exitcode for proc in procs]
            raise RuntimeError(f"a client process died: exit codes {codes}") from None
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()


async def run_load(target: Target, shares: list[Share]
                   ) -> tuple[list[RequestRecord], float, list[float]]:
    """Run the shares (one: in this event loop; more: one process each); returns every record
    in request order, the duration from the shared start to the last process's end, and each
    process's CPU seconds."""
    if len(shares) == 1:
        start = time.perf_counter()
        results = [await run_share(target, shares[0], start)]
    else:
        start, results = await asyncio.to_thread(_run_processes, target, shares)
    records: list[RequestRecord | None] = [None] * sum(len(s.indices) for s in shares)
    for share, (recs, _, _) in zip(shares, results):
        for i, rec in zip(share.indices, recs):
            records[i] = rec
    return records, max(end for _, end, _ in results) - start, [cpu for *_, cpu in results]
