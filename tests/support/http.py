"""A tiny synchronous HTTP client (stdlib) for health polling and raw-bytes assertions."""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import orjson


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return orjson.loads(self.body)


def request(
    method: str, url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> Response:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return Response(resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()})
    except urllib.error.HTTPError as exc:
        return Response(exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()})


def get(url: str, *, headers: dict[str, str] | None = None, timeout: float = 30) -> Response:
    return request("GET", url, headers=headers, timeout=timeout)


def post(url: str, body: Any, *, headers: dict[str, str] | None = None, timeout: float = 30) -> Response:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return request("POST", url, body=data, headers=headers, timeout=timeout)
