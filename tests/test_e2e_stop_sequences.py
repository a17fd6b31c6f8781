"""Anthropic ``stop_reason: "stop_sequence"`` with the matched ``stop_sequence``, end to end: the
official SDK against real router and worker processes and the real llama-server (tiny model,
greedy, so the text without stop strings tells where each stop string falls)."""

from __future__ import annotations

from typing import Any

from tests.conftest import Cluster
from tests.support import http
from tests.test_e2e_anthropic import GREEDY, HELLO, blocks, post_stream, sdk

MISSING = "\x7f~never~"  # printable-only model output never holds this


def test_stop_sequence_is_named_streaming_and_not(cluster: Cluster) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="1024")
    cluster.worker(router)
    client = sdk(router)
    plain = client.messages.create(model="tiny", max_tokens=40, extra_body=GREEDY, messages=HELLO)
    [(_, text)] = blocks(plain)
    assert plain.stop_reason == "max_tokens" and len(text) > 16, text
    stop = text[10:13]
    cut = text.index(stop)
    assert cut > 0, text
    request: dict[str, Any] = {
        "model": "tiny", "max_tokens": 40, "extra_body": GREEDY, "messages": HELLO,
        "stop_sequences": [MISSING, stop],
    }  # fmt: skip

    message = client.messages.create(**request)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", stop)
    assert blocks(message) == [("text", text[:cut])]
    assert 0 < message.usage.output_tokens < 40

    with client.messages.stream(**request) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text[:cut]
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", stop)

    raw = post_stream(
        router,
        {"model": "tiny", "max_tokens": 40, "temperature": 0, "messages": HELLO, "stop_sequences": [stop]},
    )
    [delta] = [data for name, data in raw.events if name == "message_delta"]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": stop}
    assert delta["usage"]["output_tokens"] > 0

    # no stop string in the text: everything arrives, and the length limit is the reason
    unmatched = client.messages.create(**{**request, "stop_sequences": [MISSING]})
    assert (unmatched.stop_reason, unmatched.stop_sequence) == ("max_tokens", None)
    assert blocks(unmatched) == [("text", text)]

    # OpenAI callers get the text cut at the same place, with finish_reason "stop"
    def openai_chat(**extra: Any) -> dict[str, Any]:
        body = {"model": "tiny", "max_tokens": 40, "temperature": 0, "messages": HELLO, **extra}
        resp = http.post(f"{router.url}/api/openai/chat/completions", body, headers=router.headers())
        assert resp.status == 200, resp.body[:300]
        return resp.json()["choices"][0]  # type: ignore[no-any-return]

    whole = openai_chat()["message"]["content"]
    stop = whole[10:13]
    choice = openai_chat(stop=stop)
    assert (choice["finish_reason"], choice["message"]["content"]) == ("stop", whole[: whole.index(stop)])
