"""Several models on one router, end to end: real router and worker processes, the real
llama-server, and three tiny GGUFs (different seeds) that workers download from a local fake
Hugging Face, so a worker the router moves really loads another model."""

from __future__ import annotations

import base64
import concurrent.futures
import math
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import orjson
import pytest

from tests.conftest import Cluster
from tests.fake_hf import FakeHF
from tests.support import http
from tests.support.procs import RouterProcess, WorkerProcess
from tests.support.reliability import llama_get, wait_for
from tests.support.tiny_model import N_EMBD, make_tiny_model
from tests.test_e2e_provisioning import ThreadedHF

PROMPT = [{"role": "user", "content": "Say something."}]
MODELS = {"Tiny-Alpha": 1, "Tiny-Beta": 2, "Tiny-Embed": 3}  # model name -> seed of its GGUF


def repo(name: str) -> str:
    return f"tiny-org/{name}-GGUF"


def file_name(name: str) -> str:
    return f"{name.lower()}-Q8_0.gguf"


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHF]:
    directory = tmp_path_factory.mktemp("models")
    with ThreadedHF() as fake:
        for name, seed in MODELS.items():
            data = make_tiny_model(directory / f"{name}.gguf", seed=seed).read_bytes()
            fake.add_file(repo(name), file_name(name), data)
        yield fake


def registry_entry(name: str, seed: int) -> dict[str, object]:
    return {
        "id": f"{name.lower()}-q8-0", "model_name": name, "huggingface_id": repo(name), "quantization": "Q8_0",
        "family": "Dense", "parameters": "1B", "default_context_size": 1024, "max_context_size": 4096,
        "vram_requirements_gb": 1.0 + seed, "capabilities": ["chat"], "file_name": file_name(name),
    }  # fmt: skip


def registry_file(tmp_path: Path) -> Path:
    path = tmp_path / "registry.json"
    models = [registry_entry(name, seed) for name, seed in MODELS.items()]
    path.write_bytes(orjson.dumps({"version": "test", "models": models}))
    return path


def models_router(cluster: Cluster, tmp_path: Path, toml: str, **settings: str) -> RouterProcess:
    models_file = tmp_path / "models.toml"
    models_file.write_text(toml)
    return cluster.router(
        AUXOT_REGISTRY_FILE=str(registry_file(tmp_path)), AUXOT_MODELS_FILE=str(models_file), **settings
    )


def worker(cluster: Cluster, router: RouterProcess, name: str, hf: FakeHF, *flags: str) -> WorkerProcess:
    """A worker that downloads its model from the fake Hugging Face (own cache)."""
    process = WorkerProcess(
        router,
        cluster.log_dir,
        model=None,
        llama=cluster.llama,
        name=name,
        flags=list(flags),
        HF_ENDPOINT=hf.base_url,
        AUXOT_MODELS_DIR=str(cluster.log_dir / f"{name}-models"),
        AUXOT_RECONNECT_DELAY="0.2s",
    )
    cluster.processes.append(process)
    process.start()
    return process


def served_tasks(process: WorkerProcess) -> int:
    """Tokens its own llama-server generated so far (``llamacpp:tokens_predicted_total`` of its
    ``/metrics``)."""
    for pid in process.llama_children():
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--port" in args:
            port = int(args[args.index(b"--port") + 1])
            # the worker gives llama-server its key in the environment (LLAMA_API_KEY), never in argv
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            key = next(e.split(b"=", 1)[1] for e in environ if e.startswith(b"LLAMA_API_KEY=")).decode()
            text = http.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {key}"}).body
            for line in text.decode().splitlines():
                if line.startswith("llamacpp:tokens_predicted_total"):
                    return int(float(line.split()[-1]))
    raise RuntimeError(f"{process.log_path.name} has no llama-server")


def backend_model_file(process: WorkerProcess) -> str:
    """The GGUF its llama-server was started with (its own command line)."""
    for pid in process.llama_children():
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"--model" in args:
            return Path(args[args.index(b"--model") + 1].decode()).name
    return ""


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def served_by(router: RouterProcess, name: str) -> list[dict[str, object]]:
    return [w for w in router.health()["worker_list"] if w["served_model"] == name]


def chat(router: RouterProcess, model: str, max_tokens: int = 4) -> http.Response:
    body = {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0}
    return http.post(f"{router.url}/v1/chat/completions", body, headers=router.headers(), timeout=120)


ROUTING = """
[[models]]
name = "Tiny-Alpha"
aliases = ["claude-*sonnet*"]
ctx_size = 1024
default = true

[[models]]
name = "tiny-beta-q8-0"
aliases = ["claude-*haiku*", "fast"]
ctx_size = 512
"""


def test_requests_reach_the_model_they_name(cluster: Cluster, tmp_path: Path, hf: FakeHF) -> None:
    """Names, ids, aliases (globs) and unknown names (the default) each land on the worker of the
    right model: the served model is in the response, and only that worker's llama-server counts
    the generated tokens."""
    router = models_router(cluster, tmp_path, ROUTING)
    alpha = worker(cluster, router, "alpha", hf, "--model", "tiny-alpha")
    beta = worker(cluster, router, "beta", hf, "--model", "FAST")  # an alias works for --model too
    router.wait_workers(2, timeout=120)
    assert [w["id"] for w in served_by(router, "Tiny-Alpha")] and [w["id"] for w in served_by(router, "Tiny-Beta")]
    assert backend_model_file(alpha) == file_name("Tiny-Alpha") and backend_model_file(beta) == file_name("Tiny-Beta")

    openai_client = openai.OpenAI(base_url=f"{router.url}/v1", api_key=router.keys.api_key, max_retries=0)
    anthropic_client = anthropic.Anthropic(base_url=router.url, api_key=router.keys.api_key, max_retries=0)
    cases = [
        ("Tiny-Alpha", "Tiny-Alpha"),
        ("TINY-BETA", "Tiny-Beta"),
        ("tiny-beta-q8-0", "Tiny-Beta"),
        ("claude-sonnet-4-20250514", "Tiny-Alpha"),
        ("claude-3-5-haiku-latest", "Tiny-Beta"),
        ("some-model-nobody-configured", "Tiny-Alpha"),  # the default catches unknown names
    ]
    answers: dict[str, set[str]] = {"Tiny-Alpha": set(), "Tiny-Beta": set()}
    for requested, expected in cases:
        before = {"Tiny-Alpha": served_tasks(alpha), "Tiny-Beta": served_tasks(beta)}
        if requested.startswith("claude"):
            message = anthropic_client.messages.create(model=requested, max_tokens=4, messages=PROMPT)  # type: ignore[arg-type]
            served, text = message.model, "".join(b.text for b in message.content if b.type == "text")
        else:
            result = openai_client.chat.completions.create(
                model=requested,
                messages=PROMPT,
                max_tokens=4,
                temperature=0,  # type: ignore[arg-type]
            )
            served, text = result.model, result.choices[0].message.content or ""
        assert served == expected, requested
        after = {"Tiny-Alpha": served_tasks(alpha), "Tiny-Beta": served_tasks(beta)}
        other = "Tiny-Beta" if expected == "Tiny-Alpha" else "Tiny-Alpha"
        assert after[expected] == before[expected] + 4, requested
        assert after[other] == before[other], requested
        answers[expected].add(text)
    assert answers["Tiny-Alpha"].isdisjoint(answers["Tiny-Beta"])  # two different models answered

    listed = {m.id: m for m in openai_client.models.list()}
    assert list(listed) == ["Tiny-Alpha", "Tiny-Beta"]  # the default first
    extra = dict(listed["Tiny-Beta"].model_extra or {})
    assert extra.pop("auxot")["measured_jobs"] == 3  # issue 15: profiles from the jobs it served
    assert extra == {
        "context_length": 512, "aliases": ["claude-*haiku*", "fast"], "default": False, "serving": True,
    }  # fmt: skip
    assert [m.id for m in anthropic_client.models.list()] == ["Tiny-Alpha", "Tiny-Beta"]
    assert anthropic_client.models.retrieve("claude-3-haiku").id == "Tiny-Beta"
    assert openai_client.models.retrieve("fast").id == "Tiny-Beta"
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("some-model-nobody-configured")  # listing never uses the default

    health = router.health()
    assert health["models"]["Tiny-Beta"]["workers"] == 1 and health["models"]["Tiny-Beta"]["jobs_completed"] == 3
    assert health["models"]["Tiny-Alpha"]["jobs_completed"] == 3
    assert health["models"]["Tiny-Beta"]["output_tokens"] == 12


def test_without_a_default_unknown_models_are_404_in_each_apis_shape(
    cluster: Cluster, tmp_path: Path, hf: FakeHF
) -> None:
    router = models_router(cluster, tmp_path, ROUTING.replace("default = true", ""))
    resp = chat(router, "gpt-5")
    assert resp.status == 404
    assert resp.json()["error"]["code"] == "model_not_found" and resp.json()["error"]["param"] == "model"
    headers = {"x-api-key": router.keys.api_key, "anthropic-version": "2023-06-01", "content-type": "application/json"}
    body = {"model": "gpt-5", "max_tokens": 4, "messages": PROMPT}
    resp = http.post(f"{router.url}/v1/messages", body, headers=headers)
    assert resp.status == 404 and resp.json()["error"]["type"] == "not_found_error"
    assert "Tiny-Alpha" in resp.json()["error"]["message"]


DEMAND = """
[[models]]
name = "Tiny-Alpha"
ctx_size = 512

[[models]]
name = "Tiny-Beta"
ctx_size = 512
"""


def test_workers_go_where_demand_is_and_move_when_it_shifts(cluster: Cluster, tmp_path: Path, hf: FakeHF) -> None:
    """A worker without --model joins the model whose requests are waiting; when only another
    model's requests wait, the router moves it there: it downloads that model, restarts its
    llama-server with it, and serves it."""
    router = models_router(
        cluster,
        tmp_path,
        DEMAND,
        AUXOT_MOVE_COOLDOWN="1s",
        AUXOT_DEMAND_PERSIST="1s",
        AUXOT_BALANCE_INTERVAL="0.2s",
    )
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        waiting = [pool.submit(chat, router, "Tiny-Beta") for _ in range(2)]
        wait_for(lambda: router.health()["models"]["Tiny-Beta"]["queue_depth"] == 2, 10, "two waiting jobs")
        roaming = worker(cluster, router, "roaming", hf)  # asks for no model
        router.wait_workers(1, timeout=120)
        assert [r.result(timeout=120).json()["model"] for r in waiting] == ["Tiny-Beta", "Tiny-Beta"]
        assert served_by(router, "Tiny-Beta") and backend_model_file(roaming) == file_name("Tiny-Beta")

        waiting = [pool.submit(chat, router, "Tiny-Alpha") for _ in range(2)]
        replies = [r.result(timeout=180) for r in waiting]
    assert [r.status for r in replies] == [200, 200], replies[0].body
    assert [r.json()["model"] for r in replies] == ["Tiny-Alpha", "Tiny-Alpha"]
    assert backend_model_file(roaming) == file_name("Tiny-Alpha")  # its llama-server runs the other GGUF now
    assert served_by(router, "Tiny-Alpha") and not served_by(router, "Tiny-Beta")
    assert "moving a worker to a model with waiting jobs" in router.log()
    moved = router.log().count("moving a worker")
    time.sleep(1.5)  # nothing waits now: the worker stays where it is
    assert router.log().count("moving a worker") == moved


EMBED = """
[[models]]
name = "Tiny-Alpha"
default = true

[[models]]
name = "Tiny-Embed"
aliases = ["text-embedding-*"]
embedding = true
pooling = "mean"
"""


def test_embeddings_through_the_openai_sdk_and_raw_http(cluster: Cluster, tmp_path: Path, hf: FakeHF) -> None:
    """llama-server runs the embedding model with --embeddings: vectors of the model's width,
    one per input in input order, float and base64 (the OpenAI SDK's default) alike, and usage.
    The Anthropic SDK has no embeddings API, so only the OpenAI SDK and raw HTTP are used."""
    router = models_router(cluster, tmp_path, EMBED)
    embedder = worker(cluster, router, "embedder", hf, "--model", "Tiny-Embed")
    router.wait_workers(1, timeout=120)
    command = Path(f"/proc/{embedder.llama_children()[0]}/cmdline").read_bytes().split(b"\0")
    assert b"--embeddings" in command and command[command.index(b"--pooling") + 1] == b"mean"

    client = openai.OpenAI(base_url=f"{router.url}/api/openai/v1", api_key=router.keys.api_key, max_retries=0)
    texts = ["the router", "a worker drives one local model server", "tokens stream back"]
    batch = client.embeddings.create(model="text-embedding-3-small", input=texts)  # base64 on the wire
    assert batch.model == "Tiny-Embed"
    assert [d.index for d in batch.data] == [0, 1, 2]
    assert all(len(d.embedding) == N_EMBD for d in batch.data)
    assert batch.usage.prompt_tokens > 0 and batch.usage.total_tokens == batch.usage.prompt_tokens
    # order kept: each vector of the batch is nearest to the same text embedded alone (llama-server's
    # batched and single computations differ in the last digits, so compare by cosine similarity)
    singles = [
        client.embeddings.create(model="Tiny-Embed", input=text, encoding_format="float").data[0].embedding
        for text in texts
    ]
    for i, item in enumerate(batch.data):
        similarity = [cosine(item.embedding, single) for single in singles]
        assert max(similarity) == similarity[i] > 0.99, similarity

    raw = {
        encoding: http.post(
            f"{router.url}/v1/embeddings",
            {"model": "Tiny-Embed", "input": texts[:2], "encoding_format": encoding},
            headers=router.headers(),
        ).json()
        for encoding in ("base64", "float")
    }
    vector = struct.unpack(f"<{N_EMBD}f", base64.b64decode(raw["base64"]["data"][1]["embedding"]))
    assert list(vector) == pytest.approx(raw["float"]["data"][1]["embedding"], abs=1e-6)
    assert raw["float"]["usage"]["prompt_tokens"] > 0 and raw["float"]["object"] == "list"
    own = llama_get(embedder, "/props")  # its own server says it runs the embedding model
    assert Path(own["model_path"]).name == file_name("Tiny-Embed")

    wrong = http.post(f"{router.url}/v1/embeddings", {"model": "Tiny-Alpha", "input": "x"}, headers=router.headers())
    assert wrong.status == 400 and "not an embedding model" in wrong.json()["error"]["message"]
    wrong = chat(router, "Tiny-Embed")
    assert wrong.status == 400 and "/v1/embeddings" in wrong.json()["error"]["message"]


def test_saving_the_models_file_applies_it_and_a_bad_one_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    """The router notices a changed models file (as it would a SIGHUP): a new model is listed
    and served at once; an invalid file changes nothing and is logged."""
    alpha_only = '[[models]]\nname = "Tiny-Alpha"\n'
    router = models_router(cluster, tmp_path, alpha_only, AUXOT_BALANCE_INTERVAL="0.1s")

    def models() -> list[str]:
        return [m["id"] for m in http.get(f"{router.url}/v1/models", headers=router.headers()).json()["data"]]

    assert models() == ["Tiny-Alpha"]
    (tmp_path / "models.toml").write_text(DEMAND)
    wait_for(lambda: models() == ["Tiny-Alpha", "Tiny-Beta"], 10, "the new model to be listed")
    assert router.health()["models"]["Tiny-Beta"]["workers"] == 0
    (tmp_path / "models.toml").write_text(DEMAND + '\n[[models]]\nname = "Tiny-Gamma"\n')
    wait_for(lambda: "reload refused" in router.log(), 10, "the invalid file to be refused")
    assert "Tiny-Gamma" in router.log() and models() == ["Tiny-Alpha", "Tiny-Beta"]
