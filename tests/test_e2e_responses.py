"""End to end, the OpenAI Responses API (what the Codex CLI speaks).

Real router and worker processes with the real llama-server and the tiny model: every Codex
capture replayed and read with the official ``openai`` SDK's Responses streaming helpers; the
SDK's ``client.responses.create`` (streaming and not, a function tool, ``previous_response_id``,
stored responses); and the real Codex CLI (npm ``@openai/codex``, pinned in
``scripts/install_codex.sh``) in ``codex exec`` mode against the router.
"""

from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from tests.conftest import Cluster
from tests.support import http
from tests.support.procs import REPO, RouterProcess
from tests.support.tiny_model import make_tiny_model

CAPTURES = REPO / "tests" / "data" / "client-captures"
CODEX_CAPTURES = sorted(CAPTURES.glob("codex-0.169.0-*.json"))
LONG_CONTEXT = "--override-kv llama.context_length=int:65536"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def client(router: RouterProcess, base: str = "/api/openai/v1") -> Any:
    return openai.OpenAI(base_url=f"{router.url}{base}", api_key=router.keys.api_key, max_retries=0, timeout=300)


def sdk_stream(sdk: Any, body: dict[str, Any]) -> tuple[list[Any], Any]:
    """A captured body through ``client.responses.stream``: its events and final response."""
    rest = copy.deepcopy(body)
    rest.pop("stream", None)
    model, items = rest.pop("model"), rest.pop("input")
    with sdk.responses.stream(model=model, input=items, extra_body=rest) as stream:
        events = list(stream)
        final = stream.get_final_response()
    return events, final


def check_events(events: list[Any]) -> None:
    """Sequence numbers count from 0; every output item is added, then done, in order."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == done == list(range(len(added))) and added


def tool_names(body: dict[str, Any]) -> set[tuple[str | None, str]]:
    """(namespace, name) of every function and custom tool a request offers."""
    names: set[tuple[str | None, str]] = set()
    tools = list(body.get("tools") or [])
    for item in body["input"]:
        if item.get("type") == "additional_tools":
            tools += item["tools"]
    for tool in tools:
        if tool["type"] == "namespace":
            names |= {(tool["name"], t["name"]) for t in tool["tools"]}
        elif tool["type"] in ("function", "custom"):
            names.add((None, tool["name"]))
    return names


def test_codex_captures_replay_against_llama_server(cluster: Cluster) -> None:
    """Every request Codex 0.169.0 sent in the captures, on the path it used, streamed by the real
    llama-server and parsed by the SDK; the WebSocket attempt is refused at once with a 426."""
    router = cluster.router(AUXOT_CTX_SIZE="65536", AUXOT_MAX_PARALLEL="1")  # up to ~42,000 tokens
    cluster.worker(router, AUXOT_LLAMA_ARGS=LONG_CONTEXT)
    replayed = 0
    for path in CODEX_CAPTURES:
        for request in orjson.loads(path.read_bytes())["requests"]:
            if request["method"] == "GET":  # the WebSocket upgrade, sent without a key
                headers = {k: v for k, v in request["headers"].items() if k not in ("host", "authorization")}
                resp = http.get(f"{router.url}{request['path']}", headers=headers, timeout=10)
                assert resp.status == 426, path.name
                assert orjson.loads(resp.body)["error"]["code"] == "websocket_unsupported"
                continue
            base = request["path"].removesuffix("/responses")
            events, final = sdk_stream(client(router, base), request["body"])
            check_events(events)
            assert final.status == "completed", path.name
            calls = [o for o in final.output if o.type in ("function_call", "custom_tool_call")]
            assert calls, f"{path.name}: the tiny model calls a tool whenever tools are offered"
            for call in calls:
                assert (getattr(call, "namespace", None), call.name) in tool_names(request["body"]), path.name
                if call.type == "function_call":
                    assert isinstance(orjson.loads(call.arguments), dict)
            assert final.usage.input_tokens > 5000
            replayed += 1
    assert replayed == 8  # 7 files, 8 POSTs


def test_sdk_responses_tools_state_and_storage(cluster: Cluster) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="4096")
    cluster.worker(router)
    sdk = client(router)
    first = sdk.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER_TOOL])
    assert first.status == "completed" and first.id.startswith("resp_")
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "get_weather"
    assert "city" in orjson.loads(call.arguments)
    assert first.usage.input_tokens > 0 and first.usage.output_tokens > 0

    # The stored conversation continues on another turn: the call and its output are in the prompt.
    second = sdk.responses.create(
        model="tiny",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER_TOOL],
    )
    assert second.status == "completed" and second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + 10

    fetched = sdk.responses.retrieve(first.id)
    assert fetched.id == first.id and fetched.output[-1].call_id == call.call_id
    sdk.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.responses.create(model="tiny", previous_response_id=first.id, input="again")
    assert missing.value.code == "previous_response_not_found"

    # store: false is not kept
    unstored = sdk.responses.create(model="tiny", input="hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(unstored.id)


def test_sdk_responses_streaming(cluster: Cluster) -> None:
    router = cluster.router(AUXOT_CTX_SIZE="4096")
    cluster.worker(router)
    sdk = client(router)
    with sdk.responses.stream(model="tiny", input="Weather in Paris?", tools=[WEATHER_TOOL]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    check_events(events)
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds.index("response.function_call_arguments.done") < kinds.index("response.output_item.done")
    call = final.output[-1]
    assert call.type == "function_call" and "city" in orjson.loads(call.arguments)
    assert final.usage.output_tokens > 0
    assert sdk.responses.retrieve(final.id).output[-1].call_id == call.call_id  # stored

    # Text until max_output_tokens: response.incomplete with the reason, text deltas before it.
    raw = list(sdk.responses.create(model="tiny", input="Tell me a story", max_output_tokens=6, stream=True))
    assert [e.sequence_number for e in raw] == list(range(len(raw)))
    assert raw[-1].type == "response.incomplete"
    assert raw[-1].response.incomplete_details.reason == "max_output_tokens"
    text = "".join(e.delta for e in raw if e.type == "response.output_text.delta")
    assert text and raw[-1].response.output[0].content[0].text == text
    assert raw[-1].response.usage.output_tokens == 6


def test_responses_errors(cluster: Cluster) -> None:
    """A prompt over the context is context_length_exceeded (Codex reads that code)."""
    router = cluster.router(AUXOT_CTX_SIZE="1024")
    cluster.worker(router)
    sdk = client(router)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as exc:
            sdk.responses.create(model="tiny", input="word " * 3000, stream=stream)
        assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        sdk.responses.create(model="tiny", input=[{"type": "message", "role": "user", "content": 5}], tools="x")


# --- the real Codex CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def codex_binary() -> Path:
    out = subprocess.run([str(REPO / "scripts" / "install_codex.sh")], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def run_codex(codex: Path, router: RouterProcess, tmp_path: Path, prompt: str) -> subprocess.CompletedProcess[str]:
    """``codex exec`` with its own CODEX_HOME and a custom provider pointing at the router."""
    home = tmp_path / "home"
    codex_home = home / ".codex"
    work = tmp_path / "work"
    codex_home.mkdir(parents=True)
    work.mkdir()
    (work / "notes.txt").write_text("hello\n")
    (codex_home / "config.toml").write_text(
        f"""model = "tiny"
model_provider = "auxot"
check_for_update_on_startup = false

[model_providers.auxot]
name = "Auxot"
base_url = "{router.url}/api/openai/v1"
wire_api = "responses"
env_key = "AUXOT_TEST_API_KEY"
stream_max_retries = 0
request_max_retries = 0
"""
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "CODEX_HOME": str(codex_home),
        "AUXOT_TEST_API_KEY": router.keys.api_key,
        "NO_COLOR": "1",
    }
    return subprocess.run(
        [str(codex), "exec", "--skip-git-repo-check", "-s", "read-only", prompt],
        check=False,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        stdin=subprocess.DEVNULL,
    )


def codex_requests(router: RouterProcess) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in router.log().splitlines() if line.startswith("{")]
    return [entry for entry in lines if entry.get("msg") == "job accepted" and entry.get("kind") == "responses"]


def test_codex_cli_text_answer(cluster: Cluster, codex_binary: Path, tmp_path: Path) -> None:
    """Codex with a model that answers in text and stops: exit 0 and the answer on stdout."""
    cluster.model = make_tiny_model(tmp_path / "text.gguf", behaviour="text")
    router = cluster.router(AUXOT_CTX_SIZE="40960", AUXOT_MAX_PARALLEL="1")
    cluster.worker(router, AUXOT_LLAMA_ARGS=LONG_CONTEXT)
    result = run_codex(codex_binary, router, tmp_path, "Say hello")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "the", result.stderr[-4000:]
    assert len(codex_requests(router)) == 1
    assert "Reconnecting" not in result.stderr


def test_codex_cli_runs_a_tool_and_answers(cluster: Cluster, codex_binary: Path, tmp_path: Path) -> None:
    """Codex with a model that calls a tool once, then answers after the tool result: Codex runs
    the tool, sends its output back, and the run ends without an API error."""
    cluster.model = make_tiny_model(tmp_path / "tool-once.gguf", behaviour="tool-once")
    router = cluster.router(AUXOT_CTX_SIZE="40960", AUXOT_MAX_PARALLEL="1")
    cluster.worker(router, AUXOT_LLAMA_ARGS=LONG_CONTEXT)
    result = run_codex(codex_binary, router, tmp_path, "List the files in this directory")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip() == "the", result.stderr[-4000:]
    # Codex's own session record: the call it ran and the output it sent back. (The tiny model
    # picks a tool at random; a tool that refuses, such as request_user_input outside plan mode,
    # still answers with an output.)
    items = rollout_items(tmp_path / "home" / ".codex")
    calls = {i["call_id"]: i for i in items if i.get("type") in ("function_call", "custom_tool_call")}
    outputs = [i for i in items if i.get("type") in ("function_call_output", "custom_tool_call_output")]
    assert calls and {o["call_id"] for o in outputs} >= set(calls), items
    assert len(codex_requests(router)) >= 2  # the call, then the answer after its output
    for failure in ("stream disconnected", "unexpected status", "Reconnecting", "stream error"):
        assert failure not in result.stderr, result.stderr[-4000:]


def rollout_items(codex_home: Path) -> list[dict[str, Any]]:
    """Response items of the sessions Codex recorded under CODEX_HOME/sessions."""
    items: list[dict[str, Any]] = []
    for path in sorted(codex_home.glob("sessions/**/*.jsonl")):
        for line in path.read_text().splitlines():
            entry = orjson.loads(line)
            if entry.get("type") == "response_item" and isinstance(entry.get("payload"), dict):
                items.append(entry["payload"])
    return items


@pytest.mark.parametrize("api", ["openai", "anthropic", "responses"])
async def test_the_benchmark_load_generator_counts_every_token_of_each_api(fake_cluster: Cluster, api: str) -> None:
    """bench/loadgen.py's figures for the three APIs through router + worker: every token once
    (the Responses stream repeats the whole text in its closing events), every stream ended well."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import loadgen
    finally:
        sys.path.remove(str(REPO / "bench"))
    router = fake_cluster.router()
    fake_cluster.worker(router)
    summary = await loadgen.run_load(router.url, router.keys.api_key, 2, requests_per_stream=3, max_tokens=7, api=api)
    assert summary["errors"] == 0, summary["error_samples"]
    assert summary["tokens"] == 2 * 3 * 7 and summary["short"] == 0
    assert summary["ttft_ms"]["p50"] is not None
