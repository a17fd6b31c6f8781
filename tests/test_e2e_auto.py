"""Automatic model choice end to end (issue 15): a real router, two workers with the real
llama-server serving two tiny models (from a fake Hugging Face, as in test_e2e_models), the
virtual ``auto`` model with rules, constraints, and the tiny model as the classifier."""

from __future__ import annotations

import os
from pathlib import Path

import anthropic
import openai
import orjson
import pytest

from tests.conftest import Cluster
from tests.fake_hf import FakeHF
from tests.support import http
from tests.support.reliability import wait_for
from tests.test_e2e_models import hf, models_router, worker  # noqa: F401 - hf is a fixture

MODELS = """
[[models]]
name = "Tiny-Alpha"
ctx_size = 1024

[[models]]
name = "Tiny-Beta"
ctx_size = 256
"""
RULES = """
[auto]
aliases = ["gpt-*"]
default = "Tiny-Beta"
rules = [
  { model = "Tiny-Beta", keywords = ["quick"] },
  { model = "Tiny-Alpha", tools = true },
  { model = "Tiny-Alpha", regex = "(?i)\\\\bprove\\\\b" },
]
"""
CLASSIFY = """
[auto]
policy = "classify"
classifier = "Tiny-Beta"
classify_timeout_ms = {timeout}
default = "Tiny-Alpha"
"""
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


def ask(client: openai.OpenAI, text: str, **extra: object) -> tuple[str, str, str]:
    """(response model, x-auxot-routed-model, x-auxot-route-reason)"""
    raw = client.chat.completions.with_raw_response.create(
        model=extra.pop("model", "auto"),  # type: ignore[arg-type]
        messages=[{"role": "user", "content": text}],
        max_tokens=4,
        temperature=0,
        **extra,  # type: ignore[arg-type]
    )
    return raw.parse().model, raw.headers["x-auxot-routed-model"], raw.headers["x-auxot-route-reason"]


def test_rules_constraints_and_classify(cluster: Cluster, tmp_path: Path, hf: FakeHF) -> None:  # noqa: F811
    router = models_router(cluster, tmp_path, MODELS + RULES, AUXOT_BALANCE_INTERVAL="0.2s")
    worker(cluster, router, "alpha", hf, "--model", "Tiny-Alpha")
    worker(cluster, router, "beta", hf, "--model", "Tiny-Beta")
    router.wait_workers(2, timeout=180)
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=router.keys.api_key, max_retries=0)

    # each rule routes as written; the response names the model that served
    model, routed, reason = ask(client, "a quick one")
    assert model == routed == "Tiny-Beta" and reason.startswith("rule 1")
    model, routed, reason = ask(client, "look it up", tools=[TOOL])
    assert model == routed == "Tiny-Alpha" and "rule 2" in reason
    model, routed, reason = ask(client, "Prove it.", model="gpt-4o")  # an alias of auto
    assert model == routed == "Tiny-Alpha" and "rule 3" in reason
    model, routed, reason = ask(client, "hello")
    assert model == routed == "Tiny-Beta" and "default" in reason

    # constraints: too long for Tiny-Beta's 256 tokens goes to Tiny-Alpha, whatever rule 1 says
    model, routed, reason = ask(client, "quick " + "word " * 300)
    assert model == routed == "Tiny-Alpha" and "excludes Tiny-Beta" in reason
    # an image, and no model that can see: a 400 in the caller's API shape
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="auto", max_tokens=4, messages=[{"role": "user", "content": [{"type": "text", "text": "?"}, image]}]
        )
    assert "images" in str(caught.value)

    listed = {m.id: m.model_extra for m in client.models.list()}
    assert listed["auto"]["auto"] is True and listed["Tiny-Beta"]["auxot"]["context_length"] == 256  # type: ignore[index]
    # profiles from the jobs each model served (Tiny-Beta: rule 1 and the default; Tiny-Alpha: three)
    assert listed["Tiny-Beta"]["auxot"]["measured_jobs"] == 2  # type: ignore[index]
    assert listed["Tiny-Alpha"]["auxot"]["measured_jobs"] == 3  # type: ignore[index]

    # classify: the tiny (random) model as the classifier still answers a valid name
    models_file = Path(router.env["AUXOT_MODELS_FILE"])
    models_file.write_text(MODELS + CLASSIFY.format(timeout=5000))
    os.utime(models_file, (1, 1))  # a new mtime, even within the same second

    def classified() -> bool:
        return "classifier" in ask(client, "hello")[2]

    wait_for(classified, 20, "the classify policy after the reload")
    for text in ("what is two plus two", "write a poem", "hello there"):
        model, routed, reason = ask(client, text)
        assert model == routed and routed in ("Tiny-Alpha", "Tiny-Beta")
        assert reason == "classifier Tiny-Beta chose it"
    lines = [orjson.loads(line) for line in router.log().splitlines() if line.startswith("{")]
    latencies = [line["ms"] for line in lines if line.get("msg") == "auto route" and "classifier" in line["reason"]]
    print(f"classify latency with the tiny model (ms): {latencies}")

    # a classifier past its timeout: the rules decide (here the default)
    models_file.write_text(MODELS + CLASSIFY.format(timeout=1))
    os.utime(models_file, (2, 2))
    wait_for(lambda: "timed out" in ask(client, "hello")[2], 20, "the short timeout after the reload")
    model, routed, reason = ask(client, "hello")
    assert model == routed == "Tiny-Alpha"
    assert reason.startswith("classifier timed out after 1 ms") and "default" in reason
    assert http.get(f"{router.url}/health").status == 200


SIGNED = """
[[models]]
name = "Tiny-Alpha"
default = true

[auto]
default = "Tiny-Alpha"
signature = {on}
"""


def test_the_signature_line_is_off_by_default_and_on_when_configured(fake_cluster: Cluster, tmp_path: Path) -> None:
    """``[auto] signature = true``: local answers chosen by ``auto`` end with the line naming the
    model, whole and streamed, on both APIs; off (the default), the text is the model's own."""
    router = models_router(fake_cluster, tmp_path, SIGNED.format(on="true"))
    fake_cluster.worker(router)
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=router.keys.api_key, max_retries=0)
    claude = anthropic.Anthropic(base_url=router.url, api_key=router.keys.api_key, max_retries=0)
    prompt = "FAKE:echo say it back"  # the fake llama-server answers with the prompt itself
    line = "\n\n— answered by Tiny-Alpha (auto)"

    def whole(model: str = "auto") -> str:
        messages = [{"role": "user", "content": prompt}]
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=64)  # type: ignore[arg-type]
        return reply.choices[0].message.content or ""

    def streamed() -> str:
        messages = [{"role": "user", "content": prompt}]
        chunks = client.chat.completions.create(model="auto", messages=messages, max_tokens=64, stream=True)  # type: ignore[arg-type]
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # type: ignore[union-attr]

    def anthropic_text() -> str:
        with claude.messages.stream(model="auto", max_tokens=64, messages=[{"role": "user", "content": prompt}]) as s:
            return "".join(s.text_stream)

    assert whole() == prompt + line
    assert streamed() == prompt + line
    assert anthropic_text() == prompt + line
    assert whole("Tiny-Alpha") == prompt  # asked for by name: not auto's choice, no line

    models_file = Path(router.env["AUXOT_MODELS_FILE"])
    models_file.write_text(SIGNED.replace("signature = {on}\n", ""))  # off by default
    os.utime(models_file, (1, 1))
    wait_for(lambda: whole() == prompt, 20, "the signature off after the reload")
    assert streamed() == prompt and anthropic_text() == prompt
