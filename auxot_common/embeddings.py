"""OpenAI ``POST /v1/embeddings``: request validation and the response body.

The worker asks llama-server (started with ``--embeddings --pooling <type>``) for float vectors;
the router encodes them as the caller asked: a list of floats, or ``base64`` of the
little-endian float32 bytes (what the OpenAI SDK sends by default and decodes with numpy).
"""

from __future__ import annotations

import base64
import sys
from array import array
from dataclasses import dataclass
from typing import Any

from auxot_common.openai_api import RequestError

MAX_INPUTS = 2048  # OpenAI's limit per request
ENCODINGS = ("float", "base64")


@dataclass(slots=True)
class EmbeddingsRequest:
    model: str
    inputs: list[str] | list[list[int]]
    encoding_format: str = "float"


def parse_embeddings_request(body: Any) -> EmbeddingsRequest:
    """Validate a body; raises :class:`RequestError` (400) naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object")
    model = body.get("model", "")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "model must be a string", param="model")
    inputs = _inputs(body.get("input"))
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise RequestError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
    if body.get("dimensions") is not None:
        raise RequestError(400, "dimensions is not supported: vectors have the model's own size", param="dimensions")
    return EmbeddingsRequest(model=model or "", inputs=inputs, encoding_format=encoding)


def _inputs(value: Any) -> list[str] | list[list[int]]:
    """A string, a list of strings, a list of token ids, or a list of token id lists."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RequestError(400, "input must be a non-empty string or array", param="input")
    if len(value) > MAX_INPUTS:
        raise RequestError(400, f"input must have at most {MAX_INPUTS} items", param="input")
    if all(isinstance(v, str) for v in value):
        if any(not v for v in value):
            raise RequestError(400, "input must not contain empty strings", param="input")
        return list(value)
    if all(_is_int(v) for v in value):
        return [list(value)]
    if all(isinstance(v, list) and v and all(_is_int(t) for t in v) for v in value):
        return [list(v) for v in value]
    raise RequestError(400, "input must be a string, an array of strings, or an array of token arrays", param="input")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def encode_vector(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format != "base64":
        return vector
    packed = array("f", vector)
    if sys.byteorder != "little":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


def embeddings_body(
    vectors: list[list[float]], *, model: str, prompt_tokens: int, encoding_format: str
) -> dict[str, Any]:
    """The OpenAI response: one ``embedding`` object per input, in input order."""
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode_vector(v, encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
