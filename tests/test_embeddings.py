"""OpenAI embeddings: request validation and the response body (pure)."""

from __future__ import annotations

import base64
import struct

import pytest

from auxot_common.embeddings import embeddings_body, parse_embeddings_request
from auxot_common.openai_api import RequestError


def test_inputs_of_every_documented_shape() -> None:
    assert parse_embeddings_request({"input": "hi"}).inputs == ["hi"]
    assert parse_embeddings_request({"input": ["a", "b"], "model": "m"}).inputs == ["a", "b"]
    assert parse_embeddings_request({"input": [1, 2, 3]}).inputs == [[1, 2, 3]]
    assert parse_embeddings_request({"input": [[1], [2, 3]]}).inputs == [[1], [2, 3]]
    assert parse_embeddings_request({"input": "x", "encoding_format": "base64"}).encoding_format == "base64"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": [""]}, "input"),
        ({"input": ["a", 1]}, "input"),
        ({"input": [[1], []]}, "input"),
        ({"input": ["x"] * 2049}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": 64}, "dimensions"),
        ({"input": "x", "model": 3}, "model"),
    ],
)
def test_bad_requests_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_embeddings_request(body)
    assert info.value.status == 400 and info.value.param == param


def test_body_in_input_order_float_and_base64() -> None:
    vectors = [[0.5, -1.0], [0.25, 2.0]]
    body = embeddings_body(vectors, model="m", prompt_tokens=7, encoding_format="float")
    assert body["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.5, -1.0]},
        {"object": "embedding", "index": 1, "embedding": [0.25, 2.0]},
    ]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7} and body["model"] == "m"
    packed = embeddings_body(vectors, model="m", prompt_tokens=7, encoding_format="base64")
    assert struct.unpack("<2f", base64.b64decode(packed["data"][1]["embedding"])) == (0.25, 2.0)
