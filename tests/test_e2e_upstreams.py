"""Upstream providers end to end (issue 15): a real router process, the local fake provider
(tests/support/fake_provider.py) speaking OpenAI and Anthropic streaming, both official SDKs as
callers. No worker is needed: "no-worker" and "overflow" are about a model nobody serves."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import orjson
import pytest

from tests.conftest import Cluster, Keys
from tests.support import http
from tests.support.fake_provider import FakeProvider, ServerThread
from tests.support.reliability import wait_for
from tests.test_e2e_keys import add_key, claude, oai, works
from tests.test_e2e_models import models_router
from tests.test_metrics import scrape, value

PROMPT = [{"role": "user", "content": "Say something."}]
UPSTREAM_KEY = "sk-upstream-secret-never-logged"


@pytest.fixture
def provider() -> Iterator[tuple[FakeProvider, str]]:
    fake = FakeProvider()
    with ServerThread(fake.app()) as server:
        yield fake, server.url


@pytest.fixture
def bare(keys: Keys, tmp_path: Path) -> Iterator[Cluster]:
    """Router processes only (no llama-server)."""
    c = Cluster(keys, tmp_path, tmp_path / "none.gguf", tmp_path / "no-llama")
    yield c
    c.stop()


def config(url: str, when: str, api: str = "openai") -> str:
    return f"""
[[models]]
name = "Tiny-Alpha"
ctx_size = 1024
default = true

[[models]]
name = "Tiny-Beta"
ctx_size = 512

[upstreams.paid]
api = "{api}"
base_url = "{url}/v1"
model = "provider-model"
key_env = "FAKE_UPSTREAM_KEY"
keys = ["*"]

[upstreams.openai-up]
api = "openai"
base_url = "{url}/v1"
model = "gpt-upstream"
key_env = "FAKE_UPSTREAM_KEY"
keys = ["*"]

[fallbacks]
Tiny-Alpha = {{ upstream = "paid", when = "{when}", after_s = 0.5 }}
"""


def clients(router: object) -> tuple[openai.OpenAI, anthropic.Anthropic]:
    url, key = router.url, router.keys.api_key  # type: ignore[attr-defined]
    return (
        openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0),
        anthropic.Anthropic(base_url=url, api_key=key, max_retries=0),
    )


def test_no_worker_fallback_both_sdks_translation_usage_and_429(
    bare: Cluster, tmp_path: Path, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    router = models_router(bare, tmp_path, config(url, "no-worker", api="anthropic"), FAKE_UPSTREAM_KEY=UPSTREAM_KEY)
    oai, claude = clients(router)

    # an OpenAI caller, an Anthropic upstream: translated both ways, streamed
    raw = oai.chat.completions.with_raw_response.create(model="Tiny-Alpha", messages=PROMPT, max_tokens=8)  # type: ignore[arg-type]
    assert raw.headers["x-auxot-routed-model"] == "paid" and "no-worker" in raw.headers["x-auxot-route-reason"]
    result = raw.parse()
    assert result.choices[0].message.content == "Hello from upstream."
    assert fake.requests[-1].path == "/v1/messages" and fake.requests[-1].body["model"] == "provider-model"
    assert fake.requests[-1].headers["x-api-key"] == UPSTREAM_KEY
    chunks = list(oai.chat.completions.create(model="Tiny-Alpha", messages=PROMPT, max_tokens=8, stream=True))  # type: ignore[arg-type]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from upstream."

    # an Anthropic caller, same API: passed through, streamed
    with claude.messages.stream(model="Tiny-Alpha", max_tokens=8, messages=PROMPT) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from upstream." and final.usage.output_tokens > 0
    assert fake.requests[-1].body["stream"] is True

    # a 429 from the upstream is ours, with its Retry-After
    fake.fail_next(429, retry_after="7")
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(model="Tiny-Alpha", messages=PROMPT, max_tokens=8)  # type: ignore[arg-type]
    assert caught.value.response.headers["retry-after"] == "7"
    fake.fail_next(429, retry_after="3")
    with pytest.raises(anthropic.RateLimitError) as caught_a:
        claude.messages.create(model="Tiny-Alpha", max_tokens=8, messages=PROMPT)  # type: ignore[arg-type]
    assert caught_a.value.response.headers["retry-after"] == "3"

    # usage and metrics per upstream; the upstream key is never in logs or /health
    samples = scrape(router.url, router.headers())
    assert value(samples, "auxot_upstream_requests_total", upstream="paid", status="200") == 3
    assert value(samples, "auxot_upstream_requests_total", upstream="paid", status="429") == 2
    assert value(samples, "auxot_upstream_tokens_total", upstream="paid", direction="completion") > 0
    assert UPSTREAM_KEY not in str(router.health())
    listed = [m.id for m in oai.models.list()]
    assert listed[-2:] == ["paid", "openai-up"]
    assert UPSTREAM_KEY not in router.log()


def test_always_and_upstream_as_a_model_and_cancellation(
    bare: Cluster, tmp_path: Path, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    router = models_router(bare, tmp_path, config(url, "always"), FAKE_UPSTREAM_KEY=UPSTREAM_KEY)
    oai, claude = clients(router)
    result = oai.chat.completions.create(model="Tiny-Alpha", messages=PROMPT, max_tokens=8)  # type: ignore[arg-type]
    assert result.choices[0].message.content == "Hello from upstream." and result.model == "provider-model"
    message = claude.messages.create(model="openai-up", max_tokens=8, messages=PROMPT)  # type: ignore[arg-type]
    assert "".join(b.text for b in message.content if b.type == "text") == "Hello from upstream."
    assert fake.requests[-1].path == "/v1/chat/completions"
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"

    # the caller leaves mid-stream: the upstream's stream is closed too
    fake.words = ["word "] * 200
    fake.delay_s = 0.05
    finished = len(fake.finished)
    stream = oai.chat.completions.create(model="openai-up", messages=PROMPT, max_tokens=300, stream=True)  # type: ignore[arg-type]
    for _ in zip(range(3), stream, strict=False):
        pass
    stream.close()
    wait_for(lambda: len(fake.cancelled) == 1, 10, "the upstream saw the caller leave")
    assert len(fake.finished) == finished  # it never ran to its end


def test_overflow_takes_the_job_out_of_the_queue(
    bare: Cluster, tmp_path: Path, provider: tuple[FakeProvider, str]
) -> None:
    fake, url = provider
    router = models_router(bare, tmp_path, config(url, "overflow"), FAKE_UPSTREAM_KEY=UPSTREAM_KEY)
    oai, claude = clients(router)
    started = time.monotonic()
    raw = oai.chat.completions.with_raw_response.create(model="Tiny-Alpha", messages=PROMPT, max_tokens=8)  # type: ignore[arg-type]
    assert time.monotonic() - started >= 0.5  # it waited in our queue first
    assert raw.headers["x-auxot-routed-model"] == "paid" and "overflow" in raw.headers["x-auxot-route-reason"]
    assert raw.parse().choices[0].message.content == "Hello from upstream."
    with claude.messages.stream(model="Tiny-Alpha", max_tokens=8, messages=PROMPT) as stream:  # type: ignore[arg-type]
        assert "".join(stream.text_stream) == "Hello from upstream."
    # taken out of our queue: nothing is left waiting for a worker that might connect later
    wait_for(lambda: router.health()["models"]["Tiny-Alpha"]["queue_depth"] == 0, 10, "an empty queue")
    samples = scrape(router.url, router.headers())
    assert value(samples, "auxot_jobs_total", model="Tiny-Alpha", outcome="overflow") == 2
    assert len(fake.requests) == 2 and fake.requests[-1].path == "/v1/chat/completions"


TEAM_ONLY = """
[[models]]
name = "Tiny-Alpha"
ctx_size = 1024
default = true

[upstreams.paid]
api = "openai"
base_url = "{url}/v1"
model = "provider-model"
key_env = "FAKE_UPSTREAM_KEY"
keys = ["team"]

[fallbacks]
Tiny-Alpha = {{ upstream = "paid", when = "no-worker" }}
"""


def test_only_listed_keys_go_upstream_and_their_usage_is_counted(
    bare: Cluster, tmp_path: Path, provider: tuple[FakeProvider, str]
) -> None:
    """``keys = ["team"]``: only the key named team is sent off-premises, asked by name or by
    fallback; the others get a 403 or stay local; team's upstream tokens are in its usage."""
    fake, url = provider
    router = models_router(
        bare, tmp_path, TEAM_ONLY.format(url=url), FAKE_UPSTREAM_KEY=UPSTREAM_KEY,
        AUXOT_KEYS_REFRESH="0.2s", AUXOT_JOB_TIMEOUT="2s",
    )  # fmt: skip
    team, other, admin = add_key(router, "team"), add_key(router, "other"), add_key(router, "ops", "--admin")
    wait_for(lambda: works(oai(router, other).models.list), 10, "the new keys")

    # the allowed key: the upstream by name and as the fallback of a model nobody serves
    told = oai(router, team).chat.completions.create(model="paid", messages=PROMPT, max_tokens=8)  # type: ignore[arg-type]
    assert told.choices[0].message.content == "Hello from upstream."
    as_team = oai(router, team).chat.completions.with_raw_response
    fallback = as_team.create(model="Tiny-Alpha", messages=PROMPT, max_tokens=8)  # type: ignore[arg-type]
    assert fallback.headers["x-auxot-routed-model"] == "paid"
    assert len(fake.requests) == 2

    # another key asking for the upstream: a 403 in each API's shape, nothing sent
    with pytest.raises(openai.PermissionDeniedError) as denied:
        oai(router, other).chat.completions.create(model="paid", messages=PROMPT, max_tokens=8)  # type: ignore[arg-type]
    assert denied.value.status_code == 403 and "paid" in denied.value.message
    assert denied.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(anthropic.PermissionDeniedError) as denied_a:
        claude(router, other).messages.create(model="paid", max_tokens=8, messages=PROMPT)  # type: ignore[arg-type]
    assert denied_a.value.body["error"]["type"] == "permission_error"  # type: ignore[index]

    # ... and asking for the local model: no fallback for it, the job waits for a local worker
    # (none comes: the local timeout), and its prompt never reaches the provider
    secret = [{"role": "user", "content": "internal only: do not send off-premises"}]
    with pytest.raises(openai.APIStatusError) as local:
        oai(router, other).chat.completions.create(model="Tiny-Alpha", messages=secret, max_tokens=8)  # type: ignore[arg-type]
    assert local.value.status_code >= 500 and "x-auxot-routed-model" not in local.value.response.headers
    with pytest.raises(anthropic.APIStatusError):
        claude(router, other).messages.create(model="Tiny-Alpha", max_tokens=8, messages=secret)  # type: ignore[arg-type]
    assert len(fake.requests) == 2
    assert all("internal only" not in str(r.body) for r in fake.requests)

    # usage per key: team's two upstream answers, with the tokens the provider reported
    def team_row() -> dict[str, Any]:
        response = http.get(f"{router.url}/admin/usage?key=team", headers={"Authorization": f"Bearer {admin}"})
        assert response.status == 200, response.body
        rows = orjson.loads(response.body)["data"]
        return rows[0] if rows else {}

    wait_for(lambda: team_row().get("requests") == 2, 10, "team's usage")
    row = team_row()
    assert told.usage is not None
    per_answer = (told.usage.prompt_tokens, told.usage.completion_tokens)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (2 * per_answer[0], 2 * per_answer[1])
    assert told.usage.prompt_tokens == fake.prompt_tokens and told.usage.completion_tokens == len(fake.words)
    response = http.get(f"{router.url}/admin/usage?key=other", headers={"Authorization": f"Bearer {admin}"})
    other_rows = orjson.loads(response.body)["data"]
    assert sum(r["prompt_tokens"] + r["completion_tokens"] for r in other_rows) == 0
