#!/usr/bin/env python3
"""Async load generator: N concurrent streaming chat completions, a JSON summary on stdout.

Each of ``concurrency`` streams sends requests one after another. Two modes:
  count     ``requests_per_stream`` requests each, all streams starting together; tokens/s is
            over the whole run.
  duration  streams start staggered over ``ramp`` seconds (so arrivals are spread as in steady
            traffic, not one synchronized burst), then a measurement window of ``duration``
            seconds; only tokens read inside the window count, TTFT is taken from requests
            that start inside it, and requests still running when it closes are cancelled
            (not errors). The ``on_window`` hook runs as the window opens and closes, so a
            caller can sample CPU over exactly the same span.
Before either, every stream sends one unmeasured one-token request, so connections are open.

Tokens are counted by content: the fake llama-server's every token is the word " tok", so the
count is the number of times " tok" occurs in the response bytes. That stays right when a
router merges tokens that arrive together into one delta, and costs one ``bytes.count`` per
read instead of a JSON parse per event, so the generator does not steal the CPU it measures.
TTFT is the time from sending the request to the first read that holds a token.

A request is an error if the status is not 200, the stream carries an ``{"error": ...}`` event,
or it ends without ``data: [DONE]``; it is *short* if it delivered fewer than ``max_tokens``.

    python bench/loadgen.py --url http://127.0.0.1:8080 --api-key KEY --concurrency 16 \\
        --duration 10 --max-tokens 200
As a module: ``summary = await run_load(url, api_key, concurrency, duration=10, max_tokens=200)``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

TOKEN = b" tok"
_ERROR_EVENT = b'data: {"error"'
UNIQUE = b"@@n@@"  # in a prompt: replaced by the request's number (no two share a cached prefix)
_TAIL = 31  # bytes kept between reads, longer than any pattern we look for


@dataclass(slots=True)
class Tally:
    """Results of the requests of one run."""

    requests: int = 0
    errors: int = 0
    short: int = 0
    tokens: int = 0  # inside the measurement window
    ttfts: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)

    def fail(self, reason: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(reason[:300])


@dataclass(slots=True)
class Load:
    """One kind of request, sent many times; tokens count only between ``opens`` and ``closes``."""

    url: str
    body: bytes
    headers: dict[str, str]
    max_tokens: int
    tally: Tally = field(default_factory=Tally)
    done: bytes = b"[DONE]"  # how a good stream ends (Anthropic: the message_stop event)
    # Responses API: tokens are counted in the data of these events only (later events repeat the
    # whole text), and the stream ends well with the ``done`` event (its data is the whole response)
    delta_event: bytes = b""
    sent: int = 0  # requests built; numbers the prompts where the body holds UNIQUE
    opens: float = -math.inf
    closes: float = math.inf

    async def one(self, session: aiohttp.ClientSession) -> None:
        self.tally.requests += 1
        try:
            tokens, ended_ok = await self._read(session)
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as exc:
            self.tally.fail(f"{type(exc).__name__}: {exc}")
            return
        if ended_ok and tokens < self.max_tokens:
            self.tally.short += 1

    async def _read(self, session: aiohttp.ClientSession) -> tuple[int, bool]:
        """(tokens, whether the stream ended well); records TTFT and failures itself."""
        started = time.perf_counter()
        measured = self.opens <= started < self.closes
        tokens, tail, saw_error = 0, b"", False
        self.sent += 1
        body = self.body.replace(UNIQUE, str(self.sent).encode()) if UNIQUE in self.body else self.body
        async with session.post(self.url, data=body, headers=self.headers) as resp:
            if resp.status != 200:
                self.tally.fail(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
                return 0, False
            if self.delta_event:
                return await self._read_events(resp, started, measured)
            async for chunk in resp.content.iter_any():
                buf = tail + chunk
                found = buf.count(TOKEN) - tail.count(TOKEN)  # matches inside the tail were counted
                if found:
                    now = time.perf_counter()
                    if tokens == 0 and measured:
                        self.tally.ttfts.append(now - started)
                    tokens += found
                    if self.opens <= now < self.closes:
                        self.tally.tokens += found
                saw_error = saw_error or _ERROR_EVENT in buf
                tail = buf[-_TAIL:]
        if saw_error:
            self.tally.fail("error event in stream")
        elif self.done not in tail:
            self.tally.fail(f"stream ended without {self.done.decode()}")
        return tokens, not saw_error and self.done in tail


    async def _read_events(self, resp: aiohttp.ClientResponse, started: float, measured: bool) -> tuple[int, bool]:
        tokens, event, ended, failed = 0, b"", False, False
        async for raw in resp.content:  # one line at a time
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"event: "):
                event = line[7:]
                # reaching max_output_tokens ends the stream with response.incomplete: a good end too
                ended = ended or event in (self.done, b"response.incomplete")
                failed = failed or event in (b"error", b"response.failed")
            elif event == self.delta_event and line.startswith(b"data: "):
                found = line.count(TOKEN)
                if found:
                    now = time.perf_counter()
                    if tokens == 0 and measured:
                        self.tally.ttfts.append(now - started)
                    tokens += found
                    if self.opens <= now < self.closes:
                        self.tally.tokens += found
        if failed:
            self.tally.fail("error event in stream")
        elif not ended:
            self.tally.fail(f"stream ended without {self.done.decode()}")
        return tokens, ended and not failed


def chat_url(url: str) -> str:
    """A base URL gets the OpenAI path appended; a full .../chat/completions URL is kept."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/v1/chat/completions"


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 2)


def _summary(tally: Tally, elapsed: float, concurrency: int, cpu_s: float) -> dict[str, Any]:
    return {
        "concurrency": concurrency,
        "requests": tally.requests,
        "errors": tally.errors,
        "short": tally.short,
        "tokens": tally.tokens,
        "elapsed_s": round(elapsed, 3),
        "tokens_per_s": round(tally.tokens / elapsed, 1) if elapsed > 0 else 0.0,
        "ttft_ms": {
            "p50": _ms(percentile(tally.ttfts, 50)),
            "p99": _ms(percentile(tally.ttfts, 99)),
            "max": _ms(max(tally.ttfts, default=None)),
        },
        "loadgen_cpu_s": round(cpu_s, 4),
        "error_samples": tally.error_samples,
    }


async def _warm_up(session: aiohttp.ClientSession, load: Load, concurrency: int) -> int:
    """One one-token request per stream at once, to open as many pooled connections as streams.

    Returns how many failed (they are not errors of the run itself).
    """
    body = orjson.loads(load.body)
    body["max_output_tokens" if "max_output_tokens" in body else "max_tokens"] = 1
    short = Load(load.url, orjson.dumps(body), load.headers, 1, done=load.done, delta_event=load.delta_event)
    await asyncio.gather(*(short.one(session) for _ in range(concurrency)))
    return short.tally.errors


async def _count_mode(session: aiohttp.ClientSession, load: Load, concurrency: int, requests: int) -> float:
    async def stream() -> None:
        for _ in range(requests):
            await load.one(session)

    started = time.perf_counter()
    await asyncio.gather(*(stream() for _ in range(concurrency)))
    return time.perf_counter() - started


async def _duration_mode(
    session: aiohttp.ClientSession, load: Load, concurrency: int, duration: float, ramp: float,
    limit: int, on_window: Callable[[bool], None],
) -> float:  # fmt: skip
    load.opens = time.perf_counter() + ramp
    load.closes = load.opens + duration

    async def stream(delay: float) -> None:
        await asyncio.sleep(delay)
        for _ in range(limit):
            if time.perf_counter() >= load.closes:
                return
            await load.one(session)

    tasks = [asyncio.create_task(stream(i * ramp / concurrency)) for i in range(concurrency)]
    try:
        await asyncio.sleep(max(load.opens - time.perf_counter(), 0.0))
        on_window(True)
        await asyncio.wait(tasks, timeout=max(load.closes - time.perf_counter(), 0.0))
        on_window(False)
        elapsed = min(time.perf_counter(), load.closes) - load.opens
    finally:
        for task in tasks:  # requests still running when the window closes are not measured
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return elapsed


async def run_load(
    url: str,
    api_key: str | None,
    concurrency: int,
    requests_per_stream: int | None = None,
    duration: float | None = None,
    max_tokens: int = 100,
    *,
    ramp: float = 0.0,
    on_window: Callable[[bool], None] | None = None,
    model: str = "bench",
    timeout: float = 120.0,
    prompt: str = "Say tok.",
    warmup: bool = True,
    api: str = "openai",
) -> dict[str, Any]:
    """Run the load and return the summary (see the module docstring).

    Count mode with ``requests_per_stream`` alone; duration mode with ``duration`` (and then
    ``requests_per_stream``, if given, also caps each stream). ``timeout`` bounds each request.
    """
    if requests_per_stream is None and duration is None:
        raise ValueError("give requests_per_stream or duration")
    body = orjson.dumps({
        "model": model, "stream": True, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": prompt}],
    })  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if api == "anthropic":  # /v1/messages: the same body shape, ends with message_stop
        if api_key:
            headers["x-api-key"] = api_key
        headers["anthropic-version"] = "2023-06-01"
        load = Load(url.rstrip("/") + "/v1/messages", body, headers, max_tokens, done=b"message_stop")
    elif api == "responses":  # /v1/responses (Codex): input instead of messages
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        body = orjson.dumps({"model": model, "stream": True, "max_output_tokens": max_tokens, "input": prompt})
        load = Load(url.rstrip("/") + "/v1/responses", body, headers, max_tokens, done=b"response.completed",
                    delta_event=b"response.output_text.delta")  # fmt: skip
    else:
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        load = Load(chat_url(url), body, headers, max_tokens)
    cpu: list[float] = []

    def window(opening: bool) -> None:
        cpu.append(time.process_time())
        if on_window is not None:
            on_window(opening)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        warmup_errors = await _warm_up(session, load, concurrency) if warmup else 0
        if duration is None:
            window(True)
            elapsed = await _count_mode(session, load, concurrency, requests_per_stream or 0)
            window(False)
        else:
            limit = requests_per_stream if requests_per_stream is not None else sys.maxsize
            elapsed = await _duration_mode(session, load, concurrency, duration, ramp, limit, window)
    return {**_summary(load.tally, elapsed, concurrency, cpu[-1] - cpu[0]), "warmup_errors": warmup_errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL or full .../chat/completions URL")
    parser.add_argument("--api-key", default=os.environ.get("AUXOT_API_KEY"))
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--requests-per-stream", type=int)
    parser.add_argument("--duration", type=float, help="seconds of the measurement window")
    parser.add_argument("--ramp", type=float, default=1.0, help="seconds over which streams start (duration mode)")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per request")
    args = parser.parse_args()
    if args.requests_per_stream is None and args.duration is None:
        parser.error("give --requests-per-stream or --duration")
    summary = asyncio.run(
        run_load(
            args.url, args.api_key, args.concurrency, args.requests_per_stream, args.duration,
            args.max_tokens, ramp=args.ramp, timeout=args.timeout,
        )
    )  # fmt: skip
    sys.stdout.write(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode() + "\n")


if __name__ == "__main__":
    main()
