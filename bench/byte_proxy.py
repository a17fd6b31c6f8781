#!/usr/bin/env python3
"""The reference for the benchmark: a plain aiohttp reverse proxy that only forwards bytes.

Every request (any method, any path) goes to ``--backend`` with its body; the response status,
headers and body chunks come back as they arrive, never parsed. It is the floor that the
router's cost is measured against: whatever the router spends beyond this is its own work.
It runs on the loop the router and worker run on (uvloop where installed): a proxy on asyncio's
own loop costs more per token and would flatter every ratio taken against it.

    python bench/byte_proxy.py --port 8081 --backend http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from auxot_common import eventloop

# hop-by-hop headers, and the ones aiohttp recomputes for the body it actually sends
_SKIP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Transfer-Encoding",
        "Upgrade", "Host", "Content-Length", "Content-Encoding",
    )
)  # fmt: skip


def _forwardable(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _SKIP_HEADERS)


class ByteProxy:
    def __init__(self, backend: str) -> None:
        self.backend = backend.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def start(self, _: web.Application) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)

    async def stop(self, _: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        body = await request.read()
        url = self.backend + request.rel_url.raw_path_qs
        async with self.session.request(
            request.method, url, data=body, headers=_forwardable(request.headers), allow_redirects=False
        ) as upstream:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            resp.headers.extend(_forwardable(upstream.headers))
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.on_startup.append(self.start)
        app.on_cleanup.append(self.stop)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app


async def serve(host: str, port: int, backend: str) -> None:
    # handler_cancellation: a caller that disconnects closes the backend request too
    runner = web.AppRunner(ByteProxy(backend).app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024, reuse_address=True).start()
    print(f"byte_proxy: listening on http://{host}:{port} -> {backend}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    args = parser.parse_args()
    eventloop.run(serve(args.host, args.port, args.backend))


if __name__ == "__main__":
    main()
